"""The dispatcher: late binding, admission limits, timeouts, fairness and slot release."""

from __future__ import annotations

import asyncio

import pytest

from proxy.balancer.dispatcher import Dispatcher
from proxy.balancer.policies.vram_queue import VramQueue
from proxy.balancer.state import InstanceState, LoadedModel, ModelBook
from proxy.config import QueueConfig
from proxy.errors import NoHealthyInstance, QueueFull, QueueTimeout

GIB = 1024**3
M = "llama3.1:8b"


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def instances(n: int = 2, slots: int = 2, warm: bool = True) -> list[InstanceState]:
    out = []
    for i in range(n):
        inst = InstanceState(name=f"gpu{i}", url=f"http://127.0.0.1:{11435 + i}", slots=slots)
        inst.healthy = True
        inst.memory_free = 20 * GIB
        if warm:
            inst.loaded[M] = LoadedModel(name=M, size_vram=6 * GIB, context_length=4096)
        out.append(inst)
    return out


def dispatcher(insts: list[InstanceState], **limits: float) -> tuple[Dispatcher, list[str]]:
    reasons: list[str] = []
    book = ModelBook()
    book.set_file_size(M, 5 * GIB)
    config = QueueConfig(**{"max_per_model": 8, "max_total": 16, "timeout": 5.0, **limits})  # type: ignore[arg-type]
    return Dispatcher(insts, VramQueue(), book, config, on_decision=reasons.append), reasons


async def test_binds_only_while_slots_are_free_then_queues_fifo() -> None:
    insts = instances(n=2, slots=2)
    d, reasons = dispatcher(insts)
    leases = [await d.acquire(M) for _ in range(4)]
    assert sorted(lease.instance.name for lease in leases) == ["gpu0", "gpu0", "gpu1", "gpu1"]
    waiting = [asyncio.ensure_future(d.acquire(M)) for _ in range(2)]
    await settle()
    assert d.depth(M) == 2 and not any(w.done() for w in waiting)
    d.release(leases[0])
    await settle()
    assert waiting[0].done() and not waiting[1].done()
    assert waiting[0].result().instance is leases[0].instance
    d.release(leases[1])
    await settle()
    assert waiting[1].done() and d.depth() == 0
    assert reasons.count("queued") == 2 and reasons.count("warm") == 6


async def test_admission_limits_per_model_and_total() -> None:
    d, _ = dispatcher(instances(n=1, slots=1), max_per_model=2, max_total=2)
    await d.acquire(M)
    waiting = [asyncio.ensure_future(d.acquire(M)) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull, match="max_per_model"):
        await d.acquire(M)
    for w in waiting:
        w.cancel()


async def test_queue_timeout() -> None:
    d, _ = dispatcher(instances(n=1, slots=1), timeout=0.05)
    await d.acquire(M)
    with pytest.raises(QueueTimeout):
        await d.acquire(M)
    assert d.depth() == 0


async def test_cancelled_waiter_leaves_the_queue_and_loses_nothing() -> None:
    insts = instances(n=1, slots=1)
    d, _ = dispatcher(insts)
    held = await d.acquire(M)
    gone = asyncio.ensure_future(d.acquire(M))
    behind = asyncio.ensure_future(d.acquire(M))
    await settle()
    gone.cancel()
    await settle()
    d.release(held)
    lease = await asyncio.wait_for(behind, 1)
    assert insts[0].inflight == {M: 1}
    d.release(lease)
    d.release(lease)  # releasing twice is harmless
    assert insts[0].inflight == {}


async def test_no_healthy_instance_is_immediate() -> None:
    insts = instances()
    for inst in insts:
        inst.healthy = False
    d, _ = dispatcher(insts)
    with pytest.raises(NoHealthyInstance):
        await d.acquire(M)


async def test_exclude_skips_an_instance_for_the_retry() -> None:
    d, _ = dispatcher(instances(n=2))
    lease = await d.acquire(M, exclude=["gpu0"])
    assert lease.instance.name == "gpu1"


async def test_cold_bind_reserves_vram_and_the_load_takes_its_slots_first() -> None:
    insts = instances(n=2, warm=False)
    other = "qwen2.5:7b"  # the second GPU holds another model: a replica there must pay off
    insts[1].loaded[other] = LoadedModel(name=other, size_vram=5 * GIB, context_length=4096)
    d, reasons = dispatcher(insts)
    d.book.stats(M).observe_service(1.0)  # short requests: waiting beats loading a replica
    lease = await d.acquire(M)
    assert lease.cold and reasons == ["cold_fit"]
    inst = lease.instance
    free = inst.free_vram()
    assert free is not None and free < 20 * GIB
    joined = await d.acquire(M)  # the loading instance has a free slot: start there once loaded
    assert joined.instance is inst and joined.cold  # it waits for that same load...
    assert inst.free_vram() == free  # ...reserved once
    third = asyncio.ensure_future(d.acquire(M))
    await settle()
    assert not third.done()  # both slots taken: wait in the proxy, not inside Ollama
    d.release(lease)  # the load's first request left; the others still wait for it
    assert M in inst.loading
    last = await asyncio.wait_for(third, 1)
    assert last.instance is inst
    d.release(joined)
    d.release(last)
    assert inst.loading == {} and inst.free_vram() == 20 * GIB  # nobody waits: reservation gone


