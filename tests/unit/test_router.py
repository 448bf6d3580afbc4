"""The router: one exit per lease, load reservations, deadlines and outcomes."""

from __future__ import annotations

import asyncio

import pytest

from proxy.balancer.policies.vram_queue import VramQueue
from proxy.balancer.router import Router
from proxy.balancer.state import InstanceState, LoadedModel, ModelBook, Outcome
from proxy.config import Config, EjectionConfig, QueueConfig

GIB = 1024**3
M = "llama3.1:8b"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def router(n: int = 2, *, warm: bool = False, slots: int = 2) -> tuple[Router, Clock]:
    insts = []
    for i in range(n):
        inst = InstanceState(name=f"gpu{i}", url=f"http://127.0.0.1:{11435 + i}", slots=slots)
        inst.healthy = True
        inst.memory_free = 40 * GIB
        if warm:
            inst.loaded[M] = LoadedModel(name=M, size_vram=6 * GIB, context_length=4096)
        insts.append(inst)
    book = ModelBook()
    book.set_file_size(M, 5 * GIB)
    config = Config(
        queue=QueueConfig(max_per_model=8, max_total=16, timeout=5.0),
        ejection=EjectionConfig(consecutive=2),
    )
    clock = Clock()
    return Router(insts, VramQueue(), book, config, clock=clock), clock


def held(r: Router) -> int:
    return sum(i.inflight_total() for i in r.instances)


async def test_every_exit_releases_once() -> None:
    r, _ = router(warm=True)
    async with r.lease(M) as lease:
        lease.outcome = Outcome.OK
    assert held(r) == 0 and lease.released
    with pytest.raises(RuntimeError):
        async with r.lease(M) as lease:
            raise RuntimeError("a bug in the HTTP layer")
    assert held(r) == 0 and lease.outcome is Outcome.CLIENT_GONE

    entered = asyncio.Event()

    async def client() -> None:
        async with r.lease(M):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.ensure_future(client())
    await entered.wait()
    assert held(r) == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert held(r) == 0


async def test_cancelled_while_queued_takes_no_slot() -> None:
    r, _ = router(n=1, warm=True, slots=1)
    async with r.lease(M):
        waiter = asyncio.ensure_future(r.lease(M).__aenter__())
        await asyncio.sleep(0)
        assert r.dispatcher.depth(M) == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert r.dispatcher.depth(M) == 0
    assert held(r) == 0


async def test_a_failed_load_keeps_its_reservation_while_others_wait_for_it() -> None:
    r, _ = router(n=1, slots=4)
    inst = r.instances[0]
    first = r.lease(M)
    lease_a = await first.__aenter__()
    second = r.lease(M)
    lease_b = await second.__aenter__()
    assert lease_a.cold and lease_b.cold and M in inst.loading
    lease_a.outcome = Outcome.CONNECT
    await first.__aexit__(None, None, None)
    assert M in inst.loading  # b still waits for that load
    await second.__aexit__(None, None, None)
    assert inst.loading == {} and held(r) == 0


async def test_first_answer_marks_loaded_and_learns_the_load() -> None:
    r, clock = router(n=1)
    inst = r.instances[0]
    async with r.lease(M) as lease:
        clock.now += 7.0
        r.started(lease)
        assert M in inst.loaded and M not in inst.loading
        lease.outcome = Outcome.OK
    assert r.book.stats(M).load_s == pytest.approx(7.0)
    assert list(inst.recent_ttft) == [pytest.approx(7.0)]


async def test_an_error_answer_marks_nothing_loaded() -> None:
    r, _ = router(n=1)
    async with r.lease(M) as lease:
        lease.outcome = Outcome.OK  # a 4xx: the instance answered, the model never ran
    assert r.instances[0].loaded == {} and r.instances[0].loading == {}


async def test_the_monitor_seeing_the_model_ends_the_reservation() -> None:
    r, _ = router(n=1)
    inst = r.instances[0]
    async with r.lease(M) as lease:
        assert M in inst.loading
        r.saw_loaded(inst, {M: LoadedModel(name=M, size_vram=6 * GIB, context_length=4096)}, 0)
        assert inst.loading == {} and M in inst.loaded
        lease.outcome = Outcome.OK


async def test_a_poll_older_than_a_start_does_not_unload_the_model() -> None:
    r, clock = router(n=1)
    inst = r.instances[0]
    asked_at = clock.now  # the monitor asks /api/ps, then the model starts before it answers
    async with r.lease(M) as lease:
        clock.now += 1
        r.started(lease)
        lease.outcome = Outcome.OK
    r.saw_loaded(inst, {}, asked_at)
    assert M in inst.loaded
    r.saw_loaded(inst, {}, clock.now + 1)  # a newer poll says it is gone: it is
    assert M not in inst.loaded


