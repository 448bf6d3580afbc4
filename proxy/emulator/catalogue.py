"""The emulator's model catalogue: which models its registry has and how fast they run.

Speeds are for one stream on the reference GPU (an RTX 4090-class card, ``speed: 1.0``); sizes
are the Q4_K_M download sizes ollama.com shows. Sources: shared/reference/performance.md §1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from proxy.config import ModelSpec
from proxy.names import full_name, is_valid, normalize

__all__ = ["DEFAULT_MODELS", "Catalogue", "full_name", "is_valid", "normalize"]

DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(name="llama3.2:1b", size_gb=1.3, parameters="1.2B", decode_tps=280,
              prompt_tps=15000, kv_kib_per_token=32, embedding_length=2048),
    ModelSpec(name="llama3.2:3b", size_gb=2.0, parameters="3.2B", decode_tps=200,
              prompt_tps=10000, kv_kib_per_token=112, embedding_length=3072),
    ModelSpec(name="llama3.1:8b", size_gb=4.9, parameters="8.0B", decode_tps=140,
              prompt_tps=7000, kv_kib_per_token=128),
    ModelSpec(name="qwen2.5:7b", size_gb=4.7, parameters="7.6B", context_length=32768,
              decode_tps=150, prompt_tps=7000, kv_kib_per_token=56, family="qwen2",
              embedding_length=3584),
    ModelSpec(name="gemma3:12b", size_gb=8.1, parameters="12.2B", decode_tps=80,
              prompt_tps=3500, kv_kib_per_token=192, family="gemma3", embedding_length=3840,
              capabilities=("completion", "vision")),
    ModelSpec(name="qwen2.5:14b", size_gb=9.0, parameters="14.8B", context_length=32768,
              decode_tps=70, prompt_tps=3000, kv_kib_per_token=192, family="qwen2",
              embedding_length=5120),
    ModelSpec(name="gemma3:27b", size_gb=17.0, parameters="27.4B", decode_tps=40,
              prompt_tps=1800, kv_kib_per_token=256, family="gemma3", embedding_length=5376,
              capabilities=("completion", "vision")),
    ModelSpec(name="qwen2.5:32b", size_gb=20.0, parameters="32.8B", context_length=32768,
              decode_tps=35, prompt_tps=1500, kv_kib_per_token=256, family="qwen2",
              embedding_length=5120),
    ModelSpec(name="llama3.3:70b", size_gb=43.0, parameters="70.6B", decode_tps=20,
              prompt_tps=800, kv_kib_per_token=320, embedding_length=8192),
    ModelSpec(name="nomic-embed-text:latest", size_gb=0.274, parameters="137M",
              context_length=2048, decode_tps=1, prompt_tps=20000, kv_kib_per_token=36,
              family="nomic-bert", quantization="F16", embedding=True, embedding_length=768),
    ModelSpec(name="mxbai-embed-large:latest", size_gb=0.67, parameters="334M",
              context_length=512, decode_tps=1, prompt_tps=12000, kv_kib_per_token=96,
              family="bert", quantization="F16", embedding=True, embedding_length=1024),
)  # fmt: skip


class Catalogue:
    """Models the emulated registry knows, looked up by name the way Ollama matches them."""

    def __init__(self, models: Iterable[ModelSpec] = ()) -> None:
        models = tuple(models) or DEFAULT_MODELS
        self._by_key = {normalize(m.name).lower(): m for m in models}

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._by_key.values())

    def find(self, name: str) -> ModelSpec | None:
        """The spec for ``name`` (case-insensitive, tag defaults to latest), or None."""
        return self._by_key.get(normalize(name).lower())
