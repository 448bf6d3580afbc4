"""The ``instances:`` section: one Ollama server each, how it is started and what ollamux knows
of it. Part of the config schema; :mod:`proxy.config` re-exports it."""

from __future__ import annotations

import dataclasses
import urllib.parse
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from proxy.config_build import check
from proxy.errors import ConfigError
from proxy.units import DurationError, parse_duration

__all__ = ["InstanceConfig", "Launcher", "url_problem"]

Launcher = Literal["process", "systemd", "external", "emulated", "node"]


@dataclass(frozen=True, kw_only=True)
class InstanceConfig:
    """One Ollama server: which GPU(s) it owns, where it listens and how it is started."""

    name: str
    launcher: Launcher = "process"
    gpu: tuple[int | str, ...] = ()
    """GPU index or UUID (real GPUs), or emulated GPU name or index; a list = one spread server."""
    port: int = 0
    """Loopback port of the instance; 0 = assigned from 11435 upwards."""
    url: str = ""
    """Only for ``external``: where the server already runs."""
    num_parallel: int = 0
    """OLLAMA_NUM_PARALLEL: requests one loaded model serves at once. 0 = 4 for the servers ollamux
    starts (it sets it); for ``external`` ones, 1 (Ollama's own default since 0.10): set it to the
    server's value, since Ollama's API does not tell."""
    keep_alive: str = "5m"
    max_loaded_models: int = 0
    max_queue: int = 512
    context_length: int = 0
    """OLLAMA_CONTEXT_LENGTH; 0 = Ollama's default (tiered by VRAM)."""
    spread: bool = False
    """OLLAMA_SCHED_SPREAD: split every model over all of this instance's GPUs."""
    env: dict[str, str] = field(default_factory=dict)
    gpu_source: str = ""
    """Only for ``external``: where its GPUs' memory is read, an ``ollamux agent`` on that host
    (``http://10.0.0.5:11433``; ollamux reads ``/gpus`` there). ``gpu`` then picks that server's
    GPUs among the agent's (index or UUID); empty = all of them."""
    gpu_source_token: str = ""
    """The agent's ``--token``, when it has one."""
    memory_gib: float = 0.0
    """Only for ``external`` without ``gpu_source``: the server's GPU memory, so that ollamux can
    estimate what is free from what its ``/api/ps`` shows loaded. 0 = learn it from the most the
    server has held at once (a lower bound: no replica goes there until something loaded)."""
    store: str = ""
    """Only for ``external``: a name shared by the servers that use one model directory (a pull
    through ollamux goes once to each store). Empty = the server has a store of its own."""
    api_key: str = ""
    """Only for ``external`` and ``node``: sent as ``Authorization: Bearer KEY`` on everything
    ollamux sends there, in place of the client's (a node's API key: ``ollamux keys add`` on it).
    Empty = the client's own header goes through."""

    LAUNCHED_ONLY: ClassVar[tuple[str, ...]] = (
        "port", "keep_alive", "max_loaded_models", "max_queue", "context_length", "spread", "env",
    )  # fmt: skip
    """Settings ollamux applies when it starts the server: nothing for ``external`` ones."""
    EXTERNAL_ONLY: ClassVar[tuple[str, ...]] = (
        "url", "gpu_source", "gpu_source_token", "memory_gib", "store", "api_key",
    )  # fmt: skip
    NODE_KEEPS: ClassVar[tuple[str, ...]] = ("url", "api_key")
    """Of those, what a ``node`` takes too."""

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", "must not be empty, e.g. gpu0")
        check(0 <= self.port <= 65535, "port", "must be a TCP port, 1-65535")
        check(self.num_parallel >= 0, "num_parallel", "must be >= 1 (or 0 for the default)")
        check(self.max_loaded_models >= 0, "max_loaded_models", "must be >= 0 (0 = 3 x GPUs)")
        check(self.max_queue >= 1, "max_queue", "must be >= 1")
        check(self.context_length >= 0, "context_length", "must be >= 0 (0 = Ollama's default)")
        check(self.memory_gib >= 0, "memory_gib", "must be >= 0, e.g. 24 (0 = learn it)")
        try:
            parse_duration(self.keep_alive, env_style=True)
        except DurationError as exc:
            fix = "use e.g. 5m, 1h or -1 (forever)"
            raise ConfigError(f"{exc}; {fix}", path="keep_alive") from None
        for key in ("OLLAMA_HOST", "CUDA_VISIBLE_DEVICES"):
            check(key not in self.env, f"env.{key}", "is set by ollamux; use port and gpu instead")
        if self.launcher == "node":
            self._check_node()
            return
        if self.launcher == "external":
            self._check_external()
            return
        for name in self.EXTERNAL_ONLY:
            check(
                getattr(self, name) == _DEFAULTS[name],
                name,
                f"is only for launcher external, not {self.launcher}",
            )

    def _check_external(self) -> None:
        self._check_key()
        check(
            bool(self.url), "url", "is required for launcher external, e.g. http://10.0.0.5:11434"
        )
        problem = url_problem(self.url)
        check(problem is None, "url", f"{problem}, e.g. http://10.0.0.5:11434")
        if self.gpu_source:
            problem = url_problem(self.gpu_source)
            check(problem is None, "gpu_source", f"{problem}, e.g. http://10.0.0.5:11433")
        else:
            check(
                not self.gpu,
                "gpu",
                "picks GPUs among those of gpu_source; set gpu_source (an ollamux agent) "
                "or leave gpu out",
            )
            check(
                not self.gpu_source_token,
                "gpu_source_token",
                "is the token of gpu_source; set gpu_source too",
            )
        for name in self.LAUNCHED_ONLY:
            check(
                getattr(self, name) == _DEFAULTS[name],
                name,
                "does nothing for launcher external: ollamux does not start that server; "
                "set it where the server runs (its OLLAMA_* environment)",
            )

    def _check_key(self) -> None:
        key = self.api_key
        check(
            key == key.strip() and not any(c.isspace() for c in key),
            "api_key",
            "must be one word without spaces, e.g. the key `ollamux keys add` printed there",
        )

    def _check_node(self) -> None:
        self._check_key()
        check(bool(self.url), "url", "is required for launcher node, e.g. http://box2:11434")
        problem = url_problem(self.url)
        check(problem is None, "url", f"{problem}, e.g. http://box2:11434")
        for name in (*self.LAUNCHED_ONLY, *self.EXTERNAL_ONLY, "gpu", "num_parallel"):
            if name not in self.NODE_KEEPS:
                check(
                    getattr(self, name) == _DEFAULTS[name],
                    name,
                    "does nothing for launcher node: that ollamux publishes its own slots and "
                    "memory (GET /proxy/node); set it in its config",
                )

    @property
    def remote(self) -> bool:
        """ollamux does not start it: an Ollama server (``external``) or another ollamux
        (``node``) that already runs at ``url``."""
        return self.launcher in ("external", "node")

    @property
    def slots(self) -> int:
        """``num_parallel`` with its default applied."""
        if self.num_parallel:
            return self.num_parallel
        return 1 if self.launcher == "external" else 4


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an HTTP server's base address, or None when it can."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"{url!r} needs http:// or https:// in front"
    if not parts.hostname:
        return f"{url!r} names no host"
    if parts.query or parts.fragment or parts.username or parts.password:
        return f"{url!r} must be a plain address without ?query, #fragment or user:password@"
    return None


_DEFAULTS: dict[str, object] = {}


_DEFAULTS.update(
    (f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    for f in dataclasses.fields(InstanceConfig)
)
