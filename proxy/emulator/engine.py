"""The emulated Ollama scheduler: VRAM, serial loads, slots, keep-alive, eviction and timing.

It follows Ollama's rules where routing depends on them (shared/reference/ollama.md §6, §7):

- a request for a loaded model with the same context takes the runner at once (fast path);
  everything else enters one FIFO of capacity ``max_queue`` (overflow: 503) served by one task,
  so loads are serial across all models;
- at most one runner per model; a different ``num_ctx`` means unload after draining, then reload;
- placement: the single GPU with most free memory that fits weights + KV + overhead; otherwise (or
  with spread) a layer split over all GPUs; the first model always loads, spilling to RAM;
- eviction when ``max_loaded_models`` is reached or the model does not fit: runners sorted by
  keep-alive then blob digest, the first idle one, else the first one after it drains;
- keep-alive is sticky, starts when the last request ends, 0 unloads at once, inf never.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from proxy.config import GIB, ModelSpec
from proxy.emulator.clock import Clock
from proxy.emulator.events import (
    EmbedResult,
    Event,
    Faults,
    GenerateRequest,
    Loaded,
    LoadedModel,
    ServerSettings,
)
from proxy.emulator.meter import BusyMeter
from proxy.emulator.placement import Placement, fit, spill
from proxy.emulator.runner import Runner
from proxy.emulator.sequence import embed_one, run_sequence
from proxy.errors import RunnerFailed, ServerBusy
from proxy.gpu import GpuReading

LOAD_FIXED_S = 1.5
"""Runner spawn and CUDA init before the weights are read (performance.md §1e)."""
FAST_PATH_S = 2e-5
"""load_duration Ollama reports for an already-loaded model (microseconds)."""
_TIERS = (262144, 32768, 4096)


@dataclass(eq=False)
class _Pending:
    model: ModelSpec
    num_ctx: int
    auto_ctx: bool
    keep_alive: float | None
    future: asyncio.Future[Runner]
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class Engine:
    """One emulated Ollama server's scheduler and runners."""

    def __init__(
        self, settings: ServerSettings, clock: Clock, *, faults: Faults | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.faults = faults or Faults()
        self._runners: dict[str, Runner] = {}
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._meters = [BusyMeter() for _ in settings.gpus]
        self.max_loaded = settings.max_loaded_models or 3 * max(len(settings.gpus), 1)
        total = sum(g.memory_bytes for g in settings.gpus)
        self.default_ctx = settings.context_length or next(
            (tier for tier, floor in zip(_TIERS, (47, 23, 0), strict=True) if total >= floor * GIB),
            4096,
        )

    async def aclose(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        for runner in list(self._runners.values()):
            self._unload(runner)

    # --- the API the HTTP layer uses ------------------------------------------------------------

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        """Load if needed, wait for a slot, evaluate the prompt, stream tokens, report metrics."""
        await self._faults_before_start()
        t0 = self.clock.now()
        runner = await self._acquire(req.model, req.num_ctx, req.keep_alive)
        try:
            load_duration = max(self.clock.now() - t0, FAST_PATH_S)
            yield Loaded(load_duration)
            await runner.acquire_slot()
            try:
                events = run_sequence(
                    runner,
                    req,
                    clock=self.clock,
                    contention=lambda: self._contention(runner),
                    faults=self.faults,
                    load_duration=load_duration,
                    server_seed=self.settings.seed,
                )
                async for event in events:
                    yield event
            finally:
                runner.release_slot()
        finally:
            self._release(runner)

    async def load(
        self, model: ModelSpec, *, num_ctx: int | None, keep_alive: float | None
    ) -> float:
        """Schedule and load ``model`` without generating (empty prompt); return load_duration."""
        t0 = self.clock.now()
        runner = await self._acquire(model, num_ctx, keep_alive)
        self._release(runner)
        return max(self.clock.now() - t0, FAST_PATH_S)

    def unload(self, model: ModelSpec) -> None:
        """keep_alive 0 with an empty prompt: expire now, or as soon as in-flight requests end."""
        runner = self._runners.get(model.digest)
        if runner is not None and runner.state == "ready":
            runner.keep_alive = 0.0
            self._expire(runner)

    async def embed(
        self,
        model: ModelSpec,
        inputs: list[tuple[str, ...]],
        *,
        num_ctx: int | None,
        keep_alive: float | None,
    ) -> EmbedResult:
        """Each input takes a slot (embedding runners have one) for its prompt-evaluation time."""
        await self._faults_before_start()
        t0 = self.clock.now()
        runner = await self._acquire(model, num_ctx, keep_alive)
        load_duration = max(self.clock.now() - t0, FAST_PATH_S)
        try:
            counts = [min(len(tokens), runner.num_ctx) for tokens in inputs]
            await asyncio.gather(
                *(
                    embed_one(
                        runner, n, clock=self.clock, contention=lambda: self._contention(runner)
                    )
                    for n in counts
                )
            )
        finally:
            self._release(runner)
        return EmbedResult(
            load_duration=load_duration,
            prompt_eval_count=sum(counts),
            duration=self.clock.now() - t0,
        )

    def ps(self) -> list[LoadedModel]:
        """Ready runners as /api/ps lists them, latest expiry first."""
        out = [
            LoadedModel(
                model=r.model,
                size=r.placement.size,
                size_vram=r.placement.size_vram,
                context_length=r.num_ctx,
                expires_at=r.expires_at,
                gpus=tuple(sorted(r.placement.vram)),
            )
            for r in self._runners.values()
            if r.state == "ready"
        ]
        return sorted(out, key=lambda m: m.expires_at, reverse=True)

    def gpus(self) -> list[GpuReading]:
        """The GPUs as GET /gpus reports them: the shape every GpuSource reads."""
        now = self.clock.now()
        states = []
        for i, gpu in enumerate(self.settings.gpus):
            used = self._used(i) + (self.settings.reserve_bytes if self._used(i) else 0)
            states.append(
                GpuReading(
                    index=i,
                    uuid=gpu.uuid,
                    name=gpu.name,
                    memory_total=gpu.memory_bytes,
                    memory_used=min(used, gpu.memory_bytes),
                    memory_free=max(gpu.memory_bytes - used, 0),
                    utilization=self._meters[i].utilization(now),
                )
            )
        return states

    def queued(self) -> int:
        """Requests waiting for the scheduler plus those waiting for a slot."""
        return len(self._pending) + self.waiting_for_slot()

    def waiting_for_slot(self) -> int:
        """Requests whose model is loaded but whose slots are all busy (Ollama's unbounded wait)."""
        return sum(r.waiting for r in self._runners.values())

    def pending(self) -> int:
        """Requests waiting for the scheduler (a load, a reload or an eviction)."""
        return len(self._pending)

    # --- acquiring and releasing runners ---------------------------------------------------------

    def _context(self, model: ModelSpec, num_ctx: int | None) -> tuple[int, bool]:
        auto = num_ctx is None or num_ctx <= 0
        ctx = self.default_ctx if auto else max(int(num_ctx or 0), 4)
        return min(ctx, model.context_length), auto

    def _fits_request(self, runner: Runner, ctx: int, auto: bool) -> bool:
        return runner.state == "ready" and (
            (auto and runner.auto_ctx) or (not auto and runner.num_ctx == ctx)
        )

    async def _acquire(
        self, model: ModelSpec, num_ctx: int | None, keep_alive: float | None
    ) -> Runner:
        ctx, auto = self._context(model, num_ctx)
        runner = self._runners.get(model.digest)
        if runner is not None and self._fits_request(runner, ctx, auto):
            self._grant(runner, keep_alive)  # fast path: no queue for a loaded model
            return runner
        if len(self._pending) >= self.settings.max_queue:
            raise ServerBusy()
        loop = asyncio.get_running_loop()
        pending = _Pending(model, ctx, auto, keep_alive, loop.create_future())
        self._pending.append(pending)
        self._wakeup.set()
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = loop.create_task(self._schedule_forever())
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.cancelled.set()
            if pending.future.done() and not pending.future.cancelled():
                self._release(pending.future.result())
            raise

    def _grant(self, runner: Runner, keep_alive: float | None) -> None:
        runner.refs += 1
        if keep_alive is not None:
            runner.keep_alive = keep_alive
        if runner.expire_task is not None:
            runner.expire_task.cancel()
            runner.expire_task = None

    def _release(self, runner: Runner) -> None:
        runner.refs -= 1
        if runner.refs > 0 or runner.state != "ready":
            return
        if runner.expiring or runner.keep_alive <= 0:
            self._unload(runner)
        elif math.isinf(runner.keep_alive):
            runner.expires_at = math.inf
        else:
            runner.expires_at = self.clock.now() + runner.keep_alive
            runner.expire_task = asyncio.get_running_loop().create_task(self._expire_later(runner))

    async def _expire_later(self, runner: Runner) -> None:
        await self.clock.sleep(runner.expires_at - self.clock.now())
        runner.expire_task = None
        if runner.refs == 0:
            self._unload(runner)

    def _expire(self, runner: Runner) -> None:
        runner.expiring = True
        if runner.refs == 0:
            self._unload(runner)

    def _unload(self, runner: Runner) -> None:
        if runner.expire_task is not None:
            runner.expire_task.cancel()
            runner.expire_task = None
        if self._runners.get(runner.model.digest) is runner:
            del self._runners[runner.model.digest]
        if runner.busy:
            runner.busy = 0
            self._on_activity(runner)
        runner.state = "gone"
        runner.gone.set()

    # --- the scheduler: one pending request at a time, FIFO across models ----------------------

    async def _schedule_forever(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            pending = self._pending.popleft()
            if not pending.cancelled.is_set():
                await self._schedule(pending)

    async def _schedule(self, p: _Pending) -> None:
        while not p.cancelled.is_set():
            current = self._runners.get(p.model.digest)
            if current is not None:
                if self._fits_request(current, p.num_ctx, p.auto_ctx):
                    if not p.future.done():
                        self._grant(current, p.keep_alive)
                        p.future.set_result(current)
                    return
                await self._evict(current)  # a different context: drain, unload, reload
                continue
            if len(self._runners) >= self.max_loaded:
                await self._evict(self._victim())
                continue
            placement, ctx = self._place_with_tiers(p)
            if placement is None:
                if self._runners:
                    await self._evict(self._victim())
                    continue
                placement = spill(self.need_bytes(p.model, ctx), self._free())
            await self._load(p, placement, ctx)
            return

    def _victim(self) -> Runner:
        """Ollama's rule: by keep-alive, then blob digest; the first idle one, else the first."""
        ordered = sorted(self._runners.values(), key=lambda r: (r.keep_alive, r.model.digest))
        return next((r for r in ordered if r.refs == 0), ordered[0])

    async def _evict(self, runner: Runner) -> None:
        self._expire(runner)
        await runner.gone.wait()

    async def _load(self, p: _Pending, placement: Placement, ctx: int) -> None:
        model = p.model
        runner = Runner(
            model=model,
            num_ctx=ctx,
            auto_ctx=p.auto_ctx,
            slots=1 if model.embedding else self.settings.num_parallel,
            placement=placement,
            gpus=self.settings.gpus,
            keep_alive=self.settings.keep_alive,
            split_penalty=self.settings.spread_penalty,
            cpu_slowdown=self.settings.cpu_slowdown,
            on_activity=self._on_activity,
        )
        self._runners[model.digest] = runner
        seconds = (LOAD_FIXED_S + model.size_gb / model.load_gbps) * self.faults.slow
        loading = asyncio.ensure_future(self.clock.sleep(seconds))
        aborted = asyncio.ensure_future(p.cancelled.wait())
        try:
            await asyncio.wait({loading, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loading.cancel()
            aborted.cancel()
        if p.cancelled.is_set():  # the client left during the load: Ollama aborts it
            self._unload(runner)
            return
        runner.state = "ready"
        self._grant(runner, p.keep_alive)
        # a fresh, never-idle runner reports now + keep-alive (ollama.md §3.6)
        runner.expires_at = self.clock.now() + runner.keep_alive
        if not p.future.done():  # its waiter may be gone: the model stays loaded, as in Ollama
            p.future.set_result(runner)

    # --- placement -------------------------------------------------------------------------------

    def _used(self, gpu: int) -> int:
        return sum(r.placement.vram.get(gpu, 0) for r in self._runners.values())

    def _available(self, gpu: int) -> int:
        spec = self.settings.gpus[gpu]
        return max(spec.memory_bytes - self.settings.reserve_bytes - self._used(gpu), 0)

    def need_bytes(self, model: ModelSpec, ctx: int) -> int:
        """Weights plus KV cache for ``ctx`` tokens in every slot (without per-GPU overhead)."""
        slots = 1 if model.embedding else self.settings.num_parallel
        return model.size_bytes + int(model.kv_kib_per_token * 1024 * ctx * slots)

    def _place_with_tiers(self, p: _Pending) -> tuple[Placement | None, int]:
        """Place at the request's context; an automatic one steps down a tier on an empty box."""
        placement = fit(
            self.need_bytes(p.model, p.num_ctx), self._free(), spread=self.settings.spread
        )
        if placement is not None or not p.auto_ctx or self._runners:
            return placement, p.num_ctx
        for tier in _TIERS:
            ctx = min(tier, p.model.context_length)
            if ctx < p.num_ctx:
                placement = fit(
                    self.need_bytes(p.model, ctx), self._free(), spread=self.settings.spread
                )
                if placement is not None:
                    return placement, ctx
        return None, p.num_ctx

    def _free(self) -> dict[int, int]:
        return {i: self._available(i) for i in range(len(self.settings.gpus))}

    # --- timing of one sequence ------------------------------------------------------------------

    def _on_activity(self, runner: Runner) -> None:
        now = self.clock.now()
        for gpu in runner.placement.vram:
            if gpu < len(self._meters):
                self._meters[gpu].set_busy(any(self._busy_on(gpu)), now)

    def _busy_on(self, gpu: int) -> list[Runner]:
        return [r for r in self._runners.values() if r.busy and gpu in r.placement.vram]

    def _contention(self, runner: Runner) -> float:
        """How many runners' worth of work share the busiest GPU under this runner (>= 1)."""
        load = [
            sum(r.placement.share(gpu) for r in self._busy_on(gpu)) for gpu in runner.placement.vram
        ]
        return max([1.0, *load]) * self.faults.slow

    async def _faults_before_start(self) -> None:
        if self.faults.hang:
            await asyncio.Event().wait()  # never set: the request hangs until the client leaves
        if self.faults.fail_next > 0:
            self.faults.fail_next -= 1
            raise RunnerFailed(self.faults.fail_message)
