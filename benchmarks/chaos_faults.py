"""The chaos scenarios that break one instance under a closed-loop load: kill, hang, freeze, die.

Each starts a fresh box, runs ``Sizes.clients`` users of llama3.1:8b (3 in 4 streamed, 150-250
tokens) for ``warm`` seconds, injects the fault into one instance, keeps the load on for a while,
then waits a bounded time for the requests still running and measures (see chaos_measure).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.chaos_box import Box
from benchmarks.chaos_client import Client, Clock, Load
from benchmarks.chaos_measure import detect, marked, quiet, recover, routed_after, timeline
from benchmarks.chaos_plan import MODEL, SHIPPED, Ctx, common_goals, goal, row

Inject = Callable[[Box, Load, Ctx], Awaitable[str]]


async def _busiest(box: Box, model: str | None = None) -> str:
    """The up instance with most in flight (with ``model`` loaded, when given)."""
    status = await box.status()
    assert status is not None, "the proxy does not answer"
    insts = [i for i in status["instances"] if i.get("state") == "up"]
    if model is not None:
        warm = [i for i in insts if any(m.get("name") == model for m in i.get("loaded") or [])]
        insts = warm or [i for i in insts if i.get("inflight_total")] or insts
    best = max(insts, key=lambda i: (int(i.get("inflight_total", 0)), i["name"]))
    return str(best["name"])


async def _kill(box: Box, load: Load, ctx: Ctx) -> str:
    name = await _busiest(box)
    ctx.say(f"SIGKILL {name} (pid {await box.signal(name, signal.SIGKILL)})")
    return name


async def _hang_warm(box: Box, load: Load, ctx: Ctx) -> str:
    name = await _busiest(box, MODEL)
    await box.fault(name, hang=True)
    ctx.say(f"hang on {name} ({MODEL} loaded)")
    return name


async def _hang_cold(box: Box, load: Load, ctx: Ctx) -> str:
    """Hang the instance a cold load goes to first (the fewest models loaded, then the most free
    memory: where vram_queue puts a model loaded nowhere), then send a model loaded nowhere.
    Replicas of the baseline's model may already fill every GPU (they load in the background)."""
    status = await box.status()
    assert status is not None
    up = [i for i in status["instances"] if i.get("state") == "up"]
    if not up:
        raise RuntimeError("no instance is up to hang")

    def rank(i: dict[str, Any]) -> tuple[int, int, str]:
        models = len(i.get("loaded") or []) + len(i.get("loading") or [])
        return (models, -int(i.get("memory_free") or 0), str(i["name"]))

    target = min(up, key=rank)
    name = str(target["name"])
    await box.fault(name, hang=True)
    what = "nothing loaded" if rank(target)[0] == 0 else "the fewest models loaded"
    ctx.say(f"hang on {name} ({what}); 6 users of qwen2.5:7b start")
    load.closed(6, lambda: ctx.mixed("qwen2.5:7b"))
    return name


async def _freeze(box: Box, load: Load, ctx: Ctx) -> str:
    name = await _busiest(box)
    ctx.say(f"SIGSTOP {name} (pid {await box.signal(name, signal.SIGSTOP)})")
    return name


async def _die(box: Box, load: Load, ctx: Ctx) -> str:
    name = await _busiest(box)
    await box.fault(name, die_after_tokens=100)
    ctx.say(f"die_after_tokens 100 on {name}")
    return name


async def _undo(box: Box, target: str, scenario: str) -> None:
    """Take the fault back so the box can stop cleanly (best effort: the instance may be gone)."""
    with contextlib.suppress(Exception):
        if scenario == "freeze":
            await box.signal(target, signal.SIGCONT)
        elif scenario.startswith("hang"):
            await box.fault(target, hang=False)
        elif scenario == "die":
            await box.fault(target, die_after_tokens=None)


async def _start(ctx: Ctx, name: str, overrides: dict[str, Any]) -> tuple[Box, list[str]]:
    """A started box; with ``overrides`` dropped (and a note) if this build does not know them."""
    box = Box(ctx.workdir, speed=ctx.sizes.speed, src=ctx.src, overrides=overrides, name=name)
    try:
        await box.__aenter__()
        return box, []
    except RuntimeError as exc:
        if not overrides or "unknown key" not in str(exc):
            raise
    box = Box(ctx.workdir, speed=ctx.sizes.speed, src=ctx.src, name=name)
    await box.__aenter__()
    return box, [f"this build does not know {overrides}: shipped defaults"]


