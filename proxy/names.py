"""Ollama's model-name rules: display form, validity, full registry form."""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,79}$")
_PREFIXES = ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/")


def normalize(name: str) -> str:
    """The short display form Ollama lists: ``llama3.2`` -> ``llama3.2:latest``."""
    name = name.strip()
    lowered = name.lower()
    for prefix in _PREFIXES:
        if lowered.startswith(prefix):
            name = name[len(prefix) :]
            break
    base, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        base, tag = name, "latest"
    return f"{base}:{tag}"


def is_valid(name: str) -> bool:
    """Whether Ollama would accept the name at all (otherwise 400 ``invalid model name``)."""
    if not name:
        return False
    short = normalize(name)
    base, _, tag = short.rpartition(":")
    parts = base.split("/")
    return len(parts) <= 3 and all(_NAME.match(p) for p in parts) and bool(_TAG.match(tag))


def full_name(name: str) -> str:
    """``registry.ollama.ai/library/x:tag``, the form some of Ollama's errors print."""
    short = normalize(name)
    if short.count("/") == 0:
        return f"registry.ollama.ai/library/{short}"
    if short.count("/") == 1:
        return f"registry.ollama.ai/{short}"
    return short


def model_key(name: str) -> str:
    """How the router keys a model: display form, lower-cased (Ollama matches names that way)."""
    return normalize(name).lower()
