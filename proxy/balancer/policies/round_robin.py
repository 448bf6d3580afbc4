"""round_robin: the available instances in turn."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.balancer.policy import Decision, placement_reason
from proxy.balancer.state import InstanceView, RouteRequest


class RoundRobin:
    """Each request goes to the next available instance by name, blind to models and load."""

    def __init__(self) -> None:
        self._turn = 0

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision | None:
        available = sorted((v for v in instances if v.available), key=lambda v: v.name)
        if not available:
            return None
        choice = available[self._turn % len(available)]
        self._turn += 1
        return Decision(choice.name, placement_reason(choice, request))
