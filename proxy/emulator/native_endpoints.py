"""Ollama's native model endpoints: /, /api/version, /api/ps, generate, chat, embed, embeddings.

Statuses, bodies and field order follow shared/reference/ollama.md §3 and §5: responses echo the
``model`` string as sent, streams are NDJSON with the metrics on the final chunk, an error after
the first chunk is a last ``{"error"}`` line, an empty prompt (or no messages) loads the model or,
with ``keep_alive: 0``, unloads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.emulator import text
from proxy.emulator.catalogue import is_valid
from proxy.emulator.common import (
    NDJSON,
    STATE,
    EmulatorState,
    Generation,
    LazyStream,
    RunOptions,
    check_capabilities,
    check_format,
    details,
    embed_texts,
    error_response,
    expires_text,
    float32_json,
    json_response,
    metrics,
    now_text,
    parse_options,
    token_ids,
)
from proxy.emulator.events import Done, GenerateRequest
from proxy.emulator.goformat import dumps, go_quote, ns
from proxy.emulator.gojson import decode
from proxy.emulator.schemas import CHAT, EMBED, EMBEDDINGS, GENERATE
from proxy.emulator.store import StoredModel
from proxy.errors import BadRequest, EmulatorError, ModelNotFound

__all__ = ["lookup", "routes"]

ASSISTANT_EMPTY = {"role": "assistant", "content": ""}


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running", content_type="text/plain", charset="utf-8")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": request.app[STATE].version})


async def status(request: web.Request) -> web.Response:
    return json_response({"cloud": {"disabled": False, "source": "none"}})


async def ps(request: web.Request) -> web.Response:
    clock = request.app[STATE].engine.clock
    models = [
        {
            "name": m.model.name,
            "model": m.model.name,
            "size": m.size,
            "digest": m.model.digest,
            "details": details(m.model),
            "expires_at": expires_text(clock, m.expires_at),
            "size_vram": m.size_vram,
            "context_length": m.context_length,
        }
        for m in request.app[STATE].engine.ps()
    ]
    return json_response({"models": models})


def lookup(state: EmulatorState, name: str, *, missing: str) -> StoredModel:
    """The model a generation names; 400 for a bad name, 404 ``missing`` when it is absent."""
    if not is_valid(name):
        raise BadRequest("invalid model name")
    stored = state.store.get(name)
    if stored is None:
        raise ModelNotFound(missing)
    return stored


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    clock = state.engine.clock
    started = clock.now()
    body = decode(await request.read(), GENERATE)
    name = body.get("model", "")
    if not name:
        raise ModelNotFound("model '' not found")
    stored = lookup(state, name, missing=f"model '{name}' not found")
    prompt: str = body.get("prompt", "")
    keep_alive: float | None = body.get("keep_alive")

    def reply(reason: str) -> dict[str, Any]:
        return {
            "model": name,
            "created_at": now_text(clock),
            "response": "",
            "done": True,
            "done_reason": reason,
        }

    if not prompt and keep_alive == 0:
        state.engine.unload(stored.spec)
        return json_response(reply("unload"))
    raw = bool(body.get("raw"))
    if raw and (body.get("template") or body.get("system") or body.get("context")):
        raise BadRequest("raw mode does not support template, system, or context")
    if not 0 <= body.get("top_logprobs", 0) <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")
    check_capabilities(
        stored,
        name,
        verb="generate",
        suffix=bool(body.get("suffix")),
        think=bool(body.get("think")),
    )
    options = parse_options(body.get("options"))
    check_format(body.get("format"))
    if not prompt:
        await state.engine.load(stored.spec, num_ctx=options.num_ctx, keep_alive=keep_alive)
        return json_response(reply("load"))

    rendered = text.render_generate(prompt, body.get("system", ""), raw)
    history = tuple(f"<{i}>" for i in body.get("context", []))
    tokens = history + tuple(text.tokenize(rendered))
    gen = Generation(state.engine, _request(stored, tokens, options, keep_alive))

    def chunk(token: str) -> dict[str, Any]:
        return {"model": name, "created_at": now_text(clock), "response": token, "done": False}

    def final(done: Done, whole: str) -> dict[str, Any]:
        out = {
            "model": name,
            "created_at": now_text(clock),
            "response": whole,
            "done": True,
            "done_reason": done.done_reason,
        }
        if not raw:
            out["context"] = [
                *body.get("context", []),
                *token_ids(tokens[len(history) :]),
                *token_ids(gen.tokens),
            ]
        return out | metrics(done, clock.now() - started)

    return await _respond(request, gen, body.get("stream", True), chunk, final)


async def chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    clock = state.engine.clock
    started = clock.now()
    body = decode(await request.read(), CHAT)
    name = body.get("model", "")
    if not name:
        raise BadRequest("model is required")
    stored = lookup(state, name, missing=f"model '{name}' not found")
    messages: list[dict[str, Any]] = body.get("messages", [])
    keep_alive: float | None = body.get("keep_alive")

    def reply(reason: str) -> dict[str, Any]:
        return {
            "model": name,
            "created_at": now_text(clock),
            "message": ASSISTANT_EMPTY,
            "done_reason": reason,
            "done": True,
        }

    if not messages and keep_alive == 0:
        state.engine.unload(stored.spec)
        return json_response(reply("unload"))
    check_capabilities(
        stored, name, verb="chat", tools=bool(body.get("tools")), think=bool(body.get("think"))
    )
    options = parse_options(body.get("options"))
    check_format(body.get("format"))
    if not messages:
        await state.engine.load(stored.spec, num_ctx=options.num_ctx, keep_alive=keep_alive)
        return json_response(reply("load"))

    for message in messages:
        message["role"] = str(message.get("role", "")).lower()
    tokens = tuple(text.tokenize(text.render_chat(messages)))
    gen = Generation(state.engine, _request(stored, tokens, options, keep_alive))

    def chunk(token: str) -> dict[str, Any]:
        return {
            "model": name,
            "created_at": now_text(clock),
            "message": {"role": "assistant", "content": token},
            "done": False,
        }

    def final(done: Done, whole: str) -> dict[str, Any]:
        out = {
            "model": name,
            "created_at": now_text(clock),
            "message": {"role": "assistant", "content": whole},
            "done_reason": done.done_reason,
            "done": True,
        }
        return out | metrics(done, clock.now() - started)

    return await _respond(request, gen, body.get("stream", True), chunk, final)


async def embed(request: web.Request) -> web.Response:
    state = request.app[STATE]
    started = state.engine.clock.now()
    body = decode(await request.read(), EMBED)
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        texts = [raw_input] if raw_input else []
    elif isinstance(raw_input, list) and all(isinstance(item, str) for item in raw_input):
        texts = list(raw_input)
    elif raw_input is None:
        texts = []
    else:
        raise BadRequest("invalid input type")
    name = body.get("model", "")
    if not name:
        raise ModelNotFound("model '' not found")
    stored = lookup(state, name, missing=f"model {go_quote(name)} not found, try pulling it first")
    options = parse_options(body.get("options"))
    keep_alive = body.get("keep_alive")
    if not texts:
        await state.engine.load(stored.spec, num_ctx=options.num_ctx, keep_alive=keep_alive)
        return json_response({"model": name, "embeddings": []})
    vectors, result = await embed_texts(
        state.engine,
        stored.spec,
        texts,
        options=options,
        keep_alive=keep_alive,
        truncate=body.get("truncate", True),
        dimensions=body.get("dimensions", 0),
    )
    out: dict[str, Any] = {"model": name, "embeddings": float32_json(vectors)}
    extra = {
        "total_duration": ns(state.engine.clock.now() - started),
        "load_duration": ns(result.load_duration),
        "prompt_eval_count": result.prompt_eval_count,
    }
    return json_response(out | {key: value for key, value in extra.items() if value})


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = decode(await request.read(), EMBEDDINGS)
    name = body.get("model", "")
    if not name:
        raise BadRequest("model is required")
    stored = lookup(state, name, missing=f"model {go_quote(name)} not found, try pulling it first")
    options = parse_options(body.get("options"))
    keep_alive = body.get("keep_alive")
    prompt = body.get("prompt", "")
    if not prompt:
        await state.engine.load(stored.spec, num_ctx=options.num_ctx, keep_alive=keep_alive)
        return json_response({"embedding": []})
    # the legacy endpoint returns the raw float64 vector, not normalised
    vectors, _ = await embed_texts(
        state.engine,
        stored.spec,
        [prompt],
        options=options,
        keep_alive=keep_alive,
        normalize=False,
    )
    return json_response({"embedding": vectors[0]})


def _request(
    stored: StoredModel, tokens: tuple[str, ...], options: RunOptions, keep_alive: float | None
) -> GenerateRequest:
    return GenerateRequest(
        model=stored.spec,
        prompt_tokens=tokens,
        num_predict=options.num_predict,
        num_ctx=options.num_ctx,
        keep_alive=keep_alive,
        seed=options.seed,
    )


async def _respond(
    request: web.Request,
    gen: Generation,
    stream: bool,
    chunk: Callable[[str], dict[str, Any]],
    final: Callable[[Done, str], dict[str, Any]],
) -> web.StreamResponse:
    """Run the generation; one JSON object, or NDJSON chunks with the metrics on the last."""
    if not stream:
        done = await gen.run()
        return json_response(final(done, "".join(gen.tokens)))
    out = LazyStream(request, NDJSON)

    async def send(token: str) -> None:
        await out.send(dumps(chunk(token)) + "\n")

    try:
        done = await gen.run(send)
    except EmulatorError as exc:
        if out.started:  # HTTP 200 is out: the stream ends with the error, no done line
            await out.send(dumps({"error": exc.message}) + "\n")
            return await out.finish()
        if gen.loaded:  # Ollama's streamResponse sets a bare application/json for it
            return error_response(exc.status, exc.message, content_type="application/json")
        raise
    await out.send(dumps(final(done, "")) + "\n")
    return await out.finish()


def routes() -> list[web.RouteDef]:
    return [
        web.get("/", root, allow_head=False),
        web.head("/", root),
        web.get("/api/version", version, allow_head=False),
        web.head("/api/version", version),
        web.get("/api/status", status, allow_head=False),
        web.get("/api/ps", ps, allow_head=False),
        web.post("/api/generate", generate),
        web.post("/api/chat", chat),
        web.post("/api/embed", embed),
        web.post("/api/embeddings", embeddings),
    ]
