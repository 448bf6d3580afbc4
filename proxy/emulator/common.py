"""What the emulator's native and OpenAI handlers share: app state, responses, models, runs.

Handlers raise :class:`~proxy.errors.EmulatorError`; the server's middleware turns it into the
body the endpoint family uses. Streams go through :class:`LazyStream`, which sends the status line
with the first chunk, so an error before any chunk is still an ordinary JSON error.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from proxy.config import ModelSpec
from proxy.emulator import text
from proxy.emulator.catalogue import Catalogue, full_name
from proxy.emulator.clock import Clock
from proxy.emulator.engine import Engine
from proxy.emulator.events import Done, EmbedResult, Event, GenerateRequest, Loaded, Token
from proxy.emulator.goformat import FOREVER, Raw, dumps, float32_text, go_quote, ns, rfc3339
from proxy.emulator.store import ModelStore, StoredModel
from proxy.errors import BadRequest, EmulatorError, RunnerFailed

JSON_UTF8 = "application/json; charset=utf-8"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True, kw_only=True)
class EmulatorState:
    """Everything the handlers of one emulated server use."""

    engine: Engine
    store: ModelStore
    catalogue: Catalogue
    version: str


STATE = web.AppKey("emulator", EmulatorState)


# --- responses -------------------------------------------------------------------------------


def json_response(value: Any, *, status: int = 200, content_type: str = JSON_UTF8) -> web.Response:
    """One JSON object, no trailing newline (gin's ``c.JSON``)."""
    return web.Response(
        status=status, body=dumps(value).encode(), headers={"Content-Type": content_type}
    )


def error_response(status: int, message: str, *, content_type: str = JSON_UTF8) -> web.Response:
    return json_response({"error": message}, status=status, content_type=content_type)


def empty_response(status: int = 200) -> web.Response:
    """Ollama's ``c.Status(200)``: no body, no content type."""
    return web.Response(status=status)


class LazyStream:
    """A streamed response whose headers go out with the first chunk, each chunk flushed."""

    def __init__(self, request: web.Request, content_type: str) -> None:
        self.request = request
        self.response = web.StreamResponse()
        self.response.headers["Content-Type"] = content_type

    @property
    def started(self) -> bool:
        return self.response.prepared

    async def send(self, chunk: str) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write(chunk.encode())

    async def finish(self) -> web.StreamResponse:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write_eof()
        return self.response


async def stream_statuses(
    request: web.Request, lines: AsyncIterator[dict[str, Any]], *, stream: bool
) -> web.StreamResponse:
    """Progress statuses (pull, push, create): NDJSON, or with ``stream:false`` only the last.

    An error after the first line ends the stream with an ``{"error"}`` line (HTTP 200); without
    streaming it is the response (500 unless the error says otherwise).
    """
    generator = cast(AsyncGenerator[dict[str, Any], None], lines)
    async with contextlib.aclosing(generator):
        if not stream:
            last: dict[str, Any] = {}
            async for line in generator:
                last = line
            return json_response(last)
        out = LazyStream(request, NDJSON)
        try:
            async for line in generator:
                await out.send(dumps(line) + "\n")
        except EmulatorError as exc:
            if not out.started:
                raise
            await out.send(dumps({"error": exc.message}) + "\n")
        return await out.finish()


# --- values Ollama prints --------------------------------------------------------------------


def now_text(clock: Clock) -> str:
    return rfc3339(clock.wall(clock.now()))


def expires_text(clock: Clock, at: float) -> str:
    """``expires_at``: infinite keep-alive shows as Go's MaxInt64 ns (~292 years) from now."""
    if math.isinf(at):
        return rfc3339(clock.wall(clock.now()) + FOREVER)
    return rfc3339(clock.wall(at))


def details(spec: ModelSpec) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": spec.family,
        "families": [spec.family],
        "parameter_size": spec.parameters,
        "quantization_level": spec.quantization,
    }


def metrics(done: Done, total: float) -> dict[str, int]:
    """The final chunk's metrics in ns; zero values are omitted (Go's omitempty)."""
    values = {
        "total_duration": ns(total),
        "load_duration": ns(done.load_duration),
        "prompt_eval_count": done.prompt_eval_count,
        "prompt_eval_duration": ns(done.prompt_eval_duration),
        "eval_count": done.eval_count,
        "eval_duration": ns(done.eval_duration),
    }
    return {key: value for key, value in values.items() if value}


def token_ids(tokens: Sequence[str]) -> list[int]:
    """Stable stand-in token ids for ``context`` (a 128k vocabulary)."""
    return [int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "big") % 128000 for t in tokens]


# --- request checks shared by /api and /v1 ---------------------------------------------------

_INT_OPTIONS = frozenset(
    (
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "draft_num_predict",
    )
)
_FLOAT_OPTIONS = frozenset(
    (
        "temperature",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
    )
)


