"""random: a uniform pick, what Open WebUI does across several OLLAMA_BASE_URLS."""

from __future__ import annotations

import random
from collections.abc import Sequence

from proxy.balancer.policy import Decision, placement_reason
from proxy.balancer.state import InstanceView, RouteRequest


class RandomChoice:
    """A uniformly random available instance (seedable for tests and benchmarks)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision | None:
        available = [v for v in instances if v.available]
        if not available:
            return None
        choice = self._rng.choice(available)
        return Decision(choice.name, placement_reason(choice, request))
