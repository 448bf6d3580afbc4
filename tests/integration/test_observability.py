"""Metrics, access log and status after real traffic through the proxy and four emulated GPUs.

The Prometheus checks use the Debian package `prometheus` (promtool and the server); they are
skipped with the reason when it is not installed (.ci/run installs it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.commands.status import CLEAR, fetch_status, render
from proxy.metrics import LATENCY_BUCKETS
from tests.integration.farm import Farm, farm
from tests.integration.test_proxy import post

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MODEL = "llama3.2:1b"
EMBED = "nomic-embed-text:latest"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)"
)

FAMILIES = {
    "ollamux_requests": "counter",
    "ollamux_routing_decisions": "counter",
    "ollamux_rejected": "counter",
    "ollamux_retries": "counter",
    "ollamux_key_requests": "counter",
    "ollamux_auth_refused": "counter",
    "ollamux_upstream_errors": "counter",
    "ollamux_ejections": "counter",
    "ollamux_model_loads": "counter",
    "ollamux_tokens": "counter",
    "ollamux_request_duration_seconds": "histogram",
    "ollamux_time_to_first_token_seconds": "histogram",
    "ollamux_queue_wait_seconds": "histogram",
    "ollamux_queue_depth": "gauge",
    "ollamux_inflight": "gauge",
    "ollamux_slots": "gauge",
    "ollamux_instance_up": "gauge",
    "ollamux_instance_ejected": "gauge",
    "ollamux_gpu_memory_total_bytes": "gauge",
    "ollamux_gpu_memory_used_bytes": "gauge",
    "ollamux_gpu_memory_free_bytes": "gauge",
    "ollamux_gpu_utilization_ratio": "gauge",
    "ollamux_model_loaded": "gauge",
    "ollamux_model_vram_ratio": "gauge",
    "ollamux_build_info": "gauge",
}
"""ARCHITECTURE.md "Metrics", by family name as the text format's parser reports it."""
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
SENT_OK = 7
"""Requests answered 200 by ``traffic``."""


