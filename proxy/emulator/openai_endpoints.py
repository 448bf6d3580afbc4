"""Ollama's OpenAI-compatible endpoints (/v1): chat and text completions, embeddings, models.

Translated onto the same engine and checks as the native API (shared/reference/ollama.md §4):
``max_tokens`` is ``num_predict``, there is no ``keep_alive`` or ``num_ctx``, ``stream`` defaults
to false, and streams have HEAD's (>= v0.32.6) shape: the role only in the first chunk, a separate
finish chunk with an empty delta, an optional usage chunk with ``choices: []``, then
``data: [DONE]``. Errors are ``{"error":{"message","type","param":null,"code":null}}``.
"""

from __future__ import annotations

import base64
import random
import struct
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.config import ModelSpec
from proxy.emulator import text
from proxy.emulator.catalogue import is_valid, normalize
from proxy.emulator.clock import Clock
from proxy.emulator.common import (
    STATE,
    EmulatorState,
    Generation,
    LazyStream,
    RunOptions,
    check_capabilities,
    check_format,
    embed_texts,
    json_response,
)
from proxy.emulator.events import Done, GenerateRequest
from proxy.emulator.goformat import Raw, dumps, float32_text, go_quote
from proxy.emulator.gojson import GoType, decode
from proxy.emulator.native_endpoints import lookup
from proxy.emulator.schemas import V1_CHAT, V1_COMPLETION, V1_EMBED
from proxy.emulator.store import StoredModel
from proxy.errors import BadRequest, EmulatorError, ModelNotFound

__all__ = ["Rejected", "error_response", "routes"]

SSE = "text/event-stream"
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
_GO_TYPES = {bool: "bool", int: "float64", float: "float64", dict: "map[string]interface {}"}


class Rejected(BadRequest):
    """A 400 from Ollama's OpenAI middleware itself, before the native handler runs."""


def error_response(exc: EmulatorError) -> web.Response:
    """The OpenAI error object; the native handler's errors come through Go's json.Encoder."""
    body = {
        "error": {
            "message": exc.message,
            "type": _ERROR_TYPES.get(exc.status, "api_error"),
            "param": None,
            "code": None,
        }
    }
    if isinstance(exc, Rejected):
        return json_response(body, status=exc.status)
    return web.Response(
        status=exc.status,
        body=(dumps(body) + "\n").encode(),
        headers={"Content-Type": "application/json"},
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = _decode(await request.read(), V1_CHAT)
    messages = body.get("messages") or []
    if not messages:
        raise Rejected("[] is too short - 'messages'")
    for message in messages:
        _check_content(message.get("content"))
    name = body.get("model", "")
    if not name:
        raise BadRequest("model is required")
    stored = lookup(state, name, missing=f"model '{name}' not found")
    check_capabilities(
        stored, name, verb="chat", tools=bool(body.get("tools")), think=_thinks(body)
    )
    check_format(_format(body.get("response_format")))
    prompt = tuple(text.tokenize(text.render_chat(messages)))
    gen = Generation(state.engine, _request(stored.spec, prompt, body))
    ident = f"chatcmpl-{random.randrange(999)}"

    def wrap(choices: list[dict[str, Any]], created: int) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "system_fingerprint": "fp_ollama",
            "choices": choices,
        }

    if not body.get("stream", False):
        done = await gen.run()
        message = {"role": "assistant", "content": "".join(gen.tokens)}
        return json_response(
            {
                "id": ident,
                "object": "chat.completion",
                "created": _unix(state.engine.clock),
                "model": name,
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": message, "finish_reason": done.done_reason}],
                "usage": _usage(done),
            }
        )
    first = True

    def delta(token: str) -> list[dict[str, Any]]:
        nonlocal first
        content = {"role": "assistant", "content": token} if first else {"content": token}
        first = False
        return [{"index": 0, "delta": content, "finish_reason": None}]

    return await _stream(request, state, gen, body, wrap, delta, finish_delta={})


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    clock = state.engine.clock
    body = _decode(await request.read(), V1_COMPLETION)
    name = body.get("model", "")
    if not name:
        raise ModelNotFound("model '' not found")
    stored = lookup(state, name, missing=f"model '{name}' not found")
    check_capabilities(stored, name, verb="generate", suffix=bool(body.get("suffix")))
    prompt: str = body.get("prompt", "")
    ident = f"cmpl-{random.randrange(999)}"
    usage = body.get("stream_options", {}).get("include_usage", False)

    def wrap(choices: list[dict[str, Any]], created: int) -> dict[str, Any]:
        out = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": name,
            "system_fingerprint": "fp_ollama",
            "choices": choices,
        }
        if usage and choices:  # per Ollama's code every chunk carries a zeroed usage
            out["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return out

    def choice(token: str, reason: str | None = None) -> list[dict[str, Any]]:
        return [{"text": token, "index": 0, "finish_reason": reason}]

    if not prompt:  # the native empty prompt: load the model, generate nothing
        await state.engine.load(stored.spec, num_ctx=None, keep_alive=None)
        whole = wrap(choice("", "load"), _unix(clock))
        if body.get("stream", False):
            stream = LazyStream(request, SSE)
            await stream.send(f"data: {dumps(whole)}\n\ndata: [DONE]\n\n")
            return await stream.finish()
        zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return json_response(whole | {"usage": zero})
    tokens = tuple(text.tokenize(text.render_generate(prompt)))
    gen = Generation(state.engine, _request(stored.spec, tokens, body))
    if not body.get("stream", False):
        done = await gen.run()
        out = wrap(choice("".join(gen.tokens), done.done_reason), _unix(clock))
        return json_response(out | {"usage": _usage(done)})
    return await _stream(request, state, gen, body, wrap, choice, finish_delta=None)


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = _decode(await request.read(), V1_EMBED)
    raw_input = body.get("input")
    if raw_input == "":
        raw_input = [""]
    if raw_input is None or raw_input == []:
        raise Rejected("invalid input")
    encoding = body.get("encoding_format", "")
    if encoding not in ("", "float", "base64"):
        raise Rejected(
            f"Invalid value for 'encoding_format' = {encoding}. "
            "Supported values: ['float', 'base64']."
        )
    texts = [raw_input] if isinstance(raw_input, str) else raw_input
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest("invalid input type")
    name = body.get("model", "")
    if not name:
        raise ModelNotFound("model '' not found")
    stored = lookup(state, name, missing=f"model {go_quote(name)} not found, try pulling it first")
    vectors, result = await embed_texts(
        state.engine,
        stored.spec,
        texts,
        options=RunOptions(),
        keep_alive=None,
        dimensions=body.get("dimensions", 0),
    )
    data = [
        {"object": "embedding", "embedding": _vector(vector, encoding), "index": i}
        for i, vector in enumerate(vectors)
    ]
    count = result.prompt_eval_count
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": count, "total_tokens": count},
        }
    )


