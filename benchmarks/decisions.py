"""What one routing decision costs as the fleet grows: the dispatcher and ``vram_queue``, no I/O.

    python -m benchmarks.decisions [--quick]

Each case is N healthy instances and M models: every instance runs one model (instance i runs
model i mod M) with all its slots busy and no memory free, and one request per model waits in the
proxy's queue (its warm instances are busy; no replica fits). A decision is what a release costs:
one slot is given back, the dispatcher pumps its queues and grants the slot to the waiting request
of that model; a new request of the model is queued again, so every round looks the same. Reported:
microseconds per decision (the release and its pump, median of the rounds), and per pump that
grants nothing (a state change that helps nobody, such as a health check round).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from proxy.balancer.dispatcher import Dispatcher, Lease
from proxy.balancer.policies.vram_queue import VramQueue
from proxy.balancer.state import InstanceState, LoadedModel, ModelBook
from proxy.config import QueueConfig

GIB = 1024**3
SLOTS = 4
CASES = ((4, 4), (64, 20), (256, 20), (512, 50), (1000, 50))
QUICK_CASES = ((4, 4), (64, 20), (256, 20))
GOALS_US = {64: 100.0, 1000: 1000.0}
"""The issue's goals: microseconds per decision up to these fleet sizes."""


def fleet(n: int, m: int) -> tuple[list[InstanceState], list[str]]:
    models = [f"model{j}:latest" for j in range(m)]
    instances = []
    for i in range(n):
        inst = InstanceState(name=f"i{i:04d}", url=f"http://127.0.0.1:{20000 + i}", slots=SLOTS)
        inst.healthy = True
        inst.memory_free = 0
        inst.memory_total = 24 * GIB
        model = models[i % m]
        inst.models = frozenset(models)
        inst.loaded[model] = LoadedModel(name=model, size_vram=20 * GIB, context_length=8192)
        instances.append(inst)
    return instances, models


async def measure(n: int, m: int, rounds: int) -> dict[str, float]:
    instances, models = fleet(n, m)
    book = ModelBook()
    for model in models:
        book.set_file_size(model, 16 * GIB)
    limits = QueueConfig(max_per_model=1000, max_total=100_000, timeout=3600)
    dispatcher = Dispatcher(instances, VramQueue(), book, limits)
    held: dict[str, list[Lease]] = {model: [] for model in models}
    for _ in range(SLOTS):  # fill every slot
        for inst in instances:
            model = next(iter(inst.loaded))
            held[model].append(await dispatcher.acquire(model))
    waiting = {model: asyncio.ensure_future(dispatcher.acquire(model)) for model in models}
    await asyncio.sleep(0)
    assert dispatcher.depth() == m, "every model should have one request waiting"

    idle = []
    for _ in range(rounds):
        start = time.perf_counter()
        dispatcher.pump()
        idle.append(time.perf_counter() - start)

    decisions = []
    for r in range(rounds):
        model = models[r % m]
        lease = held[model].pop(0)
        start = time.perf_counter()
        dispatcher.release(lease)
        decisions.append(time.perf_counter() - start)
        granted = await waiting[model]
        held[model].append(granted)
        waiting[model] = asyncio.ensure_future(dispatcher.acquire(model))
        await asyncio.sleep(0)
    for task in waiting.values():
        task.cancel()
    return {
        "instances": n,
        "models": m,
        "decision_us": statistics.median(decisions) * 1e6,
        "idle_pump_us": statistics.median(idle) * 1e6,
    }


async def main_async(quick: bool) -> list[dict[str, float]]:
    rounds = 50 if quick else 200
    return [await measure(n, m, rounds) for n, m in (QUICK_CASES if quick else CASES)]


def table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| instances | queued models | per decision | pump that grants nothing | goal |",
        "|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        n = int(row["instances"])
        goal = next((f"<= {g:g} us" for size, g in sorted(GOALS_US.items()) if n <= size), "")
        lines.append(
            f"| {n} | {int(row['models'])} | {row['decision_us']:.0f} us | "
            f"{row['idle_pump_us']:.0f} us | {goal} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, up to 256 instances")
    args = parser.parse_args()
    print(table(asyncio.run(main_async(args.quick))))


if __name__ == "__main__":
    main()
