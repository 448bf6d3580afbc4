"""Fleet benchmark: three emulated Ollama servers that hold different models, before and after.

    python -m benchmarks.fleet [--quick] [--out FILE] [--before REV] [--after DIR] [--no-gpu-source]

Issue 14's evidence, on 127.0.0.1 only. Each run starts three ``ollamux emulate`` servers (one
24 GiB GPU, 2 slots each; separate in-memory stores) and deletes ``llama3.2:1b`` from the first
two, then ``ollamux serve`` over them as ``launcher: external`` instances (``num_parallel: 2``;
``gpu_source`` = each server, where the code knows the key and ``--no-gpu-source`` is not
given). Every process runs from the code under test: *before* is ``git archive REV`` (default
b5aa189) unpacked into a temp dir, *after* the working tree. Two scenarios, each on a fresh fleet:

- **A, 12 chats Open WebUI-like**, 4 at a time; chats alternate between ``llama3.2:3b`` (on all
  three servers) and ``llama3.2:1b`` (on the last only). A chat is a streamed ``/api/chat`` turn,
  the non-streamed title task call, and a second streamed turn with the history, all carrying
  ``X-OpenWebUI-Chat-Id``; then 5 ``/api/show`` of ``llama3.2:1b``; then ``llama3.2:3b`` is
  deleted from a server that has it loaded, behind the proxy's back, and 6 requests of it go at
  once in the earlier chats' sessions (a stale model list: each must be retried elsewhere).
- **B, one model**: 22 streamed requests of ``llama3.1:8b`` (on all three), 8 at a time, so one
  server's 2 slots are not enough.

Which server answered comes from ``/proxy/status`` ``recent`` (polled every 0.1 s, matched by
``X-Request-Id``). TTFT is the client's, in emulated seconds (wall x speed), over streamed chat
turns that got a first token. Loads: placements whose reason loads a model (cold_fit, evict,
scale_out) in ``instances[].reasons``; replicas: servers whose own ``/api/ps`` lists the model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.fleet_box import (
    ONE_MODEL,
    SHARED,
    SINGLE,
    Code,
    Fleet,
    export,
    knows_gpu_source,
    start_fleet,
)
from benchmarks.procs import ROOT
from benchmarks.report import dumps
from benchmarks.stats import percentile

RESULTS = Path(__file__).with_name("results")
LOADING = ("cold_fit", "evict", "scale_out")
PROMPT = (
    "Explain in a few paragraphs how a reverse proxy can spread chat requests over several "
    "model servers, what it should watch, and what can go wrong when the servers differ. "
)


@dataclass(frozen=True)
class Sizes:
    speed: float
    chats: int = 12
    chats_at_once: int = 4
    chat_tokens: int = 200
    title_tokens: int = 12
    shows: int = 5
    stale: int = 6
    one_model: int = 22
    one_model_at_once: int = 8
    one_model_tokens: int = 300
    request_timeout: float = 60.0


QUICK = Sizes(speed=15.0)
FULL = Sizes(speed=4.0, request_timeout=180.0)


@dataclass(kw_only=True)
class Sent:
    """One request and what the client saw of it; times in emulated seconds."""

    rid: str
    kind: str
    model: str
    status: int | None = None
    ttft: float | None = None
    e2e: float | None = None
    error: str = ""
    text: str = ""
    instance: str = "-"
    reason: str = "-"


async def send(
    session: aiohttp.ClientSession, fleet: Fleet, sent: Sent, body: dict[str, Any], *,
    path: str = "/api/chat", chat_id: str = "", speed: float, timeout: float,
) -> Sent:  # fmt: skip
    headers = {"X-Request-Id": sent.rid}
    if chat_id:
        headers["X-OpenWebUI-Chat-Id"] = chat_id
    start = time.monotonic()
    try:
        async with session.post(
            fleet.url + path, json=body, headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:  # fmt: skip
            sent.status = resp.status
            if resp.status != 200 or not body.get("stream", True):
                raw = await resp.read()
                sent.e2e = (time.monotonic() - start) * speed
                doc = json.loads(raw) if raw.startswith(b"{") else {}
                sent.error = doc.get("error", "") if resp.status != 200 else ""
                sent.text = doc.get("message", {}).get("content", "")
                return sent
            async for line in resp.content:
                if not line.strip():
                    continue
                if sent.ttft is None:
                    sent.ttft = (time.monotonic() - start) * speed
                doc = json.loads(line)
                if "error" in doc:
                    sent.error = str(doc["error"])
                sent.text += doc.get("message", {}).get("content", "")
            sent.e2e = (time.monotonic() - start) * speed
    except asyncio.TimeoutError:
        sent.error = "timeout (no complete answer)"
    except (aiohttp.ClientError, ValueError) as exc:
        sent.error = f"{type(exc).__name__}: {exc}"
    return sent


def _chat(model: str, messages: list[dict[str, str]], tokens: int, *, stream: bool) -> Any:
    return {"model": model, "messages": messages, "stream": stream,
            "options": {"num_predict": tokens}}  # fmt: skip


async def chats(fleet: Fleet, sizes: Sizes, tag: str) -> list[Sent]:
    """Scenario A: the chats, then the /api/show calls."""
    out: list[Sent] = []
    gate = asyncio.Semaphore(sizes.chats_at_once)
    kw = {"speed": sizes.speed, "timeout": sizes.request_timeout}

    async def chat(i: int, session: aiohttp.ClientSession) -> None:
        model = SINGLE if i % 2 else SHARED
        chat_id = f"{tag}-chat{i}"
        history = [{"role": "user", "content": f"Chat {i}. {PROMPT}"}]
        async with gate:
            first = Sent(rid=f"{chat_id}-t1", kind="chat", model=model)
            out.append(first)
            body = _chat(model, history, sizes.chat_tokens, stream=True)
            await send(session, fleet, first, body, chat_id=chat_id, **kw)  # type: ignore[arg-type]
            if first.error or first.status != 200:
                return  # Open WebUI shows the error; no task calls follow a failed reply
            history.append({"role": "assistant", "content": first.text})
            task = [{"role": "user", "content": "### Task:\nGenerate a concise, 3-5 word title "
                     f"summarizing the chat history.\n### Chat History:\n{history}"}]  # fmt: skip
            title = Sent(rid=f"{chat_id}-title", kind="title", model=model)
            out.append(title)
            body = _chat(model, task, sizes.title_tokens, stream=False)
            await send(session, fleet, title, body, chat_id=chat_id, **kw)  # type: ignore[arg-type]
            history.append({"role": "user", "content": "And how would you test that?"})
            second = Sent(rid=f"{chat_id}-t2", kind="chat", model=model)
            out.append(second)
            body = _chat(model, history, sizes.chat_tokens, stream=True)
            await send(session, fleet, second, body, chat_id=chat_id, **kw)  # type: ignore[arg-type]

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(chat(i, session) for i in range(sizes.chats)))
        for n in range(sizes.shows):
            show = Sent(rid=f"{tag}-show{n}", kind="show", model=SINGLE)
            out.append(show)
            await send(session, fleet, show, {"model": SINGLE}, path="/api/show", **kw)  # type: ignore[arg-type]
        out += await stale(fleet, sizes, tag, session)
    return out


async def stale(fleet: Fleet, sizes: Sizes, tag: str, session: aiohttp.ClientSession) -> list[Sent]:
    """Delete SHARED behind the proxy's back from a server that has it loaded (the emulator, as
    Ollama, then answers 404 although it still has it in memory), then send ``stale`` requests
    of it at once, in the SHARED chats' sessions: the proxy's list is stale until a 404 or its
    next refresh, and those sessions' affinity points at that server."""
    ps = await fleet.backend_ps(session)
    warm = [u for u, m in zip(fleet.backends, ps, strict=True) if SHARED in m]
    target = (warm or fleet.backends)[0]
    async with session.delete(target + "/api/delete", json={"model": SHARED}) as resp:
        resp.raise_for_status()
    fleet.stale_on = f"b{fleet.backends.index(target)}"
    out = [Sent(rid=f"{tag}-stale{n}", kind="stale", model=SHARED) for n in range(sizes.stale)]
    history = [{"role": "user", "content": PROMPT}]
    body = _chat(SHARED, history, sizes.chat_tokens, stream=True)
    await asyncio.gather(*(send(session, fleet, s, body, chat_id=f"{tag}-chat{2 * n}",
                                speed=sizes.speed, timeout=sizes.request_timeout)
                           for n, s in enumerate(out)))  # fmt: skip
    return out


