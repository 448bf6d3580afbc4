"""`ollamux serve --backend URL ...` as a subprocess in front of two emulated Ollama servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import REPO, free_ports, ollamux, ollamux_env


def start(*args: str, logs: Path) -> tuple[subprocess.Popen[str], Path]:
    """`ollamux ARGS` in the background; stderr (the log) to a file of its own."""
    stderr = logs / f"stderr-{time.monotonic_ns()}.log"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            cwd=REPO,
            env=ollamux_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    return proc, stderr


def wait_answering(url: str, proc: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{url} never answered:\n{log.read_text()}"
        time.sleep(0.1)


def stop(proc: subprocess.Popen[str], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two emulated Ollama servers, one 24 GiB GPU each, as `ollamux emulate` runs them."""
    logs = tmp_path_factory.mktemp("backends")
    ports = free_ports(2)
    started = [
        start(
            *("emulate", "--listen", f"127.0.0.1:{port}", "--gpu", "a:24", "--speed", "20"),
            "--quiet",
            logs=logs,
        )
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, (proc, log) in zip(urls, started, strict=True):
            wait_answering(url + "/", proc, log)
        yield urls
    finally:
        for proc, _ in started:
            proc.kill()
            proc.wait(10)


def test_serve_backends_routes_a_streamed_chat_and_lists_both_up(
    backends: list[str], tmp_path: Path
) -> None:
    (listen,) = free_ports(1)
    flags = [arg for url in backends for arg in ("--backend", url)]
    proc, log = start("serve", *flags, "--listen", f"127.0.0.1:{listen}", logs=tmp_path)
    try:
        proxy = f"http://127.0.0.1:{listen}"
        wait_answering(proxy + "/", proc, log)
        body = {
            "model": "llama3.2:1b",
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 4},
        }
        request = urllib.request.Request(proxy + "/api/chat", data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=30) as reply:
            lines = [json.loads(line) for line in reply if line.strip()]
        assert len(lines) >= 2  # streamed: chunks, then the final line
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 4
        assert "".join(line["message"]["content"] for line in lines)
        with urllib.request.urlopen(proxy + "/proxy/status", timeout=5) as reply:
            status = json.loads(reply.read())
        names = [f"127.0.0.1-{url.rsplit(':', 1)[1]}" for url in backends]
        listed = {inst["name"]: inst for inst in status["instances"]}
        assert sorted(listed) == sorted(names)
        assert {inst["url"] for inst in listed.values()} == set(backends)
        assert all(inst["state"] == "up" and inst["slots"] == 1 for inst in listed.values())
        output = log.read_text()
        assert "WARNING" in output and "--num-parallel: not given" in output
        assert f"{names[0]} answers at {backends[0]} (external)" in output
    finally:
        stop(proc, log)


def test_serve_backends_with_num_parallel_gives_every_backend_its_slots(
    backends: list[str], tmp_path: Path
) -> None:
    (listen,) = free_ports(1)
    flags = [arg for url in backends for arg in ("--backend", url)]
    args = ("serve", *flags, "--num-parallel", "2", "--listen", f"127.0.0.1:{listen}")
    proc, log = start(*args, logs=tmp_path)
    try:
        wait_answering(f"http://127.0.0.1:{listen}/", proc, log)
        url = f"http://127.0.0.1:{listen}/proxy/status"
        with urllib.request.urlopen(url, timeout=5) as reply:
            status = json.loads(reply.read())
        assert [inst["slots"] for inst in status["instances"]] == [2, 2]
        assert "num-parallel" not in log.read_text()
    finally:
        stop(proc, log)


def test_serve_logs_a_config_files_warning_naming_the_file(
    backends: list[str], tmp_path: Path
) -> None:
    (listen,) = free_ports(1)
    path = tmp_path / "ext.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{listen}\n"
        f"instances: [{{name: remote, launcher: external, url: '{backends[0]}'}}]\n"
    )
    proc, log = start("serve", "--config", str(path), logs=tmp_path)
    try:
        wait_answering(f"http://127.0.0.1:{listen}/", proc, log)
        warning = f'level=WARNING logger=ollamux.fleet msg="{path}: instances[0].num_parallel: '
        assert warning + "not set for external instance remote" in log.read_text()
    finally:
        stop(proc, log)


def test_serve_backend_with_config_exits_2_naming_both_flags(tmp_path: Path) -> None:
    result = ollamux(
        "serve", "--config", str(REPO / "config" / "demo.yaml"), "--backend", "http://a:11434"
    )
    assert result.returncode == 2
    assert "--backend" in result.stderr and "--config" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("10.0.0.5:11434", "needs http:// or https:// in front"),
        ("ftp://10.0.0.5:11434", "needs http:// or https:// in front"),
        ("http://", "names no host"),
        ("http://10.0.0.5:11434/?x=1", "without ?query"),
    ],
)
def test_serve_backend_with_a_bad_url_exits_2(url: str, says: str) -> None:
    result = ollamux("serve", "--backend", "http://10.0.0.6:11434", "--backend", url)
    assert result.returncode == 2
    assert result.stderr.startswith("ollamux: error: --backend: "), result.stderr
    assert says in result.stderr and "e.g. --backend http://" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_num_parallel_without_backend_exits_2() -> None:
    result = ollamux("serve", "--num-parallel", "2", "--config", str(REPO / "config/demo.yaml"))
    assert result.returncode == 2
    assert "--num-parallel" in result.stderr and "--backend" in result.stderr


def test_serve_help_shows_backend_with_an_example() -> None:
    result = ollamux("serve", "--help")
    assert result.returncode == 0
    assert "--backend URL" in result.stdout and "--num-parallel N" in result.stdout
    assert "ollamux serve --backend http://10.0.0.5:11434 --backend" in result.stdout
