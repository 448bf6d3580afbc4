"""Routing policies as pure functions of a snapshot: the shared contract and vram_queue's rules."""

from __future__ import annotations

import dataclasses
import random
import typing

import pytest

from proxy.balancer.policies import POLICIES, make_policy
from proxy.balancer.policies.random_choice import RandomChoice
from proxy.balancer.policies.round_robin import RoundRobin
from proxy.balancer.policies.vram_queue import VramQueue
from proxy.balancer.policy import Decision
from proxy.balancer.state import InstanceView, RouteRequest
from proxy.config import RoutingConfig

GIB = 1024**3


def view(name: str, **kw: object) -> InstanceView:
    base: dict[str, object] = dict(
        name=name, slots=4, inflight=0, inflight_model=0, warm=False, loading=False,
        free_vram=20 * GIB, idle_models=0,
    )  # fmt: skip
    base.update(kw)
    return InstanceView(**base)  # type: ignore[arg-type]


REQ = RouteRequest(model="llama3.1:8b", est_size=8 * GIB, service_s=10.0, load_s=5.0)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_contract_only_available_instances_are_chosen(name: str) -> None:
    policy = make_policy(RoutingConfig(policy=name))  # type: ignore[arg-type]
    rng = random.Random(7)
    for _ in range(300):
        views = [
            view(
                f"gpu{i}",
                inflight_model=(m := rng.randint(0, 5)),
                inflight=m + rng.randint(0, 3),
                warm=rng.random() < 0.5,
                loading=rng.random() < 0.2,
                free_vram=rng.choice([None, 2 * GIB, 30 * GIB]),
                idle_models=rng.randint(0, 2),
                affinity=rng.random() < 0.2,
            )
            for i in range(rng.randint(0, 4))
        ]
        decision = policy.select(REQ, views)
        if decision is not None:
            chosen = next(v for v in views if v.name == decision.instance)
            assert chosen.available
        if all(not v.available for v in views):
            assert decision is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_contract_an_idle_instance_is_always_used(name: str) -> None:
    policy = make_policy(RoutingConfig(policy=name))  # type: ignore[arg-type]
    decision = policy.select(REQ, [view("gpu0"), view("gpu1", inflight_model=4, inflight=4)])
    assert decision is not None and decision.instance == "gpu0"


def test_vram_queue_prefers_warm_over_cold_even_if_busier() -> None:
    views = [
        view("cold", free_vram=40 * GIB),
        view("warm", warm=True, inflight=2, inflight_model=2),
    ]
    decision = VramQueue().select(REQ, views)
    assert decision is not None and (decision.instance, decision.reason) == ("warm", "warm")


def test_vram_queue_warm_fewest_inflight_then_affinity_within_slack() -> None:
    views = [
        view("a", warm=True, inflight=2, inflight_model=2),
        view("b", warm=True, inflight=0),
        view("c", warm=True, inflight=1, inflight_model=1, affinity=True),
    ]
    decision = VramQueue().select(REQ, views)
    assert decision is not None and (decision.instance, decision.reason) == ("c", "affinity")
    no_affinity = VramQueue(RoutingConfig(session_affinity=False)).select(REQ, views)
    assert no_affinity is not None and (no_affinity.instance, no_affinity.reason) == ("b", "warm")
    far = [dataclasses.replace(v, inflight=3) if v.name == "c" else v for v in views]
    decision = VramQueue().select(REQ, far)
    assert decision is not None and decision.instance == "b"


def test_vram_queue_cold_goes_where_it_fits_most_free() -> None:
    views = [
        view("small", free_vram=6 * GIB),
        view("roomy", free_vram=30 * GIB),
        view("ok", free_vram=12 * GIB),
    ]
    decision = VramQueue().select(REQ, views)
    assert decision is not None and (decision.instance, decision.reason) == ("roomy", "cold_fit")


def test_vram_queue_cold_skips_instances_busy_loading() -> None:
    views = [view("loading", free_vram=30 * GIB, loading=True), view("idle", free_vram=10 * GIB)]
    decision = VramQueue().select(REQ, views)
    assert decision is not None and decision.instance == "idle"


def test_vram_queue_evicts_where_it_disturbs_least() -> None:
    views = [
        view("busy", free_vram=1 * GIB, inflight=3, idle_models=1),
        view("idle", free_vram=2 * GIB, inflight=0, idle_models=2),
    ]
    decision = VramQueue().select(REQ, views)
    assert decision is not None and (decision.instance, decision.reason) == ("idle", "evict")


