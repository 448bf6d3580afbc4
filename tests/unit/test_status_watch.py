"""`ollamux status [--watch]` fits the terminal: rows cut to its width, frames to its height, the
alternate screen entered and left, colour on a terminal only; piped, plain frames."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from proxy.commands import status
from proxy.commands.status import render, run_status
from proxy.errors import OllamuxError
from proxy.terminal import CLEAR, ENTER, LEAVE, cut, visible_len

GIB = 1024**3
NOW = 1000.0
ESC = re.compile(r"\x1b")
SGR = re.compile(r"\x1b\[[0-9;]*m")
REPO = Path(__file__).resolve().parents[2]
WATCH = ["--watch", "--interval", "0.1"]
MODELS = ["llama3.1:8b", "nomic-embed-text:latest", "qwen2.5:7b"]


def busy_box() -> dict[str, Any]:
    """A /proxy/status of four busy GPUs and 30 recent requests: 185+ columns when drawn in full."""
    states = ["up", "up", "ejected", "draining"]
    return {
        "version": "0.1.0",
        "uptime_s": 3725,
        "policy": "vram_queue",
        "queues": {"llama3.1:8b": 3, "qwen2.5:7b": 1},
        "queued": 4,
        "queue_limits": {"max_per_model": 64, "max_total": 512, "timeout": 300},
        "instances": [
            {
                "name": f"gpu{i}",
                "state": states[i],
                "ejected_until": NOW + 12 if states[i] == "ejected" else None,
                "gpus": [
                    {
                        "gpu": str(i),
                        "uuid": f"GPU-{i}",
                        "memory_total": 24 * GIB,
                        "memory_used": (i + 1) * 5 * GIB,
                        "utilization": 0.3,
                    }
                ],
                "slots": 4,
                "inflight_total": i,
                "loaded": [
                    {"name": MODELS[i % 3], "size_vram": 5 * GIB},
                    {"name": MODELS[(i + 1) % 3], "size_vram": GIB},
                ],
                "loading": ["qwen2.5:7b"] if i == 1 else [],
                "ttft": {"count": 9, "p50": 0.1, "p95": 3.58, "last": 0.2},
                "reasons": {"warm": 12, "cold_fit": 3, "scale_out": 2, "affinity": 4},
            }
            for i in range(4)
        ],
        "recent": [
            {
                "at": NOW - 3 * k,
                "endpoint": ["/v1/chat/completions", "/api/chat", "/v1/embeddings"][k % 3],
                "model": "nomic-embed-text:latest",
                "instance": f"gpu{k % 4}",
                "reason": "cold_fit",
                "status": [200, 404, 503, 499][k % 4],
                "queue_wait": 0.0,
                "ttft": 3.58,
                "eval_tokens": 197,
            }
            for k in range(30)
        ],
    }


def assert_essentials(lines: list[str]) -> None:
    """Each instance's row shows its name, state, GPU memory, busy slots and first loaded model."""
    for i, state in enumerate(["up", "up", "ejected", "draining"]):
        row = next(SGR.sub("", line) for line in lines if SGR.sub("", line).startswith(f"gpu{i} "))
        used = f"{(i + 1) * 5:.1f}/24"
        assert state in row and used in row and "█" in row and f"{i}/4" in row, row
        assert MODELS[i % 3] in row, row


def test_full_drawing_is_wider_than_a_small_terminal() -> None:
    assert max(len(line) for line in render(busy_box(), url="h:1", now=NOW).splitlines()) > 185


@pytest.mark.parametrize(("width", "height"), [(80, 24), (200, 50)])
def test_the_drawing_fits_the_terminal_and_keeps_the_essentials(width: int, height: int) -> None:
    text = render(busy_box(), url="127.0.0.1:11434", now=NOW, width=width, height=height)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines) and len(lines) <= height
    assert not ESC.search(text)
    assert lines[0].startswith("ollamux 0.1.0") and "vram_queue" in lines[0]
    assert_essentials(lines)
    assert "Queues: llama3.1:8b 3, qwen2.5:7b 1" in lines
    newest = lines.index("Recent requests (newest first):") + 2
    assert lines[newest].startswith("0s ") and "gpu0" in lines[newest]
    full = render(busy_box(), url="127.0.0.1:11434", now=NOW).splitlines()
    assert len(full) == 42 and len(lines) == min(height, 42)  # recent requests fill what is left


def test_narrow_layout_has_short_bars_and_the_wide_one_everything() -> None:
    narrow = render(busy_box(), url="h:1", now=NOW, width=80, height=24).splitlines()
    row = next(line for line in narrow if line.startswith("gpu2 "))
    assert "ejected 12s" in row and "[█████░░░] 15.0/24G" in row
    wide = render(busy_box(), url="h:1", now=NOW, width=200, height=50).splitlines()
    row = next(line for line in wide if line.startswith("gpu2 "))
    assert "ejected (probe in 12s)" in row and "15.0/24.0 GiB" in row and "warm:12" in row
    assert "0.10s/3.58s" in row and "62%" in row
    row = next(line for line in wide if line.startswith("gpu1 "))
    assert len(row) == 200 and row.endswith("qwen2.5:7b (1")  # LOADED, last, is cut at the edge


