"""The routing benchmark's client on the OpenAI endpoint (/v1), the one LiteLLM serves."""

from __future__ import annotations

from pathlib import Path

from benchmarks.contenders import Box
from benchmarks.routing import run_scenario
from benchmarks.workload import Size, head, open_webui_scenario

# One Open WebUI session: streamed chats and non-streamed task calls.
TINY = head(open_webui_scenario(Size(quick=True)), 6, speed=50.0)


async def test_the_replay_speaks_openai_to_every_contender(tmp_path: Path) -> None:
    doc = await run_scenario(
        TINY, ["random"], box=Box.from_config(), workdir=tmp_path, quiet=True, api="openai"
    )
    contender = doc["contenders"]["random"]
    assert contender["endpoint"] == "/v1/chat/completions"
    assert contender["failed"] == 0, contender.get("errors")
    assert contender["unfinished"] == 0
    assert contender["output_tokens"] == sum(r.output_tokens for r in TINY.requests)
    assert 0 < contender["ttft_p50_s"] <= contender["ttft_p99_s"]
