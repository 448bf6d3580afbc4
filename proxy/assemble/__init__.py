"""Non-streamed answers built by the proxy from an instance's stream, as Ollama would write them.

A request the client sent with ``stream:false`` (or without ``stream`` on /v1) is sent upstream as
a stream (:func:`upstream_body`), so the proxy sees progress and can tell a hang from a long answer;
an :class:`Assembler` reads that stream and :meth:`Assembler.result` gives the status, body and
content type Ollama itself answers unstreamed: the same bytes, field order and omitted fields.

Covered: /api/chat, /api/generate (native, :mod:`proxy.assemble.native_answer`),
/v1/chat/completions and /v1/completions (OpenAI, :mod:`proxy.assemble.openai_answer`). Not covered
(:func:`upstream_body` gives ``None``: forward the request as it came): /v1/responses,
/v1/messages, embeddings, every other path, ``_debug_render_only`` requests, and bodies whose
``stream`` or ``stream_options`` Ollama would refuse (so the client still gets Ollama's own 400).

Pure: no I/O, no asyncio; memory grows with the answer, time is linear in it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from proxy.assemble import native_answer, openai_answer
from proxy.assemble.wire import Events, Lines, field, loads

__all__ = ["ASSEMBLED", "INCOMPLETE", "Assembler", "upstream_body", "wants_stream"]

ASSEMBLED = ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions")
"""The paths whose non-streamed answers can be assembled."""
INCOMPLETE = "an error was encountered while running the model: the instance stopped answering"
"""The error :meth:`Assembler.result` gives for a stream that ended before its last chunk."""

_STREAM_BY_DEFAULT = frozenset(
    ("/api/chat", "/api/generate", "/api/pull", "/api/push", "/api/create")
)
_STREAM_IF_ASKED = frozenset(
    ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
)
_V1 = frozenset(("/v1/chat/completions", "/v1/completions"))
_Builder = (
    native_answer.ChatBuilder
    | native_answer.GenerateBuilder
    | openai_answer.ChatBuilder
    | openai_answer.CompletionBuilder
)


def wants_stream(path: str, data: Mapping[str, Any]) -> bool:
    """Whether Ollama streams its answer to this parsed request body.

    Native endpoints stream unless ``stream`` is ``false``; the OpenAI ones only when it is ``true``
    (Go's decoding: keys match case-insensitively, the last one wins, ``null`` is the default).
    Endpoints that never stream (embeddings, show, ...) give False.
    """
    _, value = field(data, "stream")
    if path in _STREAM_BY_DEFAULT:
        return value is not False
    if path in _STREAM_IF_ASKED:
        return value is True
    return False


def upstream_body(path: str, data: Mapping[str, Any]) -> bytes | None:
    """The body that asks the instance for a stream of this non-streamed request, or None.

    None means: leave the request as it is (already streamed, a path that is not assembled, or a
    body whose stream fields Ollama would refuse). Otherwise the same body with ``stream: true``,
    and on /v1 ``stream_options: {"include_usage": true}`` so the usage arrives.
    """
    if path not in ASSEMBLED or wants_stream(path, data):
        return None
    _, stream = field(data, "stream")
    _, debug = field(data, "_debug_render_only")
    if not (stream is None or stream is False) or not (debug is None or debug is False):
        return None  # a value Ollama refuses: let the client get Ollama's own error
    body = {k: v for k, v in data.items() if k.casefold() != "stream"}
    body["stream"] = True
    if path in _V1:
        _, options = field(data, "stream_options")
        if options is not None and not isinstance(options, dict):
            return None
        _, usage = field(options or {}, "include_usage")
        if usage is not None and not isinstance(usage, bool):
            return None
        body = {k: v for k, v in body.items() if k.casefold() != "stream_options"}
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


class Assembler:
    """One exchange's non-streamed answer, built from the stream the instance sends.

    ``path`` is one of :data:`ASSEMBLED`; ``request`` the client's parsed body (on /api/chat and
    /v1/chat/completions it tells whether tools were offered, which decides how Ollama merges tool
    calls; without it they are all merged). Call :meth:`start` with the instance's status and
    content type if it may not be 200, :meth:`feed` with the body's bytes as they come,
    :meth:`end` (or :meth:`result`, which calls it) when the body has ended.
    """

    def __init__(
        self,
        path: str,
        request: Mapping[str, Any] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if path not in ASSEMBLED:
            raise ValueError(f"no non-streamed answer is assembled for {path}")
        self.path = path
        self._v1 = path in _V1
        _, tools = field(request, "tools") if request is not None else (True, True)
        offered = bool(tools)
        self._builder: _Builder
        if path == "/api/chat":
            self._builder = native_answer.ChatBuilder(tools=offered)
        elif path == "/api/generate":
            self._builder = native_answer.GenerateBuilder()
        elif path == "/v1/chat/completions":
            self._builder = openai_answer.ChatBuilder(tools=offered, clock=clock)
        else:
            self._builder = openai_answer.CompletionBuilder()
        self._lines = Lines()
        self._events = Events()
        self._status = 200
        self._content_type = ""
        self._raw: list[bytes] | None = None  # an answer that is relayed whole, not assembled
        self._ended = False

    def start(self, status: int, content_type: str) -> None:
        """The instance's status and Content-Type, before any :meth:`feed`.

        A non-200 answer, or a 200 that is already one JSON object, is kept as it comes; only a
        native error's bare ``application/json`` (Ollama's stream handler writes that) becomes the
        ``application/json; charset=utf-8`` of the same error unstreamed.
        """
        self._status, self._content_type = status, content_type
        mime = content_type.split(";")[0].strip().lower()
        if status != 200 or mime == "application/json":
            self._raw = []

    def feed(self, chunk: bytes) -> None:
        """Some bytes of the instance's body, split anywhere."""
        if self._raw is not None:
            self._raw.append(chunk)
        elif self._v1:
            for payload in self._events.feed(chunk):
                self._add(payload)
        else:
            for line in self._lines.feed(chunk):
                self._add(line)

    def end(self) -> None:
        """The body has ended: a last NDJSON line without its newline still counts."""
        if self._ended:
            return
        self._ended = True
        if self._raw is None and not self._v1:
            tail = self._lines.tail()
            if tail:
                self._add(tail)

    @property
    def done(self) -> bool:
        """The answer is whole: the last chunk (``done:true``; /v1: finish reason and usage)."""
        if self._raw is not None:
            return self._ended and self._status == 200 and self._raw_object() is not None
        return self._builder.finished

    @property
    def error(self) -> str | None:
        """The instance's error message: an in-band error, or the text of a non-200 answer."""
        if self._raw is not None:
            if self._status == 200:
                return None
            return self._raw_message()
        return self._builder.error

    def result(self) -> tuple[int, bytes, str]:
        """Status, body and Content-Type of the non-streamed answer (ends the body).

        The answer when :attr:`done`; an instance's error as Ollama answers it unstreamed (500
        for an in-band error); for a stream that broke off, a 500 with :data:`INCOMPLETE`.
        """
        self.end()
        if self._raw is not None:
            return self._status, b"".join(self._raw), self._raw_content_type()
        builder = self._builder
        if builder.error is None and builder.finished:
            ctype = openai_answer.CONTENT_TYPE if self._v1 else native_answer.CONTENT_TYPE
            return 200, builder.body(), ctype
        message = builder.error or INCOMPLETE
        if self._v1:
            return 500, openai_answer.error_body(500, message), openai_answer.CONTENT_TYPE
        return 500, native_answer.error_body(message), native_answer.CONTENT_TYPE

    def _add(self, item: bytes | str) -> None:
        builder = self._builder
        if isinstance(builder, (openai_answer.ChatBuilder, openai_answer.CompletionBuilder)):
            assert isinstance(item, str)
            builder.add(item)
            return
        if builder.closed:
            return
        try:
            chunk = loads(item)
        except ValueError:
            chunk = None
        builder.add(chunk)

    def _raw_object(self) -> Any:
        try:
            return loads(b"".join(self._raw or []))
        except ValueError:
            return None

    def _raw_message(self) -> str:
        body = self._raw_object()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str):
            return error
        text = b"".join(self._raw or []).decode("utf-8", errors="replace").strip()
        return text or f"the instance answered {self._status}"

    def _raw_content_type(self) -> str:
        bare = self._content_type.strip().lower() == "application/json"
        if self._status != 200 and not self._v1 and bare:
            return native_answer.CONTENT_TYPE
        return self._content_type
