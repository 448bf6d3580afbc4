"""Metrics collectors, access-log lines and the status table, fed by hand (no sockets)."""

from __future__ import annotations

import inspect
import io
import json
import platform
import re
import sys

import pytest
from prometheus_client import CollectorRegistry

from proxy import __version__, errors
from proxy.api import auth
from proxy.api.access import Access, body_model, quote
from proxy.api.admin import ttft_summary
from proxy.api.error_replies import error_text, rejection_reason
from proxy.balancer.dispatcher import Dispatcher
from proxy.balancer.policies import make_policy
from proxy.balancer.state import InstanceState, LoadedModel, ModelBook
from proxy.commands.status import CLEAR, bar, normalize_url, render, run_status
from proxy.config import QueueConfig, RoutingConfig
from proxy.gpu import GpuReading
from proxy.metrics import (
    AUTH_REASONS,
    REJECT_REASONS,
    UPSTREAM_KINDS,
    LiveCollector,
    Metrics,
    gpu_families,
    gpu_readings,
    model_label,
)

GIB = 1024**3


def reading(index: int, uuid: str, used: int, total: int = 24 * GIB) -> GpuReading:
    return GpuReading(
        index=index,
        uuid=uuid,
        name="emu",
        memory_total=total,
        memory_used=used,
        memory_free=total - used,
        utilization=0.5,
    )


def test_gpu_gauges_use_the_configured_index_once_per_gpu_and_never_collide() -> None:
    a = InstanceState(name="a", url="", slots=1, gpu_labels={"GPU-a": "2"})
    a.gpus = (reading(0, "GPU-a", 3 * GIB),)
    b = InstanceState(name="b", url="", slots=1)  # a remote host: its own index 0 and 1
    b.gpus = (reading(0, "GPU-b", GIB), reading(1, "GPU-c", 0))
    c = InstanceState(name="c", url="", slots=1)  # another remote host, index 0 again
    c.gpus = (reading(0, "GPU-d", 0), reading(0, "GPU-a", 3 * GIB))  # and a GPU a also has
    assert [(gpu, r.uuid) for gpu, r in gpu_readings([a, b, c])] == [
        ("2", "GPU-a"),
        ("0", "GPU-b"),
        ("1", "GPU-c"),
        ("c:0", "GPU-d"),
    ]
    registry = CollectorRegistry()

    class Gpus:
        def collect(self):  # type: ignore[no-untyped-def]
            return gpu_families([a, b, c])

    registry.register(Gpus())
    get = registry.get_sample_value
    assert get("ollamux_gpu_memory_used_bytes", {"gpu": "2", "uuid": "GPU-a"}) == 3 * GIB
    assert get("ollamux_gpu_memory_free_bytes", {"gpu": "0", "uuid": "GPU-b"}) == 23 * GIB
    assert get("ollamux_gpu_memory_total_bytes", {"gpu": "c:0", "uuid": "GPU-d"}) == 24 * GIB
    assert get("ollamux_gpu_utilization_ratio", {"gpu": "1"}) == 0.5


def test_counters_start_at_zero_for_every_known_label_value() -> None:
    registry = CollectorRegistry()
    Metrics(registry, "vram_queue", ["gpu0", "gpu1"])
    get = registry.get_sample_value
    for reason in ("queue_full", "queue_timeout", "no_instance"):
        assert get("ollamux_rejected_total", {"reason": reason}) == 0
    for reason in ("no_key", "bad_key", "admin", "inference_only", "model"):
        assert get("ollamux_auth_refused_total", {"reason": reason}) == 0
    for backend in ("gpu0", "gpu1"):
        for kind in ("connect", "timeout", "status", "midstream"):
            labels = {"backend": backend, "kind": kind}
            assert get("ollamux_upstream_errors_total", labels) == 0
    assert get("ollamux_retries_total") == 0
    # and nothing else: the other counters' label values (models, endpoints) come with traffic
    counted = [s for m in registry.collect() for s in m.samples if s.name.startswith("ollamux_")]
    assert sorted({s.value for s in counted}) == [0, 1]  # 1: ollamux_build_info
    assert len(counted) == 3 + 5 + 2 * 4 + 1 + 1


