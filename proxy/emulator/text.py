"""Deterministic stand-ins for a model's text work: tokens, prompts, answers and embeddings."""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]")

_WORDS = tuple(
    [
        "the",
        "model",
        "answers",
        "with",
        "care",
        "and",
        "the",
        "routing",
        "keeps",
        "every",
        "graphics",
        "card",
        "busy",
        "while",
        "users",
        "wait",
        "less",
        "for",
        "their",
        "first",
        "token",
        "because",
        "a",
        "proxy",
        "that",
        "sees",
        "queue",
        "depth",
        "can",
        "place",
        "each",
        "request",
        "where",
        "a",
        "free",
        "slot",
        "is",
        "ready",
        "and",
        "memory",
        "is",
        "enough",
        "so",
        "nobody",
        "queues",
        "behind",
        "a",
        "long",
        "story",
        "when",
        "another",
        "server",
        "sits",
        "idle",
    ]
)


def tokenize(text: str) -> list[str]:
    """Split text into tokens: each word and each punctuation mark is one token."""
    return _TOKEN.findall(text)


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt a chat template would produce: role markers around each message's text."""
    parts = []
    for message in messages:
        content = message.get("content") or ""
        if not isinstance(content, str):
            content = " ".join(
                str(part.get("text", "")) for part in content if isinstance(part, Mapping)
            )
        parts.append(f"<{message.get('role', 'user')}> {content}")
    parts.append("<assistant>")
    return "\n".join(parts)


def render_generate(prompt: str, system: str = "", raw: bool = False) -> str:
    """The prompt /api/generate would send to the runner."""
    if raw:
        return prompt
    head = f"<system> {system}\n" if system else ""
    return f"{head}<user> {prompt}\n<assistant>"


def seed_for(model: str, prompt_tokens: Sequence[str], seed: int | None) -> int:
    """A seed derived from model and prompt, so the same request gets the same answer."""
    h = hashlib.sha256(model.encode())
    h.update("\x00".join(prompt_tokens[-64:]).encode())
    h.update(str(seed).encode())
    return int.from_bytes(h.digest()[:8], "big")


def natural_length(seed: int) -> int:
    """How many tokens the model 'wants' to say when num_predict does not stop it: 16 to 256."""
    return 16 + seed % 241


def answer_tokens(seed: int) -> Iterator[str]:
    """An endless deterministic stream of token strings (a leading space before each word)."""
    rng = random.Random(seed)
    first = True
    while True:
        word = rng.choice(_WORDS)
        yield word.capitalize() if first else f" {word}"
        first = False
        if rng.random() < 0.08:
            yield "."
            first = True


def embedding(text: str, dimensions: int, *, normalize: bool = True) -> list[float]:
    """A deterministic vector for ``text``: similar texts share no structure, equal texts match."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    if not normalize:
        return vector
    return l2_normalize(vector)


def l2_normalize(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
