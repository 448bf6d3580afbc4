"""Keeps InstanceState current: health checks, /api/ps and /api/tags polls, GPU memory reads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from proxy.balancer.state import InstanceState, LoadedModel, ModelBook
from proxy.config import TimeoutConfig
from proxy.gpu import GpuSource
from proxy.names import model_key

log = logging.getLogger("ollamux.health")

FAILS_TO_DOWN = 2
"""Consecutive failed health checks before an instance that was up is marked down."""
TAGS_EVERY = 10
"""Poll /api/tags on every Nth round (models change rarely; pulls refresh it at once)."""


class Monitor:
    """One loop that probes every instance each ``health_interval`` and updates its state."""

    def __init__(
        self,
        instances: list[InstanceState],
        book: ModelBook,
        session: aiohttp.ClientSession,
        timeouts: TimeoutConfig,
        gpu_sources: Mapping[str, GpuSource],
        *,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.instances = instances
        self.book = book
        self._session = session
        self._timeouts = timeouts
        self._gpu_sources = gpu_sources
        self._on_change = on_change
        self._round = 0
        self._timeout = aiohttp.ClientTimeout(total=timeouts.health_timeout)

    async def run(self) -> None:
        """Check forever; the first round runs at once."""
        while True:
            await self.check_all()
            await asyncio.sleep(self._timeouts.health_interval)

    async def check_all(self) -> None:
        full = self._round % TAGS_EVERY == 0
        self._round += 1
        await asyncio.gather(*(self._check(inst, full=full) for inst in self.instances))
        self._on_change()

    async def refresh_tags(self) -> None:
        """Re-read every live instance's model list (after a pull, a delete, a copy)."""
        await asyncio.gather(
            *(self._poll_tags(inst) for inst in self.instances if inst.healthy),
            return_exceptions=True,
        )

    def report_failure(self, inst: InstanceState, *, connect: bool) -> None:
        """Passive health: a refused connection marks it down at once, other errors count."""
        inst.failures += 1
        if connect or inst.failures >= FAILS_TO_DOWN:
            self._set_health(inst, False, "requests to it failed")

    # --- one instance ---------------------------------------------------------------------------

    async def _check(self, inst: InstanceState, *, full: bool) -> None:
        try:
            async with self._session.get(inst.url + "/", timeout=self._timeout) as resp:
                ok = resp.status == 200
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if not ok:
            inst.failures += 1
            if inst.failures >= FAILS_TO_DOWN or not inst.healthy:
                self._set_health(inst, False, "it does not answer GET /")
            return
        inst.failures = 0
        came_up = not inst.healthy
        try:
            await self._poll_ps(inst)
            if full or came_up:
                await self._poll_tags(inst)
                await self._poll_version(inst)
            await self._poll_gpus(inst)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.warning("instance %s: polling failed: %s", inst.name, exc or type(exc).__name__)
        self._set_health(inst, True, "it answers")

    def _set_health(self, inst: InstanceState, healthy: bool, why: str) -> None:
        if inst.healthy != healthy:
            level = logging.INFO if healthy else logging.WARNING
            state = "up" if healthy else "down"
            log.log(level, "instance %s (%s) is %s: %s", inst.name, inst.url, state, why)
            inst.healthy = healthy
            if not healthy:
                inst.gpus = ()
            self._on_change()

    async def _get_json(self, url: str) -> Any:
        async with self._session.get(url, timeout=self._timeout) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def _poll_ps(self, inst: InstanceState) -> None:
        data = await self._get_json(inst.url + "/api/ps")
        loaded = {}
        for entry in data.get("models") or []:
            name = model_key(str(entry.get("name") or entry.get("model", "")))
            size_vram = int(entry.get("size_vram", 0))
            loaded[name] = LoadedModel(
                name=name, size_vram=size_vram, context_length=int(entry.get("context_length", 0))
            )
            if size_vram:
                self.book.stats(name).size_vram = size_vram
            inst.loading.pop(name, None)
        inst.loaded = loaded

    async def _poll_tags(self, inst: InstanceState) -> None:
        data = await self._get_json(inst.url + "/api/tags")
        for entry in data.get("models") or []:
            self.book.set_file_size(str(entry.get("name", "")), int(entry.get("size", 0)))

    async def _poll_version(self, inst: InstanceState) -> None:
        data = await self._get_json(inst.url + "/api/version")
        inst.version = str(data.get("version", ""))

    async def _poll_gpus(self, inst: InstanceState) -> None:
        source = self._gpu_sources.get(inst.name)
        if source is None:
            return
        try:
            readings = await source.read()
        except BaseException:
            inst.gpus = ()  # stale readings must not feed the GPU gauges
            raise
        mine = [g for g in readings if not inst.gpu_uuids or g.uuid in inst.gpu_uuids]
        inst.gpus = tuple(mine)
        if not mine:
            return
        inst.memory_total = sum(g.memory_total for g in mine)
        inst.memory_free = sum(g.memory_free for g in mine)
        inst.utilization = max(g.utilization for g in mine)
