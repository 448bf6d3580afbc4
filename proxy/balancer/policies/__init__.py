"""POLICIES: every routing policy by the name ``routing.policy`` uses; one module per policy."""

from __future__ import annotations

from collections.abc import Callable

from proxy.balancer.policies.least_connections import LeastConnections
from proxy.balancer.policies.random_choice import RandomChoice
from proxy.balancer.policies.round_robin import RoundRobin
from proxy.balancer.policies.vram_queue import VramQueue
from proxy.balancer.policy import Policy
from proxy.config import RoutingConfig

POLICIES: dict[str, Callable[[RoutingConfig], Policy]] = {
    "vram_queue": VramQueue,
    "least_connections": lambda _config: LeastConnections(),
    "round_robin": lambda _config: RoundRobin(),
    "random": lambda _config: RandomChoice(),
}


def make_policy(config: RoutingConfig) -> Policy:
    """The policy ``config.policy`` names, built with its options."""
    return POLICIES[config.policy](config)
