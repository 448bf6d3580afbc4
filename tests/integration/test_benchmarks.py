"""The routing benchmark end to end on a tiny workload, so that its code cannot rot unnoticed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks import chaos, fleet, report
from benchmarks.chaos_faults import kill
from benchmarks.chaos_plan import QUICK, Ctx
from benchmarks.contenders import LOWER_BOUND, Box, nginx_binary
from benchmarks.fleet_box import SINGLE, Code, start_fleet
from benchmarks.procs import ROOT
from benchmarks.routing import run_scenario
from benchmarks.workload import Size, head, open_webui_scenario, two_box_scenario
from tests.processes import alive

# One Open WebUI session: a streamed chat, its three task calls, the next turn and its follow-up.
TINY = head(open_webui_scenario(Size(quick=True)), 6, speed=50.0)


async def _run(tmp_path: Path, contenders: list[str]) -> dict[str, object]:
    doc = await run_scenario(TINY, contenders, box=Box.from_config(), workdir=tmp_path, quiet=True)
    json.dumps(doc)  # the document is what gets written
    return doc


def _check(contender: dict[str, object]) -> None:
    assert contender["requests"] == len(TINY.requests)
    assert contender["failed"] == 0, contender.get("errors")
    assert contender["unfinished"] == 0
    assert contender["output_tokens"] == sum(r.output_tokens for r in TINY.requests)
    assert 0 < contender["ttft_p50_s"] <= contender["ttft_p99_s"]  # type: ignore[operator]
    assert contender["cold_loads"] >= 1  # type: ignore[operator]


async def test_proxy_and_blind_contenders_replay_a_session(tmp_path: Path) -> None:
    doc = await _run(tmp_path, ["vram_queue", "random", LOWER_BOUND])
    contenders = doc["contenders"]
    assert isinstance(contenders, dict)
    for name in ("vram_queue", "random"):
        _check(contenders[name])
    assert contenders["vram_queue"]["proxy"]["model_loads"] >= 1
    bound = contenders[LOWER_BOUND]
    assert bound["ttft_p50_s"] <= contenders["vram_queue"]["ttft_p50_s"]
    assert "vram_queue" in report.table(doc)


async def test_two_fronts_over_two_nodes_replay_the_two_box_trace(tmp_path: Path) -> None:
    """The two-box scenario's two-tier contender: 2 fronts over 2 nodes of 4 emulated GPUs each."""
    scenario = dataclasses.replace(head(two_box_scenario(Size(quick=True)), 8, speed=50.0), boxes=2)
    box = Box.from_config().for_scenario(scenario)
    assert len(box.gpus) == 8 and len({g.name for g in box.gpus}) == 8
    doc = await run_scenario(scenario, ["fronts_2x2"], box=box, workdir=tmp_path, quiet=True)
    c = doc["contenders"]["fronts_2x2"]
    assert (c["requests"], c["failed"], c["unfinished"]) == (8, 0, 0), c.get("errors")
    assert c["output_tokens"] == sum(r.output_tokens for r in scenario.requests)
    assert c["cold_loads"] >= 1


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")
async def test_nginx_contender(tmp_path: Path) -> None:
    doc = await _run(tmp_path, ["nginx"])
    contenders = doc["contenders"]
    assert isinstance(contenders, dict)
    _check(contenders["nginx"])


def test_plots_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    doc = {
        "scenario": "tiny",
        "title": "tiny",
        "requests": 2,
        "contenders": {
            "vram_queue": {"ttft_quantiles_s": [0.1] * 101, "cold_loads": 1, "evictions": 0,
                           "gpu_busy_s": {"gpu0": 1.0}, "ttft_p50_s": 0.1,
                           "backlog_series": [[0.0, 1], [1.0, 0]]},
            LOWER_BOUND: {"ttft_quantiles_s": [0.05] * 101, "ttft_p50_s": 0.05},
        },
    }  # fmt: skip
    paths = report.plots(doc, tmp_path)
    assert [p.name for p in paths] == ["tiny_ttft_cdf.png", "tiny_bars.png", "tiny_backlog.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


async def test_chaos_kill_runs_and_leaves_no_process(tmp_path: Path) -> None:
    """The chaos benchmark's smallest scenario: 4 users, one instance SIGKILLed after 1.5 s."""
    sizes = dataclasses.replace(QUICK, clients=4, warm=1.5, after=1.5, grace=2.0)
    row = await kill(Ctx(workdir=tmp_path, sizes=sizes, quiet=True))
    json.dumps(row)
    kinds = ("ok", "refused", "lost", "cut", "silent", "cancelled")
    assert row["requests"] == sum(row[k] for k in kinds) > 0
    assert row["ok"] > 0
    assert row["target"] in {f"gpu{i}" for i in range(4)}
    assert row["inflight_left"] is not None
    assert row["pids"] and not any(alive(pid) for pid in row["pids"])
    assert "| kill |" in chaos.table({"rows": [row]})


async def test_fleet_routes_a_model_only_one_server_holds(tmp_path: Path) -> None:
    """The fleet benchmark's chats on the working tree: 2 chats, one on the model only b2 has."""
    sizes = dataclasses.replace(fleet.QUICK, speed=50.0, chats=2, shows=1, stale=2)
    code = Code(label="after", src=ROOT)
    box = await start_fleet(code, tmp_path, speed=sizes.speed, gpu_source=True)
    try:
        doc = await fleet.measure(box, fleet.chats, sizes, "smoke")
    finally:
        box.stop()
    assert (doc["sent"], doc["failed"]) == (6, 0), doc["errors"]
    assert doc["per_backend_by_model"][SINGLE] == {"b0": 0, "b1": 0, "b2": 3}
    assert doc["show_statuses"] == [200]
    assert doc["stale"]["ok"] == 2, doc["errors"]
    run = {"rev": "", "src": "x", "gpu_source": True, "chats": doc, "one_model": doc}
    whole = {"speed": sizes.speed, "sizes": dataclasses.asdict(sizes), "runs": {"after": run}}
    assert "| A: ok / sent | 6 / 6 |" in fleet.table(whole)
