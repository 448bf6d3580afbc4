"""The benchmark's 70b box: its own GPUs, the usual spread setup and ollamux with the plan."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from benchmarks.contenders import Box, planned_config
from benchmarks.routing import run_scenario
from benchmarks.workload import Size, box_70b_scenario, head

SCENARIO = box_70b_scenario(Size(quick=True))


def test_the_scenario_brings_its_box_and_the_planner_lays_it_out() -> None:
    box = Box.from_config().for_scenario(SCENARIO)
    assert [(g.name, g.memory_gib) for g in box.gpus] == [(f"rtx4090-{i}", 24.0) for i in range(4)]
    assert box.models == ("llama3.3:70b", "qwen2.5:32b")
    config = planned_config(box, speed=10, listen_port=1, timeout=60)
    layout = [(i["name"], i["gpu"], i["spread"], i["num_parallel"]) for i in config["instances"]]
    assert layout == [
        ("gpu0-2", ["rtx4090-0", "rtx4090-1", "rtx4090-2"], False, 8),
        ("gpu3", "rtx4090-3", False, 2),
    ]
    yaml.safe_dump(config)  # what the contender writes for `ollamux serve`


async def test_the_planned_and_the_usual_setup_serve_both_models(tmp_path: Path) -> None:
    tiny = head(SCENARIO, 8, speed=50.0)
    assert {r.model for r in tiny.requests} == {"llama3.3:70b", "qwen2.5:32b"}
    box = Box.from_config().for_scenario(tiny)
    names = ["ollamux_plan", "spread_keepalive"]
    doc = await run_scenario(tiny, names, box=box, workdir=tmp_path, quiet=True)
    json.dumps(doc)
    assert doc["box"]["gpus"][0]["memory_gib"] == 24.0
    for name in names:
        result = doc["contenders"][name]
        assert result["failed"] == 0, result.get("errors")
        assert result["unfinished"] == 0
        assert result["output_tokens"] == sum(r.output_tokens for r in tiny.requests)