def test_the_zeroed_label_values_are_the_ones_the_code_uses() -> None:
    # every rejection the router raises, every kind of failed exchange, every auth refusal
    refusals = _subclasses(errors.RoutingError)
    assert {rejection_reason(cls("x")) for cls in refusals} == set(REJECT_REASONS)
    kinds = {cls.kind for cls in _subclasses(errors.UpstreamError)}
    assert kinds == set(UPSTREAM_KINDS)
    used = set(re.findall(r'_refuse\(\s*request, auth, \d+, "(\w+)"', inspect.getsource(auth)))
    assert used == set(AUTH_REASONS)


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def test_build_info_and_process_metrics_in_every_registry() -> None:
    registries = [CollectorRegistry(), CollectorRegistry()]  # two apps in one process
    for registry in registries:
        Metrics(registry, "vram_queue")
    for registry in registries:
        get = registry.get_sample_value
        labels = {"version": __version__, "python": platform.python_version()}
        assert get("ollamux_build_info", labels) == 1
        assert get("process_resident_memory_bytes")  # Linux: read from /proc
        assert get("process_cpu_seconds_total") is not None
        python = {
            "implementation": platform.python_implementation(),
            "major": str(sys.version_info.major),
            "minor": str(sys.version_info.minor),
            "patchlevel": str(sys.version_info.micro),
            "version": platform.python_version(),
        }
        assert get("python_info", python) == 1


def test_model_vram_ratio_shows_a_model_spilled_to_cpu() -> None:
    inst = InstanceState(name="gpu0", url="", slots=1)
    inst.loaded = {
        "big": LoadedModel(name="big", size=40 * GIB, size_vram=30 * GIB, context_length=0),
        "small": LoadedModel(name="small", size=GIB, size_vram=GIB, context_length=0),
        "new": LoadedModel(name="new", size_vram=GIB, context_length=0),  # size not seen yet
    }
    book = ModelBook()
    dispatcher = Dispatcher([inst], make_policy(RoutingConfig()), book, QueueConfig())
    registry = CollectorRegistry()
    registry.register(LiveCollector(dispatcher, book))
    get = registry.get_sample_value
    assert get("ollamux_model_vram_ratio", {"backend": "gpu0", "model": "big"}) == 0.75
    assert get("ollamux_model_vram_ratio", {"backend": "gpu0", "model": "small"}) == 1
    assert get("ollamux_model_vram_ratio", {"backend": "gpu0", "model": "new"}) is None
    assert get("ollamux_model_loaded", {"backend": "gpu0", "model": "new"}) == 1


def test_model_label_is_bounded() -> None:
    book = ModelBook()
    book.set_file_size("llama3.2:1b", 1)
    label = model_label(book)
    assert label("llama3.2:1b") == "llama3.2:1b"
    assert label("registry.ollama.ai/library/llama3.2:1b") == "llama3.2:1b"
    assert label("made-up:7b") == "other" and label("") == "none"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("llama3.2:1b", "llama3.2:1b"),
        ("hf.co/org/model:Q4_K_M", "hf.co/org/model:Q4_K_M"),
        ("two words", '"two words"'),
        ('a"quote', '"a\\"quote"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("", '""'),
        ("x" * 300, json.dumps("x" * 200)),
    ],
)
def test_log_values_are_quoted_when_not_plain(value: str, shown: str) -> None:
    assert quote(value) == shown


