"""Ollama's model-management endpoints: tags, show, pull, push, create, copy, delete, blobs.

They touch only the model store, never the scheduler (shared/reference/ollama.md §3.5-3.8).
Push goes to an emulated registry that accepts everything: the statuses of a real push, with
each layer reported as already uploaded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proxy.emulator.catalogue import is_valid, normalize
from proxy.emulator.common import (
    STATE,
    details,
    empty_response,
    json_response,
    stream_statuses,
)
from proxy.emulator.goformat import go_quote, rfc3339
from proxy.emulator.gojson import decode, get_str
from proxy.emulator.schemas import COPY, CREATE, DELETE, PULL, PUSH, SHOW
from proxy.emulator.store import StoredModel
from proxy.errors import BadRequest, EmulatorError, ModelNotFound

__all__ = ["routes"]

_BLOB = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
_SIZE = re.compile(r"^([\d.]+)\s*([KMBT]?)$", re.IGNORECASE)


async def tags(request: web.Request) -> web.Response:
    models = [
        {
            "name": m.name,
            "model": m.name,
            "modified_at": rfc3339(m.modified_at),
            "size": m.size,
            "digest": m.digest,
            "details": details(m.spec),
        }
        for m in request.app[STATE].store.list()
    ]
    return json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    store = request.app[STATE].store
    body = decode(await request.read(), SHOW)
    name = get_str(body, "model", "name")
    if not name:
        raise BadRequest("model is required")
    if not is_valid(name):
        raise BadRequest("invalid model name")
    stored = store.get(name)
    if stored is None:
        raise ModelNotFound(f"model '{normalize(name)}' not found")
    spec = stored.spec
    template = stored.template or "{{ .Prompt }}"
    parameters = "" if spec.embedding else 'stop                           "<|eot_id|>"'
    out: dict[str, Any] = {
        "license": f"{spec.family} license (emulated)",
        "modelfile": _modelfile(stored, template, parameters),
        "parameters": parameters,
        "template": template,
        "system": stored.system,
        "details": details(spec),
        "model_info": _model_info(stored),
        "capabilities": list(spec.capabilities),
        "modified_at": rfc3339(stored.modified_at),
    }
    return json_response({key: value for key, value in out.items() if value != ""})


async def pull(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = decode(await request.read(), PULL)
    name = get_str(body, "model", "name")
    if not is_valid(name):
        raise BadRequest("invalid model name")
    lines = state.store.pull(name, clock=state.engine.clock)
    return await stream_statuses(request, lines, stream=body.get("stream", True))


async def push(request: web.Request) -> web.StreamResponse:
    body = decode(await request.read(), PUSH)
    name = get_str(body, "model", "name")
    if not name:
        raise BadRequest("model is required")
    if not is_valid(name):
        raise BadRequest("invalid model name")
    stored = request.app[STATE].store.get(name)
    return await stream_statuses(request, _push(stored), stream=body.get("stream", True))


async def _push(stored: StoredModel | None) -> AsyncIterator[dict[str, Any]]:
    yield {"status": "retrieving manifest"}
    if stored is None:
        raise EmulatorError("file does not exist")
    for layer in (*stored.layers, stored.config):
        yield {
            "status": f"pushing {layer.digest.removeprefix('sha256:')[:12]}",
            "digest": layer.digest,
            "total": layer.size,
            "completed": layer.size,
        }
    yield {"status": "pushing manifest"}
    yield {"status": "success"}


async def create(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = decode(await request.read(), CREATE)
    name = get_str(body, "model", "name")
    if not is_valid(name):
        raise BadRequest("invalid model name")
    source = body.get("from", "")
    if not source:
        if body.get("files"):
            raise BadRequest('the emulator creates models only "from" an existing model')
        raise BadRequest("neither 'from' or 'files' was specified")
    lines = state.store.create(
        name,
        source,
        system=body.get("system"),
        template=body.get("template"),
        clock=state.engine.clock,
    )
    return await stream_statuses(request, lines, stream=body.get("stream", True))


async def copy(request: web.Request) -> web.Response:
    body = decode(await request.read(), COPY)
    source, destination = body.get("source", ""), body.get("destination", "")
    if not is_valid(source):
        raise BadRequest(f"source {go_quote(source)} is invalid")
    if not is_valid(destination):
        raise BadRequest(f"destination {go_quote(destination)} is invalid")
    if not request.app[STATE].store.copy(source, destination):
        raise ModelNotFound(f"model {go_quote(source)} not found")
    return empty_response()


async def delete(request: web.Request) -> web.Response:
    body = decode(await request.read(), DELETE)
    name = get_str(body, "model", "name")
    if not name:
        raise BadRequest("model is required")
    if not is_valid(name):
        raise BadRequest(f"name {go_quote(name)} is invalid")
    if not request.app[STATE].store.delete(name):
        raise ModelNotFound(f"model '{name}' not found")
    return empty_response()


async def head_blob(request: web.Request) -> web.Response:
    param = request.match_info["digest"]
    match = _BLOB.match(param)
    if match is None:
        raise BadRequest("invalid digest format")
    if not request.app[STATE].store.has_blob(f"sha256:{match.group(1).lower()}"):
        raise EmulatorError(f"blob {go_quote(param)} not found", status=404)
    return empty_response()


async def post_blob(request: web.Request) -> web.Response:
    store = request.app[STATE].store
    param = request.match_info["digest"]
    match = _BLOB.match(param)
    if match is None:
        raise BadRequest("invalid digest format")
    digest = f"sha256:{match.group(1).lower()}"
    if store.has_blob(digest):
        return empty_response(200)
    data = await request.read()
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != param:
        raise BadRequest(f"digest mismatch, expected {go_quote(param)}, got {go_quote(actual)}")
    store.put_blob(digest, data)
    return empty_response(201)


def _modelfile(stored: StoredModel, template: str, parameters: str) -> str:
    model_layer = next(
        (layer for layer in stored.layers if layer.media_type.endswith(".model")), stored.config
    )
    blob = model_layer.digest.replace(":", "-")
    lines = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {stored.name}",
        "",
        f"FROM /root/.ollama/models/blobs/{blob}",
        f'TEMPLATE """{template}"""',
    ]
    if stored.system:
        lines.append(f'SYSTEM """{stored.system}"""')
    if parameters:
        lines.append(f"PARAMETER {parameters}")
    lines.append(f'LICENSE """{stored.spec.family} license (emulated)"""')
    return "\n".join(lines) + "\n"


def _model_info(stored: StoredModel) -> dict[str, Any]:
    spec = stored.spec
    arch = spec.family.replace("-", "_")
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.file_type": 15,
        "general.parameter_count": _parameter_count(spec.parameters),
        "general.quantization_version": 2,
        f"{arch}.context_length": spec.context_length,
        f"{arch}.embedding_length": spec.embedding_length,
    }
    return dict(sorted(info.items()))  # Go writes map keys sorted


def _parameter_count(text: str) -> int:
    match = _SIZE.match(text.strip())
    if match is None:
        return 0
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/tags", tags, allow_head=False),
        web.head("/api/tags", tags),
        web.post("/api/show", show),
        web.post("/api/pull", pull),
        web.post("/api/push", push),
        web.post("/api/create", create),
        web.post("/api/copy", copy),
        web.delete("/api/delete", delete),
        web.head("/api/blobs/{digest}", head_blob),
        web.post("/api/blobs/{digest}", post_blob),
    ]