async def list_models(request: web.Request) -> web.Response:
    data = [_model(m.name, m) for m in request.app[STATE].store.list()]
    return json_response({"object": "list", "data": data or None})  # Go's nil slice: null


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    stored = request.app[STATE].store.get(name) if is_valid(name) else None
    if stored is None:
        raise ModelNotFound(f"model '{normalize(name)}' not found")
    return json_response(_model(name, stored))


# --- helpers ---------------------------------------------------------------------------------


def _decode(body: bytes, target: GoType) -> dict[str, Any]:
    try:
        return decode(body, target, empty="EOF")
    except BadRequest as exc:
        raise Rejected(exc.message) from None


def _check_content(content: object) -> None:
    """Ollama's checks of a message's content: a string, null, or text / base64 image parts."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise Rejected(f"invalid message content type: {_GO_TYPES.get(type(content), 'string')}")
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if (kind == "text" and isinstance(part.get("text"), str)) or kind == "input_audio":
            continue
        if kind == "image_url" and isinstance(part, dict):
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str) and not url.startswith("data:"):
                raise Rejected(
                    "image URLs are not currently supported, please use base64 encoded data instead"
                )
            continue
        raise Rejected("invalid message format")


def _thinks(body: dict[str, Any]) -> bool:
    reasoning = body.get("reasoning")
    effort = body.get("reasoning_effort") or (
        reasoning.get("effort") if isinstance(reasoning, dict) else None
    )
    return bool(effort) and effort != "none"


def _format(response_format: object) -> object:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = response_format.get("json_schema")
        return schema.get("schema", {}) if isinstance(schema, dict) else {}
    return None


def _request(spec: ModelSpec, tokens: tuple[str, ...], body: dict[str, Any]) -> GenerateRequest:
    limit = body.get("max_tokens")
    return GenerateRequest(
        model=spec,
        prompt_tokens=tokens,
        num_predict=limit if limit is not None and limit >= 0 else None,
        seed=body.get("seed"),
    )


async def _stream(
    request: web.Request,
    state: EmulatorState,
    gen: Generation,
    body: dict[str, Any],
    wrap: Callable[[list[dict[str, Any]], int], dict[str, Any]],
    chunk: Callable[[str], list[dict[str, Any]]],
    *,
    finish_delta: dict[str, Any] | None,
) -> web.StreamResponse:
    """SSE: content chunks, the finish chunk, the optional usage chunk, ``[DONE]``."""
    out = LazyStream(request, SSE)
    created = _unix(state.engine.clock)  # every chunk repeats the first chunk's time

    async def send(token: str) -> None:
        await out.send(f"data: {dumps(wrap(chunk(token), created))}\n\n")

    try:
        done = await gen.run(send)
    except EmulatorError:
        if not out.started:
            raise
        # Per Ollama's code the native error line parses as an empty chunk; no [DONE] follows.
        await send("")
        return await out.finish()
    if finish_delta is None:  # text completions: the native final chunk, text ""
        finish = [{"text": "", "index": 0, "finish_reason": done.done_reason}]
    else:
        finish = [{"index": 0, "delta": finish_delta, "finish_reason": done.done_reason}]
    await out.send(f"data: {dumps(wrap(finish, created))}\n\n")
    if body.get("stream_options", {}).get("include_usage", False):
        await out.send(f"data: {dumps(wrap([], created) | {'usage': _usage(done)})}\n\n")
    await out.send("data: [DONE]\n\n")
    return await out.finish()


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_eval_count,
        "completion_tokens": done.eval_count,
        "total_tokens": done.prompt_eval_count + done.eval_count,
    }


def _unix(clock: Clock) -> int:
    return int(clock.wall(clock.now()).timestamp())


def _vector(vector: list[float], encoding: str) -> object:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return Raw("[" + ",".join(float32_text(x) for x in vector) + "]")


def _model(name: str, stored: StoredModel) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(stored.modified_at.timestamp()),
        "owned_by": stored.namespace,
    }


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/completions", completions),
        web.post("/v1/embeddings", embeddings),
        web.get("/v1/models", list_models, allow_head=False),
        web.get("/v1/models/{model}", get_model, allow_head=False),
    ]
