"""Clock-driven tests of the emulated Ollama scheduler: exact times, no sockets."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import pytest

from proxy.config import GpuSpec, ModelSpec
from proxy.emulator.clock import ManualClock
from proxy.emulator.engine import FAST_PATH_S, LOAD_FIXED_S, Engine
from proxy.emulator.events import Done, GenerateRequest, Loaded, ServerSettings, Token
from proxy.emulator.placement import OVERHEAD_BYTES
from proxy.errors import RunnerFailed, ServerBusy

SMALL = ModelSpec(name="small:1b", size_gb=1.2, decode_tps=100, prompt_tps=1000, load_gbps=1.2,
                  kv_kib_per_token=64)  # fmt: skip
MID = ModelSpec(name="mid:8b", size_gb=6.0, decode_tps=50, prompt_tps=1000, load_gbps=2.0,
                kv_kib_per_token=64)  # fmt: skip
BIG = ModelSpec(name="big:27b", size_gb=19.0, decode_tps=20, prompt_tps=500, load_gbps=4.0,
                kv_kib_per_token=64)  # fmt: skip
HUGE = ModelSpec(name="huge:70b", size_gb=40.0, decode_tps=10, prompt_tps=200, load_gbps=8.0,
                 kv_kib_per_token=64)  # fmt: skip
EMBED = ModelSpec(name="embed:latest", size_gb=0.3, embedding=True, prompt_tps=1000, load_gbps=0.3,
                  kv_kib_per_token=8, context_length=2048)  # fmt: skip
GPU24 = GpuSpec(name="gpu24", memory_gib=24)
GPU48 = GpuSpec(name="gpu48", memory_gib=48)


def load_time(model: ModelSpec) -> float:
    return LOAD_FIXED_S + model.size_gb / model.load_gbps


@dataclass
class Run:
    """One generate call consumed in the background, with the virtual time of each event."""

    events: list[tuple[float, object]] = field(default_factory=list)
    error: BaseException | None = None
    task: asyncio.Task[None] | None = None

    @property
    def done(self) -> Done | None:
        last = self.events[-1][1] if self.events else None
        return last if isinstance(last, Done) else None

    def first_token_at(self) -> float | None:
        return next((t for t, e in self.events if isinstance(e, Token)), None)

    def loaded(self) -> Loaded:
        return next(e for _, e in self.events if isinstance(e, Loaded))


def start(engine: Engine, model: ModelSpec, prompt: int = 10, **kw: object) -> Run:
    run = Run()
    req = GenerateRequest(model=model, prompt_tokens=tuple(f"w{i}" for i in range(prompt)), **kw)  # type: ignore[arg-type]

    async def consume() -> None:
        try:
            async for event in engine.generate(req):
                run.events.append((engine.clock.now(), event))
        except Exception as exc:  # recorded for the test to assert on
            run.error = exc

    run.task = asyncio.get_running_loop().create_task(consume())
    return run


def make(*gpus: GpuSpec, **kw: object) -> tuple[Engine, ManualClock]:
    clock = ManualClock()
    settings = ServerSettings(gpus=gpus or (GPU24,), context_length=2048, **kw)  # type: ignore[arg-type]
    return Engine(settings, clock), clock


def loaded_names(engine: Engine) -> list[str]:
    return sorted(m.model.name for m in engine.ps())


async def test_cold_load_takes_fixed_plus_size_over_bandwidth_then_fast_path() -> None:
    engine, clock = make()
    first = start(engine, SMALL, num_predict=5)
    await clock.advance(100)
    assert first.done is not None
    assert first.loaded().load_duration == pytest.approx(load_time(SMALL))
    second = start(engine, SMALL, num_predict=5)
    await clock.advance(100)
    assert second.loaded().load_duration == pytest.approx(FAST_PATH_S)


async def test_decode_and_prompt_timing_single_stream() -> None:
    engine, clock = make()
    run = start(engine, SMALL, prompt=500, num_predict=100)
    await clock.advance(100)
    done = run.done
    assert done is not None and done.done_reason == "length"
    assert done.prompt_eval_count == 500
    assert done.prompt_eval_duration == pytest.approx(500 / 1000)
    assert done.eval_count == 100
    assert done.eval_duration == pytest.approx(100 / 100)


async def test_concurrent_slots_decode_slower_each_but_faster_together() -> None:
    engine, clock = make(num_parallel=4)
    warm = start(engine, SMALL, num_predict=1)
    await clock.advance(50)
    runs = [start(engine, SMALL, num_predict=100) for _ in range(4)]
    await clock.advance(50)
    durations = [r.done.eval_duration for r in runs if r.done]
    assert warm.done is not None and len(durations) == 4
    per_stream = 100 / durations[0]
    assert per_stream == pytest.approx(100 / (1 + 0.12 * 3), rel=0.01)  # slower per stream
    assert 4 * per_stream > 2.5 * 100  # but ~2.9x aggregate


async def test_request_beyond_num_parallel_waits_for_a_slot() -> None:
    engine, clock = make(num_parallel=2)
    runs = [start(engine, SMALL, num_predict=50) for _ in range(3)]
    await clock.advance(100)
    assert all(r.done for r in runs)
    first_done = min(t for r in runs[:2] for t, e in r.events if isinstance(e, Done))
    third_token = runs[2].first_token_at()
    assert third_token is not None and third_token > first_done
    # waiting for a slot is not part of load_duration (ollama.md §3.2)
    assert runs[2].loaded().load_duration == pytest.approx(runs[1].loaded().load_duration)


async def test_keep_alive_default_expiry_and_zero_and_forever() -> None:
    engine, clock = make(keep_alive=300.0)
    run = start(engine, SMALL, num_predict=1)
    await clock.advance(10)
    (entry,) = engine.ps()
    finished_at = run.events[-1][0]
    assert entry.expires_at == pytest.approx(finished_at + 300)
    await clock.advance(280)
    assert loaded_names(engine) == ["small:1b"]
    await clock.advance(30)
    assert loaded_names(engine) == []
    start(engine, SMALL, num_predict=1, keep_alive=0.0)
    await clock.advance(10)
    assert loaded_names(engine) == []
    start(engine, SMALL, num_predict=1, keep_alive=math.inf)
    await clock.advance(10_000)
    assert [m.expires_at for m in engine.ps()] == [math.inf]


async def test_keep_alive_is_sticky() -> None:
    engine, clock = make(keep_alive=300.0)
    start(engine, SMALL, num_predict=1, keep_alive=20.0)
    await clock.advance(10)
    start(engine, SMALL, num_predict=1)  # no keep_alive: keeps 20 s, not the default
    await clock.advance(15)
    assert loaded_names(engine) == ["small:1b"]
    await clock.advance(10)
    assert loaded_names(engine) == []


async def test_unload_of_busy_model_waits_for_it_to_finish() -> None:
    engine, clock = make()
    run = start(engine, SMALL, num_predict=200)
    await clock.advance(load_time(SMALL) + 0.5)
    engine.unload(SMALL)
    assert loaded_names(engine) == ["small:1b"]
    await clock.advance(5)
    assert run.done is not None and loaded_names(engine) == []


async def test_max_loaded_models_evicts() -> None:
    engine, clock = make(max_loaded_models=1)
    start(engine, SMALL, num_predict=1)
    await clock.advance(10)
    start(engine, MID, num_predict=1)
    await clock.advance(10)
    assert loaded_names(engine) == ["mid:8b"]


async def test_model_that_does_not_fit_evicts_idle_runner() -> None:
    engine, clock = make()
    start(engine, BIG, num_predict=1)
    await clock.advance(20)
    start(engine, MID, num_predict=1)  # 19 + 6 GB exceed 24 GiB less reserve
    await clock.advance(20)
    assert loaded_names(engine) == ["mid:8b"]


async def test_both_fit_side_by_side() -> None:
    engine, clock = make(GPU48)
    start(engine, BIG, num_predict=1)
    start(engine, MID, num_predict=1)
    await clock.advance(30)
    assert loaded_names(engine) == ["big:27b", "mid:8b"]


async def test_victim_is_by_keep_alive_then_digest_not_lru() -> None:
    engine, clock = make(max_loaded_models=2)
    start(engine, SMALL, num_predict=1, keep_alive=math.inf)
    await clock.advance(10)
    start(engine, MID, num_predict=1, keep_alive=600.0)
    await clock.advance(10)
    start(engine, SMALL, num_predict=1)  # SMALL is the most recently used ...
    await clock.advance(10)
    start(engine, BIG, num_predict=1)
    await clock.advance(20)
    # ... yet MID (shorter keep-alive) is the victim, and SMALL (forever) stays
    assert loaded_names(engine) == ["big:27b", "small:1b"]


async def test_eviction_waits_for_busy_victim() -> None:
    engine, clock = make(max_loaded_models=1)
    long = start(engine, SMALL, num_predict=300)  # 3 s of decoding
    await clock.advance(load_time(SMALL) + 0.1)
    other = start(engine, MID, num_predict=1)
    await clock.advance(1)
    assert other.events == []  # waiting for SMALL to drain
    await clock.advance(30)
    assert long.done is not None and other.done is not None
    assert other.loaded().load_duration > load_time(MID) + 1.5


async def test_loads_are_serial() -> None:
    engine, clock = make(GPU48)
    a = start(engine, SMALL, num_predict=1)
    b = start(engine, MID, num_predict=1)
    await clock.advance(30)
    assert a.loaded().load_duration == pytest.approx(load_time(SMALL))
    assert b.loaded().load_duration == pytest.approx(load_time(SMALL) + load_time(MID))


async def test_max_queue_gives_server_busy_only_for_scheduling() -> None:
    engine, clock = make(GPU48, max_queue=1)
    start(engine, SMALL, num_predict=1)  # taken by the scheduler: loading
    await clock.settle()
    queued = start(engine, MID, num_predict=1)  # waits in the queue (1 of 1)
    rejected = start(engine, BIG, num_predict=1)
    await clock.settle()
    assert isinstance(rejected.error, ServerBusy)
    assert (
        str(rejected.error) == "server busy, please try again.  maximum pending requests exceeded"
    )
    await clock.advance(30)
    assert queued.done is not None
    # a loaded model never gets 503, however many wait for its slots
    many = [start(engine, SMALL, num_predict=5) for _ in range(10)]
    await clock.advance(30)
    assert all(r.done and r.error is None for r in many)


async def test_num_ctx_change_forces_reload() -> None:
    engine, clock = make()
    start(engine, SMALL, num_predict=1, num_ctx=2048)
    await clock.advance(10)
    run = start(engine, SMALL, num_predict=1, num_ctx=8192)
    await clock.advance(10)
    assert run.loaded().load_duration == pytest.approx(load_time(SMALL))
    assert [m.context_length for m in engine.ps()] == [8192]


async def test_vram_accounting_weights_plus_kv_for_every_slot() -> None:
    engine, clock = make(num_parallel=4)
    start(engine, MID, num_predict=1, num_ctx=4096)
    await clock.advance(10)
    (entry,) = engine.ps()
    expected = MID.size_bytes + 64 * 1024 * 4096 * 4 + OVERHEAD_BYTES
    assert entry.size == entry.size_vram == expected
    (gpu,) = engine.gpus()
    assert gpu.memory_used == expected + engine.settings.reserve_bytes
    assert gpu.memory_free == gpu.memory_total - gpu.memory_used


async def test_placement_picks_gpu_with_most_free_memory() -> None:
    engine, clock = make(GPU24, GPU48, GPU24)
    start(engine, BIG, num_predict=1)
    await clock.advance(20)
    assert [m.gpus for m in engine.ps()] == [(1,)]
    start(engine, MID, num_predict=1)
    await clock.advance(20)  # 48 GiB card has ~30 free, the 24s have ~23.5: still the 48
    assert sorted(m.gpus for m in engine.ps()) == [(1,), (1,)]


async def test_spread_splits_every_model_and_is_slower_per_token() -> None:
    single, c1 = make(GPU24)
    spread, c2 = make(GPU24, GPU24, spread=True, spread_penalty=0.1)
    r1 = start(single, SMALL, num_predict=100)
    r2 = start(spread, SMALL, num_predict=100)
    await c1.advance(50)
    await c2.advance(50)
    assert [m.gpus for m in spread.ps()] == [(0, 1)]
    assert r1.done and r2.done
    assert r2.done.eval_duration == pytest.approx(r1.done.eval_duration * 1.1)


async def test_model_too_big_for_any_gpu_spills_when_alone_and_crawls() -> None:
    engine, clock = make(GPU24)
    run = start(engine, HUGE, num_predict=10)
    await clock.advance(200)
    (entry,) = engine.ps()
    assert entry.size_vram < entry.size
    assert run.done is not None and run.done.eval_duration > 10 / 10 * 2


async def test_two_models_on_one_gpu_compete_for_compute() -> None:
    engine, clock = make(GPU48, num_parallel=1)
    start(engine, SMALL, num_predict=1)
    start(engine, MID, num_predict=1)
    await clock.advance(30)
    alone = start(engine, SMALL, num_predict=100)
    await clock.advance(30)
    a = start(engine, SMALL, num_predict=100)
    b = start(engine, MID, num_predict=100)
    await clock.advance(30)
    assert alone.done and a.done and b.done
    assert a.done.eval_duration > 1.5 * alone.done.eval_duration


async def test_prompt_cache_skips_the_shared_prefix() -> None:
    engine, clock = make()
    first = start(engine, SMALL, prompt=1000, num_predict=10)
    await clock.advance(30)
    second = start(engine, SMALL, prompt=1100, num_predict=10)  # same first 1000 tokens
    await clock.advance(30)
    assert first.done and second.done
    assert second.done.prompt_eval_count == 1100
    assert second.done.prompt_eval_duration == pytest.approx(100 / 1000)


async def test_cancel_while_waiting_for_slot_and_while_decoding_frees_the_slot() -> None:
    engine, clock = make(num_parallel=1)
    holder = start(engine, SMALL, num_predict=1000)
    waiter = start(engine, SMALL, num_predict=10)
    behind = start(engine, SMALL, num_predict=10)
    await clock.advance(load_time(SMALL) + 1)
    assert waiter.task is not None and holder.task is not None
    waiter.task.cancel()
    await clock.advance(0.1)
    holder.task.cancel()  # the client went away mid-stream
    await clock.advance(1)
    assert behind.done is not None  # got the slot at once, not after 10 s of decoding
    assert engine.queued() == 0


async def test_cancel_during_load_aborts_it() -> None:
    engine, clock = make()
    run = start(engine, MID, num_predict=1)
    await clock.advance(1)
    assert run.task is not None
    run.task.cancel()
    await clock.advance(30)
    assert loaded_names(engine) == []
    again = start(engine, MID, num_predict=1)
    await clock.advance(30)
    assert again.loaded().load_duration == pytest.approx(load_time(MID))  # from zero


async def test_faults_fail_next_and_die_mid_stream() -> None:
    engine, clock = make()
    engine.faults.fail_next = 1
    failed = start(engine, SMALL, num_predict=5)
    ok = start(engine, SMALL, num_predict=5)
    await clock.advance(20)
    assert isinstance(failed.error, RunnerFailed) and failed.events == []
    assert ok.done is not None
    engine.faults.die_after_tokens = 3
    dying = start(engine, SMALL, num_predict=5)
    await clock.advance(20)
    assert isinstance(dying.error, RunnerFailed)
    assert sum(isinstance(e, Token) for _, e in dying.events) == 3


async def test_embed_runs_inputs_through_one_slot() -> None:
    engine, clock = make(num_parallel=4)

    async def call() -> None:
        result = await engine.embed(
            EMBED, [("a",) * 100, ("b",) * 100], num_ctx=None, keep_alive=None
        )
        results.append(result)

    results: list = []
    task = asyncio.get_running_loop().create_task(call())
    await clock.advance(30)
    await task
    (result,) = results
    assert result.prompt_eval_count == 200
    assert result.duration == pytest.approx(load_time(EMBED) + 2 * 100 / 1000)


async def test_default_context_follows_vram_tiers() -> None:
    clock = ManualClock()
    small = Engine(ServerSettings(gpus=(GpuSpec(name="g", memory_gib=16),)), clock)
    mid = Engine(ServerSettings(gpus=(GPU24,)), clock)
    big = Engine(ServerSettings(gpus=(GPU24, GPU24)), clock)
    assert (small.default_ctx, mid.default_ctx, big.default_ctx) == (4096, 32768, 262144)


async def test_gpu_utilization_reflects_busy_time() -> None:
    engine, clock = make()
    start(engine, SMALL, num_predict=1)
    await clock.advance(10)
    assert engine.gpus()[0].utilization == 0.0
    start(engine, SMALL, num_predict=500)
    await clock.advance(1.5)
    assert engine.gpus()[0].utilization == pytest.approx(1.0)
    await clock.advance(10)
    assert engine.gpus()[0].utilization == 0.0
