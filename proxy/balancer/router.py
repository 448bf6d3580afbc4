"""The one owner of a request's routing lifecycle: lease a slot, note its start, finish it once.

The HTTP layer asks for a lease with ``async with router.lease(model) as lease`` and only says what
happened (``lease.outcome``, ``lease.final``). Whatever way the block ends (an answer, an upstream
failure, the client leaving, a cancellation at any await) the router finishes the lease exactly
once: the slot goes back to the dispatcher, a load nobody waits for any more is forgotten, timings
are learned, and the outcome counts for or against the instance (outlier ejection).

Instance state is written here and in the monitor only. The load reservation (``inst.loading``)
moves to ``inst.loaded`` when a request there sees its model's first answer, or when the monitor's
``/api/ps`` lists the model (:meth:`Router.saw_loaded`); it is dropped when the last request
waiting for it leaves without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.balancer.dispatcher import DecisionHook, Dispatcher, Lease
from proxy.balancer.outlier import Outliers
from proxy.balancer.policy import Policy
from proxy.balancer.state import InstanceState, LoadedModel, ModelBook, Outcome
from proxy.config import Config
from proxy.names import model_key

log = logging.getLogger("ollamux.router")

CHARS_PER_TOKEN = 4
"""A prompt's length in tokens, roughly, from its body's bytes (a generous deadline's input)."""
MIN_TOKENS_FOR_SPEED = 8
SPEED_WEIGHT = 0.2
"""How much one answer moves an instance's learned relative speed."""
PRELOAD_RETRY_S = 30.0
"""After a background load failed on an instance, how long before it is tried there again."""
_FAILURES = frozenset({Outcome.CONNECT, Outcome.TIMEOUT, Outcome.STATUS, Outcome.MIDSTREAM})


Preloader = Callable[[InstanceState, str, float], Awaitable[str | None]]
"""Loads a model on an instance within a deadline: None when it is loaded, else why not."""


class Abortable(Protocol):
    """An exchange in flight that the router can end when its instance goes away."""

    delivering: bool
    """Bytes of the answer are reaching the client (a stream under way)."""

    def abort(self, reason: str) -> None: ...


@dataclass(frozen=True)
class Deadlines:
    """Seconds an exchange may wait: for its first byte, then between two chunks."""

    first: float
    idle: float


class Router:
    """Leases, deadlines and outcomes for every request; the dispatcher grants the slots."""

    def __init__(
        self,
        instances: Iterable[InstanceState],
        policy: Policy,
        book: ModelBook,
        config: Config,
        *,
        on_decision: DecisionHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instances = list(instances)
        self.book = book
        self.dispatcher = Dispatcher(
            self.instances, policy, book, config.queue, on_decision=on_decision, clock=clock
        )
        self.outliers = Outliers(
            config.ejection,
            clock=clock,
            on_change=self.dispatcher.pump,
            on_eject=self._ejected,
        )
        self._timeouts = config.timeouts
        self._clock = clock
        self.preloader: Preloader | None = None
        """Loads a model on an instance (an HTTP call, given by the app); with
        ``routing.preload`` a scale-out uses it instead of binding a request to the load."""
        if config.routing.preload:
            self.dispatcher.preload = self._preload
        self._preloads: set[asyncio.Task[None]] = set()
        self._preload_failed: dict[tuple[str, str], float] = {}
        self._closed = False
        self._active: dict[str, set[Abortable]] = {i.name: set() for i in self.instances}
        self._started_at: dict[tuple[str, str], float] = {}
        """When a request last saw a model start on an instance (the monitor's polls may lag)."""

    # --- the request's lifecycle ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self,
        model: str,
        *,
        session: str = "",
        exclude: Iterable[str] = (),
        wait: float | None = None,
        user: str = "",
        background: bool = False,
        num_ctx: int = 0,
    ) -> AsyncIterator[Lease]:
        """A slot for ``model``, waited for up to ``wait`` seconds (default ``queue.timeout``),
        finished once however the block ends. ``user`` and ``background`` order the wait.

        Raises QueueFull, QueueTimeout or NoHealthyInstance before granting one.
        """
        lease = await self.dispatcher.acquire(
            model,
            session=session,
            exclude=exclude,
            timeout=wait,
            user=user,
            background=background,
            num_ctx=num_ctx,
        )
        try:
            yield lease
        except BaseException:
            lease.outcome = lease.outcome or Outcome.CLIENT_GONE
            raise
        finally:
            self._finish(lease)

    def started(self, lease: Lease) -> None:
        """The model began to answer: it is loaded there now, whatever it took."""
        if lease.started:
            return
        lease.first_token_s = max(self._clock() - lease.bound_at, 0.0)
        inst, model = lease.instance, lease.model
        current = inst.loaded.get(model)
        if (
            current is not None
            and lease.num_ctx
            and current.context_length
            not in (
                0,
                lease.num_ctx,
            )
        ):  # Ollama reloaded it for this request's context
            inst.loaded[model] = dataclasses.replace(current, context_length=lease.num_ctx)
        if model in inst.loaded:
            return
        self._loaded(inst, model)
        if lease.cold:
            self.book.stats(model).observe_load(lease.first_token_s)
        self.dispatcher.pump()

    def deadlines(self, lease: Lease, *, prompt_bytes: int, silent: bool = False) -> Deadlines:
        """How long the exchange for ``lease`` may wait for its first byte, then between chunks.

        The first token: at least ``timeouts.first_token``, more for a long prompt at the learned
        prompt rate; plus the load when the model is cold there (at least ``timeouts.load``).
        ``silent``: the answer comes in one piece at the end (a non-streamed generation the proxy
        cannot watch), so the whole generation must fit before the first byte too.
        """
        t = self._timeouts
        stats = self.book.stats(lease.model)
        first = t.first_token
        if stats.prompt_tps:
            first = max(first, 3 * prompt_bytes / CHARS_PER_TOKEN / stats.prompt_tps)
        if lease.cold:
            first += max(t.load, 4 * self.book.estimate_load_s(lease.model))
        if silent or lease.decision.reason == "overcommit":  # or it waits behind another
            first += max(t.load, 4 * self.book.estimate_service_s(lease.model))
        return Deadlines(first=first, idle=t.idle)

    def answered(self, lease: Lease) -> None:
        """The answer's final line came: Ollama's slot is free, so the proxy's is too, before
        the last bytes reach the client (its accounting waits for the end)."""
        self.dispatcher.release(lease)

    def _finish(self, lease: Lease) -> None:
        if lease.finished:
            return
        lease.finished = True
        self.dispatcher.release(lease)
        outcome = lease.outcome or Outcome.CLIENT_GONE
        inst = lease.instance
        if outcome in _FAILURES:
            self.outliers.failure(inst, outcome.value)
            return
        if outcome is not Outcome.OK or not lease.started:
            return
        self.outliers.success(inst)
        assert lease.first_token_s is not None
        inst.recent_ttft.append(lease.queued_s + lease.first_token_s)
        self._learn_speed(inst, lease.model, lease.final or {})
        stats = self.book.stats(lease.model)
        if not lease.cold:
            stats.observe_service(max(self._clock() - lease.bound_at, 0.0))
            prompt = (lease.final or {}).get("prompt_eval_count")
            if isinstance(prompt, int):
                stats.observe_prompt(prompt, lease.first_token_s)

    def _learn_speed(self, inst: InstanceState, model: str, final: dict[str, Any]) -> None:
        """Decode speed from Ollama's final line (``eval_count`` over ``eval_duration``), and
        this instance's speed against the fastest one that ran the same model."""
        count, duration = final.get("eval_count"), final.get("eval_duration")
        if not isinstance(count, int) or not isinstance(duration, int) or duration <= 0:
            return
        if count < MIN_TOKENS_FOR_SPEED:
            return  # a few tokens say more about the prompt than about the GPU
        inst.observe_decode(model, count / (duration / 1e9))
        fastest = max(i.decode_tps.get(model, 0.0) for i in self.instances)
        ratio = inst.decode_tps[model] / fastest
        old = inst.relative_speed
        inst.relative_speed = ratio if not old else (1 - SPEED_WEIGHT) * old + SPEED_WEIGHT * ratio

    # --- replicas loaded in the background ------------------------------------------------------

    def _preload(self, inst: InstanceState, model: str, size: int) -> None:
        """Start loading ``model`` on ``inst`` with no request bound to it; waiting requests go
        there once it is loaded (or to a warm slot that frees first)."""
        if self.preloader is None or self._closed or model in inst.loading:
            return
        failed = self._preload_failed.get((inst.name, model))
        if failed is not None and self._clock() - failed < PRELOAD_RETRY_S:
            return  # it failed there just now; requests wait for warm slots meanwhile
        inst.loading[model] = size
        inst.preloading.add(model)
        deadline = max(self._timeouts.load, 4 * self.book.estimate_load_s(model))
        task = asyncio.get_running_loop().create_task(self._load(inst, model, deadline))
        self._preloads.add(task)
        task.add_done_callback(self._preloads.discard)

    async def _load(self, inst: InstanceState, model: str, deadline: float) -> None:
        asked = self._clock()
        why: str | None = "cancelled"
        try:
            assert self.preloader is not None
            why = await self.preloader(inst, model, deadline)
        finally:
            inst.preloading.discard(model)
            if why is None:
                self._loaded(inst, model)
                self.book.stats(model).observe_load(self._clock() - asked)
            else:
                inst.loading.pop(model, None)
                if why != "cancelled":
                    log.warning("loading %s on instance %s failed: %s", model, inst.name, why)
                    self._preload_failed[inst.name, model] = self._clock()
            self.dispatcher.pump()

    def _loaded(self, inst: InstanceState, model: str) -> None:
        """``model`` is loaded on ``inst`` now (its first answer came, or its load ended)."""
        if model in inst.loaded:
            inst.loading.pop(model, None)
            return
        size = inst.loading.pop(model, 0) or self.book.estimate_size(model)
        inst.loaded[model] = LoadedModel(name=model, size_vram=size, context_length=0)
        self._started_at[inst.name, model] = self._clock()

    async def close(self) -> None:
        """Stop the background loads still under way, and start no more."""
        self._closed = True
        tasks = list(self._preloads)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- exchanges in flight --------------------------------------------------------------------

    @contextlib.contextmanager
    def watching(self, inst: InstanceState, exchange: Abortable) -> Iterator[None]:
        """Let :meth:`abort_on` end ``exchange`` while the block runs."""
        active = self._active.setdefault(inst.name, set())
        active.add(exchange)
        try:
            yield
        finally:
            active.discard(exchange)

    def abort_on(self, inst: InstanceState, reason: str, *, spare_streams: bool = False) -> None:
        """End the exchanges in flight on ``inst``; ``spare_streams``: not those delivering."""
        active = [
            e for e in self._active.get(inst.name, ()) if not (spare_streams and e.delivering)
        ]
        if active:
            log.warning("%s: ending %d request(s) in flight there", reason, len(active))
        for exchange in active:
            exchange.abort(reason)

    def report(self, inst: InstanceState, outcome: Outcome) -> None:
        """The outcome of an exchange that held no lease (a request passed through as is)."""
        if outcome in _FAILURES:
            self.outliers.failure(inst, outcome.value)
        elif outcome is Outcome.OK:
            self.outliers.success(inst)

    # --- instance state from elsewhere ----------------------------------------------------------

    def saw_loaded(
        self, inst: InstanceState, loaded: dict[str, LoadedModel], asked_at: float
    ) -> None:
        """The monitor read ``inst``'s /api/ps (asked at ``asked_at``): that is what is loaded,
        except models whose first answer came after it asked; those loads' reservations end."""
        for name, model in inst.loaded.items():
            if name not in loaded and self._started_at.get((inst.name, name), -1.0) > asked_at:
                loaded[name] = model
        inst.loaded = loaded
        dropped = [inst.loading.pop(name) for name in loaded if name in inst.loading]
        inst.preloading -= set(loaded)  # loaded: requests may go there (its load call ends soon)
        if dropped:
            self.dispatcher.pump()

    def _ejected(self, inst: InstanceState) -> None:
        """Requests still waiting there for a first answer go elsewhere now; streams under way
        keep going (the idle deadline still guards them)."""
        self.abort_on(inst, f"instance {inst.name} was ejected", spare_streams=True)

    def went_down(self, inst: InstanceState) -> None:
        """The monitor lost ``inst``: its streams will never end by themselves."""
        self.abort_on(inst, f"instance {inst.name} stopped answering")

    def unloaded(self, inst: InstanceState, model: str) -> None:
        """A request unloaded ``model`` on ``inst`` (keep_alive 0)."""
        inst.loaded.pop(model_key(model), None)
        self.dispatcher.pump()

    def set_draining(self, inst: InstanceState, draining: bool) -> bool:
        """Drain or undrain ``inst``; True when that changed anything."""
        if inst.draining == draining:
            return False
        inst.draining = draining
        self.dispatcher.pump()  # requests waiting in the proxy may start there now
        return True

    def routable(self) -> list[InstanceState]:
        return [i for i in self.instances if i.routable]

    def holders(self, model: str, *, known: bool = False) -> list[InstanceState]:
        """Instances whose store holds ``model``, up or not; ``known``: only those whose list
        says so (not those whose list was not read yet)."""
        key = model_key(model)
        if known:
            return [i for i in self.instances if i.is_warm(key) or key in (i.models or ())]
        return [i for i in self.instances if i.has(key)]

    def not_found(self, inst: InstanceState, model: str, *, tried: Iterable[str] = ()) -> bool:
        """``inst`` answered that it does not have ``model``: take it off its list (its monitor
        re-reads the list) and say whether a routable instance not ``tried`` may have it."""
        key = model_key(model)
        if inst.models is not None:
            inst.models = inst.models - {key}
        inst.loaded.pop(key, None)
        self.dispatcher.pump()
        skip = {inst.name, *tried}
        return any(i.routable and i.has(key) for i in self.instances if i.name not in skip)

    def inflight(self) -> int:
        """Requests holding a slot now, over all instances."""
        return sum(i.inflight_total() for i in self.instances)
