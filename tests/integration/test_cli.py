"""The real `ollamux` command as a subprocess: exit codes, messages, emulate, serve, no orphans."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from proxy import __version__
from tests.processes import REPO, alive, children_of, free_ports, ollamux, ollamux_env

CONFIG_FILES = sorted((REPO / "config").glob("*.yaml"))
LINUX = sys.platform.startswith("linux")

needs_server = pytest.mark.skipif(
    importlib.util.find_spec("proxy.emulator.server") is None,
    reason="proxy.emulator.server is not written yet",
)


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status, response.read().decode()


def wait_until_answering(
    url: str, proc: subprocess.Popen[str], log: Path, timeout: float = 30
) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = get(url)
            if status == 200:
                return body
        except (OSError, urllib.error.URLError):
            pass
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{url} never answered:\n{log.read_text()}"
        time.sleep(0.1)


def wait_gone(pids: set[int], timeout: float = 15) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {pid for pid in pids if alive(pid)}
        if not left:
            return left
        time.sleep(0.1)
    return {pid for pid in pids if alive(pid)}


# --- version, config check -----------------------------------------------------------------------


def test_version() -> None:
    result = ollamux("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ollamux {__version__}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_check_prints_the_resolved_config(path: Path) -> None:
    result = ollamux("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    tree = yaml.safe_load(result.stdout)
    assert tree["listen"]
    assert all(inst["port"] > 0 for inst in tree["instances"])
    assert tree["emulator"]["models"], "the built-in catalogue is spelled out"
    assert "timeouts" in tree and "queue" in tree and "routing" in tree


def test_config_check_fills_defaults_and_ports(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text("instances:\n  - {name: a, gpu: 0}\n  - {name: b, gpu: 1}\n")
    result = ollamux("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    tree = yaml.safe_load(result.stdout)
    assert [i["port"] for i in tree["instances"]] == [11435, 11436]
    assert tree["instances"][0]["num_parallel"] == 0  # ollamux's default: 4 for what it starts
    assert tree["timeouts"]["start"] == 60
    assert any(m["name"] == "llama3.1:8b" for m in tree["emulator"]["models"])


BAD = {
    "unknown key": (
        "instances:\n  - {name: a, gpu: 0, num_paralel: 2}\n",
        "instances[0].num_paralel: unknown key 'num_paralel'; did you mean 'num_parallel'?",
    ),
    "wrong type": ("queue: {max_total: lots}\n", "queue.max_total: must be an integer"),
    "duplicate port": (
        "instances:\n  - {name: a, gpu: 0, port: 11600}\n  - {name: b, gpu: 1, port: 11600}\n",
        "instances[1].port: port 11600 is already used by instances[0]",
    ),
    "duplicate GPU": (
        "instances:\n  - {name: a, gpu: GPU-1}\n  - {name: b, gpu: GPU-1}\n",
        "instances[1].gpu: GPU 'GPU-1' is already owned by instances[0]",
    ),
    "emulated GPU that does not exist": (
        "emulator: {gpus: [{name: a, memory_gib: 24}]}\n"
        "instances:\n  - {name: x, launcher: emulated, gpu: b}\n",
        "instances[0].gpu: 'b' is not an emulated GPU; use one of ['a'] or its index",
    ),
    "bad duration": ("timeouts: {connect: 5 s}\n", "timeouts.connect: time: "),
    "bad YAML": ("listen: [127.0.0.1\n", ": line 2, column 1: not valid YAML: expected ','"),
}


@pytest.mark.parametrize("case", list(BAD), ids=str)
def test_config_errors_exit_2_with_file_path_and_fix(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = ollamux("config", "check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"ollamux: error: {path}: ")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") <= 3  # a message, not a dump


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = ollamux("config", "check", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "missing.yaml: cannot read the file (No such file or directory)" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("instances: [{name: a, gpu: 0, port: nope}]\n")
    result = ollamux("serve", "--config", str(path))
    assert result.returncode == 2
    assert "instances[0].port: must be an integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2() -> None:
    assert ollamux().returncode == 2
    assert ollamux("emulate", "--num-parallel", "x").returncode == 2


# --- a host without NVIDIA GPUs or Ollama --------------------------------------------------------


def without_gpus_or_ollama(tmp_path: Path) -> dict[str, str]:
    """No NVIDIA driver (the fake pynvml without $FAKE_NVML) and no `ollama` on PATH."""
    fakes = REPO / "tests" / "fakes"
    environ = {**ollamux_env(), "PYTHONPATH": f"{fakes}{os.pathsep}{REPO}", "PATH": str(tmp_path)}
    environ.pop("FAKE_NVML", None)
    return environ


def test_serve_without_instances_points_at_the_demo(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve"],
        cwd=REPO,
        env=without_gpus_or_ollama(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "NVML" in result.stderr and "or try the emulated demo box: ollamux demo" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_the_process_launcher_needs_ollama(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(REPO / "config" / "example.yaml")],
        cwd=REPO,
        env=without_gpus_or_ollama(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "`ollama` is not on PATH; install Ollama" in result.stderr
    assert "ollama_binary" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_listen_must_not_clash_with_an_instance() -> None:
    result = ollamux("serve", "--config", str(REPO / "config" / "demo.yaml"), "--listen", ":11436")
    assert result.returncode == 2
    assert "--listen: port 11436 is already used by instances[1] (gpu1)" in result.stderr


def test_emulate_without_gpus_exits_2() -> None:
    result = ollamux("emulate", "--listen", "127.0.0.1:1")
    assert result.returncode == 2
    assert "--gpu: no GPU given; use --gpu NAME:GIB" in result.stderr


# --- emulate and serve for real ------------------------------------------------------------------


@needs_server
def test_emulate_answers_and_stops_on_sigterm(spawn: object, tmp_path: Path) -> None:
    assert callable(spawn)
    (port,) = free_ports(1)
    proc, log = spawn(
        "emulate",
        "--listen",
        f"127.0.0.1:{port}",
        "--gpu",
        "rtx4090:24",
        "--gpu",
        "l40s:48:0.85",
        "--speed",
        "20",
        "--num-parallel",
        "2",
        "--models-dir",
        str(tmp_path / "models"),
    )
    assert wait_until_answering(f"http://127.0.0.1:{port}/", proc, log) == "Ollama is running"
    status, body = get(f"http://127.0.0.1:{port}/api/version")
    assert status == 200 and '"version"' in body
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    output = log.read_text()
    assert f"starting on http://127.0.0.1:{port} with 2 GPU(s)" in output
    assert "num_parallel=2" in output
    assert "Traceback" not in output


@needs_server
def test_emulate_listens_on_ollama_host_and_logs_key_value_lines(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    log = tmp_path / "emulate.log"
    env = {**ollamux_env(), "OLLAMA_HOST": f"127.0.0.1:{port}"}
    env.pop("JOURNAL_STREAM", None)
    argv = [sys.executable, "-m", "proxy", "emulate", "--gpu", "a:24", "--log-level", "info"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        assert wait_until_answering(f"http://127.0.0.1:{port}/", proc, log) == "Ollama is running"
        assert get(f"http://127.0.0.1:{port}/api/version")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = log.read_text().splitlines()
    iso = r"time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d "
    assert lines and all(re.match(iso + "level=[A-Z]+ logger=ollamux\\.", x) for x in lines), lines
    access = [x for x in lines if "logger=ollamux.emulator.access " in x]
    assert any(" method=GET path=/api/version status=200 duration=" in x for x in access), lines
    assert f"starting on http://127.0.0.1:{port} " in lines[0]


@needs_server
def test_emulate_on_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = ollamux("emulate", "--listen", f"127.0.0.1:{port}", "--gpu", "a:24")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def write_box(tmp_path: Path) -> tuple[Path, list[int]]:
    """A config with two emulated instances on free ports."""
    listen, a, b = free_ports(3)
    path = tmp_path / "box.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{listen}\n"
        f"models_dir: {tmp_path / 'models'}\n"
        "timeouts: {start: 30s}\n"
        "emulator:\n  speed: 20\n"
        "  gpus: [{name: g0, memory_gib: 24}, {name: g1, memory_gib: 48, speed: 0.85}]\n"
        "instances:\n"
        f"  - {{name: gpu0, launcher: emulated, gpu: g0, port: {a}}}\n"
        f"  - {{name: gpu1, launcher: emulated, gpu: g1, port: {b}, num_parallel: 2}}\n"
    )
    return path, [a, b]


def start_box(spawn: object, tmp_path: Path) -> tuple[subprocess.Popen[str], Path, set[int]]:
    assert callable(spawn)
    config, ports = write_box(tmp_path)
    proc, log = spawn("serve", "--config", str(config))
    for port in ports:
        assert wait_until_answering(f"http://127.0.0.1:{port}/", proc, log) == "Ollama is running"
    deadline = time.monotonic() + 10
    while "instance(s) up" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    children = children_of(proc.pid)
    assert len(children) == 2, log.read_text()
    return proc, log, children


@needs_server
@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_serve_starts_every_instance_and_sigterm_stops_them_all(
    spawn: object, tmp_path: Path
) -> None:
    proc, log, children = start_box(spawn, tmp_path)
    output = log.read_text()
    assert "gpu0 answers at http://127.0.0.1:" in output
    assert "gpu1 | " in output  # the children's own lines, prefixed with their name
    listen = (tmp_path / "box.yaml").read_text().splitlines()[0].split(" ")[1]
    assert wait_until_answering(f"http://{listen}/", proc, log) == "Ollama is running"
    body = json.dumps(
        {"model": "llama3.2:1b", "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
    ).encode()
    request = urllib.request.Request(f"http://{listen}/api/generate", data=body)
    with urllib.request.urlopen(request, timeout=30) as reply:  # through the routing proxy
        assert json.loads(reply.read())["eval_count"] == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    assert wait_gone(children, timeout=1) == set()
    assert "all instances stopped" in log.read_text()
    assert "Traceback" not in log.read_text()


@needs_server
@pytest.mark.skipif(not LINUX, reason="parent-death signal is Linux only")
def test_sigkill_of_serve_leaves_no_orphans(spawn: object, tmp_path: Path) -> None:
    proc, log, children = start_box(spawn, tmp_path)
    proc.kill()
    proc.wait(10)
    assert wait_gone(children) == set(), log.read_text()


@needs_server
def test_serve_starts_when_no_external_instance_answers_and_serves_503_until_one_does(
    spawn: object, tmp_path: Path
) -> None:
    assert callable(spawn)
    port, listen = free_ports(2)
    path = tmp_path / "ext.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{listen}\n"
        "timeouts: {start: 0.5s}\n"  # how long it waits for a first answer: the subject here
        f"instances: [{{name: remote, launcher: external, url: 'http://127.0.0.1:{port}'}}]\n"
    )
    proc, log = spawn("serve", "--config", str(path))
    deadline = time.monotonic() + 30
    while "proxy listening" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    output = log.read_text()
    assert f"remote (external) does not answer http://127.0.0.1:{port}/" in output
    assert "0 of 1 instance(s) up after 0.5 s (timeouts.start); starting the routing" in output
    body = json.dumps(
        {"model": "llama3.2:1b", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    ).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{listen}/api/generate", data=body)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"]
    assert "error" in json.loads(refused.value.read())
    backend, _ = spawn(
        "emulate", "--listen", f"127.0.0.1:{port}", "--gpu", "r:24", "--speed", "20",
        "--models-dir", str(tmp_path / "models"),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while "instance remote (http://127.0.0.1:" not in log.read_text():  # the monitor saw it
        assert backend.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert json.loads(reply.read())["done"] is True
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_serve_checks_external_instances_and_stops_on_sigterm(
    spawn: object, tmp_path: Path
) -> None:
    assert callable(spawn)
    (port,) = free_ports(1)
    backend = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        path = tmp_path / "ext.yaml"
        path.write_text(
            f"instances: [{{name: remote, launcher: external, url: 'http://127.0.0.1:{port}'}}]\n"
        )
        proc, log = spawn("serve", "--config", str(path))
        deadline = time.monotonic() + 30
        while "instance(s) up" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert f"remote answers at http://127.0.0.1:{port} (external)" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        backend.kill()
        backend.wait(10)


def test_serve_refuses_a_bad_ollama_origins_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "listen: 127.0.0.1:1\ninstances:\n"
        "  - {name: gpu0, launcher: emulated, gpu: 0}\n"
        "emulator: {gpus: [{name: g0, memory_gib: 24}]}\n"
    )
    monkeypatch.setenv("OLLAMA_ORIGINS", "http://ok.example,notanorigin")
    result = ollamux("serve", "--config", str(config), timeout=30)
    assert result.returncode == 2
    assert "OLLAMA_ORIGINS: 'notanorigin' is not an origin" in result.stderr
    assert "started" not in result.stderr  # no instance was launched
