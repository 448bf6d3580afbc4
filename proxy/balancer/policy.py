"""The Policy protocol: a policy only ranks instances, it never judges health.

A policy gets one request and a snapshot of the healthy, non-draining instances (``InstanceView``)
and returns a ``Decision`` naming an instance whose ``available`` is true, or ``None`` to let the
request wait in the proxy's queue. It does no I/O and keeps at most a counter of its own.
The registry by name is ``proxy.balancer.policies.POLICIES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.balancer.state import InstanceView, RouteRequest

Reason = Literal["warm", "affinity", "scale_out", "cold_fit", "evict", "fallback", "overcommit"]
"""Why an instance was chosen; ``queued`` (no decision) is counted by the dispatcher."""


@dataclass(frozen=True)
class Decision:
    instance: str
    reason: Reason


class Policy(Protocol):
    """Chooses an available instance for a request, or None to keep it queued.

    A policy may set ``warm_first = True`` when, whenever some instance has the model warm with a
    free slot, its choice depends on those instances alone: the dispatcher then shows it only
    them, so a decision does not cost a view of every instance (see ``balancer/dispatcher.py``).
    """

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision | None:
        """Pick among ``instances`` whose ``available`` is true; never return a busy one."""


def fits(view: InstanceView, size: int) -> bool:
    """Whether a model of ``size`` bytes loads on ``view`` without evicting another.

    With its free memory unknown (a server on another host without an agent or ``memory_gib``),
    an instance with nothing loaded counts as fitting: it is only offered models its own store
    holds, which its operator put there to run on it.
    """
    if view.free_vram is None:
        return view.loaded_models == 0
    return view.free_vram >= size


def placement_reason(view: InstanceView, request: RouteRequest) -> Reason:
    """What landing on ``view`` means for the model: warm, a load that fits, or an eviction."""
    if view.warm:
        return "warm"
    return "cold_fit" if fits(view, request.est_size) else "evict"
