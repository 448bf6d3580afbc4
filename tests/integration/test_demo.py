"""`ollamux demo` from a wheel, away from the checkout; port checks, before and at readiness."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.errors import LaunchError
from proxy.instances.ports import port_problem
from proxy.instances.supervisor import ChildSpec, RestartPolicy, Supervisor
from tests.processes import REPO, alive, descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a copy of the checkout (so builds never share build/)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("proxy", "config"):
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    out = root / "out"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "-w", str(out), "--no-deps", "-q"],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("ollamux-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path) -> Path:
    """The wheel installed into a folder of its own, as a user's site-packages would hold it."""
    target = wheel.parent / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def test_the_wheel_ships_the_configs_the_license_and_the_project_urls(wheel: Path) -> None:
    for config in ("demo.yaml", "example.yaml"):  # one copy: the package data links to config/
        shipped = REPO / "proxy" / "data" / config
        assert shipped.is_symlink() and shipped.resolve() == (REPO / "config" / config).resolve()
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        for config in ("demo.yaml", "example.yaml"):
            # the file's content, not a link: config/ is the one copy, proxy/data/ links to it
            assert whl.read(f"proxy/data/{config}") == (REPO / "config" / config).read_bytes()
        (license_file,) = [n for n in names if n.endswith("/LICENSE")]
        assert ".dist-info/" in license_file
        assert "MIT License" in whl.read(license_file).decode()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
    assert "Project-URL: Source, https://github.com/ollamux/ollamux" in metadata
    assert "Classifier: Topic :: Internet :: Proxy Servers" in metadata


def test_demo_runs_from_the_installed_wheel_and_a_second_one_fails_fast(
    installed: Path, tmp_path: Path
) -> None:
    below = _free_block(6)  # a second demo's proxy may listen there
    port = below + 1
    listen = f"127.0.0.1:{port}"
    demo, log = _start_demo(installed, tmp_path, "--listen", listen)
    try:
        _wait_listening(demo, log, port)
        answer = _post(
            port,
            "/api/chat",
            {
                "model": "llama3.2:1b",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
                "options": {"num_predict": 3},
            },
        )
        assert answer["done"] is True and answer["message"]["role"] == "assistant"
        assert {m["name"] for m in _get(port, "/api/ps")["models"]} == {"llama3.2:1b"}

        # The same ports again: the proxy's, then (one port lower) the first instance's.
        for other, held, who in ((port, port, "the proxy"), (below, port, "instance gpu0")):
            second = _run_demo(installed, tmp_path, "--listen", f"127.0.0.1:{other}")
            assert second.returncode == 1, second.stderr
            (line,) = second.stderr.strip().splitlines()
            assert line.startswith(f"ollamux: error: {who}")
            assert f"port {held} is already in use by pid {demo.pid} (" in line
            assert "pass --listen HOST:PORT" in line
            assert "started" not in second.stderr  # nothing was started
        assert _get(port, "/api/ps")["models"]  # the first demo is untouched

        children = descendants(demo.pid)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    assert not [pid for pid in children if alive(pid)]
    assert "Traceback" not in log.read_text()


def test_demo_without_room_for_its_instances_is_a_usage_error(
    installed: Path, tmp_path: Path
) -> None:
    result = _run_demo(installed, tmp_path, "--listen", "127.0.0.1:65533")
    assert result.returncode == 2
    assert "--listen: port 65533 leaves no room for the 4 instances after it" in result.stderr


async def test_a_child_whose_port_another_server_answers_is_not_taken_for_ready() -> None:
    """The child never listens, while another server answers 200 on its port: named, not used."""

    async def running(_request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    app = web.Application()
    app.router.add_get("/", running)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_block(1)
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    spec = ChildSpec(
        name="gpu0",
        argv=(sys.executable, "-c", "import time; time.sleep(60)"),
        health_url=f"http://127.0.0.1:{port}/",
    )
    supervisor = Supervisor([spec], policy=RestartPolicy(start_timeout=10, probe_interval=0.05))
    try:
        with pytest.raises(LaunchError) as caught:
            await supervisor.start()
    finally:
        await supervisor.stop()
        await runner.cleanup()
    message = str(caught.value)
    assert f"instance gpu0: http://127.0.0.1:{port}/ is answered by pid {os.getpid()} (" in message
    assert "not by the instance just started" in message


def _free_block(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that were free a moment ago."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        if not any(port_problem("127.0.0.1", base + i) for i in range(count)):
            return base
    raise AssertionError(f"no {count} consecutive free ports found")


def _env(installed: Path) -> dict[str, str]:
    """Only the installed wheel on the path: the checkout is neither on it nor the cwd."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OLLAMA_ORIGINS")}
    return {**env, "PYTHONPATH": str(installed), "PYTHONUNBUFFERED": "1"}


def _start_demo(installed: Path, cwd: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    log = cwd / "demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", *args],
            cwd=cwd,
            env=_env(installed),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    return proc, log


def _run_demo(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "demo", *args],
        cwd=cwd,
        env=_env(installed),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _wait_listening(proc: subprocess.Popen[str], log: Path, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        if f"listening on http://127.0.0.1:{port}" in log.read_text():
            assert "/site/proxy/data/demo.yaml" in _cmdlines(proc.pid)
            return
        time.sleep(0.1)
    raise AssertionError(f"the demo did not listen within 60 s:\n{log.read_text()}")


def _cmdlines(pid: int) -> str:
    """The command lines of ``pid``'s descendants: the emulators name the config they run."""
    lines: Iterator[str] = (
        Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        for child in descendants(pid)
    )
    return "\n".join(lines)


def _get(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        body: dict[str, object] = json.load(response)
        return body


def _post(port: int, path: str, payload: object) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body: dict[str, object] = json.load(response)
        return body