async def test_deadlines_grow_with_a_cold_load_a_long_prompt_and_silence() -> None:
    r, clock = router(n=1)
    t = Config().timeouts
    async with r.lease(M) as cold:
        limits = r.deadlines(cold, prompt_bytes=100)
        assert limits.first >= t.first_token + t.load and limits.idle == t.idle
        clock.now += 2
        r.started(cold)
        cold.outcome = Outcome.OK
    async with r.lease(M) as lease:
        assert r.deadlines(lease, prompt_bytes=100).first == t.first_token
        clock.now += 1.0
        r.started(lease)
        lease.final = {"prompt_eval_count": 1000}
        lease.outcome = Outcome.OK
    assert r.book.stats(M).prompt_tps == pytest.approx(1000.0)
    async with r.lease(M) as lease:
        # 400,000 bytes ~ 100,000 tokens at 1,000 tokens/s, three times over
        assert r.deadlines(lease, prompt_bytes=400_000).first == pytest.approx(300.0)
        silent = r.deadlines(lease, prompt_bytes=100, silent=True).first
        assert silent >= t.first_token + t.load
        lease.outcome = Outcome.OK


async def test_failures_eject_and_abort_what_is_in_flight_there() -> None:
    r, _ = router(n=2, warm=True)
    aborted: list[str] = []

    class Exchange:
        def __init__(self, name: str, delivering: bool) -> None:
            self.name, self.delivering = name, delivering

        def abort(self, reason: str) -> None:
            aborted.append(self.name)

    async with r.lease(M) as lease:
        victim = lease.instance
        with (
            r.watching(victim, Exchange("waiting", False)),
            r.watching(victim, Exchange("streaming", True)),
        ):
            for _ in range(2):
                r.report(victim, Outcome.TIMEOUT)
            assert victim.ejected and not victim.routable
            assert aborted == ["waiting"]  # a stream under way keeps going
            r.went_down(victim)
            assert sorted(aborted) == ["streaming", "waiting", "waiting"]
        lease.outcome = Outcome.CLIENT_GONE
    async with r.lease(M) as lease:
        assert lease.instance is not victim
        lease.outcome = Outcome.OK
    assert held(r) == 0


async def test_a_client_that_leaves_does_not_count_against_the_instance() -> None:
    r, _ = router(n=1, warm=True)
    for _ in range(5):
        async with r.lease(M):
            pass  # no outcome said: the client went away
    assert r.instances[0].strikes == 0 and not r.instances[0].ejected


# --- replicas loaded in the background (routing.preload) ----------------------------------------


def busy_one_warm(r: Router) -> None:
    """gpu0 has the model and no free slot; gpu1 is empty with room: a replica is worth it."""
    gpu0 = r.instances[0]
    gpu0.loaded[M] = LoadedModel(name=M, size_vram=6 * GIB, context_length=4096)
    gpu0.inflight[M] = gpu0.slots
    r.book.stats(M).observe_service(60.0)  # long answers: waiting beats no load


async def test_a_replica_loads_in_the_background_and_takes_the_waiting_one_once_loaded() -> None:
    r, _ = router(slots=1)
    busy_one_warm(r)
    loads: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def preloader(inst: InstanceState, model: str, deadline: float) -> str | None:
        loads.append((inst.name, model))
        await done.wait()
        return None

    r.preloader = preloader
    waiting = asyncio.ensure_future(r.dispatcher.acquire(M))
    await asyncio.sleep(0.01)
    gpu1 = r.instances[1]
    assert loads == [("gpu1", M)] and not waiting.done()  # nobody is bound to the load
    assert gpu1.loading and M in gpu1.preloading and gpu1.reasons == {"scale_out": 1}
    done.set()
    lease = await asyncio.wait_for(waiting, 1)
    assert (lease.instance.name, lease.decision.reason, lease.cold) == ("gpu1", "warm", False)
    assert M in gpu1.loaded and not gpu1.loading and not gpu1.preloading
    r.dispatcher.release(lease)


async def test_a_warm_slot_that_frees_first_takes_the_request_and_the_load_goes_on() -> None:
    r, _ = router(slots=1)
    busy_one_warm(r)
    release = asyncio.Event()

    async def preloader(inst: InstanceState, model: str, deadline: float) -> str | None:
        await release.wait()
        return None

    r.preloader = preloader
    gpu0, gpu1 = r.instances
    gpu0.inflight.clear()
    running = await r.dispatcher.acquire(M)  # gpu0's one slot
    waiting = asyncio.ensure_future(r.dispatcher.acquire(M))
    await asyncio.sleep(0.01)
    assert M in gpu1.preloading
    r.dispatcher.release(running)
    lease = await asyncio.wait_for(waiting, 1)
    assert lease.instance is gpu0  # the warm slot, not the load
    assert M in gpu1.preloading  # the replica still loads, for the next ones
    release.set()
    await r.close()
    r.dispatcher.release(lease)


