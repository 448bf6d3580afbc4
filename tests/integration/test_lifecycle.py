"""Every way a request ends gives its slot back once: cancels at each await, kills, hangs, breaks.

Each test drives the real proxy over real sockets into emulated instances, ends a request at one
exact point of its life (waiting in the queue, waiting for headers, during the load, during a
non-streamed generation, mid-stream), then checks through ``/proxy/status`` and ``/metrics`` that
nothing is left in flight or reserved, and that the next request is served. Timeouts are the
shipped defaults unless a test says it is about a setting.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.farm import Farm, farm

MODEL = "llama3.2:1b"


async def status(box: Farm) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(box.url + "/proxy/status") as r:
        data: dict[str, Any] = await r.json()
        return data


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def nothing_left(box: Farm) -> bool:
    """No slot held, no load reserved and nobody queued, as the proxy and its gauges say."""
    data = await status(box)
    held = sum(i["inflight_total"] for i in data["instances"])
    loading = [m for i in data["instances"] for m in i["loading"]]
    gauges = sum(box.sample("ollamux_inflight", {"backend": i["name"]}) for i in data["instances"])
    return held == 0 and not loading and data["queued"] == 0 and gauges == 0


async def assert_recovered(box: Farm, model: str = MODEL) -> None:
    await wait_for(lambda: nothing_left(box))
    reply = await asyncio.wait_for(
        box.ollama().generate(model=model, prompt="next", options={"num_predict": 2}), timeout=30
    )
    assert reply.eval_count == 2
    await wait_for(lambda: nothing_left(box))


async def start(box: Farm, body: dict[str, Any], path: str = "/api/generate") -> asyncio.Task[Any]:
    """A request in its own task, to be cancelled (the client hangs up) at a chosen point."""

    async def send() -> bytes:
        async with aiohttp.ClientSession() as s, s.post(box.url + path, json=body) as r:
            return await r.read()

    return asyncio.ensure_future(send())


async def hang_up(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def bound(box: Farm, n: int = 1) -> bool:
    data = await status(box)
    return sum(i["inflight_total"] for i in data["instances"]) >= n


async def warm(box: Farm, model: str = MODEL) -> str:
    await box.ollama().generate(model=model, prompt="", keep_alive=-1)
    return next(n for n, models in box.loaded().items() if model in models)


# --- a client that leaves, at each await between taking a slot and giving it back ----------------


async def test_leaving_while_queued_for_a_slot(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24,), num_parallel=1) as box:
        await warm(box)
        box.engines[0].faults.slow = 50.0  # real time: the first answer takes minutes
        long = {"model": MODEL, "prompt": "a", "options": {"num_predict": 100_000}}
        running = await start(box, long)
        await wait_for(lambda: bound(box))
        queued = await start(box, {**long, "prompt": "b"})

        async def waiting() -> bool:
            return (await status(box))["queued"] == 1

        await wait_for(waiting)
        await hang_up(queued)
        assert (await status(box))["queued"] == 0
        await hang_up(running)
        box.engines[0].faults.slow = 1.0
        await assert_recovered(box)


async def test_leaving_while_the_instance_has_not_answered(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24,), num_parallel=1) as box:
        holder = await warm(box)
        box.engine(holder).faults.hang = True  # accepts the request, never answers
        waiting = await start(box, {"model": MODEL, "prompt": "x", "stream": False})
        await wait_for(lambda: bound(box))
        await hang_up(waiting)
        box.engine(holder).faults.hang = False
        await assert_recovered(box)


async def test_leaving_during_the_load_drops_the_reservation(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24,), num_parallel=4) as box:
        box.engines[0].faults.slow = 100.0  # the load takes seconds
        body = {"model": MODEL, "prompt": "x", "options": {"num_predict": 4}}
        clients = [await start(box, {**body, "prompt": str(i)}) for i in range(4)]
        await wait_for(lambda: bound(box, 4))
        assert (await status(box))["instances"][0]["loading"] == [MODEL]
        for client in clients:
            await hang_up(client)
        box.engines[0].faults.slow = 1.0
        await assert_recovered(box)


async def test_leaving_during_a_non_streamed_generation(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24,), num_parallel=1) as box:
        await warm(box)
        box.engines[0].faults.slow = 50.0
        body = {"model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 10**5}}
        waiting = await start(box, body)
        await wait_for(lambda: bound(box))
        await asyncio.sleep(0.3)  # generating; the answer comes only at the end
        await hang_up(waiting)
        box.engines[0].faults.slow = 1.0
        await assert_recovered(box)
        assert box.waiting_inside() == 0


async def test_leaving_mid_stream(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24,), num_parallel=1) as box:
        await warm(box)
        box.engines[0].faults.slow = 50.0
        body = {"model": MODEL, "prompt": "x", "options": {"num_predict": 10**5}}
        async with aiohttp.ClientSession() as s, s.post(box.url + "/api/generate", json=body) as r:
            await r.content.readline()
        box.engines[0].faults.slow = 1.0
        await assert_recovered(box)


async def test_a_storm_of_clients_that_leave_leaks_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with farm(tmp_path, num_parallel=2) as box:
        models = [MODEL, "qwen2.5:7b", "llama3.1:8b"]
        tasks = []
        for i in range(60):
            body: dict[str, Any] = {
                "model": models[i % 3],
                "prompt": f"p{i}",
                "stream": i % 2 == 0,
                "options": {"num_predict": 2000},
            }
            tasks.append(await start(box, body))
            await asyncio.sleep(0.005)
            if i % 6:
                tasks[-1].get_loop().call_later(0.01 * (i % 7), tasks[-1].cancel)
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in models:
            await assert_recovered(box, model)
    unhandled = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not unhandled, unhandled[0].getMessage()


# --- instances that fail -------------------------------------------------------------------------


async def test_instance_killed_during_the_load_leaves_no_reservation(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24, 24)) as box:
        for engine in box.engines:
            engine.faults.slow = 100.0
        body = {"model": MODEL, "prompt": "x", "options": {"num_predict": 2}}
        clients = [await start(box, {**body, "prompt": str(i)}) for i in range(2)]
        await wait_for(lambda: bound(box, 2))
        loading = next(i["name"] for i in (await status(box))["instances"] if i["loading"])
        for engine in box.engines:
            engine.faults.slow = 1.0
        await box.servers[int(loading[-1])].close()
        answers = await asyncio.gather(*clients)
        assert all(json.loads(a.splitlines()[-1]).get("done") for a in answers)
        dead = next(i for i in (await status(box))["instances"] if i["name"] == loading)
        assert dead["loading"] == [] and dead["inflight_total"] == 0
        await assert_recovered(box)


async def test_a_hung_warm_instance_is_left_for_another_with_shipped_deadlines(
    tmp_path: Path,
) -> None:
    async with farm(tmp_path, gpus=(24, 24)) as box:
        holder = await warm(box)
        box.engine(holder).faults.hang = True
        reply = await box.ollama().generate(model=MODEL, prompt="hi", options={"num_predict": 2})
        assert reply.eval_count == 2
        assert box.sample("ollamux_upstream_errors_total", {"backend": holder, "kind": "timeout"})
        assert box.sample("ollamux_retries_total") == 1
        await wait_for(lambda: nothing_left(box))


async def test_a_hung_cold_instance_is_left_after_the_load_deadline(tmp_path: Path) -> None:
    """About timeouts.load and first_token: both short here, or the test would take minutes."""
    async with farm(tmp_path, gpus=(24, 24), timeouts={"load": 0.5, "first_token": 0.5}) as box:
        for engine in box.engines:
            engine.faults.hang = True
        waiting = await start(box, {"model": MODEL, "prompt": "x", "stream": False})
        await wait_for(lambda: bound(box))
        data = await status(box)
        cold = next(i["name"] for i in data["instances"] if i["inflight_total"])
        assert data["instances"][int(cold[-1])]["loading"] == [MODEL]
        other = next(e for i, e in enumerate(box.engines) if f"gpu{i}" != cold)
        other.faults.hang = False
        answer = json.loads(await asyncio.wait_for(waiting, 60))
        assert answer["done"]
        labels = {"backend": cold, "kind": "timeout"}
        assert box.sample("ollamux_upstream_errors_total", labels) == 1
        assert (await _instance(box, cold))["loading"] == []
        box.engine(cold).faults.hang = False
        await assert_recovered(box)


async def test_a_stream_that_stalls_is_cut_after_the_idle_deadline(tmp_path: Path) -> None:
    """About timeouts.idle: short here; the shipped 30 s is the same mechanism."""
    async with farm(tmp_path, gpus=(24,), timeouts={"idle": 0.5}) as box:
        await warm(box)
        # Tokens come every ~14 ms, so the answer cannot end (at the context's length) between
        # its first line and the stall, however loaded the machine is.
        box.engines[0].faults.slow = 200.0
        body = {"model": MODEL, "prompt": "x", "options": {"num_predict": 10**5}}
        async with aiohttp.ClientSession() as s, s.post(box.url + "/api/generate", json=body) as r:
            await r.content.readline()
            box.engines[0].faults.slow = 1e9  # the next token never comes; the socket stays open
            rest = await asyncio.wait_for(r.read(), 30)
        last = json.loads(rest.splitlines()[-1])
        assert "error" in last and "stopped answering" in last["error"]
        labels = {"backend": "gpu0", "kind": "midstream"}
        assert box.sample("ollamux_upstream_errors_total", labels) == 1
        box.engines[0].faults.slow = 1.0
        await wait_for(lambda: nothing_left(box))


async def test_a_long_non_streamed_answer_is_not_cut(tmp_path: Path) -> None:
    """The whole answer takes longer than the first-token deadline; chunks keep it alive."""
    async with farm(tmp_path, gpus=(24,), num_parallel=1) as box:
        await warm(box)
        box.engines[0].faults.slow = 50.0  # the farm's 50x compression undone: real time
        body = {"model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 3000}}
        status_code, raw = await asyncio.wait_for(
            _post(box.url + "/api/generate", body), timeout=60
        )
        answer = json.loads(raw)
        assert status_code == 200 and answer["done"] and answer["eval_count"] == 3000
        assert box.sample("ollamux_retries_total") == 0


async def test_streams_that_keep_breaking_eject_their_instance(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24, 24)) as box:
        holder = await warm(box)
        other = "gpu1" if holder == "gpu0" else "gpu0"
        box.engine(holder).faults.die_after_tokens = 3
        body = {"model": MODEL, "prompt": "x", "options": {"num_predict": 10}}
        cut = 0
        for i in range(12):
            code, raw = await _post(box.url + "/api/generate", {**body, "prompt": str(i)})
            lines = [json.loads(line) for line in raw.splitlines()]
            cut += "error" in lines[-1]
            assert code == 200
        errors = "ollamux_upstream_errors_total"
        broken = box.sample(errors, {"backend": holder, "kind": "midstream"})
        assert cut == broken <= 3
        assert box.sample(errors, {"backend": other, "kind": "midstream"}) == 0
        assert (await _instance(box, holder))["state"] == "ejected"


async def test_a_non_streamed_answer_that_breaks_is_retried_elsewhere(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24, 24)) as box:
        holder = await warm(box)
        box.engine(holder).faults.die_after_tokens = 3
        body = {"model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 10}}
        code, raw = await _post(box.url + "/api/generate", body)
        assert code == 200 and json.loads(raw)["eval_count"] == 10
        assert box.sample("ollamux_retries_total") == 1
        labels = {"backend": holder, "kind": "midstream"}
        assert box.sample("ollamux_upstream_errors_total", labels) == 1


async def test_up_to_three_instances_are_tried_before_giving_up(tmp_path: Path) -> None:
    async with farm(tmp_path) as box:
        for engine in box.engines:
            await box.ollama().generate(model=MODEL, prompt="", keep_alive=-1)
            engine.faults.fail_next = 1
        code, raw = await _post(box.url + "/api/generate", {"model": MODEL, "prompt": "x"})
        assert code == 500 and "error" in json.loads(raw)
        assert box.sample("ollamux_retries_total") == 2
        assert sorted(e.faults.fail_next for e in box.engines) == [0, 0, 0, 1]
        await assert_recovered(box)


async def test_errors_name_no_address_and_no_library(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24,)) as box:
        await warm(box)
        box.engines[0].faults.die_after_tokens = 2
        _, streamed = await _post(box.url + "/api/generate", {"model": MODEL, "prompt": "x"})
        await box.servers[0].close()
        code, failed = await _post(box.url + "/api/generate", {"model": MODEL, "prompt": "y"})
        assert code in (502, 503)
        for text in (streamed.splitlines()[-1], failed):
            message = json.loads(text)["error"]
            assert "127.0.0.1" not in message and "aiohttp" not in message
            assert "Error" not in message and "<" not in message


async def _post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return r.status, await r.read()


async def _instance(box: Farm, name: str) -> dict[str, Any]:
    return next(i for i in (await status(box))["instances"] if i["name"] == name)