async def one_model(fleet: Fleet, sizes: Sizes, tag: str) -> list[Sent]:
    """Scenario B: one model, more at once than one server's slots."""
    gate = asyncio.Semaphore(sizes.one_model_at_once)
    out = [Sent(rid=f"{tag}-r{i}", kind="chat", model=ONE_MODEL) for i in range(sizes.one_model)]

    async def one(sent: Sent, session: aiohttp.ClientSession) -> None:
        history = [{"role": "user", "content": f"{sent.rid}. {PROMPT}"}]
        body = _chat(ONE_MODEL, history, sizes.one_model_tokens, stream=True)
        async with gate:
            await send(session, fleet, sent, body, speed=sizes.speed, timeout=sizes.request_timeout)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(s, session) for s in out))
    return out


async def measure(fleet: Fleet, scenario: Any, sizes: Sizes, tag: str) -> dict[str, Any]:
    """Run a scenario while watching ``/proxy/status``; the scenario's summary."""
    async with aiohttp.ClientSession() as session:
        watcher = asyncio.create_task(fleet.watch(session))
        try:
            sent: list[Sent] = await scenario(fleet, sizes, tag)
            await asyncio.sleep(0.3)
            await fleet.poll(session)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        ps = await fleet.backend_ps(session)
    for s in sent:
        rec = fleet.recent.get(s.rid, {})
        s.instance, s.reason = rec.get("instance", "-"), rec.get("reason", "-")
    doc = summarize(sent, fleet.status, ps)
    doc["stale"]["deleted_on"] = fleet.stale_on
    doc["lacks"] = {i["name"]: i.get("lacks") for i in fleet.status.get("instances", [])}
    return doc