def test_least_important_sections_go_first_when_the_terminal_is_short() -> None:
    def lines(height: int) -> list[str]:
        return render(busy_box(), now=NOW, width=80, height=height).splitlines()

    no_recent = lines(10)  # header, blank, 5 table rows, blank, queues: 9 rows
    assert len(no_recent) == 9 and no_recent[-1].startswith("Queues:")
    assert_essentials(no_recent)
    no_queues = lines(8)
    assert len(no_queues) == 7 and not any("Queues" in line for line in no_queues)
    assert_essentials(no_queues)
    tiny = lines(5)
    assert len(tiny) == 5 and tiny[-1] == "... 3 more rows (enlarge the terminal)"


def test_cut_counts_only_what_the_terminal_shows() -> None:
    line = "\x1b[32mup\x1b[0m   " + "x" * 20
    assert cut(line, 100) == line
    short = cut(line, 6)
    assert visible_len(short) == 6 and short == "\x1b[32mup\x1b[0m   x\x1b[0m"
    assert cut("abcdef", 3) == "abc"


def fake_proxy(monkeypatch: pytest.MonkeyPatch, answers: list[Any]) -> None:
    """``fetch_status`` answers from ``answers``: a doc, or an exception to raise."""
    queue = iter(answers)

    def fetch(url: str, *, timeout: float = 5.0) -> dict[str, Any]:
        answer = next(queue)
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)

    monkeypatch.setattr(status, "fetch_status", fetch)
    monkeypatch.setattr("proxy.commands.status.time.sleep", lambda _s: None)


class Terminal(io.StringIO):
    """An output stream that draws blocks (utf-8)."""

    encoding = "utf-8"


def test_watch_on_a_terminal_uses_the_alternate_screen_and_fits_each_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    fake_proxy(monkeypatch, [busy_box(), OllamuxError("cannot reach the proxy at h:1")])
    out = Terminal()
    run_status("h:1", watch=True, rounds=2, out=out, tty=True, size=lambda: (80, 24))
    text = out.getvalue()
    assert text.startswith(ENTER) and text.endswith(LEAVE)
    frames = text.removeprefix(ENTER).removesuffix(LEAVE).split(CLEAR)
    assert frames[0] == "" and len(frames) == 3
    for frame in frames[1:]:  # no last newline: a frame of 24 rows must not scroll
        assert not frame.endswith("\n") and len(frame.split("\n")) <= 24
        assert all(len(line) <= 80 for line in frame.split("\n")) and "\x1b" not in frame
    assert_essentials(frames[1].split("\n"))
    assert frames[2].startswith("cannot reach the proxy at h:1\n(retrying every 2s")


def test_colour_only_on_a_terminal_and_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    fake_proxy(monkeypatch, [busy_box()])
    out = Terminal()
    run_status("h:1", watch=True, rounds=1, out=out, tty=True, size=lambda: (80, 24))
    frame = out.getvalue().removeprefix(ENTER + CLEAR).removesuffix(LEAVE)
    assert "\x1b[32mup\x1b[0m" in frame and "\x1b[1mINSTANCE\x1b[0m" in frame
    assert "\x1b[31m503\x1b[0m" in frame  # statuses: 5xx red
    assert all(visible_len(line) <= 80 for line in frame.split("\n"))
    assert_essentials(frame.split("\n"))

    fake_proxy(monkeypatch, [busy_box()])
    monkeypatch.setenv("NO_COLOR", "1")
    out = Terminal()
    run_status("h:1", out=out, tty=True, size=lambda: (80, 24))  # once: cut to width, not height
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and len(lines) > 24 and max(map(len, lines)) <= 80


def test_piped_watch_prints_plain_full_frames_apart_by_a_blank_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    fake_proxy(monkeypatch, [busy_box(), busy_box()])
    out = Terminal()
    run_status("h:1", watch=True, rounds=2, out=out, size=lambda: (80, 24))  # StringIO: no tty
    text = out.getvalue()
    assert "\x1b" not in text
    first, second = text.split("\n\nollamux ")
    assert first.startswith("ollamux 0.1.0 at http://h:1 | policy vram_queue") and "WHY" in first
    assert max(len(line) for line in first.splitlines()) > 185  # nothing cut: a log, not a screen
    assert "INSTANCE" in second and len(second.splitlines()) > 24


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")])
def test_the_screen_is_left_and_the_cursor_shown_on_ctrl_c_and_errors(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    fake_proxy(monkeypatch, [busy_box(), error])
    out = Terminal()
    with pytest.raises(type(error)):
        run_status("h:1", watch=True, out=out, tty=True, size=lambda: (80, 24))
    assert out.getvalue().startswith(ENTER) and out.getvalue().endswith(LEAVE)
    assert out.getvalue().count(CLEAR) == 1


# --- the real command on a real pseudo-terminal, against a status served over HTTP -------------


@pytest.fixture
def status_server() -> Iterator[str]:
    body = json.dumps(busy_box() | {"recent": []}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/proxy/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_watch_in_an_80x24_terminal(status_server: str) -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {
        "PYTHONPATH": str(REPO),
        "PATH": "/usr/bin:/bin",
        "PYTHONIOENCODING": "utf-8",
        "TERM": "xterm",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "status", "--url", status_server, *WATCH],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        cwd=REPO,
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 20
        while seen.count(CLEAR.encode()) < 3 and time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                seen += os.read(leader, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        while select.select([leader], [], [], 0.5)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    text = seen.decode()
    assert text.startswith(ENTER) and LEAVE in text and "Traceback" not in text
    frame = text.split(CLEAR)[2]
    lines = [SGR.sub("", line) for line in frame.replace("\r", "").split("\n")]
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    assert "\x1b[32mup\x1b[0m" in frame  # colour on a terminal
    assert_essentials(lines)
