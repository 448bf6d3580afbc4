"""Ollama's non-streamed /v1/chat/completions and /v1/completions answers, rebuilt from SSE chunks.

Ollama's OpenAI layer turns the native answer into one ``chat.completion`` / ``text_completion``
object written with Go's ``json.Encoder`` (a trailing newline, ``Content-Type: application/json``).
Its stream carries everything that object needs once ``stream_options.include_usage`` is asked
for: the deltas (content, reasoning, tool calls, log probabilities), the finish reason, then a
usage chunk with ``choices: []``. Both the HEAD stream shape (role only in the first delta, a
separate finish chunk with an empty delta) and the older one (role in every delta, the finish
reason on the last content chunk) are read.

A native error in the middle of a /v1 stream reaches the client as one chunk with an empty
``model`` and no ``[DONE]``: its text is lost, so such an error is reported with
:data:`MIDSTREAM`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from proxy.assemble.wire import dumps, loads

__all__ = ["CONTENT_TYPE", "MIDSTREAM", "ChatBuilder", "CompletionBuilder", "error_body"]

CONTENT_TYPE = "application/json"
MIDSTREAM = (
    "an error was encountered while running the model: the instance ended its answer with an "
    "error it does not show on /v1"
)
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def error_body(status: int, message: str) -> bytes:
    """The OpenAI error object as Ollama writes it (``json.Encoder``: a trailing newline)."""
    error = {
        "message": message,
        "type": _ERROR_TYPES.get(status, "api_error"),
        "param": None,
        "code": None,
    }
    return (dumps({"error": error}) + "\n").encode()


class _Builder(abc.ABC):
    """The chunk header (id, created, model), the usage chunk, errors and ``[DONE]``."""

    def __init__(self) -> None:
        self.head: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None
        self.finish_created: Any = None
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish is not None and self.usage is not None

    @property
    def closed(self) -> bool:
        return self.finished or self.error is not None

    def add(self, payload: str) -> None:
        if self.closed or payload == "[DONE]":
            return
        try:
            chunk = loads(payload)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            self.error = "the instance sent a chunk that is not a JSON object"
            return
        if "error" in chunk:  # not what Ollama sends today, but an OpenAI-style error event
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            self.error = message if isinstance(message, str) and message else MIDSTREAM
            return
        if chunk.get("model") == "":  # Ollama's native error line, read as an empty chunk
            self.error = MIDSTREAM
            return
        if self.head is None:
            self.head = chunk
            self.started()
        choices = chunk.get("choices")
        if choices == [] and isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
            return
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        self.take(choice)
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish, self.finish_created = reason, chunk.get("created")

    def started(self) -> None:
        """The first chunk arrived; a hook that does nothing unless an endpoint needs it."""
        return None

    @abc.abstractmethod
    def take(self, choice: dict[str, Any]) -> None:
        """Fold one choice into the answer (what each endpoint keeps)."""

    def wrap(self, kind: str, created: Any, choice: dict[str, Any]) -> bytes:
        assert self.head is not None
        out = {
            "id": self.head.get("id", ""),
            "object": kind,
            "created": created,
            "model": self.head.get("model", ""),
            "system_fingerprint": self.head.get("system_fingerprint", ""),
            "choices": [choice],
            "usage": self.usage,
        }
        return (dumps(out) + "\n").encode()


class ChatBuilder(_Builder):
    """``chat.completion``: content and reasoning concatenated, tool calls, log probabilities.

    ``created`` is the time of Ollama's last native chunk; a HEAD stream repeats the first one's
    on every chunk, so the time between the first and the finish chunk (by ``clock``) is added.
    """

    def __init__(self, *, tools: bool, clock: Callable[[], float]) -> None:
        super().__init__()
        self.tools = tools
        self.clock = clock
        self.first_at = 0.0
        self.finish_at = 0.0
        self.role = ""
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[Any] = []
        self.last_calls: list[Any] = []
        self.logprobs: list[Any] = []

    def started(self) -> None:
        self.first_at = self.clock()

    def take(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta:
            if isinstance(delta.get("role"), str) and not self.role:
                self.role = delta["role"]
            _append(self.content, delta.get("content"))
            _append(self.reasoning, delta.get("reasoning"))
            calls = delta.get("tool_calls")
            calls = calls if isinstance(calls, list) else []
            self.tool_calls.extend(calls)
            self.last_calls = calls
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            self.logprobs.extend(logprobs["content"])
        if choice.get("finish_reason") is not None:
            self.finish_at = self.clock()

    def body(self) -> bytes:
        assert self.head is not None and self.finish is not None
        # Ollama merges every chunk's tool calls only when the request offered tools.
        calls = self.tool_calls if self.tools else self.last_calls
        reason = "stop" if self.finish == "tool_calls" else self.finish
        if reason == "stop" and calls:
            reason = "tool_calls"
        message: dict[str, Any] = {"role": self.role or "assistant"}
        message["content"] = "".join(self.content)
        if self.reasoning:
            message["reasoning"] = "".join(self.reasoning)
        if calls:
            message["tool_calls"] = calls
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reason}
        if self.logprobs:
            choice["logprobs"] = {"content": self.logprobs}
        created = self.head.get("created")
        if self.finish_created != created:  # streams before v0.32.6 stamp each chunk's own time
            created = self.finish_created
        elif isinstance(created, int):
            created += max(int(self.finish_at - self.first_at), 0)
        return self.wrap("chat.completion", created, choice)


class CompletionBuilder(_Builder):
    """``text_completion``: the text concatenated; ``created`` is the finish chunk's."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def take(self, choice: dict[str, Any]) -> None:
        _append(self.text, choice.get("text"))

    def body(self) -> bytes:
        assert self.finish is not None
        choice = {"text": "".join(self.text), "index": 0, "finish_reason": self.finish}
        return self.wrap("text_completion", self.finish_created, choice)


def _append(pieces: list[str], value: object) -> None:
    if isinstance(value, str) and value:
        pieces.append(value)
