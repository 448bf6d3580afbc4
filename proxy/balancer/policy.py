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

Reason = Literal["warm", "affinity", "scale_out", "cold_fit", "evict", "fallback"]
"""Why an instance was chosen; ``queued`` (no decision) is counted by the dispatcher."""


@dataclass(frozen=True)
class Decision:
    instance: str
    reason: Reason


class Policy(Protocol):
    """Chooses an available instance for a request, or None to keep it queued."""

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision | None:
        """Pick among ``instances`` whose ``available`` is true; never return a busy one."""


def placement_reason(view: InstanceView, request: RouteRequest) -> Reason:
    """What landing on ``view`` means for the model: warm, a load that fits, or an eviction."""
    if view.warm:
        return "warm"
    if view.free_vram is not None and view.free_vram >= request.est_size:
        return "cold_fit"
    return "evict"