async def test_a_failed_background_load_frees_its_reservation_and_is_not_retried_at_once() -> None:
    r, clock = router(slots=1)
    busy_one_warm(r)
    tries: list[str] = []

    async def preloader(inst: InstanceState, model: str, deadline: float) -> str | None:
        tries.append(inst.name)
        return "answered 500: out of memory"

    r.preloader = preloader
    waiting = asyncio.ensure_future(r.dispatcher.acquire(M))
    for _ in range(5):
        await asyncio.sleep(0)
    gpu1 = r.instances[1]
    assert tries == ["gpu1"] and not gpu1.loading and not gpu1.preloading
    r.dispatcher.pump()
    await asyncio.sleep(0)
    assert tries == ["gpu1"]  # not again within PRELOAD_RETRY_S
    clock.now += 31
    r.dispatcher.pump()
    await asyncio.sleep(0)
    assert tries == ["gpu1", "gpu1"]
    waiting.cancel()
    await r.close()


async def test_closing_the_router_cancels_background_loads() -> None:
    r, _ = router(slots=1)
    busy_one_warm(r)
    started = asyncio.Event()

    async def preloader(inst: InstanceState, model: str, deadline: float) -> str | None:
        started.set()
        await asyncio.sleep(3600)
        return None

    r.preloader = preloader
    waiting = asyncio.ensure_future(r.dispatcher.acquire(M))
    await asyncio.wait_for(started.wait(), 1)
    await r.close()
    assert not r.instances[1].preloading and not r.instances[1].loading
    waiting.cancel()


async def test_the_slot_comes_back_at_the_final_line_and_the_rest_is_accounted_at_the_end() -> None:
    r, _ = router(n=1, warm=True, slots=1)
    async with r.lease(M) as lease:
        r.started(lease)
        waiting = asyncio.ensure_future(r.dispatcher.acquire(M))
        await asyncio.sleep(0)
        assert not waiting.done()
        r.answered(lease)  # the final line: Ollama's slot is free
        next_one = await asyncio.wait_for(waiting, 1)
        assert next_one.instance is lease.instance and not lease.finished
        lease.outcome = Outcome.OK
    assert lease.finished and len(lease.instance.recent_ttft) == 1  # accounted once, at the end
    assert held(r) == 1  # only the next request's slot
    r.dispatcher.release(next_one)


async def test_a_request_for_another_context_goes_where_that_context_runs_or_loads() -> None:
    r, _ = router(n=2, slots=2)
    gpu0, gpu1 = r.instances
    gpu0.loaded[M] = LoadedModel(name=M, size_vram=6 * GIB, context_length=4096)
    r.book.stats(M).max_ctx = 32768
    same = await r.dispatcher.acquire(M, num_ctx=4096)
    plain = await r.dispatcher.acquire(M)
    assert same.instance is gpu0 and plain.instance is gpu0  # no context asked: any serves
    other = await r.dispatcher.acquire(M, num_ctx=16384)
    assert (other.instance, other.decision.reason) == (gpu1, "cold_fit")  # no reload on gpu0
    r.started(other)
    assert gpu1.loaded[M].context_length == 0  # unknown until /api/ps says
    huge = await r.dispatcher.acquire(M, num_ctx=10**6)  # clamped to what the model can do
    assert huge.instance is gpu1  # 0 = unknown counts as a match; gpu0 is full
    for lease in (same, plain, other, huge):
        r.dispatcher.release(lease)
    gpu1.loaded[M] = LoadedModel(name=M, size_vram=6 * GIB, context_length=32768)
    clamped = await r.dispatcher.acquire(M, num_ctx=10**6)
    assert clamped.instance is gpu1  # 32768 is the most it runs with: no reload for more
    r.dispatcher.release(clamped)


async def test_decode_speed_is_learned_per_instance_from_the_final_line() -> None:
    r, _ = router(n=2, warm=True, slots=2)
    gpu0, gpu1 = r.instances
    for inst, tps in ((gpu0, 100.0), (gpu1, 85.0)):
        async with r.lease(M, exclude=[i.name for i in r.instances if i is not inst]) as lease:
            r.started(lease)
            lease.outcome = Outcome.OK
            lease.final = {"eval_count": int(tps), "eval_duration": 10**9}
    assert gpu0.decode_tps[M] == 100.0 and gpu1.decode_tps[M] == 85.0
    assert gpu0.speed_for(M, 100.0) == 1.0 and gpu1.speed_for(M, 100.0) == 0.85
    assert gpu1.relative_speed == 0.85  # what it will likely do with a model it never ran
    assert gpu1.speed_for("other:latest", 100.0) == 0.85
    async with r.lease(M) as lease:  # a short answer says nothing about the GPU
        r.started(lease)
        lease.outcome = Outcome.OK
        lease.final = {"eval_count": 2, "eval_duration": 10**6}
    assert gpu0.decode_tps[M] == 100.0