@pytest.fixture
async def box(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with farm(tmp_path) as f:
        yield f


async def traffic(box: Farm) -> None:
    """3 chats, 2 streamed generates, 1 embed, 1 OpenAI chat (all 200) and 1 unknown model."""
    client = box.ollama()
    for i in range(3):
        await client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": f"hi {i}"}],
            options={"num_predict": 8},
        )
    for _ in range(2):
        stream = await client.generate(
            model=MODEL, prompt="hello", stream=True, options={"num_predict": 5}
        )
        async for _chunk in stream:
            pass
    await client.embed(model=EMBED, input=["a", "b"])
    await box.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    status, _ = await post(box.url, "/api/chat", {"model": "no-such-model", "messages": []})
    assert status == 404


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def series(text: str) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return [
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def exported_names(text: str) -> set[str]:
    """Every series name the scrape declares (a counter ``x`` is ``x_total``, and so on)."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "ollamux.json").read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


async def settled(box: Farm) -> str:
    """A scrape taken once the monitor has read the GPU memory of the model ``traffic`` loaded."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        text = await scrape(box.url)
        holders = [n for n, models in box.loaded().items() if MODEL in models]
        if holders and value(text, "ollamux_gpu_memory_used_bytes", gpu=holders[0][-1]) > 1e9:
            return text
        assert asyncio.get_running_loop().time() < deadline, "the monitor never read the GPUs"
        await asyncio.sleep(0.05)


async def scraped(box: Farm, name: str, expected: float, **labels: str) -> None:
    """Wait until the scrape's ``name`` samples with ``labels`` add up to ``expected``."""
    deadline = asyncio.get_running_loop().time() + 5
    while (got := value(await scrape(box.url), name, **labels)) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{name}{labels} = {got}"
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- /metrics -------------------------------------------------------------------------------------


async def test_metrics_count_the_traffic(box: Farm) -> None:
    await traffic(box)
    text = await settled(box)
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {
        name: kind for name, kind in families.items() if name.startswith("ollamux_")
    } == FAMILIES
    # the proxy's own process, as prometheus_client exports it
    assert families["process_resident_memory_bytes"] == "gauge"
    assert families["process_cpu_seconds"] == "counter" and "python_info" in families
    assert value(text, "process_resident_memory_bytes") > 0
    build = {"version": __version__, "python": platform.python_version()}
    assert value(text, "ollamux_build_info", **build) == 1
    ok = {"code": "200"}
    assert value(text, "ollamux_requests_total", **ok) == SENT_OK
    assert value(text, "ollamux_requests_total", endpoint="/api/chat", model=MODEL, **ok) == 3
    assert value(text, "ollamux_requests_total", endpoint="/api/generate", model=MODEL) == 2
    assert value(text, "ollamux_requests_total", endpoint="/api/embed", model=EMBED) == 1
    assert value(text, "ollamux_requests_total", endpoint="/v1/chat/completions") == 1
    assert value(text, "ollamux_requests_total", model="other", code="404") == 1
    assert value(text, "ollamux_tokens_total", model=MODEL, kind="eval") == 3 * 8 + 2 * 5 + 4
    assert value(text, "ollamux_tokens_total", model=EMBED, kind="prompt") > 0
    assert value(text, "ollamux_time_to_first_token_seconds_count", model=MODEL) == 6
    assert value(text, "ollamux_queue_wait_seconds_count", model=MODEL) == 6
    assert value(text, "ollamux_request_duration_seconds_count") == SENT_OK
    assert value(text, "ollamux_routing_decisions_total", policy="vram_queue") == SENT_OK
    assert value(text, "ollamux_model_loads_total", model=MODEL) >= 1
    bounds = {
        float(s.labels["le"])
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "ollamux_time_to_first_token_seconds_bucket"
    }
    assert bounds == {*map(float, LATENCY_BUCKETS), float("inf")}
    assert min(bounds) == 0.01 and max(bounds - {float("inf")}) == 300
    # the GPUs: one series each, labelled by their host-wide index, read from the emulators
    gib = 1024**3
    for gpu, size in zip("0123", (24, 24, 48, 48), strict=True):
        total = value(text, "ollamux_gpu_memory_total_bytes", gpu=gpu)
        used = value(text, "ollamux_gpu_memory_used_bytes", gpu=gpu)
        free = value(text, "ollamux_gpu_memory_free_bytes", gpu=gpu)
        assert total == size * gib and used + free == total
        assert 0 <= value(text, "ollamux_gpu_utilization_ratio", gpu=gpu) <= 1
    holder = next(n for n, models in box.loaded().items() if MODEL in models)
    assert value(text, "ollamux_gpu_memory_used_bytes", gpu=holder[-1]) > 1e9
    assert value(text, "ollamux_model_loaded", backend=holder, model=MODEL) == 1
    assert value(text, "ollamux_model_vram_ratio", backend=holder, model=MODEL) == 1  # fits
    assert value(text, "ollamux_instance_up") == 4 and value(text, "ollamux_slots") == 8
    assert value(text, "ollamux_inflight") == 0
    # ejections: a series per instance from the start, so increase() sees the first one
    ejected = [dict(labels)["backend"] for n, labels in series(text) if n.startswith("ollamux_ej")]
    assert sorted(ejected) == ["gpu0", "gpu1", "gpu2", "gpu3"]
    assert value(text, "ollamux_ejections_total") == 0
    assert value(text, "ollamux_instance_ejected") == 0
    # and so do the refusals and failed exchanges: 0, not "No data", until the first one
    rejected = {
        dict(labels)["reason"] for n, labels in series(text) if n == "ollamux_rejected_total"
    }
    assert rejected == {"queue_full", "queue_timeout", "no_instance"}
    assert value(text, "ollamux_rejected_total") == 0
    errors = [dict(labels) for n, labels in series(text) if n == "ollamux_upstream_errors_total"]
    assert len(errors) == 4 * 4 and value(text, "ollamux_upstream_errors_total") == 0
    assert {e["backend"] for e in errors} == {"gpu0", "gpu1", "gpu2", "gpu3"}
    # no metric names the Ollama server `instance`: Prometheus keeps that label for the target
    assert not [n for n, labels in series(text) if "instance" in dict(labels)]


async def test_a_model_spilled_to_cpu_shows_in_its_vram_ratio(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24,)) as box:  # a 43 GB model on a 24 GiB card
        body = {"model": "llama3.3:70b", "prompt": "hi", "options": {"num_predict": 1}}
        status, _ = await post(box.url, "/api/generate", {**body, "stream": False})
        assert status == 200
        deadline = asyncio.get_running_loop().time() + 5
        while not (ratio := value(await scrape(box.url), "ollamux_model_vram_ratio")):
            assert asyncio.get_running_loop().time() < deadline, "no ratio for the model"
            await asyncio.sleep(0.05)
        assert 0.3 < ratio < 0.6  # about 22 of 43+ GB on the GPU