def test_access_line_and_record() -> None:
    access = Access(
        request_id="r1",
        method="POST",
        path="/api/chat",
        endpoint="/api/chat",
        model="llama3.2:1b",
        model_label="llama3.2:1b",
        started=0.0,
        at=1000.0,
        instance="gpu1",
        reason="warm",
        queue_wait=0.0123,
        ttft=0.5,
        prompt_tokens=10,
        eval_tokens=20,
        status=200,
        duration=1.25,
    )
    assert access.line() == (
        "request_id=r1 method=POST path=/api/chat model=llama3.2:1b instance=gpu1 reason=warm "
        "queue_wait=0.012 ttft=0.500 prompt_tokens=10 eval_tokens=20 status=200 duration=1.250"
    )
    access.error, access.ttft = "upstream broke: reset", None
    assert access.line().endswith('ttft=- prompt_tokens=10 eval_tokens=20 status=200 '
                                  'duration=1.250 error="upstream broke: reset"')  # fmt: skip
    assert access.record()["instance"] == "gpu1" and access.record()["ttft"] is None


def test_body_model_reads_small_json_only() -> None:
    assert body_model(b'{"model": "m:1b"}') == "m:1b"
    assert body_model(b'{"name": "m"}') == "m"
    assert body_model(b"[1]") == "" and body_model(b"{bad") == "" and body_model(b"") == ""
    assert body_model(b'{"model": 3}') == ""
    assert body_model(b'{"model": "m", "x": "' + b"a" * (2 << 20) + b'"}') == ""


def test_ttft_summary() -> None:
    assert ttft_summary([]) == {"count": 0, "p50": None, "p95": None, "last": None}
    summary = ttft_summary([float(i) for i in range(1, 101)])
    assert summary == {"count": 100, "p50": 50.5, "p95": 95.0, "last": 100.0}


def status_doc() -> dict[str, object]:
    gpu = {"gpu": "0", "uuid": "GPU-a", "memory_total": 24 * GIB, "utilization": 0.25}
    return {
        "version": "0.1.0",
        "uptime_s": 3725,
        "policy": "vram_queue",
        "queues": {"llama3.2:1b": 3},
        "queued": 3,
        "queue_limits": {"max_per_model": 64, "max_total": 512, "timeout": 300},
        "instances": [
            {
                "name": "gpu0",
                "state": "up",
                "gpus": [
                    {**gpu, "memory_used": 12 * GIB},
                    {**gpu, "gpu": "1", "uuid": "GPU-b", "memory_used": 0},
                ],
                "slots": 4,
                "inflight_total": 2,
                "loaded": [{"name": "llama3.2:1b", "size_vram": 2 * GIB}],
                "loading": ["qwen3:8b"],
                "ttft": {"count": 3, "p50": 0.25, "p95": 1.5, "last": 0.3},
                "reasons": {"warm": 5, "cold_fit": 1},
            },
            {"name": "gpu1", "state": "down", "gpus": [], "slots": 4, "loaded": []},
        ],
        "recent": [
            {
                "at": 990.0,
                "endpoint": "/api/chat",
                "model": "llama3.2:1b",
                "instance": "gpu0",
                "reason": "warm",
                "status": 200,
                "queue_wait": 0.0,
                "ttft": 0.25,
                "eval_tokens": 8,
            }
        ],
    }


def test_status_table_shows_gpus_with_bars_models_and_why() -> None:
    text = render(status_doc(), url="localhost:11434", now=1000.0)
    lines = text.splitlines()
    assert lines[0] == (
        "ollamux 0.1.0 at http://localhost:11434 | policy vram_queue | up 1h02m | "
        "queued 3 (max 64/model)"
    )
    row = next(line for line in lines if line.startswith("gpu0"))
    assert "[" + "█" * 10 + "░" * 10 + "]  12.0/24.0 GiB  50%" in row
    assert "25%" in row and "2/4" in row and "0.25s/1.50s" in row
    assert "warm:5 cold_fit:1" in row and "llama3.2:1b (2.0 GiB), qwen3:8b (loading)" in row
    second = lines[lines.index(row) + 1]
    assert second.split()[0] == "1" and "░" * 20 in second  # the instance's second GPU
    down = next(line for line in lines if line.startswith("gpu1"))
    assert "down" in down and "(no GPU reading)" in down
    assert "Queues: llama3.2:1b 3" in text
    recent = lines[lines.index("Recent requests (newest first):") + 2]
    assert re.split(r"\s{2,}", recent) == [
        "10s",
        "/api/chat",
        "llama3.2:1b",
        "gpu0",
        "warm",
        "200",
        "0.00s",
        "0.25s",
        "8",
    ]


