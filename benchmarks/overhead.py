"""Overhead benchmark: what ollamux adds to a token stream, against direct access and nginx.

    python -m benchmarks.overhead [--quick] [--backend stub|emulator] [--out DIR]

For 1, 16, 64 and 256 concurrent streams, each path (``direct`` to the backend, through
``ollamux`` and through ``nginx``) gets the same load: every stream sends a small ``/api/chat``
(64 tokens) and reads its NDJSON answer to the end, again and again, and one probe sends one-token
requests one after another and times their first byte - a new user's request while the others
stream. After a warm-up, chunks (NDJSON lines) per second and the CPU seconds the proxy process
(nginx: master and worker) spent per 1000 chunks (read from /proc/<pid>/stat) are measured over
one window with the streams alone, then the probe's time to first byte p50/p99, and what it adds
over direct, over a second window with the streams still flowing.

The backend is the stub (benchmarks/stub.py: paced at 100 tokens/s per stream, a real 8B model's
speed, so 256 streams offer 25,600 chunks/s), or an emulator at speed 1000 with llama3.2:1b. On a
machine with two or more cores the proxy (or nginx) is pinned to its own core and the client and
backend share the others, so what the proxy costs shows up as its own CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks import report
from benchmarks.contenders import nginx_binary, nginx_conf
from benchmarks.procs import Child, children_of, cpu_seconds, free_port, ollamux_argv, wait_http
from benchmarks.stats import percentile

RESULTS = Path(__file__).with_name("results")
LEVELS = (1, 16, 64, 256)
PATHS = ("direct", "ollamux", "nginx")
TOKENS = 64
"""Tokens per request: one TTFT sample per 64 chunks."""
RATE = 100.0
"""Stub tokens per second per stream."""
MODEL = "llama3.2:1b"
PROBE_GAP = 0.002
"""Pause between two probes (seconds), so the probe is a user, not a hot loop."""


def _body(tokens: int) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "stream": True,
            "options": {"num_predict": tokens},
        }
    ).encode()


BODY = _body(TOKENS)
PROBE = _body(1)


@dataclass
class Level:
    """One path at one concurrency: what the client measured and what the front spent."""

    ttft: list[float] = field(default_factory=list)
    chunks: int = 0
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    front_cpu_s: float | None = None


def _cpus() -> tuple[set[int] | None, set[int] | None]:
    """(the front's core, everybody else's), or (None, None) on one core."""
    try:
        mine = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    if len(mine) < 2:
        return None, None
    return {mine[-1]}, set(mine[:-1])


@contextlib.asynccontextmanager
async def backend(kind: str, workdir: Path, cpus: set[int] | None) -> AsyncIterator[str]:
    port = free_port()
    if kind == "stub":
        argv = [
            sys.executable, "-m", "benchmarks.stub", "--listen", f"127.0.0.1:{port}",
            "--rate", f"{RATE:g}", "--tokens", str(TOKENS),
        ]  # fmt: skip
    else:
        argv = ollamux_argv(
            "--log-level", "warning", "emulate", "--quiet", "--listen", f"127.0.0.1:{port}",
            "--gpu", "bench:80", "--num-parallel", "256", "--context-length", "2048",
            "--speed", "1000",
        )  # fmt: skip
    child = Child(kind, argv, log=workdir / f"{kind}.log", cpus=cpus)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/", child=child)
        yield url
    finally:
        child.stop()


@contextlib.asynccontextmanager
async def front(
    path: str, upstream: str, workdir: Path, cpus: set[int] | None
) -> AsyncIterator[tuple[str, list[int]]]:
    """(URL the client uses, pids whose CPU time counts as the front's)."""
    if path == "direct":
        yield upstream, []
        return
    port = free_port()
    if path == "ollamux":
        config = {
            "listen": f"127.0.0.1:{port}",
            "instances": [
                # 256 slots: the proxy must not queue (late binding) what the backend can take
                {"name": "backend", "launcher": "external", "url": upstream, "num_parallel": 256}
            ],
        }
        conf = workdir / "overhead.yaml"
        conf.write_text(yaml.safe_dump(config), encoding="utf-8")
        argv = ollamux_argv("--log-level", "warning", "serve", "--config", str(conf))
        child = Child("ollamux", argv, log=workdir / "ollamux.log", cpus=cpus)
        await wait_http(f"http://127.0.0.1:{port}/api/tags", child=child, expect=MODEL)
        pids = [child.pid]
    else:
        binary = nginx_binary()
        assert binary is not None
        prefix = workdir / "nginx"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        prefix.chmod(0o755)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, port, [int(upstream.rsplit(":", 1)[1])]))
        child = Child("nginx", [binary, "-p", str(prefix), "-c", str(conf)],
                      log=workdir / "nginx.log", cpus=cpus)  # fmt: skip
        await wait_http(f"http://127.0.0.1:{port}/", child=child)
        pids = [child.pid, *children_of(child.pid)]
        if cpus:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, cpus)
    try:
        yield f"http://127.0.0.1:{port}", pids
    finally:
        child.stop()