@needs_promtool
async def test_metrics_pass_promtool_check_metrics(box: Farm) -> None:
    await traffic(box)
    text = await scrape(box.url)
    proc = await asyncio.create_subprocess_exec(
        str(PROMTOOL),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), timeout=30)
    assert proc.returncode == 0 and not out.strip(), out.decode()


async def test_unknown_models_and_paths_do_not_grow_the_series(box: Farm) -> None:
    rng = random.Random(6)

    def junk() -> str:
        return "".join(rng.choices(string.ascii_lowercase + string.digits + "-_.:/", k=12))

    endpoints = ["/api/chat", "/api/generate", "/api/embed", "/v1/chat/completions", "/api/show"]
    async with aiohttp.ClientSession() as s:

        async def send(path: str, model: str) -> None:
            body = {"model": model, "prompt": "x", "messages": [], "input": "x"}
            headers = {"X-Request-Id": junk()}
            async with s.post(box.url + path, json=body, headers=headers) as r:
                await r.read()
                assert r.status >= 400

        for path in endpoints:  # the first of each makes its series ("other" model, 404/400)
            await send(path, "warm-up")
            await send(path, "not a name!")
        await send("/api/" + junk(), "warm-up")
        before = await scrape(box.url)
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with gate:
                await send(endpoints[i % 5] if i % 10 else "/api/" + junk(), junk())

        await asyncio.gather(*(one(i) for i in range(1000)))
    after = await scrape(box.url)
    assert set(series(after)) <= set(series(before))
    grown = value(after, "ollamux_requests_total", model="other") - value(
        before, "ollamux_requests_total", model="other"
    )
    assert grown == 1000


# --- the access log -------------------------------------------------------------------------------


async def test_one_key_value_access_line_per_request(
    box: Farm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ollamux.access")
    body = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 3}, "stream": False}
    status, _ = await post(box.url, "/api/generate", body, headers={"X-Request-Id": "req-1"})
    assert status == 200
    status, _ = await post(box.url, "/api/generate", {"model": "bad\nname x", "prompt": "hi"})
    assert status == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "ollamux.access"]
    assert len(lines) == 2
    fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', lines[0]))
    assert list(fields) == [
        "request_id",
        "method",
        "path",
        "model",
        "instance",
        "reason",
        "queue_wait",
        "ttft",
        "prompt_tokens",
        "eval_tokens",
        "status",
        "duration",
    ]
    assert fields["request_id"] == "req-1" and fields["model"] == MODEL
    assert fields["instance"].startswith("gpu") and fields["reason"] == "cold_fit"
    assert fields["eval_tokens"] == "3" and fields["status"] == "200"
    assert float(fields["ttft"]) > 0 and float(fields["queue_wait"]) >= 0
    assert 'model="bad\\nname x"' in lines[1] and "reason=passthrough" in lines[1]
    assert "status=400" in lines[1] and "\n" not in lines[1]


async def test_rejected_and_cancelled_requests_are_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ollamux.access")
    async with farm(
        tmp_path, gpus=(24,), num_parallel=1, queue={"max_per_model": 1, "max_total": 1}
    ) as box:
        box.engines[0].faults.slow = 50.0  # the running answer lasts seconds, however loaded
        body = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 100_000}}
        running = asyncio.ensure_future(post(box.url, "/api/generate", body))
        await scraped(box, "ollamux_inflight", 1, backend="gpu0")
        waiting = asyncio.ensure_future(post(box.url, "/api/generate", body))
        await scraped(box, "ollamux_queue_depth", 1, model=MODEL)
        status, _ = await post(box.url, "/api/generate", body)
        assert status == 503
        text = await scrape(box.url)
        assert value(text, "ollamux_rejected_total", reason="queue_full") == 1
        assert value(text, "ollamux_requests_total", backend="none", code="503") == 1
        assert value(text, "ollamux_routing_decisions_total", reason="queued") == 1
        assert value(text, "ollamux_queue_depth", model=MODEL) == 1
        for task in (waiting, running):
            task.cancel()
        await scraped(box, "ollamux_requests_total", 2, code="499")
        await scraped(box, "ollamux_queue_depth", 0, model=MODEL)
        await scraped(box, "ollamux_inflight", 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "ollamux.access"]
    assert len(lines) == 3
    rejected = next(line for line in lines if "status=503" in line)
    assert "reason=queue_full" in rejected and "instance=none" in rejected
    assert 'error="too many requests waiting' in rejected
    assert sum("status=499" in line for line in lines) == 2