def test_bar_and_url() -> None:
    assert bar(0.0, 4) == "[░░░░]" and bar(1.2, 4) == "[████]" and bar(0.5, 4) == "[██░░]"
    assert normalize_url("127.0.0.1:11434/") == "http://127.0.0.1:11434"
    assert normalize_url("https://box") == "https://box"


def test_watch_redraws_in_place_and_survives_a_missing_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.commands import status

    answers = iter([status_doc(), None, status_doc()])

    def fake_fetch(url: str, *, timeout: float = 5.0) -> dict[str, object]:
        doc = next(answers)
        if doc is None:
            raise status.OllamuxError("cannot reach the proxy at x")
        return doc

    monkeypatch.setattr(status, "fetch_status", fake_fetch)
    monkeypatch.setattr(status.time, "sleep", lambda _s: None)
    out = io.StringIO()
    run_status("x", watch=True, rounds=3, out=out, tty=True, size=lambda: (200, 50))
    frames = out.getvalue().split(CLEAR)
    assert frames[0] == "\x1b[?1049h\x1b[?25l" and len(frames) == 4  # the alternate screen
    assert "INSTANCE" in frames[1] and "cannot reach the proxy" in frames[2]
    assert "INSTANCE" in frames[3]


def test_ascii_fallback_when_the_terminal_cannot_draw_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.commands import status

    monkeypatch.setattr(status, "fetch_status", lambda url, timeout=5.0: status_doc())
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    run_status("x", out=out)
    out.flush()
    text = out.buffer.getvalue().decode()  # type: ignore[attr-defined]
    assert "[##########..........]" in text


def test_status_says_what_an_external_instance_lacks_and_how_to_fix_it() -> None:
    doc = status_doc()
    blind = {"name": "far", "state": "up", "gpus": [], "slots": 1, "loaded": []}
    blind |= {"lacks": ["gpu memory", "num_parallel"], "memory_source": "learned"}
    learned = {"name": "near", "state": "up", "gpus": [], "slots": 2, "loaded": []}
    learned |= {"lacks": ["gpu memory readings (learned)"], "memory_source": "learned"}
    learned |= {"memory_capacity": 8 * 1024**3, "free_estimate": 2 * 1024**3}
    doc["instances"] = [*doc["instances"], blind, learned]
    lines = render(doc, now=1000.0).splitlines()
    assert "~6.0/8.0 GiB (learned)" in next(line for line in lines if line.startswith("near"))
    assert "(no GPU reading)" in next(line for line in lines if line.startswith("far"))
    assert (
        "far lacks gpu memory, num_parallel (run `ollamux agent` there and set gpu_source, or set "
        "memory_gib; set num_parallel to its OLLAMA_NUM_PARALLEL)"
    ) in lines
    assert "near lacks gpu memory readings (learned)" in lines
    assert not any("gpu0 lacks" in line for line in lines)  # one with readings lacks nothing


def test_error_text_reads_ollamas_error_from_an_answer() -> None:
    assert error_text(b'{"error":"model \\"x\\" not found"}') == 'model "x" not found'
    assert error_text(b'{"error":{"message":"bad","type":"api_error"}}') == "bad"
    assert error_text(b'{"status":"success"}') == ""
    assert (
        error_text(b"502 Bad Gateway from a proxy in between")
        == "502 Bad Gateway from a proxy in between"
    )
    assert error_text(b"x" * 500, limit=200) == "x" * 200
