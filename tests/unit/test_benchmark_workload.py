"""The benchmark's workloads and statistics: exact prompt sizes, seeded, sound bounds."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from benchmarks.contenders import Box
from benchmarks.replay import Result, request_headers
from benchmarks.stats import backlog, drain_time, latency, lower_bound, overloaded, percentile
from benchmarks.workload import (
    FAIR_MODEL,
    FAIR_RATE,
    FAIR_USERS,
    FAIR_WARMUP_S,
    FAIRNESS,
    FAIRNESS_BASELINE,
    FLOOD_FACTOR,
    FLOOD_USER,
    SCENARIOS,
    Req,
    Size,
    fair_users,
)
from proxy.emulator import text


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_prompts_have_the_token_count_the_emulator_sees(name: str) -> None:
    scenario = SCENARIOS[name](Size(quick=True))
    assert scenario.requests
    for req in scenario.requests[:60]:
        body = json.loads(req.body)
        rendered = text.render_chat(body["messages"])
        assert len(text.tokenize(rendered)) == req.prompt_tokens
        assert body["options"]["num_predict"] == req.output_tokens
        assert body["stream"] is req.stream
        assert req.after is None or req.after < req.id
        assert 0 <= req.cached_tokens < req.prompt_tokens


def test_workloads_are_seeded() -> None:
    first = SCENARIOS["open-webui"](Size(quick=True, seed=1))
    again = SCENARIOS["open-webui"](Size(quick=True, seed=1))
    other = SCENARIOS["open-webui"](Size(quick=True, seed=2))
    assert first.requests == again.requests
    assert first.requests != other.requests


def test_open_webui_sends_task_calls_after_each_reply() -> None:
    scenario = SCENARIOS["open-webui"](Size(quick=True))
    by_id = {r.id: r for r in scenario.requests}
    tasks = [r for r in scenario.requests if r.kind == "task"]
    assert tasks and all(not t.stream and t.after is not None for t in tasks)
    assert all(by_id[t.after].kind == "chat" for t in tasks if t.after is not None)
    assert all(by_id[t.after].model == t.model for t in tasks if t.after is not None)


def test_lower_bound_is_service_time_only() -> None:
    scenario = SCENARIOS["trace"](Size(quick=True))
    bound = lower_bound(scenario, Box.from_config())
    assert bound["failed"] == bound["unfinished"] == 0
    assert bound["output_tokens"] == sum(r.output_tokens for r in scenario.requests)
    assert 0 < bound["ttft_p50_s"] <= bound["ttft_p99_s"] < bound["e2e_p95_s"]


def _result(sent: float, first: float | None, done: float | None) -> Result:
    req = Req(id=0, kind="chat", model="m", prompt_tokens=10, cached_tokens=0, output_tokens=5,
              stream=True)  # fmt: skip
    return Result(req=req, sent=sent, first=first, done=done)


def test_unfinished_requests_censor_the_percentiles_they_reach() -> None:
    done = [_result(0.0, 1.0, 2.0) for _ in range(18)]
    cut = [_result(0.0, None, None) for _ in range(2)]
    out = latency(done + cut, end=100.0)
    assert out["ttft_p50_s"] == 1.0
    assert out["ttft_p99_s"] == 100.0
    assert "ttft_p99_s" in out["censored"] and "ttft_p50_s" not in out["censored"]


def test_backlog_and_percentile() -> None:
    steady = [_result(float(t), t + 0.5, t + 1.0) for t in range(100)]
    assert max(n for _, n in backlog(steady, 100)) == 1
    assert percentile([1, 2, 3, 4], 50) == 2.5


def _series(values: list[int]) -> list[tuple[float, int]]:
    return [(float(t), n) for t, n in enumerate(values)]


def test_a_burst_early_in_the_window_and_worked_off_is_no_overload() -> None:
    # 100 s of arrivals; a backlog of 60 at 10 s that is gone by 40 s; the bound never queues
    bound = _series([2] * 110)
    early = _series([2] * 5 + [60] * 10 + [30] * 20 + [4] * 75)
    drain = drain_time(early, bound, 100.0)
    assert drain == 0.0
    assert not overloaded(drain, 100.0, unfinished=0, requests=300)


def test_a_burst_early_never_worked_off_is_an_overload() -> None:
    # the old rule (growth over the second half) missed it: flat at 60 from 10 s to the end
    bound = _series([2] * 200)
    stuck = _series([2] * 10 + [60] * 120 + [50, 40, 30, 20, 10] * 14)
    drain = drain_time(stuck, bound, 100.0)
    assert drain is not None and drain > 10
    assert overloaded(drain, 100.0, unfinished=0, requests=300)


def test_a_burst_at_the_end_drained_at_once_is_no_overload() -> None:
    # the old rule flagged every contender for it: the backlog rises steeply at 95-100 s
    bound = _series([2] * 95 + [10] * 5 + [0] * 10)
    late = _series([2] * 95 + [50] * 5 + [40, 30, 20, 10, 0] + [0] * 5)
    drain = drain_time(late, bound, 100.0)
    assert drain == 3.0  # 40, 30, 20, then 10: within the slots
    assert not overloaded(drain, 100.0, unfinished=0, requests=300)


def test_a_backlog_that_never_drains_or_unfinished_requests_are_an_overload() -> None:
    bound = _series([2] * 101)
    assert drain_time(_series([2] * 50 + [40] * 51), bound, 100.0) is None
    assert overloaded(None, 100.0, unfinished=0, requests=300)
    assert overloaded(0.0, 100.0, unfinished=4, requests=300)
    assert not overloaded(10.0, 100.0, unfinished=3, requests=300)
    assert overloaded(10.5, 100.0, unfinished=0, requests=300)


def test_fairness_has_six_users_and_one_at_ten_times_their_rate() -> None:
    size = Size()
    flood = SCENARIOS[FAIRNESS](size)
    window = max(r.at for r in flood.requests) - FAIR_WARMUP_S
    counts = Counter(r.user for r in flood.requests if r.kind != "warmup")
    assert set(counts) == {f"user-{i}" for i in range(1, FAIR_USERS + 1)} | {FLOOD_USER}
    assert {r.model for r in flood.requests} == {FAIR_MODEL}
    for user, kind, rate in fair_users(flood=True):
        expected = rate * window
        assert abs(counts[user] - expected) < 4 * math.sqrt(expected), user
        assert {r.kind for r in flood.requests if r.user == user} == {kind}
    flood_rate = fair_users(flood=True)[-1][2]
    assert flood_rate == FLOOD_FACTOR * FAIR_RATE == 10 * FAIR_RATE
    assert all(r.at >= FAIR_WARMUP_S for r in flood.requests if r.kind != "warmup")


def test_the_fairness_baseline_is_the_same_requests_without_the_flood() -> None:
    size = Size(quick=True)
    flood = SCENARIOS[FAIRNESS](size)
    baseline = SCENARIOS[FAIRNESS_BASELINE](size)
    assert baseline.requests == tuple(r for r in flood.requests if r.user != FLOOD_USER)
    assert sum(r.kind == "warmup" for r in baseline.requests) == 16


def test_replay_names_the_user_only_when_the_request_has_one() -> None:
    base = {"Content-Type": "application/json"}
    anonymous = Req(id=0, kind="chat", model="m", prompt_tokens=10, cached_tokens=0,
                    output_tokens=5, stream=True)  # fmt: skip
    named = Req(id=1, kind="chat", model="m", prompt_tokens=10, cached_tokens=0,
                output_tokens=5, stream=True, user="user-1")  # fmt: skip
    assert request_headers(anonymous, base) == base
    assert request_headers(named, base) == {**base, "X-OpenWebUI-User-Id": "user-1"}
    assert base == {"Content-Type": "application/json"}
