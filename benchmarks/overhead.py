"""Overhead benchmark: what ollamux adds to a token stream, against direct access and nginx.

    python -m benchmarks.overhead [--quick] [--repeat N] [--levels 1,16,...] [--paths ...]
                                  [--backend stub|emulator] [--out DIR]

For 1, 16, 64, 256 and 1024 concurrent streams, each path (``direct`` to the backend, through
``ollamux`` and through ``nginx``; ``ollamux-asyncio`` is ollamux on asyncio's own event loop
instead of uvloop) gets the same load (benchmarks/overhead_load.py): every stream sends a small
``/api/chat`` (64 tokens) and reads its NDJSON answer to the end, again and again, and one probe
sends one-token requests one after another and times their first byte - a new user's request while
the others stream. After a warm-up, chunks (NDJSON lines) per second and the CPU seconds the
proxy process (nginx: master and worker) spent per 1000 chunks (utime + stime from
/proc/<pid>/stat) are measured over one window with the streams alone, then the probe's time to
first byte p50/p99, and what it adds over direct, over a second window with the streams still
flowing. Every front runs all the time; each level measures the paths one after another, and the
whole round is repeated (``--repeat``), so that the ratios compare paths under the same noise;
the report gives the median and the spread (min-max) of every number.

The backend is the stub (benchmarks/stub.py: paced at 100 tokens/s per stream, a real 8B model's
speed, so 256 streams offer 25,600 chunks/s), or an emulator at speed 1000 with llama3.2:1b. A
last phase finds the most chunks per second one front process relays: 64 streams of 2048 tokens
from a second stub at 1000 tokens/s each (64,000 chunks/s offered), so the front's core is the
limit; ``chunks_per_cpu_s`` is what it relays per second of its own CPU, i.e. at 100 % of a core.
On a machine with two or more cores the front is pinned to its own core and the client and
backend share the others, so what the front costs shows up as its own CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks import report
from benchmarks.contenders import nginx_binary, nginx_conf
from benchmarks.overhead_load import Level, measure
from benchmarks.overhead_report import row, summarize, table
from benchmarks.procs import Child, children_of, free_port, ollamux_argv, wait_http
from proxy.eventloop import ENV as ENV_LOOP

RESULTS = Path(__file__).with_name("results")
LEVELS = (1, 16, 64, 256, 1024)
PATHS = ("direct", "ollamux", "ollamux-asyncio", "nginx")
DEFAULT_PATHS = ("direct", "ollamux", "nginx")
TOKENS = 64
"""Tokens per request: one TTFT sample per 64 chunks."""
RATE = 100.0
"""Stub tokens per second per stream."""
MODEL = "llama3.2:1b"
MAX_STREAMS, MAX_RATE, MAX_TOKENS = 64, 1000.0, 2048
"""The last phase: streams, tokens/s each and tokens per request that no front keeps up with."""


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
async def backend(
    kind: str, workdir: Path, cpus: set[int] | None, rate: float = RATE
) -> AsyncIterator[str]:
    port = free_port()
    if kind == "stub":
        argv = [
            sys.executable, "-m", "benchmarks.stub", "--listen", f"127.0.0.1:{port}",
            "--rate", f"{rate:g}", "--tokens", str(TOKENS),
        ]  # fmt: skip
    else:
        argv = ollamux_argv(
            "--log-level", "warning", "emulate", "--quiet", "--listen", f"127.0.0.1:{port}",
            "--gpu", "bench:80", "--num-parallel", "1100", "--context-length", "4096",
            "--speed", "1000",
        )  # fmt: skip
    child = Child(kind, argv, log=workdir / f"{kind}-{port}.log", cpus=cpus)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/", child=child)
        yield url
    finally:
        child.stop()


@contextlib.asynccontextmanager
async def front(
    path: str, upstream: str, workdir: Path, cpus: set[int] | None
) -> AsyncIterator[tuple[int, list[int]]]:
    """(port the client uses, pids whose CPU time counts as the front's)."""
    if path == "direct":
        yield int(upstream.rsplit(":", 1)[1]), []
        return
    port = free_port()
    if path.startswith("ollamux"):
        config = {
            "listen": f"127.0.0.1:{port}",
            "instances": [
                # slots for every stream: the proxy must not queue what the backend can take
                {"name": "backend", "launcher": "external", "url": upstream, "num_parallel": 1100}
            ],
            "queue": {"max_per_model": 1100, "max_total": 1100},
        }
        conf = workdir / f"{path}-{port}.yaml"
        conf.write_text(yaml.safe_dump(config), encoding="utf-8")
        argv = ollamux_argv("--log-level", "warning", "serve", "--config", str(conf))
        loop = "asyncio" if path == "ollamux-asyncio" else ""
        child = Child(
            path, argv, log=workdir / f"{path}-{port}.log", cpus=cpus, env={ENV_LOOP: loop}
        )
        await wait_http(f"http://127.0.0.1:{port}/api/tags", child=child, expect=MODEL)
        pids = [child.pid]
    else:
        binary = nginx_binary()
        assert binary is not None
        prefix = workdir / f"nginx-{port}"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        prefix.chmod(0o755)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, port, [int(upstream.rsplit(":", 1)[1])]))
        child = Child(
            "nginx",
            [binary, "-p", str(prefix), "-c", str(conf)],
            log=workdir / f"nginx-{port}.log",
            cpus=cpus,
        )
        await wait_http(f"http://127.0.0.1:{port}/", child=child)
        pids = [child.pid, *children_of(child.pid)]
        if cpus:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, cpus)
    try:
        yield port, pids
    finally:
        child.stop()