async def measure(
    url: str, streams: int, pids: list[int], *, warmup: float, seconds: float
) -> Level:
    """``streams`` long streams in closed loops: chunks and the front's CPU are counted over
    ``seconds`` after ``warmup``; then, with the streams still flowing, one probe sends one-token
    requests one after another for another ``seconds`` and times their first byte."""
    level = Level()
    state = {"chunks": False, "probe": False}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def stream() -> None:
            while True:
                try:
                    async with session.post(url + "/api/chat", data=BODY) as resp:
                        async for chunk in resp.content.iter_any():
                            if state["chunks"]:
                                level.chunks += chunk.count(b"\n")
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                level.requests += 1
                level.errors += not ok

        async def probe() -> None:
            while True:
                t0 = time.perf_counter()
                first: float | None = None
                try:
                    async with session.post(url + "/api/chat", data=PROBE) as resp:
                        async for _chunk in resp.content.iter_any():
                            if first is None:
                                first = time.perf_counter() - t0
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                level.errors += not ok
                if state["probe"] and ok and first is not None:
                    level.ttft.append(first)
                await asyncio.sleep(PROBE_GAP)

        workers = [asyncio.create_task(stream()) for _ in range(streams)]
        await asyncio.sleep(warmup)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        state["chunks"] = True
        await asyncio.sleep(seconds)
        state["chunks"] = False
        level.seconds = time.perf_counter() - t0
        if pids:
            level.front_cpu_s = sum(cpu_seconds(p) for p in pids) - cpu0
        workers.append(asyncio.create_task(probe()))
        await asyncio.sleep(0.2)
        state["probe"] = True
        await asyncio.sleep(seconds)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return level


def row(path: str, streams: int, level: Level, direct: Level | None) -> dict[str, Any]:
    p50 = percentile(level.ttft, 50) * 1000 if level.ttft else None
    p99 = percentile(level.ttft, 99) * 1000 if level.ttft else None
    out: dict[str, Any] = {
        "path": path,
        "streams": streams,
        "requests": level.requests,
        "errors": level.errors,
        "ttft_p50_ms": _r(p50),
        "ttft_p99_ms": _r(p99),
        "chunks_per_s": round(level.chunks / level.seconds) if level.seconds else 0,
    }
    if direct is not None and direct.ttft and p50 is not None and p99 is not None:
        out["added_ttft_p50_ms"] = _r(p50 - percentile(direct.ttft, 50) * 1000)
        out["added_ttft_p99_ms"] = _r(p99 - percentile(direct.ttft, 99) * 1000)
    if level.front_cpu_s is not None and level.chunks:
        out["front_cpu_s_per_1000_chunks"] = round(level.front_cpu_s / level.chunks * 1000, 4)
        out["front_cpu_share"] = round(level.front_cpu_s / level.seconds, 3)
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def run(kind: str, levels: Sequence[int], paths: Sequence[str], *, warmup: float,
              seconds: float, workdir: Path) -> dict[str, Any]:  # fmt: skip
    front_cpus, other_cpus = _cpus()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    rows: list[dict[str, Any]] = []
    try:
        async with backend(kind, workdir, other_cpus) as upstream:
            for path in paths:
                async with front(path, upstream, workdir, front_cpus) as (url, pids):
                    await measure(url, 1, pids, warmup=0.5, seconds=0.1)  # connections, model
                    for streams in levels:
                        level = await measure(url, streams, pids, warmup=warmup, seconds=seconds)
                        direct = next(
                            (r["_level"] for r in rows
                             if r["path"] == "direct" and r["streams"] == streams),
                            None,
                        )  # fmt: skip
                        out = row(path, streams, level, direct)
                        out["_level"] = level
                        rows.append(out)
                        print(_line(out), file=sys.stderr)
    finally:
        if other_cpus:
            os.sched_setaffinity(0, other_cpus | (front_cpus or set()))
    for r in rows:
        del r["_level"]
    return {
        "backend": kind,
        "tokens_per_request": TOKENS,
        "stub_tokens_per_s_per_stream": RATE if kind == "stub" else None,
        "seconds_per_level": seconds,
        "cpus": {"front": sorted(front_cpus or []), "client_and_backend": sorted(other_cpus or [])},
        "rows": rows,
    }


def _line(r: dict[str, Any]) -> str:
    return (
        f"  {r['path']:8} {r['streams']:4} streams: TTFT p50 {r['ttft_p50_ms']} ms, p99 "
        f"{r['ttft_p99_ms']} ms, {r['chunks_per_s']} chunks/s, front CPU "
        f"{r.get('front_cpu_s_per_1000_chunks', '-')} s/1000 chunks, errors {r['errors']}"
    )


def table(doc: dict[str, Any]) -> str:
    lines = [
        f"Backend: {doc['backend']}; {doc['tokens_per_request']} tokens per request; "
        f"{doc['seconds_per_level']:g} s measured per row.",
        "",
        "| path | streams | TTFT p50 ms | TTFT p99 ms | added p50 ms | added p99 ms | chunks/s "
        "| front CPU s / 1000 chunks | front CPU share | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['path']} | {r['streams']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} "
            f"| {r.get('added_ttft_p50_ms', '-')} | {r.get('added_ttft_p99_ms', '-')} "
            f"| {r['chunks_per_s']} | {r.get('front_cpu_s_per_1000_chunks', '-')} "
            f"| {r.get('front_cpu_share', '-')} | {r['errors']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="1 s windows instead of 4")
    parser.add_argument("--backend", choices=("stub", "emulator"), default="stub")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    paths = [p for p in PATHS if p != "nginx" or nginx_binary() is not None]
    if "nginx" not in paths:
        print("nginx is not installed: skipping it (apt-get install nginx)", file=sys.stderr)
    levels = [int(x) for x in args.levels.split(",")]
    seconds, warmup = (1.0, 0.5) if args.quick else (4.0, 1.0)
    with tempfile.TemporaryDirectory(prefix="ollamux-overhead-") as tmp:
        doc = asyncio.run(
            run(args.backend, levels, paths, warmup=warmup, seconds=seconds, workdir=Path(tmp))
        )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "overhead" if args.backend == "stub" else f"overhead_{args.backend}"
    path = args.out / f"{name}.json"
    path.write_text(report.dumps(doc) + "\n", encoding="utf-8")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