# --- deploy/ --------------------------------------------------------------------------------------


@needs_promtool
def test_shipped_prometheus_config_and_rules_pass_promtool() -> None:
    config = DEPLOY / "prometheus" / "prometheus.yml"
    checks = (
        ["check", "config", str(config)],  # which checks alerts.yml, the rule file it loads
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],  # the alerts fire when they should
    )
    for args in checks:
        done = subprocess.run(
            [str(PROMTOOL), *args],
            cwd=DEPLOY / "prometheus",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr


async def test_every_dashboard_and_rule_expression_names_an_exported_metric(box: Farm) -> None:
    await traffic(box)
    exported = exported_names(await scrape(box.url))
    used: set[str] = set()
    for expr in dashboard_exprs() + rule_exprs():
        names = set(re.findall(r"\b(?:ollamux|process|python)_\w+", expr))
        assert names or expr.startswith('up{job="ollamux"}'), f"no ollamux metric in {expr!r}"
        assert names <= exported, f"{expr!r} names {names - exported}"
        assert not re.search(r"\binstance\b", expr), f"{expr!r}: the Ollama server is `backend`"
        used |= names
    # and the dashboard shows every family: one panel or more per metric family
    shown = {n for e in dashboard_exprs() for n in re.findall(r"\bollamux_\w+", e)}
    for family, kind in FAMILIES.items():
        assert any(family + s in shown for s in SUFFIXES[kind]), f"no panel for {family}"


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "ollamux.json").read_text())
    panels = dashboard["panels"]
    assert dashboard["uid"] == "ollamux" and len({p["id"] for p in panels}) == len(panels)
    titles = {p["title"] for p in panels}
    for title in (
        "GPU memory used",
        "Queue depth by model",
        "Time to first token p50 / p95 / p99",
        "Routing decisions by reason",
        "Generated tokens / s per instance",
    ):
        assert title in titles
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"


