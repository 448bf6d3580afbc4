"""least_connections: the available instance with the fewest requests in flight."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.balancer.policy import Decision, placement_reason
from proxy.balancer.state import InstanceView, RouteRequest


class LeastConnections:
    """Fewest in-flight requests (counted by the proxy, all models), ties by name.

    Like nginx ``least_conn``: it ignores where the model is loaded and how much VRAM is free.
    """

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision | None:
        available = [v for v in instances if v.available]
        if not available:
            return None
        best = min(available, key=lambda v: (v.inflight, v.name))
        return Decision(best.name, placement_reason(best, request))
