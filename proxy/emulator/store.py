"""The emulated model store: manifests (shared on disk or in memory), blobs, pull and create.

With a root directory the store is Ollama's ``OLLAMA_MODELS`` layout: one JSON manifest per model
under ``manifests/registry.ollama.ai/library/<name>/<tag>``, re-read on every call so that a pull
by one emulator process is seen by all that share the directory. Layers are not written (they
would be gigabytes); a blob counts as present when a manifest names it, when this process
downloaded it, or when it was uploaded. Without a root everything lives in memory.

A model's digest is the sha256 of its manifest (as /api/tags shows it); manifests are rendered
deterministically (:mod:`proxy.emulator.registry`), so it is the same in every process, and a
copy has the digest of its source, which makes the engine share one runner between them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from proxy.config import ModelSpec
from proxy.emulator.catalogue import Catalogue, full_name, is_valid, normalize
from proxy.emulator.clock import Clock, RealClock
from proxy.emulator.registry import (
    Downloads,
    Layer,
    config_of,
    layers_of,
    progress,
    render_manifest,
)
from proxy.errors import EmulatorError

__all__ = ["Layer", "ModelStore", "StoredModel"]

REGISTRY = "registry.ollama.ai"
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


@dataclass(frozen=True, kw_only=True)
class StoredModel:
    """One model in the store, as /api/tags lists it."""

    name: str
    """Short display name with tag, e.g. ``llama3.2:latest``."""
    spec: ModelSpec
    """The catalogue model it stands for, renamed to ``name``, with this manifest's digest."""
    digest: str
    """sha256 (hex) of the manifest."""
    size: int
    modified_at: datetime
    config: Layer
    layers: tuple[Layer, ...]
    system: str = ""
    template: str = ""

    @property
    def namespace(self) -> str:
        parts = full_name(self.name).rpartition(":")[0].split("/")
        return parts[-2] if len(parts) >= 2 else "library"


@dataclass
class _Entry:
    name: str
    data: bytes
    modified_at: datetime
    path: Path | None


