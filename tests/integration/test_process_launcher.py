"""The process launcher end to end: a fake ``ollama`` on PATH, a fake NVML, real processes.

Each fake ``ollama serve`` records its environment and then runs the emulator, so these tests see
what a real Ollama would be given (GPU UUID, port, settings) and a real proxy in front of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import config_from_dict
from proxy.errors import LaunchError
from proxy.instances.fleet import plan_fleet, run_fleet
from proxy.instances.pinning import pin_with_nvml
from proxy.instances.process import find_ollama, instance_env
from proxy.instances.supervisor import RestartPolicy
from tests.fakes.helpers import REPO, box_env, gpu, load_fake_nvml, records, write_fake_ollama
from tests.processes import alive, descendants, free_ports

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; parent-death signal is Linux only"
)
GPUS = [gpu(0), gpu(1), gpu(2), gpu(3)]
FAST = RestartPolicy(
    start_timeout=30,
    stop_timeout=5,
    probe_interval=0.05,
    backoff_initial=0.1,
    backoff_max=0.2,
    crash_limit=2,
    crash_window=60,
    poll_interval=0.05,
)


def wait_until(condition: Any, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def write_box(tmp_path: Path) -> tuple[Path, int, list[int]]:
    listen, a, b, c = free_ports(4)
    path = tmp_path / "box.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{listen}\n"
        f"models_dir: {tmp_path / 'models'}\n"
        "timeouts: {start: 30s, health_interval: 0.2s}\n"
        "instances:\n"
        f"  - {{name: a, gpu: 0, port: {a}, num_parallel: 2, keep_alive: 10m, "
        "context_length: 8192, env: {OLLAMA_FLASH_ATTENTION: '1'}}\n"
        f"  - {{name: b, gpu: {gpu(1)['uuid']}, port: {b}, max_loaded_models: 2}}\n"
        f"  - {{name: c, gpu: [2, 3], spread: true, port: {c}}}\n"
    )
    return path, listen, [a, b, c]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """`ollamux serve` on a fake 4-GPU box in the background; killed at the end."""
    started: list[subprocess.Popen[str]] = []
    record = tmp_path / "record"
    bin_dir = tmp_path / "bin"
    write_fake_ollama(bin_dir)

    def start(config: Path, listen: int) -> tuple[subprocess.Popen[str], Path]:
        log = tmp_path / "serve.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                cwd=REPO,
                # the shell's settings do not leak into the instances
                env={**box_env(bin_dir, record, GPUS), "OLLAMA_CONTEXT_LENGTH": "1234"},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        started.append(proc)
        wait_until(
            lambda: "instance(s) up" in log.read_text() or proc.poll() is not None, 60, "start"
        )
        assert proc.poll() is None, log.read_text()
        wait_until(lambda: answers(f"http://127.0.0.1:{listen}/"), 20, "the proxy answers")
        return proc, log

    yield start, record
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_each_instance_gets_its_gpu_port_and_settings_and_comes_back_after_a_kill(
    serve: Any, tmp_path: Path
) -> None:
    start, record = serve
    config, listen, (a, b, c) = write_box(tmp_path)
    proc, log = start(config, listen)
    env = {port: records(record, port)[-1]["env"] for port in (a, b, c)}
    assert env[a]["CUDA_VISIBLE_DEVICES"] == gpu(0)["uuid"]  # index 0 pinned by its UUID
    assert env[b]["CUDA_VISIBLE_DEVICES"] == gpu(1)["uuid"]
    assert env[c]["CUDA_VISIBLE_DEVICES"] == f"{gpu(2)['uuid']},{gpu(3)['uuid']}"
    assert [env[p]["OLLAMA_HOST"] for p in (a, b, c)] == [f"127.0.0.1:{p}" for p in (a, b, c)]
    assert {env[p]["OLLAMA_MODELS"] for p in (a, b, c)} == {str(tmp_path / "models")}
    assert env[a]["OLLAMA_NUM_PARALLEL"] == "2" and env[b]["OLLAMA_NUM_PARALLEL"] == "4"
    assert env[a]["OLLAMA_KEEP_ALIVE"] == "10m" and env[a]["OLLAMA_CONTEXT_LENGTH"] == "8192"
    assert env[a]["OLLAMA_FLASH_ATTENTION"] == "1" and env[a]["OLLAMA_MAX_QUEUE"] == "512"
    assert env[b]["OLLAMA_MAX_LOADED_MODELS"] == "2" and "OLLAMA_CONTEXT_LENGTH" not in env[b]
    assert "OLLAMA_MAX_LOADED_MODELS" not in env[a]
    assert env[c]["OLLAMA_SCHED_SPREAD"] == "1" and "OLLAMA_SCHED_SPREAD" not in env[a]
    assert records(record, a)[0]["argv"][1:] == ["serve"]

    # the proxy routes to them and knows their GPUs, read through (fake) NVML
    body = json.dumps({"model": "llama3.2:1b", "prompt": "hi", "stream": False}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{listen}/api/generate", data=body)
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert json.loads(reply.read())["done"] is True
    listed = get_json(f"http://127.0.0.1:{listen}/proxy/instances")["instances"]
    assert [(i["name"], i["launcher"], i["gpus"]) for i in listed] == [
        ("a", "process", [gpu(0)["uuid"]]),
        ("b", "process", [gpu(1)["uuid"]]),
        ("c", "process", [gpu(2)["uuid"], gpu(3)["uuid"]]),
    ]
    first = records(record, a)[-1]["pid"]
    assert listed[0]["process"] == f"running (pid {first})"
    wait_until(
        lambda: any(
            i["memory_total"] == 24 * 1024**3
            for i in get_json(f"http://127.0.0.1:{listen}/proxy/status")["instances"]
        ),
        10,
        "NVML readings",
    )

    # a killed instance comes back after the backoff, on the same GPU and port
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: len(records(record, a)) == 2, 20, "restart of a")
    assert records(record, a)[-1]["env"]["CUDA_VISIBLE_DEVICES"] == gpu(0)["uuid"]
    wait_until(lambda: answers(f"http://127.0.0.1:{a}/api/version"), 20, "a answers")
    assert "a exited (killed by SIGKILL) (pid" in log.read_text()
    assert "restarting it in 0.5 s" in log.read_text()

    children = descendants(proc.pid)
    assert len(children) >= 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    wait_until(lambda: not any(alive(pid) for pid in children), 10, "children gone")
    assert "Traceback" not in log.read_text()


def test_sigkill_of_serve_leaves_no_ollama_behind(serve: Any, tmp_path: Path) -> None:
    start, record = serve
    config, listen, ports = write_box(tmp_path)
    proc, _ = start(config, listen)
    children = descendants(proc.pid)
    assert {records(record, p)[-1]["pid"] for p in ports} <= children
    proc.kill()
    proc.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in children), 15, "no orphans")


def test_a_port_in_use_is_named_with_its_holder_before_anything_starts(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    write_fake_ollama(bin_dir)
    config, _, (a, _, _) = write_box(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", a))
        squatter.listen()
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            cwd=REPO,
            env=box_env(bin_dir, tmp_path / "record", GPUS),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"instance a: port {a} is already in use by pid {os.getpid()} (" in result.stderr
    assert "Traceback" not in result.stderr
    assert records(tmp_path / "record", a) == []  # nothing was started


def test_a_missing_ollama_names_the_key_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    config = config_from_dict({"instances": [{"name": "a", "gpu": "GPU-a"}]}, source="box.yaml")
    with pytest.raises(LaunchError, match=r"box.yaml: `ollama` is not on PATH; install Ollama"):
        find_ollama(config)
    missing = config_from_dict({"ollama_binary": "/opt/nope/ollama"}, source="box.yaml")
    with pytest.raises(LaunchError, match="ollama_binary: /opt/nope/ollama does not exist"):
        find_ollama(missing)
    plain = tmp_path / "ollama"
    plain.write_text("not executable")
    with pytest.raises(LaunchError, match="is not executable"):
        find_ollama(config_from_dict({"ollama_binary": str(plain)}))
    plain.chmod(0o755)
    assert find_ollama(config) == str(plain)


def test_instance_env_leaves_out_what_is_not_set() -> None:
    config = config_from_dict({"instances": [{"name": "a", "port": 11500}]})
    assert config.instances != "auto"
    assert instance_env(config, config.instances[0]) == {
        "OLLAMA_HOST": "127.0.0.1:11500",
        "OLLAMA_NUM_PARALLEL": "4",
        "OLLAMA_KEEP_ALIVE": "5m",
        "OLLAMA_MAX_QUEUE": "512",
    }


# --- in process: crash loops and restarts through the admin API ----------------------------------


async def test_a_crash_looping_instance_is_given_up_reported_down_and_restartable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "record"
    bin_dir = tmp_path / "bin"
    write_fake_ollama(bin_dir)
    for key, value in box_env(bin_dir, record, None).items():
        monkeypatch.setenv(key, value)
    load_fake_nvml(monkeypatch, GPUS[:2])
    listen, a, b = free_ports(3)
    raw = {
        "listen": f"127.0.0.1:{listen}",
        "timeouts": {"start": 30, "health_interval": 0.1},
        "instances": [{"name": "a", "gpu": 0, "port": a}, {"name": "b", "gpu": 1, "port": b}],
    }
    config = pin_with_nvml(config_from_dict(raw, source="box.yaml"))
    stop = asyncio.Event()
    task = asyncio.ensure_future(run_fleet(config, plan_fleet(config), policy=FAST, stop=stop))
    url = f"http://127.0.0.1:{listen}/proxy/instances"
    try:
        async with aiohttp.ClientSession() as session:

            async def listed() -> dict[str, dict[str, Any]]:
                try:
                    async with session.get(url) as response:
                        return {i["name"]: i for i in (await response.json())["instances"]}
                except aiohttp.ClientError:
                    return {}

            async def until(check: Any, what: str) -> dict[str, dict[str, Any]]:
                for _ in range(400):
                    assert not task.done(), task.exception() if task.done() else ""
                    state = await listed()
                    if state and check(state):
                        return state
                    await asyncio.sleep(0.05)
                raise AssertionError(f"not in time: {what}: {await listed()}")

            await until(lambda s: s["a"]["state"] == s["b"]["state"] == "up", "both up")
            (record / f"crash-{b}").touch()
            os.kill(records(record, b)[-1]["pid"], signal.SIGKILL)
            state = await until(lambda s: s["b"]["process"].startswith("given up"), "b given up")
            assert state["b"]["process"] == "given up after 3 crashes"
            state = await until(lambda s: s["b"]["state"] == "down", "b down")
            assert state["a"]["state"] == "up"
            starts = len(records(record, b))
            assert starts == 1 + FAST.crash_limit  # the first start, then the restarts
            await asyncio.sleep(0.3)
            assert len(records(record, b)) == starts  # no more restarts

            # an operator fixes it and restarts it through the admin API
            (record / f"crash-{b}").unlink()
            async with session.post(f"http://127.0.0.1:{listen}/proxy/instances/b/restart") as r:
                assert r.status == 200, await r.text()
                entry = await r.json()
            assert entry["state"] == "up" and entry["process"].startswith("running (pid ")
            async with session.post(f"http://127.0.0.1:{listen}/proxy/instances/a/restart") as r:
                assert r.status == 200
            assert len(records(record, a)) == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    for port in (a, b):
        assert not alive(records(record, port)[-1]["pid"])
