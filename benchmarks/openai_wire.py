"""The benchmark's requests on Ollama's OpenAI-compatible endpoint: body and answer.

A workload's native ``/api/chat`` body becomes the same chat on ``/v1/chat/completions``
(``options.num_predict`` is ``max_tokens``; streams ask for the usage chunk so the output length
is known), and an answer's tail (SSE, or one JSON object when not streamed) is read back into the
counts the native final line carries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

NATIVE = "native"
OPENAI = "openai"
APIS = (NATIVE, OPENAI)
PATHS = {NATIVE: "/api/chat", OPENAI: "/v1/chat/completions"}


def openai_body(native: bytes) -> bytes:
    """The native chat body ``native`` as an OpenAI chat completion request."""
    src: dict[str, Any] = json.loads(native)
    out: dict[str, Any] = {"model": src["model"], "messages": src["messages"]}
    stream = bool(src.get("stream", True))
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}
    limit = (src.get("options") or {}).get("num_predict")
    if limit is not None:
        out["max_tokens"] = limit
    return json.dumps(out, separators=(",", ":")).encode()


@dataclass
class Answer:
    """What the end of an answer said: an error, or the token counts."""

    error: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0


def read_answer(tail: bytes, *, stream: bool) -> Answer:
    """The outcome of a 200 answer whose last bytes are ``tail``."""
    if not stream:
        try:
            whole = json.loads(tail)
        except ValueError:
            return Answer(error="the answer was not one JSON object")
        return _usage(whole) if isinstance(whole, dict) else Answer(error="not a JSON object")
    events = [ln[5:].strip() for ln in tail.split(b"\n") if ln.startswith(b"data:")]
    if not events or events[-1] != b"[DONE]":
        return Answer(error="the stream ended without data: [DONE]")
    answer = Answer()
    finished = False
    for data in events[:-1]:
        try:
            event = json.loads(data)
        except ValueError:
            continue  # the tail may start inside an event
        if not isinstance(event, dict):
            continue
        if event.get("error"):
            return Answer(error=str(event["error"])[:200])
        if any(c.get("finish_reason") for c in event.get("choices") or []):
            finished = True
        if event.get("usage"):
            counted = _usage(event)
            if counted.completion_tokens:
                answer = counted
    if not finished:
        return Answer(error="the stream ended without a finish_reason")
    return answer


def _usage(obj: dict[str, Any]) -> Answer:
    if obj.get("error"):
        return Answer(error=str(obj["error"])[:200])
    usage = obj.get("usage") or {}
    return Answer(
        completion_tokens=int(usage.get("completion_tokens") or 0),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
    )