async def test_a_long_queue_behind_a_load_scales_out() -> None:
    d, reasons = dispatcher(instances(n=2, warm=False))
    d.book.stats(M).observe_service(60.0)
    first, second, third = [await d.acquire(M) for _ in range(3)]
    assert second.instance is first.instance  # its second slot
    assert third.instance is not first.instance
    assert reasons == ["cold_fit", "warm", "scale_out"]


async def test_models_are_served_in_turn() -> None:
    other = "qwen2.5:7b"
    insts = instances(n=1, slots=1)
    insts[0].loaded[other] = LoadedModel(name=other, size_vram=5 * GIB, context_length=4096)
    d, _ = dispatcher(insts)
    a = await d.acquire(M)
    b = await d.acquire(other)
    queued_a = asyncio.ensure_future(d.acquire(M))
    queued_b = asyncio.ensure_future(d.acquire(other))
    await settle()
    d.release(b)  # a slot of `other` frees: its waiter goes although M's waiter is older
    await settle()
    assert queued_b.done() and not queued_a.done()
    d.release(a)
    await settle()
    assert queued_a.done()


async def test_interactive_requests_go_before_background_ones_that_waited_longer() -> None:
    d, _ = dispatcher(instances(n=1, slots=1), max_per_model=16)
    running = await d.acquire(M)
    background = [asyncio.ensure_future(d.acquire(M, background=True)) for _ in range(3)]
    await settle()
    interactive = asyncio.ensure_future(d.acquire(M))
    await settle()
    d.release(running)
    await settle()
    assert interactive.done() and not any(b.done() for b in background)
    d.release(interactive.result())
    await settle()
    assert background[0].done() and not background[1].done()  # then background, in order
    for task in background[1:]:
        task.cancel()
    await settle()
    d.release(background[0].result())


async def test_users_take_turns_so_one_flood_does_not_starve_the_others() -> None:
    d, _ = dispatcher(instances(n=1, slots=1), max_per_model=32, max_total=32)
    running = await d.acquire(M, user="flood")
    flood = [asyncio.ensure_future(d.acquire(M, user="flood")) for _ in range(10)]
    await settle()
    others = [asyncio.ensure_future(d.acquire(M, user=u)) for u in ("ann", "bob")]
    await settle()
    order: list[str] = []
    lease = running
    pending = {**{f"flood{i}": t for i, t in enumerate(flood)}, "ann": others[0], "bob": others[1]}
    for _ in range(4):
        d.release(lease)
        await settle()
        name, task = next((n, t) for n, t in pending.items() if t.done())
        del pending[name]
        order.append(name)
        lease = task.result()
    # the flood's first waiter came first; then ann and bob, who were never served, then flood
    assert order == ["flood0", "ann", "bob", "flood1"]
    for task in pending.values():
        task.cancel()
    await settle()
    d.release(lease)
    assert d.depth() == 0


async def test_a_user_alone_is_served_first_come_first_served() -> None:
    d, _ = dispatcher(instances(n=1, slots=1))
    running = await d.acquire(M, user="ann")
    waiting = [asyncio.ensure_future(d.acquire(M, user="ann")) for _ in range(3)]
    await settle()
    lease = running
    for task in waiting:
        d.release(lease)
        await settle()
        assert task.done() and sum(w.done() for w in waiting) == waiting.index(task) + 1
        lease = task.result()
    d.release(lease)


async def test_a_full_queue_refuses_the_flooding_users_newest_request_not_the_newcomer() -> None:
    d, _ = dispatcher(instances(n=1, slots=1), max_per_model=4)
    running = await d.acquire(M, user="flood")
    flood = [asyncio.ensure_future(d.acquire(M, user="flood")) for _ in range(4)]
    await settle()
    alone = asyncio.ensure_future(d.acquire(M, user="flood"))
    await settle()
    with pytest.raises(QueueFull):  # one user alone: the queue is full for it as before
        alone.result()
    ann = asyncio.ensure_future(d.acquire(M, user="ann"))
    await settle()
    assert not ann.done() and d.depth(M) == 4
    with pytest.raises(QueueFull, match="max_per_model"):
        flood[-1].result()  # the flood's newest made way
    assert not any(f.done() for f in flood[:-1])
    d.release(running)
    await settle()
    assert ann.done() or flood[0].done()
    for task in [*flood[:-1], ann]:
        if task.done() and not task.cancelled() and task.exception() is None:
            d.release(task.result())
        else:
            task.cancel()
    await settle()
