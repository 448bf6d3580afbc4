"""Ollama's non-streamed /api/chat and /api/generate answers, rebuilt from their NDJSON chunks.

Ollama answers ``stream:false`` by running the same stream and writing its last chunk (the
``done:true`` one, with ``done_reason``, ``context`` and the metrics) with the text fields replaced
by the whole answer: ``response`` / ``message.content`` and ``thinking`` concatenated, ``logprobs``
collected, and on /api/chat the tool calls of every chunk when the request offered tools (without
tools, the last chunk's). Everything else, field order included, is the last chunk's, so this
module keeps that chunk as it came and only puts the whole-answer fields in, where Go's struct order
puts a field the last chunk omitted (Go drops empty ``omitempty`` fields).
"""

from __future__ import annotations

import abc
from typing import Any

from proxy.assemble.wire import dumps, put

__all__ = ["CONTENT_TYPE", "ChatBuilder", "GenerateBuilder", "error_body"]

CONTENT_TYPE = "application/json; charset=utf-8"
"""gin's ``c.JSON``: what Ollama's unstreamed answers and errors carry."""

_METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
_MESSAGE = ("role", "content", "thinking", "images", "tool_calls", "tool_name", "tool_call_id")
_CHAT = (
    "model",
    "remote_model",
    "remote_host",
    "created_at",
    "message",
    "done",
    "done_reason",
    "_debug_info",
    "logprobs",
    *_METRICS,
)
_GENERATE = (
    "model",
    "remote_model",
    "remote_host",
    "created_at",
    "response",
    "thinking",
    "done",
    "done_reason",
    "context",
    *_METRICS,
    "tool_calls",
    "_debug_info",
    "logprobs",
)
_NO_MESSAGE = "unexpected error format in response"


def error_body(message: str) -> bytes:
    """``{"error": message}`` as Ollama's handlers write it (no trailing newline)."""
    return dumps({"error": message}).encode()


class _Builder(abc.ABC):
    """What both native endpoints share: the error line, the last chunk, the log probabilities."""

    def __init__(self) -> None:
        self.final: dict[str, Any] | None = None
        self.error: str | None = None
        self.logprobs: list[Any] = []

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def closed(self) -> bool:
        """Nothing after the last chunk or an error line counts."""
        return self.final is not None or self.error is not None

    def add(self, chunk: Any) -> None:
        if self.closed:
            return
        if not isinstance(chunk, dict):
            self.error = "the instance sent a chunk that is not a JSON object"
            return
        if "error" in chunk:  # Ollama's in-band error line: the stream ends with it
            message = chunk["error"]
            self.error = message if isinstance(message, str) else _NO_MESSAGE
            return
        logprobs = chunk.get("logprobs")
        if isinstance(logprobs, list):
            self.logprobs.extend(logprobs)
        self.take(chunk)
        if chunk.get("done") is True:
            self.final = chunk

    @abc.abstractmethod
    def take(self, chunk: dict[str, Any]) -> None:
        """Fold one chunk into the answer (what each endpoint keeps)."""

    def with_logprobs(self, order: tuple[str, ...]) -> dict[str, Any]:
        assert self.final is not None
        out = dict(self.final)
        if self.logprobs:
            return put(out, "logprobs", self.logprobs, order)
        out.pop("logprobs", None)
        return out


class GenerateBuilder(_Builder):
    """/api/generate: ``response`` and ``thinking`` concatenated, ``context`` the last chunk's."""

    def __init__(self) -> None:
        super().__init__()
        self.response: list[str] = []
        self.thinking: list[str] = []

    def take(self, chunk: dict[str, Any]) -> None:
        _append(self.response, chunk.get("response"))
        _append(self.thinking, chunk.get("thinking"))

    def body(self) -> bytes:
        out = self.with_logprobs(_GENERATE)
        out = put(out, "response", "".join(self.response), _GENERATE)
        out = _text(out, "thinking", "".join(self.thinking), _GENERATE)
        return dumps(out).encode()


class ChatBuilder(_Builder):
    """/api/chat: ``message.content`` and ``message.thinking`` concatenated, tool calls merged."""

    def __init__(self, *, tools: bool) -> None:
        super().__init__()
        self.tools = tools
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[Any] = []

    def take(self, chunk: dict[str, Any]) -> None:
        message = chunk.get("message")
        if not isinstance(message, dict):
            return
        _append(self.content, message.get("content"))
        _append(self.thinking, message.get("thinking"))
        calls = message.get("tool_calls")
        if self.tools and isinstance(calls, list):
            self.tool_calls.extend(calls)

    def body(self) -> bytes:
        out = self.with_logprobs(_CHAT)
        last = out.get("message")
        message = dict(last) if isinstance(last, dict) else {"role": "assistant"}
        message = put(message, "content", "".join(self.content), _MESSAGE)
        message = _text(message, "thinking", "".join(self.thinking), _MESSAGE)
        if self.tool_calls:
            message = put(message, "tool_calls", self.tool_calls, _MESSAGE)
        out = put(out, "message", message, _CHAT)
        return dumps(out).encode()


def _append(pieces: list[str], value: object) -> None:
    if isinstance(value, str) and value:
        pieces.append(value)


def _text(obj: dict[str, Any], key: str, value: str, order: tuple[str, ...]) -> dict[str, Any]:
    """An ``omitempty`` string: set when not empty, else absent."""
    if value:
        return put(obj, key, value, order)
    obj.pop(key, None)
    return obj
