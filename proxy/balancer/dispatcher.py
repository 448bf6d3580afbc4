"""Proxy-side wait queues with late binding: a request is bound only when it can start.

Ollama queues requests for a loaded model without limit inside the runner, where nobody can see or
move them. The dispatcher keeps them here instead: one FIFO per model, admission limits per model
and in total, a timeout, and a grant only when the policy names an instance with a free slot.
A state change pumps every queue (models served in turn, so one busy model cannot starve another);
a released slot or a new request pumps only its model's queue, since a slot for one model makes no
other model's request placeable (``InstanceView.available`` is per model).

A decision's cost does not grow with the instances that cannot take the request: a policy that
says ``warm_first`` is shown only the warm instances with a free slot when there are any (its
choice depends on nothing else then), and views of the others are built only when there are none.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proxy.balancer.policy import Decision, Policy
from proxy.balancer.state import InstanceState, ModelBook, Outcome, RouteRequest
from proxy.balancer.waitqueue import BACKGROUND, INTERACTIVE, Waiter, WaitQueue
from proxy.config import QueueConfig
from proxy.errors import NoHealthyInstance, QueueFull, QueueTimeout
from proxy.names import model_key

_SESSIONS_KEPT = 10_000


@dataclass(eq=False)
class Lease:
    """A slot on one instance, held from bind to release (see ``balancer/router.py``)."""

    instance: InstanceState
    model: str
    decision: Decision
    queued_s: float
    cold: bool
    """The model was not loaded there when bound: this request waits for a load."""
    bound_at: float = 0.0
    first_token_s: float | None = None
    """Seconds from bind to the model's first answer; None until it started."""
    outcome: Outcome | None = None
    """How it ended, as the HTTP layer saw it; None when it left without saying (cancelled)."""
    final: dict[str, Any] | None = None
    """The answer's final metrics line (token counts), when one came."""
    released: bool = False
    """Its slot went back (at the answer's final line, or when it ended)."""
    finished: bool = False
    """The router accounted for it (once, whatever way it ended)."""
    num_ctx: int = 0
    """The context the request asked for (0: not set)."""

    @property
    def started(self) -> bool:
        return self.first_token_s is not None


DecisionHook = Callable[[str], None]
"""Called with the reason of every decision, ``queued`` included (for metrics)."""


