"""vram_queue (default): warm slot first, then a load where VRAM is free, replicas under queue."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.balancer.policy import Decision, fits
from proxy.balancer.state import InstanceView, RouteRequest
from proxy.config import RoutingConfig

SPEED_SLACK = 0.1
"""Instances within this of the fastest one's relative speed count as equally fast."""
AFFINITY_SLACK = 1
"""The session's previous instance wins while it has at most this many more in flight."""


class VramQueue:
    """Route to the instance that will answer first, by where the model is and what VRAM is free.

    1. warm instances (model loaded or loading there) with a free slot: fewest in flight, or the
       session's previous one within ``AFFINITY_SLACK`` (its prompt cache is warm);
    2. warm instances all busy: load a replica on a GPU that has nothing loaded and fits it;
       failing that, wait, unless the expected wait behind them (queued x service time / their
       slots) exceeds the load time of a replica on an instance whose free VRAM fits it;
    3. not warm anywhere: an instance whose free VRAM fits the model without eviction, the one
       with fewest models sharing its GPU first, then most free; else the one where an eviction
       disturbs least (idle models, nothing in flight).
    An instance already loading a model counts as busy for new loads: Ollama loads one at a time.
    """

    warm_first = True
    """With a warm instance free, the choice is among the warm free ones only (step 1)."""

    def __init__(self, config: RoutingConfig | None = None) -> None:
        config = config or RoutingConfig()
        self.session_affinity = config.session_affinity
        self.scale_out = config.scale_out
        self.overcommit = config.overcommit

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision | None:
        available = [v for v in instances if v.available]
        warm = [v for v in instances if v.warm]
        warm_free = [v for v in warm if v.available]
        if warm_free:
            return self._warm(warm_free)
        can_load = [v for v in available if not v.warm and not v.loading]
        fitting = [v for v in can_load if fits(v, request.est_size)]
        if warm:
            if not (self.scale_out and fitting):
                return self._overcommit(warm)
            # A GPU with nothing loaded loses nothing by taking a replica: fill it at once.
            # Elsewhere the replica must pay for itself: the wait behind the warm ones must
            # exceed its load time.
            empty = [v for v in fitting if v.loaded_models == 0]
            if empty:
                return Decision(_roomiest(empty).name, "scale_out")
            capacity = sum(v.slots for v in warm)
            expected_wait = (request.queued_ahead + 1) * request.service_s / capacity
            if expected_wait <= request.load_s:
                return self._overcommit(warm)
            return Decision(_roomiest(fitting).name, "scale_out")
        if fitting:
            return Decision(_roomiest(fitting).name, "cold_fit")
        if can_load:
            calmest = min(can_load, key=lambda v: (v.inflight, -v.idle_models, -(v.free_vram or 0)))
            return Decision(calmest.name, "evict")
        if available:  # every instance is loading: take the least loaded rather than stall
            return Decision(min(available, key=lambda v: (v.inflight, v.name)).name, "fallback")
        return None

    def _overcommit(self, warm: list[InstanceView]) -> Decision | None:
        """Every warm slot is busy: queue one more inside the least loaded warm instance, up to
        ``overcommit`` beyond its slots, so it starts as soon as a slot frees there."""
        room = [v for v in warm if v.inflight_model < v.slots + self.overcommit]
        if not room:
            return None
        best = min(room, key=lambda v: (v.inflight_model - v.slots, v.inflight, v.name))
        return Decision(best.name, "overcommit")

    def _warm(self, warm_free: list[InstanceView]) -> Decision:
        best = min(warm_free, key=lambda v: (v.inflight, v.inflight_model, v.name))
        if self.session_affinity:
            for view in warm_free:
                if view.affinity and view.inflight <= best.inflight + AFFINITY_SLACK:
                    return Decision(view.name, "affinity")
        return Decision(best.name, "warm")


def _roomiest(views: list[InstanceView]) -> InstanceView:
    """Fewest models sharing the GPU (they would compete for its compute), then a GPU about as
    fast as the fastest for the model (learned; within ``SPEED_SLACK``, so noise does not
    decide), then most free VRAM."""
    top = max(v.speed for v in views)

    def rank(v: InstanceView) -> tuple[int, bool, int, int, str]:
        slower = v.speed < top - SPEED_SLACK
        return (v.loaded_models, slower, -(v.free_vram or 0), v.inflight, v.name)

    return min(views, key=rank)