class ModelStore:
    """Local models of one emulated server (or of several sharing ``root``)."""

    def __init__(
        self,
        root: Path | None,
        catalogue: Catalogue,
        *,
        clock: Clock | None = None,
        registry_gbps: float = 1.0,
    ) -> None:
        self.root = Path(root) if root is not None else None
        self.catalogue = catalogue
        self.clock = clock
        self._memory: dict[str, _Entry] = {}
        self._blobs: dict[str, bytes] = {}
        self._downloads = Downloads(registry_gbps * 1e9)
        for spec in _specs(catalogue):
            if spec.pulled:
                name = normalize(spec.name)
                if self.root is None or not self._path(name).exists():
                    self._write(name, render_manifest(spec), keep_existing=True)

    async def aclose(self) -> None:
        """Stop downloads in progress (what they fetched so far is kept, like partial files)."""
        await self._downloads.aclose()

    # --- reading ----------------------------------------------------------------------------

    def list(self) -> list[StoredModel]:
        """Every model, newest first (re-read from disk on each call)."""
        models = [self._model(e) for e in sorted(self._entries(), key=lambda e: e.name)]
        return sorted(models, key=lambda m: m.modified_at, reverse=True)

    def get(self, name: str) -> StoredModel | None:
        """The model called ``name`` (case-insensitive, tag defaults to latest), or None."""
        entry = self._find(name)
        return self._model(entry) if entry is not None else None

    def has_blob(self, digest: str) -> bool:
        """Whether ``sha256:<hex>`` is uploaded, downloaded or part of a local model."""
        if digest in self._downloads.fetched or self._blob_exists(digest):
            return True
        return any(digest in _digests(m) for m in self.list())

    # --- changing ---------------------------------------------------------------------------

    def delete(self, name: str) -> bool:
        """Remove the manifest; False if there is no such model."""
        entry = self._find(name)
        if entry is None:
            return False
        if entry.path is None:
            del self._memory[entry.name.lower()]
            return True
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()
        assert self.root is not None
        parent = entry.path.parent
        while parent != self.root / "manifests" and parent.is_relative_to(self.root):
            try:
                parent.rmdir()  # like Ollama: drop directories the manifest leaves empty
            except OSError:
                break
            parent = parent.parent
        return True

    def copy(self, source: str, destination: str) -> bool:
        """Write ``source``'s manifest under ``destination``; False if there is no source."""
        entry = self._find(source)
        if entry is None:
            return False
        self._write(normalize(destination), entry.data)
        return True

    def put_blob(self, digest: str, data: bytes) -> bool:
        """Store an uploaded blob; True if it was new. The digest must already be checked."""
        if self._blob_exists(digest):
            return False
        path = self._blob_path(digest)
        if path is None:
            self._blobs[digest] = data
        else:
            _write_file(path, data)
        return True

    async def pull(self, name: str, *, clock: Clock | None = None) -> AsyncIterator[dict[str, Any]]:
        """Download ``name`` from the emulated registry, yielding Ollama's progress statuses.

        Raises EmulatorError (500, ``pull model manifest: file does not exist``) for a name the
        catalogue does not know, after the first status, as Ollama does.
        """
        clock = clock or self.clock or RealClock()
        yield {"status": "pulling manifest"}
        spec = self.catalogue.find(name)
        if spec is None:
            raise EmulatorError("pull model manifest: file does not exist")
        data = render_manifest(spec)
        manifest = json.loads(data)
        have = self._present()
        for layer in (*layers_of(manifest), config_of(manifest)):
            if layer.digest in have:
                yield progress(layer, layer.size)
                continue
            async for line in self._downloads.follow(layer, clock):
                yield line
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        existing = self._find(name)
        self._write(existing.name if existing else normalize(name), data)
        yield {"status": "success"}

    async def create(
        self,
        name: str,
        source: str,
        *,
        system: str | None = None,
        template: str | None = None,
        clock: Clock | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """``/api/create`` from an existing model (pulled first if only the registry has it)."""
        if self._find(source) is None:
            async for line in self.pull(source, clock=clock):
                if line["status"] != "success":
                    yield line
        base = self.get(source)
        if base is None:  # pragma: no cover - pull either wrote it or raised
            raise EmulatorError(f"model {source!r} not found")
        catalogue_name = _extension(self._find(source)).get("model", base.spec.name)
        new_system = base.system if system is None else system
        new_template = base.template if template is None else template
        spec = self.catalogue.find(catalogue_name) or base.spec
        data = render_manifest(spec, system=new_system, template=new_template)
        manifest = json.loads(data)
        old = _digests(base)
        for layer in layers_of(manifest):
            verb = "using existing" if layer.digest in old else "creating new"
            yield {"status": f"{verb} layer {layer.digest}"}
        yield {"status": "writing manifest"}
        self._write(normalize(name), data)
        yield {"status": "success"}

    # --- internals --------------------------------------------------------------------------

    def _present(self) -> set[str]:
        have = set(self._downloads.fetched)
        for model in self.list():
            have |= _digests(model)
        return have

    def _entries(self) -> Iterator[_Entry]:
        if self.root is None:
            yield from self._memory.values()
            return
        for path in (self.root / "manifests").glob("*/*/*/*"):
            entry = self._read(path)
            if entry is not None:
                yield entry

    def _read(self, path: Path) -> _Entry | None:
        assert self.root is not None
        if path.name.startswith(".") or not path.is_file():
            return None  # a directory, or another process's half-written temporary file
        host, namespace, model, tag = path.relative_to(self.root / "manifests").parts
        if host != REGISTRY:
            short = f"{host}/{namespace}/{model}:{tag}"
        else:
            short = f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
        try:
            stat = path.stat()
            data = path.read_bytes()
            json.loads(data)
        except (OSError, ValueError):
            return None  # deleted by another process meanwhile, or not a manifest
        return _Entry(
            short, data, datetime.fromtimestamp(stat.st_mtime_ns / 1e9, timezone.utc), path
        )

    def _find(self, name: str) -> _Entry | None:
        key = normalize(name).lower()
        if self.root is None:
            return self._memory.get(key)
        # The exact path first (one file read per request); names match case-insensitively.
        entry = self._read(self._path(normalize(name))) if is_valid(name) else None
        if entry is not None and entry.name.lower() == key:
            return entry
        return next((e for e in self._entries() if e.name.lower() == key), None)

    def _model(self, entry: _Entry) -> StoredModel:
        manifest = json.loads(entry.data)
        extra = _extension(entry)
        layers = layers_of(manifest)
        config = config_of(manifest)
        size = config.size + sum(layer.size for layer in layers)
        base = self.catalogue.find(str(extra.get("model", ""))) or ModelSpec(
            name=entry.name, size_gb=max(size, 1) / 1e9
        )
        digest = hashlib.sha256(entry.data).hexdigest()
        return StoredModel(
            name=entry.name,
            spec=dataclasses.replace(base, name=entry.name, digest=digest, pulled=True),
            digest=digest,
            size=size,
            modified_at=entry.modified_at,
            config=config,
            layers=layers,
            system=str(extra.get("system", "")),
            template=str(extra.get("template", "")),
        )

    def _path(self, name: str) -> Path:
        assert self.root is not None
        base, _, tag = full_name(name).rpartition(":")
        return self.root.joinpath("manifests", *base.split("/"), tag)

    def _write(self, name: str, data: bytes, *, keep_existing: bool = False) -> None:
        if self.root is None:
            key = name.lower()
            if keep_existing and key in self._memory:
                return
            self._memory[key] = _Entry(name, data, datetime.now(timezone.utc), None)
            return
        _write_file(self._path(name), data)

    def _blob_path(self, digest: str) -> Path | None:
        match = _DIGEST.match(digest)
        if self.root is None or match is None:
            return None
        return self.root / "blobs" / f"sha256-{match.group(1)}"

    def _blob_exists(self, digest: str) -> bool:
        path = self._blob_path(digest)
        return path.exists() if path is not None else digest in self._blobs


def _extension(entry: _Entry | None) -> dict[str, Any]:
    if entry is None:
        return {}
    extra = json.loads(entry.data).get("ollamux")
    return extra if isinstance(extra, dict) else {}


def _digests(model: StoredModel) -> set[str]:
    return {model.config.digest, *(layer.digest for layer in model.layers)}


def _specs(catalogue: Catalogue) -> list[ModelSpec]:
    return list(catalogue)


def _write_file(path: Path, data: bytes) -> None:
    """Write atomically: other processes never read half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