def summarize(sent: list[Sent], status: dict[str, Any], ps: list[list[str]]) -> dict[str, Any]:
    names = [i["name"] for i in status.get("instances", [])]
    routed = [s for s in sent if s.kind in ("chat", "title")]
    ttft = [s.ttft for s in routed if s.kind == "chat" and s.ttft is not None]

    def per_backend(rows: list[Sent]) -> dict[str, int]:
        counts = Counter(s.instance for s in rows if s.status == 200 and not s.error)
        return {n: counts.get(n, 0) for n in names}

    reasons = {i["name"]: i.get("reasons", {}) for i in status.get("instances", [])}
    return {
        "sent": len(routed),
        "ok": sum(1 for s in routed if s.status == 200 and not s.error),
        "failed": sum(1 for s in routed if s.status != 200 or s.error),
        "not_found": sum(1 for s in routed if s.status == 404 or "not found" in s.error),
        "timeouts": sum(1 for s in routed if s.error.startswith("timeout")),
        "chats_failed": len({_chat_of(s.rid) for s in routed if s.status != 200 or s.error}),
        "per_backend": per_backend(routed),
        "per_backend_by_model": {
            m: per_backend([s for s in routed if s.model == m])
            for m in sorted({s.model for s in routed})
        },
        "ttft_p50_s": _r(percentile(ttft, 50)),
        "ttft_p95_s": _r(percentile(ttft, 95)),
        "reasons": reasons,
        "loads": sum(n for r in reasons.values() for k, n in r.items() if k in LOADING),
        "loaded_per_backend": dict(zip(names, ps, strict=False)),
        "show_statuses": [s.status for s in sent if s.kind == "show"],
        "stale": {
            "sent": sum(1 for s in sent if s.kind == "stale"),
            "ok": sum(1 for s in sent if s.kind == "stale" and s.status == 200 and not s.error),
            "not_found": sum(
                1 for s in sent if s.kind == "stale" and (s.status == 404 or "not found" in s.error)
            ),
            "per_backend": per_backend([s for s in sent if s.kind == "stale"]),
        },
        "errors": sorted({f"{s.status} {s.error}"[:160] for s in sent if s.error})[:8],
        "requests": [{k: v for k, v in asdict(s).items() if k != "text"} for s in sent],
    }


def _chat_of(rid: str) -> str:
    """``TAG-chatN`` for a chat's requests; the request id itself otherwise."""
    return rid.rsplit("-", 1)[0] if "-chat" in rid else rid


def _r(value: float) -> float | None:
    return None if value != value else round(value, 2)


async def run_code(
    code: Code, sizes: Sizes, workdir: Path, *, gpu_source: bool = True
) -> dict[str, Any]:
    """Both scenarios, each on a fresh fleet, from one source tree (``gpu_source`` where the
    code knows the key, unless told not to)."""
    gpu_source = gpu_source and knows_gpu_source(code, workdir)
    doc: dict[str, Any] = {"src": str(code.src), "rev": code.rev,
                           "package": code.package_file(), "gpu_source": gpu_source}  # fmt: skip
    for name, scenario in (("chats", chats), ("one_model", one_model)):
        fleet = await start_fleet(code, workdir / name, speed=sizes.speed, gpu_source=gpu_source)
        try:
            limit = 3 * sizes.request_timeout
            doc[name] = await asyncio.wait_for(
                measure(fleet, scenario, sizes, f"{code.label}-{name}"), limit
            )
        finally:
            fleet.stop()
    return doc


