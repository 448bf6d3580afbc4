"""The generic supervisor with real child processes: readiness, output, restarts, no orphans."""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import sys
import textwrap

import pytest

from proxy.errors import LaunchError
from proxy.instances.supervisor import ChildSpec, RestartPolicy, Supervisor
from tests.processes import alive

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")

FAST = RestartPolicy(
    start_timeout=10,
    stop_timeout=3,
    probe_interval=0.05,
    backoff_initial=0.05,
    backoff_max=0.2,
    crash_limit=2,
    crash_window=30,
    poll_interval=0.05,
)

# A tiny HTTP server that says hello, optionally after starting a grandchild in its group.
SERVER = textwrap.dedent(
    """
    import http.server, subprocess, sys
    port, spawn = int(sys.argv[1]), sys.argv[2] == "spawn"
    if spawn:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("grandchild", grandchild.pid, flush=True)
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello")
        def log_message(self, *args):
            pass
    print("serving on", port, flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Hello).serve_forever()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server(name: str, port: int, *, spawn: bool = False) -> ChildSpec:
    argv = (sys.executable, "-c", SERVER, str(port), "spawn" if spawn else "-")
    return ChildSpec(name=name, argv=argv, health_url=f"http://127.0.0.1:{port}/")


def script(name: str, code: str) -> ChildSpec:
    return ChildSpec(name=name, argv=(sys.executable, "-c", code), health_url="http://127.0.0.1:9/")


async def wait_for(condition: object, timeout: float = 10) -> None:
    assert callable(condition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_start_waits_until_ready_and_stop_leaves_nothing() -> None:
    out = io.StringIO()
    supervisor = Supervisor(
        [server("one", free_port()), server("second", free_port(), spawn=True)],
        policy=FAST,
        output=out,
    )
    try:
        await supervisor.start()
        pids = [c.pid for c in supervisor.children]
        assert all(pid is not None and alive(pid) for pid in pids)
        await wait_for(lambda: "grandchild" in out.getvalue())
    finally:
        await supervisor.stop()
    assert not any(alive(pid) for pid in pids if pid is not None)
    grandchild = int(re.search(r"grandchild (\d+)", out.getvalue()).group(1))  # type: ignore[union-attr]
    await wait_for(lambda: not alive(grandchild))
    # every line carries its instance's name, padded to the longest
    assert re.search(r"^one    \| serving on \d+$", out.getvalue(), re.M)
    assert re.search(r"^second \| serving on \d+$", out.getvalue(), re.M)


async def test_child_that_exits_before_answering_is_named_with_its_output() -> None:
    spec = script("gpu7", "import sys; print('CUDA error: out of memory'); sys.exit(3)")
    supervisor = Supervisor([spec], policy=FAST, output=io.StringIO())
    with pytest.raises(LaunchError) as info:
        await supervisor.run(asyncio.Event())
    message = str(info.value)
    assert "instance gpu7 exited (exit code 3) before answering http://127.0.0.1:9/" in message
    assert "CUDA error: out of memory" in message


async def test_child_that_never_answers_times_out_and_is_stopped() -> None:
    spec = script("slow", "import time; print('loading', flush=True); time.sleep(60)")
    policy = RestartPolicy(start_timeout=0.5, probe_interval=0.05, stop_timeout=2)
    supervisor = Supervisor([spec], policy=policy, output=io.StringIO())
    with pytest.raises(LaunchError, match=r"instance slow did not answer .* within 0.5 s") as info:
        await supervisor.run(asyncio.Event())
    assert "loading" in str(info.value)
    assert "timeouts.start" in str(info.value)
    pid = supervisor.children[0].pid
    assert pid is not None and not alive(pid)


async def test_missing_executable_is_a_launch_error() -> None:
    spec = ChildSpec(name="x", argv=("/nonexistent/ollama", "serve"), health_url="http://h/")
    with pytest.raises(LaunchError, match="instance x: cannot run '/nonexistent/ollama'"):
        await Supervisor([spec], policy=FAST).run(asyncio.Event())


async def test_crashed_child_is_restarted_and_stop_ends_the_loop() -> None:
    supervisor = Supervisor([server("gpu0", free_port())], policy=FAST, output=io.StringIO())
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.ensure_future(supervisor.run(stop, on_ready=ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        child = supervisor.children[0]
        first = child.pid
        assert first is not None
        os.kill(first, 9)
        await wait_for(lambda: child.pid != first and child.returncode is None)
        await child.wait_ready(FAST)
        assert len(child.crashes) == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert child.pid is not None and not alive(child.pid)


async def test_crash_loop_gives_up() -> None:
    # Ready at first, then every restart dies at once: a crash loop.
    marker_port = free_port()
    supervisor = Supervisor([server("flaky", marker_port)], policy=FAST, output=io.StringIO())
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.ensure_future(supervisor.run(stop, on_ready=ready.set))
    await asyncio.wait_for(ready.wait(), 10)
    child = supervisor.children[0]
    child.spec = script("flaky", "import sys; sys.exit(1)")
    assert child.pid is not None
    os.kill(child.pid, 9)
    with pytest.raises(LaunchError, match="every instance crashed repeatedly"):
        await asyncio.wait_for(task, 10)
    assert child.given_up
    assert len(child.crashes) == FAST.crash_limit + 1


async def test_stop_during_start_abandons_the_start() -> None:
    spec = script("slow", "import time; time.sleep(60)")
    supervisor = Supervisor([spec], policy=RestartPolicy(start_timeout=30), output=io.StringIO())
    stop = asyncio.Event()
    task = asyncio.ensure_future(supervisor.run(stop))
    await wait_for(lambda: supervisor.children[0].pid is not None)
    stop.set()
    await asyncio.wait_for(task, 10)
    pid = supervisor.children[0].pid
    assert pid is not None and not alive(pid)


def test_backoff_doubles_up_to_the_maximum() -> None:
    policy = RestartPolicy(backoff_initial=0.5, backoff_max=3)
    assert [policy.backoff(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1, 2, 3, 3]


async def test_restart_on_request_is_not_a_crash_and_stop_cancels_one_under_way() -> None:
    supervisor = Supervisor([server("gpu0", free_port())], policy=FAST, output=io.StringIO())
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.ensure_future(supervisor.run(stop, on_ready=ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        child = supervisor.children[0]
        first = child.pid
        await supervisor.restart("gpu0")
        assert child.pid != first and child.returncode is None and not child.crashes
        assert first is not None and not alive(first)
        assert child.describe() == f"running (pid {child.pid})"
        with pytest.raises(LaunchError, match="no supervised instance is called 'nope'"):
            await supervisor.restart("nope")
        child.spec = script("gpu0", "import time; time.sleep(60)")  # never answers
        second = child.pid
        under_way = asyncio.ensure_future(supervisor.restart("gpu0"))
        await wait_for(lambda: child.restarting and child.pid != second)  # waiting for readiness
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    with pytest.raises(asyncio.CancelledError):
        await under_way
    assert child.pid is not None and not alive(child.pid)
