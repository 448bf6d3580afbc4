"""The emulated registry: the manifests it serves and how its downloads progress.

A manifest is rendered deterministically from a catalogue model, so every process gets the same
bytes and the same digest. Besides Ollama's fields it carries an ``ollamux`` object naming the
catalogue model, so copies and created models keep the speeds of the model they came from.
Downloads advance at the registry's speed in virtual time; concurrent pulls of one blob share a
download, which is abandoned (keeping its progress, like Ollama's partial files) only when every
client waiting for it has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from proxy.config import ModelSpec
from proxy.emulator.clock import Clock

__all__ = ["Downloads", "Layer", "config_of", "layers_of", "progress", "render_manifest"]

PROGRESS_S = 0.06
"""Ollama reports download progress every 60 ms."""
_MEDIA = "application/vnd.ollama.image."
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Small layers every model has: (kind, size in bytes); the weights take the rest of its size.
_SMALL_LAYERS = (("template", 1_429), ("license", 7_711), ("params", 96))
_CONFIG_SIZE = 485


@dataclass(frozen=True)
class Layer:
    """One blob of a manifest."""

    media_type: str
    digest: str
    """``sha256:<hex>``."""
    size: int


def render_manifest(spec: ModelSpec, *, system: str = "", template: str = "") -> bytes:
    """The manifest of catalogue model ``spec``: the same bytes in every process."""

    def blob(kind: str) -> str:
        return "sha256:" + hashlib.sha256(f"{spec.digest}/{kind}".encode()).hexdigest()

    small = [
        (kind, blob(kind), size)
        for kind, size in _SMALL_LAYERS
        if not (kind == "template" and (spec.embedding or template))
    ]
    small += [
        (kind, "sha256:" + hashlib.sha256(text.encode()).hexdigest(), len(text.encode()))
        for kind, text in (("template", template), ("system", system))
        if text
    ]
    weights = max(spec.size_bytes - _CONFIG_SIZE - sum(size for _, _, size in small), 1)
    model = f"sha256:{spec.digest}" if _HEX64.match(spec.digest) else blob("model")
    layers = [("model", model, weights), *small]
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": blob("config"),
            "size": _CONFIG_SIZE,
        },
        "layers": [{"mediaType": _MEDIA + k, "digest": d, "size": n} for k, d, n in layers],
        "ollamux": {"model": spec.name, "system": system, "template": template},
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def layers_of(manifest: dict[str, Any]) -> tuple[Layer, ...]:
    return tuple(
        Layer(str(item["mediaType"]), str(item["digest"]), int(item["size"]))
        for item in manifest.get("layers", [])
    )


def config_of(manifest: dict[str, Any]) -> Layer:
    item = manifest.get("config") or {"mediaType": "", "digest": "", "size": 0}
    return Layer(str(item["mediaType"]), str(item["digest"]), int(item["size"]))


def progress(layer: Layer, completed: int, *, verb: str = "pulling") -> dict[str, Any]:
    """One progress status; ``completed`` is omitted while zero (Go's omitempty)."""
    line: dict[str, Any] = {
        "status": f"{verb} {layer.digest.removeprefix('sha256:')[:12]}",
        "digest": layer.digest,
        "total": layer.size,
    }
    if completed:
        line["completed"] = completed
    return line


@dataclass(eq=False)
class _Download:
    total: int
    completed: int
    waiters: int = 0
    task: asyncio.Task[None] | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    moved: asyncio.Condition = field(default_factory=asyncio.Condition)


class Downloads:
    """Blob downloads of one server from the emulated registry."""

    def __init__(self, bytes_per_second: float) -> None:
        self.bytes_per_second = bytes_per_second
        self.fetched: set[str] = set()
        """Digests this process downloaded completely."""
        self._partial: dict[str, int] = {}
        self._active: dict[str, _Download] = {}

    async def follow(self, layer: Layer, clock: Clock) -> AsyncIterator[dict[str, Any]]:
        """Download ``layer`` (or join its download), yielding its progress every 60 ms."""
        download = self._active.get(layer.digest)
        if download is None:
            download = _Download(total=layer.size, completed=self._partial.get(layer.digest, 0))
            self._active[layer.digest] = download
            download.task = asyncio.get_running_loop().create_task(
                self._fetch(layer.digest, download, clock)
            )
        download.waiters += 1
        try:
            while not download.finished.is_set():
                yield progress(layer, download.completed)
                async with download.moved:
                    await download.moved.wait()
            yield progress(layer, layer.size)
        finally:
            download.waiters -= 1
            if download.waiters == 0 and not download.finished.is_set():
                self._partial[layer.digest] = download.completed
                self._active.pop(layer.digest, None)
                if download.task is not None:
                    download.task.cancel()

    async def aclose(self) -> None:
        """Stop downloads in progress."""
        for download in list(self._active.values()):
            if download.task is not None:
                download.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await download.task

    async def _fetch(self, digest: str, download: _Download, clock: Clock) -> None:
        step = max(int(self.bytes_per_second * PROGRESS_S), 1)
        while download.completed < download.total:
            await clock.sleep(PROGRESS_S)
            download.completed = min(download.total, download.completed + step)
            if download.completed < download.total:
                async with download.moved:
                    download.moved.notify_all()
        self.fetched.add(digest)
        self._partial.pop(digest, None)
        self._active.pop(digest, None)
        download.finished.set()
        async with download.moved:
            download.moved.notify_all()
