"""The routing benchmark's tables: ratios against an overloaded contender are never numbers."""

from __future__ import annotations

from typing import Any

from benchmarks import report, sensitivity
from benchmarks.emulator_knobs import DEFAULT, Knobs


def _c(p95: float, *, overloaded: bool = False, **more: Any) -> dict[str, Any]:
    return {"ttft_p50_s": p95 / 4, "ttft_p95_s": p95, "ttft_p99_s": p95 * 2, "e2e_p95_s": p95 * 3,
            "overloaded": overloaded, "drain_s": 40.0 if overloaded else 0.0, **more}  # fmt: skip


def _doc(**contenders: dict[str, Any]) -> dict[str, Any]:
    return {"scenario": "s", "title": "t", "description": "d", "requests": 10, "speed": 10.0,
            "contenders": contenders}  # fmt: skip


def test_a_ratio_against_an_overloaded_contender_reads_overloaded() -> None:
    doc = _doc(
        vram_queue=_c(1.0),
        nginx=_c(40.0, overloaded=True),
        round_robin=_c(50.0, overloaded=True),
        spread_np4=_c(100.0, overloaded=True),
        spread_np16=_c(0.5),
    )
    lines = report.ratios(doc)
    text = "\n".join(lines)
    assert "- vram_queue TTFT p95 / spread_np4: overloaded" in lines
    assert "- vram_queue TTFT p95 / spread_np16: 2.00x" in lines
    assert "- vram_queue TTFT p95 / best blind: overloaded (all 2)" in lines
    # the best contender not overloaded is spread_np16, at every target percentile
    assert lines[0] == (
        "- vram_queue / best contender not overloaded: TTFT p50 2.00x (spread_np16), "
        "TTFT p95 2.00x (spread_np16), TTFT p99 2.00x (spread_np16), e2e p95 2.00x (spread_np16)"
    )
    for number in ("0.025x", "0.02x", "0.01x", "0.025", "0.01"):
        assert number not in text
    table = report.table(doc)
    assert "| 40 | **yes** |" in table and "| 0 | no |" in table


def test_the_best_blind_contender_is_the_best_one_not_overloaded() -> None:
    doc = _doc(vram_queue=_c(1.0), nginx=_c(0.5, overloaded=True), random=_c(4.0))
    assert "- vram_queue TTFT p95 / best blind (random): 0.25x" in report.ratios(doc)


def test_an_overloaded_vram_queue_is_said_so() -> None:
    ours = _c(8.0, overloaded=True)
    assert report.ratio_text(ours, _c(4.0), "ttft_p95_s") == "2.00x (vram_queue overloaded)"
    assert report.ratio_text(ours, _c(4.0, overloaded=True), "ttft_p95_s") == "overloaded"


def _sens(np16_p95: list[float], np16_overloaded: bool = False) -> dict[str, Any]:
    rows = []
    for knobs, p95 in zip(sensitivity.settings(grid=False), np16_p95, strict=True):
        rows.append({"knobs": knobs.__dict__, "spread_np4": _c(9.0, overloaded=True),
                     "spread_np16": _c(p95, overloaded=np16_overloaded)})  # fmt: skip
    return {"sensitivity": "open-webui", "title": "t", "requests": 10, "speed": 12.0,
            "vram_queue": _c(1.0), "rows": rows}  # fmt: skip


def test_sensitivity_lists_where_the_conclusion_flips() -> None:
    settings = sensitivity.settings(grid=False)
    assert settings[0] == DEFAULT and len(settings) == 6
    assert len(sensitivity.settings(grid=True)) == 18
    doc = _sens([2.0, 0.5, 2.0, 2.0, 2.0, 0.8])  # worse with no split penalty and with cap x6
    flips = sensitivity.flips(doc)
    assert flips["spread_np4"] == []
    assert flips["spread_np16"] == [
        Knobs(split_penalty=0.0).label(),
        Knobs(batch_cap=6.0).label(),
    ]
    table = sensitivity.table(doc)
    assert "- spread_np4: vram_queue is better at p95 TTFT under every setting" in table
    assert (
        "spread_np16: vram_queue is better at p95 TTFT with the defaults; the conclusion " in table
    )
    assert "| 9.00 (overloaded) | overloaded | better |" in table


def test_an_overloaded_spread_server_never_wins_the_verdict() -> None:
    doc = _sens([0.5] * 6, np16_overloaded=True)
    assert sensitivity.flips(doc)["spread_np16"] == []
    assert "| 0.50 (overloaded) | overloaded | better |" in sensitivity.table(doc)


def _fair(others_p95: float, flood_p95: float | None = None, **more: Any) -> dict[str, Any]:
    kinds = {"chat": {"n": 100, "ttft_p95_s": others_p95, "failed": 0}}
    if flood_p95 is not None:
        kinds["flood"] = {"n": 900, "ttft_p95_s": flood_p95, "failed": 0}
    return {**_c(others_p95), "by_kind": kinds, **more}


def test_the_fairness_table_divides_the_other_users_p95_with_the_flood_by_without() -> None:
    flood = {**_doc(vram_queue=_fair(0.6, 9.0), nginx=_fair(8.0, 8.0)), "scenario": "fairness"}
    base = {**_doc(vram_queue=_fair(0.5), nginx=_fair(0.4)), "scenario": "fairness-baseline"}
    text = report.fairness(flood, base)
    assert "| vram_queue | 0.50 | 0.60 | **1.20x** | 9.00 | 100 / 100 | 0 / 0 |" in text
    assert "vram_queue 1.20x (target <= 1.5x: met), nginx 20.00x" in text
    missed = {**flood, "contenders": {"vram_queue": _fair(0.9, 9.0)}}
    assert "vram_queue 1.80x (target <= 1.5x: missed)" in report.fairness(missed, base)
    overloaded = {**base, "contenders": {"vram_queue": _fair(0.5, overloaded=True)}}
    assert "vram_queue overloaded (target <= 1.5x: missed)" in report.fairness(flood, overloaded)