def test_vram_queue_fills_an_empty_gpu_as_soon_as_the_warm_ones_are_busy() -> None:
    views = [
        view("warm", warm=True, inflight=4, inflight_model=4),
        view("free", free_vram=30 * GIB),
    ]
    short = dataclasses.replace(REQ, service_s=0.1, load_s=5.0)
    decision = VramQueue().select(short, views)
    assert decision is not None and (decision.instance, decision.reason) == ("free", "scale_out")


def test_vram_queue_waits_for_busy_warm_instance_when_wait_is_short() -> None:
    views = [
        view("warm", warm=True, inflight=4, inflight_model=4),
        view("shared", free_vram=30 * GIB, loaded_models=1, idle_models=1),
    ]
    short = dataclasses.replace(REQ, service_s=2.0, load_s=5.0, queued_ahead=0)
    assert VramQueue().select(short, views) is None


def test_vram_queue_scales_out_when_wait_exceeds_load_time() -> None:
    views = [
        view("warm", warm=True, inflight=4, inflight_model=4),
        view("free", free_vram=30 * GIB, loaded_models=1, idle_models=1),
    ]
    long = dataclasses.replace(REQ, service_s=10.0, load_s=5.0, queued_ahead=3)
    decision = VramQueue().select(long, views)
    assert decision is not None and (decision.instance, decision.reason) == ("free", "scale_out")
    off = VramQueue(RoutingConfig(scale_out=False))
    assert off.select(long, views) is None


def test_vram_queue_no_scale_out_without_room() -> None:
    views = [view("warm", warm=True, inflight=4, inflight_model=4), view("full", free_vram=GIB)]
    long = dataclasses.replace(REQ, queued_ahead=10)
    assert VramQueue().select(long, views) is None


def test_round_robin_turns_and_skips_busy() -> None:
    policy = RoundRobin()
    views = [view("a"), view("b", inflight_model=4), view("c")]
    picks = [policy.select(REQ, views) for _ in range(4)]
    assert [p.instance for p in picks if p] == ["a", "c", "a", "c"]


def test_random_is_uniform_over_available() -> None:
    policy = RandomChoice(random.Random(1))
    views = [view("a"), view("b"), view("c", inflight_model=4)]
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(2000):
        decision = policy.select(REQ, views)
        assert decision is not None
        counts[decision.instance] += 1
    assert counts["c"] == 0 and 800 < counts["a"] < 1200


def test_the_config_and_the_benchmark_name_the_registrys_policies() -> None:
    """POLICIES is the one list: the config accepts exactly its names, and every policy the
    routing benchmark runs through the proxy is one of them."""
    from benchmarks.contenders import PROXIED
    from proxy.config import PolicyName

    assert set(typing.get_args(PolicyName)) == set(POLICIES)
    assert set(PROXIED) <= set(POLICIES)
    for name in POLICIES:
        assert RoutingConfig(policy=name).policy == name  # type: ignore[arg-type]


def test_vram_queue_overcommits_one_request_into_the_least_loaded_warm_instance() -> None:
    busy = [
        view("a", slots=2, warm=True, inflight_model=2, inflight=2),
        view("b", slots=2, warm=True, inflight_model=2, inflight=3),
    ]
    request = RouteRequest(model="m", est_size=5 * GIB, service_s=1.0, load_s=30.0)
    assert VramQueue().select(request, busy) is None  # by default every wait is in the proxy
    one = VramQueue(RoutingConfig(overcommit=1))
    assert one.select(request, busy) == Decision("a", "overcommit")
    full = [view("a", slots=2, warm=True, inflight_model=3, inflight=3)]
    assert one.select(request, full) is None  # at most one beyond its slots


def test_vram_queue_loads_a_model_on_the_faster_gpu_when_both_have_room() -> None:
    slow = view("l40s", free_vram=40 * GIB, speed=0.85)
    fast = view("rtx", free_vram=20 * GIB, speed=1.0)
    decision = VramQueue().select(REQ, [slow, fast])
    assert decision == Decision("rtx", "cold_fit")  # speed before free memory
    same = view("rtx", free_vram=20 * GIB, speed=0.9)  # within a tenth: free memory decides
    assert VramQueue().select(REQ, [slow, same]) == Decision("l40s", "cold_fit")
    shared = view("rtx", free_vram=20 * GIB, speed=1.0, loaded_models=1)
    assert VramQueue().select(REQ, [slow, shared]) == Decision("l40s", "cold_fit")  # not shared