async def fault_scenario(
    ctx: Ctx,
    scenario: str,
    inject: Inject,
    *,
    after: float,
    clients: int | None = None,
    overrides: dict[str, Any] | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Load, fault, ``after`` s more load, a bounded wait for what is left, then the row."""
    s = ctx.sizes
    box, notes = await _start(ctx, scenario.replace(" ", "-"), overrides or {})
    target = ""
    try:
        async with Client() as client:
            clock = Clock()
            poller = box.poller(clock)
            load = client.load(box.url, clock, ctx.rng)
            load.closed(clients or s.clients, ctx.mixed)
            await asyncio.sleep(s.warm)
            rss_before = box.rss()
            t_fault = clock()
            target = await inject(box, load, ctx)
            await asyncio.sleep(after)
            load_end = clock()
            await load.finish(load_end + s.grace)
            await _undo(box, target, scenario)
            left = await box.settle(clock, clock() + 2.0)
            rss_after = box.rss()
            samples = await poller.stop()
    finally:
        await box.stop()
    mine, total = routed_after(samples, target, t_fault)
    found = detect(samples, target, t_fault)
    later = routed_after(samples, target, t_fault + found) if found is not None else None
    out = row(
        scenario,
        load.calls,
        label=label,
        rss=(rss_before, rss_after, poller.peak_rss or None),
        left=left,
        target=target,
        t_fault=round(t_fault, 3),
        window_s=round(load_end - t_fault, 1),
        detect_s=_r(found),
        marked_s=_r(marked(samples, target, t_fault)),
        quiet_s=_r(quiet(samples, target, t_fault)),
        recover_s=_r(recover(load.calls, t_fault, load_end)),
        routed_to_target_after_fault=mine,
        routed_after_fault=total,
        routed_to_target_after_detect=None if later is None else later[0],
        timeline=timeline(samples, target),
        pids=sorted({box.pid, *box.emulators}),
        notes=notes,
    )
    out["notes"].append(f"{target}: {mine} of {total} requests routed after the fault")
    if later is not None and later[0]:
        out["notes"].append(f"{later[0]} of {later[1]} after detection")
    out["goals"] = common_goals(out)
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def kill(ctx: Ctx) -> dict[str, Any]:
    """SIGKILL the busiest instance mid-load."""
    return await fault_scenario(ctx, "kill", _kill, after=ctx.sizes.after)


async def hang_warm(ctx: Ctx) -> dict[str, Any]:
    """The busiest instance (model loaded) stops answering new requests; goal: detect <= 15 s."""
    out = await fault_scenario(ctx, "hang warm", _hang_warm, after=ctx.sizes.after_hang)
    out["goals"].append(
        goal("detect <= 15 s", out["detect_s"] is not None and out["detect_s"] <= 15)
    )
    return out


async def hang_cold(ctx: Ctx) -> dict[str, Any]:
    """An instance with nothing loaded stops answering; requests for a cold model go to it first.
    Their first token may take ``timeouts.first_token`` plus ``timeouts.load`` (120 s shipped, or
    four times the expected load if longer): ``--quick`` sets 10 s, and the load runs that long
    plus 4 s."""
    s = ctx.sizes
    load_s = s.cold_load or SHIPPED["load"]
    overrides = {"timeouts": {"load": s.cold_load}} if s.cold_load else {}
    label = f"hang cold (timeouts.load {s.cold_load:g}s)" if s.cold_load else "hang cold"
    after = SHIPPED["first_token"] + load_s + 4.0
    return await fault_scenario(
        ctx, "hang cold", _hang_cold, after=after, clients=8, overrides=overrides, label=label
    )


async def freeze(ctx: Ctx) -> dict[str, Any]:
    """SIGSTOP the busiest instance with streams on it; its streams must end (``timeouts.idle``)
    with an error line, and it must be taken out. The load runs long enough for both the idle
    deadline and a request sent there before the health checks (about 6 s) take it out to be
    retried after ``timeouts.first_token``, plus 4 s; SIGCONT at the end."""
    s = ctx.sizes
    idle = s.idle or SHIPPED["idle"]
    overrides = {"timeouts": {"idle": s.idle}} if s.idle else {}
    label = f"freeze (timeouts.idle {s.idle:g}s)" if s.idle else "freeze"
    after = max(s.after, idle, 6.0 + SHIPPED["first_token"]) + 4.0
    return await fault_scenario(
        ctx, "freeze", _freeze, after=after, overrides=overrides, label=label
    )


async def die(ctx: Ctx) -> dict[str, Any]:
    """The busiest instance cuts every stream after 100 tokens for the rest of the run."""
    return await fault_scenario(ctx, "die", _die, after=ctx.sizes.after, label="die mid-stream")