@dataclass(frozen=True)
class RunOptions:
    """The options that change what the emulator does."""

    num_predict: int | None = None
    num_ctx: int | None = None
    seed: int | None = None


def parse_options(options: Mapping[str, Any] | None) -> RunOptions:
    """Check option types as Ollama does (500 ``option "x" must be of type ...``)."""
    values: dict[str, int] = {}
    for key, value in (options or {}).items():
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in _INT_OPTIONS:
            if not number:
                raise EmulatorError(f"option {go_quote(key)} must be of type integer")
            values[key] = int(value)
        elif key in _FLOAT_OPTIONS and not number:
            raise EmulatorError(f"option {go_quote(key)} must be of type float32")
        elif key == "use_mmap" and not isinstance(value, bool):
            raise EmulatorError(f"option {go_quote(key)} must be of type boolean")
        elif key == "stop":
            if not isinstance(value, list):
                raise EmulatorError(f"option {go_quote(key)} must be of type array")
            if not all(isinstance(v, str) for v in value):
                raise EmulatorError(f"option {go_quote(key)} must be of an array of strings")
    predict = values.get("num_predict")
    return RunOptions(
        num_predict=predict if predict is not None and predict >= 0 else None,
        num_ctx=values.get("num_ctx"),
        seed=values.get("seed"),
    )


def check_format(value: object) -> None:
    if value is None or value in ("", "json") or isinstance(value, dict):
        return
    raise EmulatorError(
        f'invalid format: {dumps(value)}; expected "json" or a valid JSON Schema object'
    )


def check_capabilities(
    stored: StoredModel,
    name: str,
    *,
    verb: str,
    tools: bool = False,
    suffix: bool = False,
    think: bool = False,
) -> None:
    """Ollama's capability errors (400), in the order it checks them."""
    have = stored.spec.capabilities
    if "completion" not in have:
        raise BadRequest(f"{go_quote(name)} does not support {verb}")
    for wanted, cap in ((tools, "tools"), (suffix, "insert")):
        if wanted and cap not in have:
            raise BadRequest(f"{full_name(stored.name)} does not support {cap}")
    if think and "thinking" not in have:
        raise BadRequest(f"{go_quote(name)} does not support thinking")


# --- running the engine ----------------------------------------------------------------------


class Generation:
    """One generation run for a handler: its tokens, and whether the runner was handed over."""

    def __init__(self, engine: Engine, request: GenerateRequest) -> None:
        self.engine = engine
        self.request = request
        self.loaded = False
        self.tokens: list[str] = []

    async def run(self, on_token: Callable[[str], Awaitable[None]] | None = None) -> Done:
        """Drive the engine to its Done event; closing it at once if the client goes away."""
        events = cast(AsyncGenerator[Event, None], self.engine.generate(self.request))
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Loaded):
                    self.loaded = True
                elif isinstance(event, Token):
                    self.tokens.append(event.text)
                    if on_token is not None:
                        await on_token(event.text)
                else:
                    return event
        raise RunnerFailed("model runner has unexpectedly stopped")  # pragma: no cover


def context_length(engine: Engine, spec: ModelSpec, num_ctx: int | None) -> int:
    """The context a runner for this request gets: the request's, else the server default."""
    ctx = engine.default_ctx if num_ctx is None or num_ctx <= 0 else max(num_ctx, 4)
    return min(ctx, spec.context_length)


async def embed_texts(
    engine: Engine,
    spec: ModelSpec,
    texts: Sequence[str],
    *,
    options: RunOptions,
    keep_alive: float | None,
    truncate: bool = True,
    dimensions: int = 0,
    normalize: bool = True,
) -> tuple[list[list[float]], EmbedResult]:
    """Run ``texts`` through the engine; float32 vectors, L2-normalised unless told otherwise."""
    ctx = context_length(engine, spec, options.num_ctx)
    inputs = []
    for item in texts:
        tokens = tuple(text.tokenize(item))
        if len(tokens) > ctx:
            if not truncate:
                raise BadRequest("the input length exceeds the context length")
            tokens = tokens[:ctx]
        inputs.append(tokens)
    result = await engine.embed(spec, inputs, num_ctx=options.num_ctx, keep_alive=keep_alive)
    vectors = []
    for item in texts:
        vector = text.embedding(item, spec.embedding_length, normalize=normalize)
        if normalize and 0 < dimensions < len(vector):
            vector = text.l2_normalize(vector[:dimensions])
        vectors.append([_float32(x) for x in vector])
    return vectors, result


def float32_json(vectors: Sequence[Sequence[float]]) -> Raw:
    """``[][]float32`` as Go prints it (shortest float32 digits)."""
    rows = ("[" + ",".join(float32_text(x) for x in row) + "]" for row in vectors)
    return Raw("[" + ",".join(rows) + "]")


def _float32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])