def table(doc: dict[str, Any]) -> str:
    runs = doc["runs"]
    labels = list(runs)

    def row(title: str, fn: Any) -> str:
        return f"| {title} | " + " | ".join(str(fn(runs[k])) for k in labels) + " |"

    def spread(counts: dict[str, int]) -> str:
        return " / ".join(str(v) for v in counts.values()) or "-"

    heads = [f"{k} ({runs[k]['rev'] or runs[k]['src']})" for k in labels]
    return "\n".join([
        "### fleet: three servers that hold different models (issue 14)", "",
        f"Emulator speed x{doc['speed']:g}; times in emulated seconds; per backend = b0 / b1 / b2 "
        f"(only b2 holds {SINGLE}). A: {doc['sizes']['chats']} chats x (turn, title, turn), "
        f"{doc['sizes']['chats_at_once']} at once, half on {SINGLE}; B: "
        f"{doc['sizes']['one_model']} requests of {ONE_MODEL}, {doc['sizes']['one_model_at_once']} "
        "at once.", "",
        "| | " + " | ".join(heads) + " |", "|---|" + "--:|" * len(labels),
        row("gpu_source in config", lambda r: "yes" if r["gpu_source"] else "no"),
        row("A: ok / sent", lambda r: f"{r['chats']['ok']} / {r['chats']['sent']}"),
        row("A: 404 not found", lambda r: r["chats"]["not_found"]),
        row("A: chats with a failure", lambda r: r["chats"]["chats_failed"]),
        row("A: timeouts", lambda r: r["chats"]["timeouts"]),
        row("A: answered per backend", lambda r: spread(r["chats"]["per_backend"])),
        row(f"A: {SINGLE} answered per backend",
            lambda r: spread(r["chats"]["per_backend_by_model"].get(SINGLE, {}))),
        row("A: TTFT p50 / p95",
            lambda r: f"{r['chats']['ttft_p50_s']} / {r['chats']['ttft_p95_s']}"),
        row(f"A: /api/show {SINGLE}", lambda r: " ".join(map(str, r["chats"]["show_statuses"]))),
        row(f"A then: {SHARED} deleted behind the proxy, ok / sent (404)",
            lambda r: f"{r['chats']['stale']['ok']} / {r['chats']['stale']['sent']} "
            f"({r['chats']['stale']['not_found']}) on {r['chats']['stale']['deleted_on']}"),
        row("A then: answered per backend", lambda r: spread(r["chats"]["stale"]["per_backend"])),
        row("B: ok / sent", lambda r: f"{r['one_model']['ok']} / {r['one_model']['sent']}"),
        row("B: answered per backend", lambda r: spread(r["one_model"]["per_backend"])),
        row("B: TTFT p50 / p95",
            lambda r: f"{r['one_model']['ttft_p50_s']} / {r['one_model']['ttft_p95_s']}"),
        row("B: loads (reasons)", lambda r: f"{r['one_model']['loads']} " + json.dumps(
            {k: v for k, v in r["one_model"]["reasons"].items() if v}, separators=(",", ":"))),
        row("B: servers with the model loaded",
            lambda r: sum(ONE_MODEL in m for m in r["one_model"]["loaded_per_backend"].values())),
        "",
    ])  # fmt: skip


async def run(
    codes: list[Code], sizes: Sizes, workdir: Path, *, gpu_source: bool = True
) -> dict[str, Any]:
    started = time.monotonic()
    runs = {}
    for code in codes:
        runs[code.label] = await run_code(code, sizes, workdir / code.label, gpu_source=gpu_source)
    return {"benchmark": "fleet", "speed": sizes.speed, "sizes": asdict(sizes),
            "seconds": round(time.monotonic() - started, 1), "runs": runs}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="emulator x15: under a minute")
    parser.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    parser.add_argument("--before", default="b5aa189", help="the commit to export ('' = skip)")
    parser.add_argument("--after", type=Path, default=ROOT, help="the source tree to run")
    parser.add_argument(
        "--no-gpu-source",
        action="store_true",
        help="leave gpu_source out of every config: memory is estimated",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="ollamux-fleet-") as tmp:
        codes = [export(ROOT, args.before, Path(tmp) / "src")] if args.before else []
        codes.append(Code(label="after", src=args.after.resolve()))
        try:
            work = Path(tmp) / "runs"
            doc = asyncio.run(run(codes, sizes, work, gpu_source=not args.no_gpu_source))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted: every process stopped, nothing written", file=sys.stderr)
            return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(doc) + "\n", encoding="utf-8")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
