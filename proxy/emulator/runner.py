"""One loaded model on an emulated server: its slots, its prompt cache and its speed.

A runner is what Ollama keeps per loaded model (a llama-server child): ``slots`` parallel sequences
behind a FIFO wait, a prompt cache per slot, and a speed that depends on how many sequences decode
together, on the GPUs it sits on, and on who else is computing on those GPUs.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from proxy.config import GpuSpec, ModelSpec
from proxy.emulator.placement import Placement

# Aggregate decode tok/s with b sequences ~ tg1 * b / (1 + 0.12 (b - 1)), capped at ~3.7x tg1
# (performance.md §1b): per-sequence step time is the larger of the two terms below.
_BATCH_SLOPE = 0.12
_BATCH_CAP = 3.7
# Prefill of a layer split gains a little from pipelining over GPUs (performance.md §1c).
_SPLIT_PREFILL_GAIN = 0.15


@dataclass(kw_only=True)
class Runner:
    """A loaded (or loading) model with its slots; the engine owns its lifecycle."""

    model: ModelSpec
    num_ctx: int
    auto_ctx: bool
    slots: int
    placement: Placement
    gpus: Sequence[GpuSpec]
    keep_alive: float
    split_penalty: float
    cpu_slowdown: float
    on_activity: Callable[[Runner], None]
    """Called when the number of busy sequences goes between zero and non-zero."""
    state: str = "loading"
    refs: int = 0
    expires_at: float = math.inf
    expiring: bool = False
    """Unload as soon as the last in-flight request ends (keep_alive 0, eviction, reload)."""
    expire_task: asyncio.Task[None] | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    busy: int = 0
    """Sequences in prefill or decode (holding a slot)."""
    decoding: int = 0
    stall_until: float = 0.0
    _free: int = 0
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    _cache: deque[tuple[str, ...]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._free = self.slots

    # --- slots: a FIFO semaphore, no barging (like Go's x/sync/semaphore) ---------------------

    async def acquire_slot(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._hand_on()  # we were granted the slot as we were cancelled: pass it on
                else:
                    self._waiters.remove(future)
                raise
        self.busy += 1
        if self.busy == 1:
            self.on_activity(self)

    def release_slot(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self.on_activity(self)
        self._hand_on()

    def _hand_on(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self._free += 1

    @property
    def waiting(self) -> int:
        """Requests queued behind the slots (Ollama's unbounded per-model wait)."""
        return sum(1 for f in self._waiters if not f.done())

    # --- prompt cache ---------------------------------------------------------------------------

    def cached_prefix(self, prompt: Sequence[str]) -> int:
        """Longest prefix of ``prompt`` a slot still holds from an earlier sequence."""
        best = 0
        for seq in self._cache:
            n = 0
            for a, b in zip(seq, prompt, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best

    def remember(self, tokens: tuple[str, ...]) -> None:
        self._cache.append(tokens)
        while len(self._cache) > self.slots:
            self._cache.popleft()

    # --- speed ------------------------------------------------------------------------------------

    def effective_speed(self) -> float:
        """Relative speed of the GPUs holding the layers (layer times add up over a split)."""
        by_index = dict(enumerate(self.gpus))
        time_per_layer = sum(
            self.placement.share(i) / by_index[i].speed
            for i in self.placement.vram
            if i in by_index
        )
        cpu_share = self.placement.cpu_bytes / self.placement.size if self.placement.size else 0.0
        time_per_layer += cpu_share * self.cpu_slowdown
        return 1.0 / time_per_layer if time_per_layer > 0 else 1.0

    def _split_factor(self) -> float:
        gpus_used = sum(1 for v in self.placement.vram.values() if v > 0)
        return 1.0 + self.split_penalty * max(gpus_used - 1, 0)

    def token_interval(self, contention: float) -> float:
        """Seconds between two tokens of one sequence, given the current batch and contention."""
        b = max(self.decoding, 1)
        step = max(1.0 + _BATCH_SLOPE * (b - 1), b / _BATCH_CAP)
        rate = self.model.decode_tps * self.effective_speed()
        return step / rate * self._split_factor() * contention

    def prefill_time(self, tokens: int, contention: float) -> float:
        gpus_used = sum(1 for v in self.placement.vram.values() if v > 0)
        gain = 1.0 + _SPLIT_PREFILL_GAIN * max(gpus_used - 1, 0)
        rate = self.model.prompt_tps * self.effective_speed() * gain
        return tokens / rate * contention