async def run(
    kind: str,
    levels: Sequence[int],
    paths: Sequence[str],
    *,
    warmup: float,
    seconds: float,
    repeat: int,
    workdir: Path,
) -> dict[str, Any]:
    front_cpus, other_cpus = _cpus()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    rows: list[dict[str, Any]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            upstream = await stack.enter_async_context(backend(kind, workdir, other_cpus))
            ports: dict[str, tuple[int, list[int]]] = {}
            for path in paths:
                ports[path] = await stack.enter_async_context(
                    front(path, upstream, workdir, front_cpus)
                )
                await measure(
                    "127.0.0.1",
                    ports[path][0],
                    1,
                    [],
                    body=BODY,
                    probe_body=None,
                    warmup=0.5,
                    seconds=0.1,
                )  # connections, model
            for streams in levels:
                for rep in range(repeat):
                    direct: Level | None = None
                    for path in paths:
                        port, pids = ports[path]
                        level = await measure(
                            "127.0.0.1",
                            port,
                            streams,
                            pids,
                            body=BODY,
                            probe_body=PROBE,
                            warmup=warmup,
                            seconds=seconds,
                        )
                        direct = level if path == "direct" else direct
                        rows.append(
                            row(path, streams, level, direct if path != "direct" else None)
                            | {"phase": "paced", "repeat": rep}
                        )
                        print(_line(rows[-1]), file=sys.stderr)
        if kind == "stub":
            rows += await _most(
                paths,
                warmup=warmup,
                seconds=seconds,
                repeat=repeat,
                workdir=workdir,
                cpus=(front_cpus, other_cpus),
            )
    finally:
        if other_cpus:
            os.sched_setaffinity(0, other_cpus | (front_cpus or set()))
    return {
        "backend": kind,
        "tokens_per_request": TOKENS,
        "stub_tokens_per_s_per_stream": RATE if kind == "stub" else None,
        "seconds_per_level": seconds,
        "repeats": repeat,
        "most": {
            "streams": MAX_STREAMS,
            "tokens_per_s_per_stream": MAX_RATE,
            "tokens_per_request": MAX_TOKENS,
        },
        "cpus": {"front": sorted(front_cpus or []), "client_and_backend": sorted(other_cpus or [])},
        "summary": summarize(rows),
        "rows": rows,
    }


async def _most(
    paths: Sequence[str],
    *,
    warmup: float,
    seconds: float,
    repeat: int,
    workdir: Path,
    cpus: tuple[set[int] | None, set[int] | None],
) -> list[dict[str, Any]]:
    """The most chunks/s each front relays: a fast stub, more chunks than the front can take."""
    rows: list[dict[str, Any]] = []
    body = _body(MAX_TOKENS)
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(backend("stub", workdir, cpus[1], MAX_RATE))
        ports = {
            path: await stack.enter_async_context(front(path, upstream, workdir, cpus[0]))
            for path in paths
            if path != "direct"
        }
        for rep in range(repeat):
            for path, (port, pids) in ports.items():
                level = await measure(
                    "127.0.0.1",
                    port,
                    MAX_STREAMS,
                    pids,
                    body=body,
                    probe_body=None,
                    warmup=warmup,
                    seconds=seconds,
                )
                rows.append(row(path, MAX_STREAMS, level, None) | {"phase": "most", "repeat": rep})
                print(_line(rows[-1]), file=sys.stderr)
    return rows


def _line(r: dict[str, Any]) -> str:
    return (
        f"  {r['phase']:5} {r['path']:15} {r['streams']:4} streams: TTFT p50 {r['ttft_p50_ms']} "
        f"ms, p99 {r['ttft_p99_ms']} ms, {r['chunks_per_s']} chunks/s, front CPU "
        f"{r.get('front_cpu_ms_per_1000_chunks', '-')} ms/1000 chunks "
        f"({r.get('front_cpu_share', '-')} of a core), errors {r['errors']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="1 s windows, 2 repeats")
    parser.add_argument("--repeat", type=int, default=0, help="rounds (default 3; --quick 2)")
    parser.add_argument("--backend", choices=("stub", "emulator"), default="stub")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument(
        "--paths", default=",".join(DEFAULT_PATHS), help=f"any of {','.join(PATHS)}"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if unknown := [p for p in paths if p not in PATHS]:
        parser.error(f"--paths: unknown {','.join(unknown)}; pick from {','.join(PATHS)}")
    if "nginx" in paths and nginx_binary() is None:
        print("nginx is not installed: skipping it (apt-get install nginx)", file=sys.stderr)
        paths.remove("nginx")
    if "direct" in paths:  # first: the others' added TTFT is against it
        paths.remove("direct")
        paths.insert(0, "direct")
    levels = [int(x) for x in args.levels.split(",")]
    seconds, warmup = (1.0, 0.5) if args.quick else (3.0, 1.0)
    repeat = args.repeat or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="ollamux-overhead-") as tmp:
        doc = asyncio.run(
            run(
                args.backend,
                levels,
                paths,
                warmup=warmup,
                seconds=seconds,
                repeat=repeat,
                workdir=Path(tmp),
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "overhead" if args.backend == "stub" else f"overhead_{args.backend}"
    path = args.out / f"{name}.json"
    path.write_text(report.dumps(doc) + "\n", encoding="utf-8")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