@needs_prometheus
async def test_real_prometheus_scrapes_the_proxy_with_the_shipped_config(
    box: Farm, tmp_path: Path
) -> None:
    await traffic(box)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "500ms", "evaluation_interval": "500ms"}
    target = f"127.0.0.1:{box.proxy_server.port}"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    api = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(PROMETHEUS),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address={api.removeprefix('http://')}",
        stdout=log,
        stderr=log,
    )
    try:
        async with aiohttp.ClientSession() as s:

            async def query(expr: str) -> dict[str, Any]:
                async with s.get(api + "/api/v1/query", params={"query": expr}) as r:
                    data: dict[str, Any] = await r.json()
                    return data

            async def answered() -> bool:
                try:
                    data = await query('sum(ollamux_requests_total{code="200"})')
                except aiohttp.ClientError:
                    return False
                result = data["data"]["result"]
                return bool(result) and float(result[0]["value"][1]) == SENT_OK

            deadline = asyncio.get_running_loop().time() + 30
            while not await answered():
                assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()
                assert asyncio.get_running_loop().time() < deadline, "Prometheus saw no traffic"
                await asyncio.sleep(0.2)
            # `backend` is the Ollama server; `job` and `instance` are Prometheus' (honor_labels:
            # false), the same on every series of the target as on `up`
            result = (await query("ollamux_requests_total"))["data"]["result"]
            assert {r["metric"]["backend"] for r in result} <= {"gpu0", "gpu1", "gpu2", "gpu3"}
            assert all(r["metric"]["proxy"] == "127.0.0.1:11434" for r in result)
            assert {(r["metric"]["job"], r["metric"]["instance"]) for r in result} == {
                ("ollamux", target)
            }
            assert not [r for r in result if "exported_instance" in r["metric"]]
            # counters are there at 0 from the start: the "Refused (last 5m)" stat shows 0
            refused = (await query("sum(ollamux_rejected_total)"))["data"]["result"]
            assert [float(r["value"][1]) for r in refused] == [0]
            for expr in dashboard_exprs():  # every panel's query runs
                promql = expr.replace("$proxy", ".*").replace("$__rate_interval", "1m")
                result = await query(promql)
                assert result["status"] == "success", (expr, result)
            async with s.get(api + "/api/v1/rules") as r:
                groups = (await r.json())["data"]["groups"]
            rules = groups[0]["rules"]
            assert len(rules) == 10 and all(r["health"] != "err" for r in rules), rules
            # a healthy box fires nothing (GPU memory full or not)
            assert not [r["name"] for r in rules if r["state"] != "inactive"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


# --- /proxy/status and `ollamux status` -----------------------------------------------------------


async def test_status_shows_which_gpu_served_what_and_why(box: Farm) -> None:
    await traffic(box)
    await settled(box)
    data = await asyncio.to_thread(fetch_status, box.url)
    assert data["policy"] == "vram_queue" and data["queues"] == {} and data["queued"] == 0
    instances = {i["name"]: i for i in data["instances"]}
    assert list(instances) == ["gpu0", "gpu1", "gpu2", "gpu3"]
    holder = next(n for n, models in box.loaded().items() if MODEL in models)
    inst = instances[holder]
    assert inst["state"] == "up" and inst["slots"] == 2 and inst["inflight_total"] == 0
    assert [g["gpu"] for g in inst["gpus"]] == [holder[-1]]
    assert inst["gpus"][0]["memory_used"] > 1e9
    assert MODEL in [m["name"] for m in inst["loaded"]]
    assert inst["ttft"]["count"] >= 1 and inst["ttft"]["p50"] > 0
    assert inst["reasons"].get("cold_fit", 0) + inst["reasons"].get("evict", 0) >= 1
    recent = data["recent"]
    assert recent[0]["model"] == "other" and recent[0]["status"] == 404  # newest first
    assert {"instance": holder, "model": MODEL, "reason": "warm"}.items() <= recent[1].items()
    table = render(data, url=box.url)
    assert "INSTANCE" in table and "Recent requests" in table and "█" in table
    row = next(line for line in table.splitlines() if line.startswith(holder))
    assert MODEL in row and "GiB" in row and "up" in row


async def ollamux(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_cli_prints_json_and_table(box: Farm) -> None:
    await traffic(box)
    code, out, err = await ollamux("status", "--url", box.url, "--json")
    assert code == 0, err
    assert [i["name"] for i in json.loads(out)["instances"]] == ["gpu0", "gpu1", "gpu2", "gpu3"]
    code, out, err = await ollamux("status", "--url", box.url.removeprefix("http://"))
    assert code == 0, err
    assert out.splitlines()[0].startswith("ollamux ") and "policy vram_queue" in out
    assert sum(line.startswith("gpu") for line in out.splitlines()) == 4


async def test_status_cli_watch_refreshes_in_place(box: Farm) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "status",
        "--url",
        box.url,
        "--watch",
        "--interval",
        "0.1",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.stdout is not None
    seen = b""
    try:
        while seen.count(b"\nINSTANCE ") < 3:
            seen += await asyncio.wait_for(proc.stdout.read(4096), timeout=10)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), timeout=10)
    assert proc.returncode == 130
    # piped, not a terminal: plain frames, one after the other, apart by a blank line
    assert b"\x1b" not in seen and CLEAR.encode() not in seen
    frames = seen.decode().split("\n\nollamux ")
    assert len(frames) >= 3 and all("INSTANCE" in frame for frame in frames[:3])


async def test_status_cli_without_a_proxy_is_a_clear_error() -> None:
    code, out, err = await ollamux("status", "--url", f"127.0.0.1:{free_port()}")
    assert code == 1 and not out
    assert "cannot reach the proxy" in err and "ollamux serve" in err and "Traceback" not in err
