"""The emulator's model of time: one injectable clock, real (with a speed factor) or manual."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    """Virtual seconds. The emulator reports every duration in this time."""

    def now(self) -> float:
        """Virtual seconds since the clock started (monotonic)."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of virtual time."""

    def wall(self, t: float) -> datetime:
        """The UTC wall-clock moment at which virtual time ``t`` is (or was) reached."""


class RealClock:
    """Real time compressed by ``speed``: at speed 10 a virtual second lasts 0.1 s."""

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.speed = speed
        self._t0 = time.monotonic()
        self._wall0 = datetime.now(timezone.utc)

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0) / self.speed)

    def wall(self, t: float) -> datetime:
        return self._wall0 + timedelta(seconds=t / self.speed)


class ManualClock:
    """Time moves only when a test calls :meth:`advance`; sleepers wake in deadline order."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = 0.0
        self._wall0 = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    def wall(self, t: float) -> datetime:
        return self._wall0 + timedelta(seconds=t)

    async def settle(self) -> None:
        """Let every task that can run without time passing run."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own deadline."""
        target = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target + 1e-12:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not future.done():
                future.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()