class Dispatcher:
    """Grants slots on instances to requests, in order, as the policy decides."""

    def __init__(
        self,
        instances: Iterable[InstanceState],
        policy: Policy,
        book: ModelBook,
        limits: QueueConfig,
        *,
        on_decision: DecisionHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instances = {inst.name: inst for inst in instances}
        self.policy = policy
        self.book = book
        self.limits = limits
        self._on_decision = on_decision or (lambda _reason: None)
        self._clock = clock
        self._queues: dict[str, WaitQueue] = {}
        self._turn = 0
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._warm_first = bool(getattr(policy, "warm_first", False))
        self.preload: Callable[[InstanceState, str, int], None] | None = None
        """Set by the router when replicas load in the background (``routing.preload``): a
        scale-out starts one there and binds no request to it."""

    # --- public ---------------------------------------------------------------------------------

    async def acquire(
        self,
        model: str,
        *,
        session: str = "",
        exclude: Iterable[str] = (),
        timeout: float | None = None,
        user: str = "",
        background: bool = False,
        num_ctx: int = 0,
    ) -> Lease:
        """Wait for a slot for ``model`` up to ``timeout`` (default ``queue.timeout``); raises
        QueueFull, QueueTimeout or NoHealthyInstance. While it waits, ``background`` requests
        give way to interactive ones and ``user``s take turns (see ``balancer/waitqueue.py``)."""
        model = model_key(model)
        excluded = frozenset(exclude)
        if not any(i.routable for i in self._candidates(model, excluded)):
            if any(i.routable for i in self.instances.values()):
                raise NoHealthyInstance(f"no healthy Ollama instance has model {model!r}")
            raise NoHealthyInstance()
        waiter = Waiter(
            model,
            session,
            excluded,
            self._clock(),
            asyncio.get_running_loop().create_future(),
            user=user,
            priority=BACKGROUND if background else INTERACTIVE,
            num_ctx=num_ctx,
        )
        queue = self._queues.get(model)
        if not queue:
            lease = self._try(waiter)
            if lease is not None:
                return lease
        self._admit(waiter)
        self._queues.setdefault(model, WaitQueue()).append(waiter)
        self._on_decision("queued")
        self.pump(model)  # a longer queue can make a replica worth loading now (scale-out)
        wait = self.limits.timeout if timeout is None else max(timeout, 0.0)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), wait)
        except asyncio.TimeoutError:
            self._abandon(waiter)
            raise QueueTimeout(
                f"no slot for model {model!r} within queue.timeout ({self.limits.timeout:g}s)",
                retry_after=5,
            ) from None
        except BaseException:  # the client went away while waiting
            self._abandon(waiter)
            raise

    def release(self, lease: Lease) -> None:
        """The request is over (done, failed or cancelled): free its slot and serve the queue."""
        if lease.released:
            return
        lease.released = True
        inst = lease.instance
        left = inst.inflight.get(lease.model, 0) - 1
        if left > 0:
            inst.inflight[lease.model] = left
        else:
            inst.inflight.pop(lease.model, None)
        if (
            left <= 0
            and lease.model not in inst.loaded
            and lease.model in inst.loading
            and lease.model not in inst.preloading
        ):
            del inst.loading[lease.model]  # nobody waits for that load there any more
            self.pump()  # the instance may load another model now
        else:
            self.pump(lease.model)  # only this model's requests can take the slot

    def pump(self, only: str | None = None) -> None:
        """Grant every queued request the policy can place now, serving models in turn
        (``only``: the queue of that model alone)."""
        progress = True
        while progress:
            progress = False
            models = [m for m, q in self._queues.items() if q and (only is None or m == only)]
            if not models:
                return
            self._turn = (self._turn + 1) % len(models)
            for model in models[self._turn :] + models[: self._turn]:
                queue = self._queues[model]
                head = queue.head()
                if head is None:
                    continue
                lease = self._try(head)
                if lease is not None:
                    queue.pop_head(head)
                    head.future.set_result(lease)
                    progress = True

    def depth(self, model: str | None = None) -> int:
        if model is not None:
            return len(self._queues.get(model_key(model), ()))
        return sum(len(q) for q in self._queues.values())

    def depths(self, *, empty: bool = False) -> dict[str, int]:
        """Waiting requests by model; ``empty`` also lists models that queued before (now 0)."""
        return {m: len(q) for m, q in self._queues.items() if q or empty}

    def session_instance(self, session: str) -> str | None:
        return self._sessions.get(session)

    # --- internals ------------------------------------------------------------------------------

    def _candidates(self, model: str, exclude: frozenset[str]) -> list[InstanceState]:
        """Instances that hold ``model`` (their own store has it), less ``exclude``."""
        return [i for name, i in self.instances.items() if name not in exclude and i.has(model)]

    def _admit(self, waiter: Waiter) -> None:
        """Refuse ``waiter`` when the queues are full, unless another user holds more than its
        share of the model's queue: then that user's newest request is refused instead."""
        model = waiter.model
        if self.depth(model) >= self.limits.max_per_model:
            full = QueueFull(
                f"too many requests waiting for model {model!r} "
                f"(queue.max_per_model = {self.limits.max_per_model})",
                retry_after=2,
            )
            victim = self._queues[model].make_room_for(waiter.user)
            if victim is None:
                raise full
            victim.future.set_exception(full)
        if self.depth() >= self.limits.max_total:
            raise QueueFull(
                f"too many requests waiting (queue.max_total = {self.limits.max_total})",
                retry_after=2,
            )

    def _try(self, waiter: Waiter) -> Lease | None:
        model = waiter.model
        previous = self._sessions.get(waiter.session) if waiter.session else None
        candidates = [i for i in self._candidates(model, waiter.exclude) if i.routable]
        ctx, max_ctx = waiter.num_ctx, self.book.stats(model).max_ctx
        if self._warm_first:
            warm_free = [
                i
                for i in candidates
                if i.takes(model, ctx, max_ctx) and i.inflight.get(model, 0) < i.slots_for(model)
            ]
            candidates = warm_free or candidates
        fastest = max((i.decode_tps.get(model, 0.0) for i in candidates), default=0.0)
        views = [
            inst.view(
                model,
                slots=inst.slots_for(model),
                affinity=inst.name == previous,
                num_ctx=ctx,
                max_ctx=max_ctx,
                speed=inst.speed_for(model, fastest),
            )
            for inst in candidates
        ]
        if not views:
            return None
        # replicas loading in the background will take that many of the waiting requests
        coming = sum(i.slots_for(model) for i in self.instances.values() if model in i.preloading)
        request = RouteRequest(
            model=model,
            est_size=self.book.estimate_size(model),
            queued_ahead=max(self.depth(model) - 1 - coming, 0),
            service_s=self.book.estimate_service_s(model),
            load_s=self.book.estimate_load_s(model),
            session=waiter.session,
        )
        decision = self.policy.select(request, views)
        if decision is None:
            return None
        inst = self.instances[decision.instance]
        if decision.reason == "scale_out" and self.preload is not None:
            inst.reasons["scale_out"] = inst.reasons.get("scale_out", 0) + 1
            self._on_decision("scale_out")
            self.preload(inst, model, request.est_size)  # the request waits on for a slot
            return None
        cold = model not in inst.loaded
        if cold and model not in inst.loading:
            inst.loading[model] = request.est_size
        inst.inflight[model] = inst.inflight.get(model, 0) + 1
        if waiter.session:
            self._sessions[waiter.session] = inst.name
            self._sessions.move_to_end(waiter.session)
            while len(self._sessions) > _SESSIONS_KEPT:
                self._sessions.popitem(last=False)
        inst.reasons[decision.reason] = inst.reasons.get(decision.reason, 0) + 1
        self._on_decision(decision.reason)
        now = self._clock()
        return Lease(
            inst, model, decision, now - waiter.since, cold, bound_at=now, num_ctx=waiter.num_ctx
        )

    def _abandon(self, waiter: Waiter) -> None:
        """Drop a waiter that gave up; if it was granted meanwhile, hand the slot back."""
        queue = self._queues.get(waiter.model)
        if queue is not None:
            queue.remove(waiter)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result())
        else:
            future.cancel()
