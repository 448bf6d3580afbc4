"""The proxy in front of four emulated GPUs, through real sockets and the official clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import aiohttp
import pytest

from tests.integration.farm import Farm, farm

MODEL = "llama3.2:1b"


async def post(url: str, path: str, payload: object | bytes, **kw: object) -> tuple[int, bytes]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with aiohttp.ClientSession() as s, s.post(url + path, data=data, **kw) as r:  # type: ignore[arg-type]
        return r.status, await r.read()


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def box(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with farm(tmp_path) as f:
        yield f


async def test_native_api_through_the_proxy_with_the_ollama_client(box: Farm) -> None:
    client = box.ollama()
    async with aiohttp.ClientSession() as s, s.get(box.url + "/api/version") as r:
        assert await r.json() == {"version": "0.32.15"}
    names = {m.model for m in (await client.list()).models}
    assert MODEL in names and "nomic-embed-text:latest" in names
    assert len(names) == len({m.model for m in (await client.list()).models})  # deduplicated
    reply = await client.chat(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 8}
    )
    assert reply.done and reply.eval_count == 8 and reply.message.content
    chunks = [
        c
        async for c in await client.generate(
            model=MODEL, prompt="hello", stream=True, options={"num_predict": 5}
        )
    ]
    assert chunks[-1].done and chunks[-1].eval_count == 5 and len(chunks) == 6
    embed = await client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(embed.embeddings) == 2 and len(embed.embeddings[0]) == 768
    legacy = await client.embeddings(model="nomic-embed-text", prompt="a")
    assert len(legacy.embedding) == 768
    shown = await client.show(MODEL)
    assert shown.details is not None and shown.details.family == "llama"
    running = await client.ps()
    assert {m.model for m in running.models} >= {MODEL, "nomic-embed-text:latest"}
    async with aiohttp.ClientSession() as s, s.get(box.url + "/api/ps") as r:
        entries = (await r.json())["models"]
    assert all(e["instance"].startswith("gpu") and e["gpus"] for e in entries)
    async with aiohttp.ClientSession() as s, s.head(box.url + "/") as r:
        assert r.status == 200


async def test_openai_api_through_the_proxy(box: Farm) -> None:
    client = box.openai()
    done = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6
    )
    assert done.choices[0].message.content and done.usage and done.usage.completion_tokens == 6
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    parts = [c async for c in stream]
    assert parts[-1].choices[0].finish_reason == "length"
    completion = await client.completions.create(model=MODEL, prompt="say", max_tokens=3)
    assert completion.choices[0].text
    vectors = await client.embeddings.create(model="nomic-embed-text", input=["x"])
    assert len(vectors.data[0].embedding) == 768
    listed = await client.models.list()
    ids = [m.id for m in listed.data]
    assert MODEL in ids and len(ids) == len(set(ids))


async def test_pull_delete_copy_reach_the_shared_store(box: Farm) -> None:
    client = box.ollama()
    await client.copy(MODEL, "mine:latest")
    assert "mine:latest" in {m.model for m in (await client.list()).models}
    reply = await client.generate(model="mine", prompt="hi", options={"num_predict": 2})
    assert reply.eval_count == 2
    await client.delete("mine:latest")
    assert "mine:latest" not in {m.model for m in (await client.list()).models}
    statuses = [p.status async for p in await client.pull(MODEL, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"


async def test_concurrent_pulls_of_one_model_share_one_download(box: Farm) -> None:
    async def pull() -> list[str]:
        client = box.ollama()
        return [p.status or "" async for p in await client.pull(MODEL, stream=True)]

    first, second = await asyncio.gather(pull(), pull())
    assert first[-1] == second[-1] == "success"
    assert first == second  # the same progress lines: one upstream pull


async def test_eight_chats_spread_so_none_waits_inside_a_backend(box: Farm) -> None:
    client = box.ollama()
    await client.generate(model=MODEL, prompt="", keep_alive=-1)  # warm one instance
    peak_inside = 0

    async def watch() -> None:
        nonlocal peak_inside
        while True:
            peak_inside = max(peak_inside, box.waiting_inside())
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    replies = await asyncio.gather(
        *(
            client.chat(
                model=MODEL,
                messages=[{"role": "user", "content": f"q{i}"}],
                options={"num_predict": 400},
            )
            for i in range(8)
        )
    )
    watcher.cancel()
    assert all(r.eval_count == 400 for r in replies)
    assert peak_inside == 0
    served = {
        name: box.sample(
            "ollamux_requests_total",
            {"endpoint": "/api/chat", "model": MODEL, "backend": name, "code": "200"},
        )
        for name in ("gpu0", "gpu1", "gpu2", "gpu3")
    }
    assert sum(served.values()) == 8
    assert sum(1 for n in served.values() if n) >= 2  # a replica was loaded, not one queue


async def test_loaded_model_is_preferred_over_a_cold_load(box: Farm) -> None:
    client = box.ollama()
    await client.generate(model=MODEL, prompt="", keep_alive=-1)
    holder = [name for name, models in box.loaded().items() if MODEL in models]
    for _ in range(3):
        await client.generate(model=MODEL, prompt="hi", options={"num_predict": 2})
    assert [name for name, models in box.loaded().items() if MODEL in models] == holder
    assert (
        box.sample("ollamux_routing_decisions_total", {"policy": "vram_queue", "reason": "warm"})
        >= 3
    )


async def test_model_goes_where_its_vram_is_free(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24, 24, 48, 24)) as box:
        client = box.ollama()
        await client.generate(model="qwen2.5:32b", prompt="", keep_alive=-1)
        assert box.loaded()["gpu2"] == ["qwen2.5:32b"]  # 20 GB + KV fits only the 48 GiB card
        await client.generate(model="gemma3:27b", prompt="", keep_alive=-1)
        loaded = box.loaded()
        # the 48 GiB card still has the most free memory, but an empty card that fits is better
        assert loaded["gpu2"] == ["qwen2.5:32b"]
        assert sum(1 for models in loaded.values() if models == ["gemma3:27b"]) == 1


async def test_failure_before_first_byte_is_retried_elsewhere(box: Farm) -> None:
    client = box.ollama()
    for engine in box.engines:
        engine.faults.fail_next = 0
    await client.generate(model=MODEL, prompt="", keep_alive=-1)
    holder = next(n for n, models in box.loaded().items() if MODEL in models)
    box.engine(holder).faults.fail_next = 1
    reply = await client.generate(model=MODEL, prompt="hi", options={"num_predict": 3})
    assert reply.eval_count == 3
    assert box.sample("ollamux_retries_total") == 1


async def test_killed_instance_is_skipped(box: Farm) -> None:
    client = box.ollama()
    await client.generate(model=MODEL, prompt="", keep_alive=-1)
    holder = next(n for n, models in box.loaded().items() if MODEL in models)
    await box.servers[int(holder[-1])].close()
    replies = [
        await client.generate(model=MODEL, prompt="hi", options={"num_predict": 2})
        for _ in range(3)
    ]
    assert all(r.eval_count == 2 for r in replies)
    await wait_for(lambda: box.sample("ollamux_instance_up", {"backend": holder}) == 0)
    assert (await client.list()).models  # a dead instance does not stall the model list


async def test_mid_stream_failure_ends_with_ollama_error_line(box: Farm) -> None:
    for engine in box.engines:
        engine.faults.die_after_tokens = 2
    body = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 10}}
    status, raw = await post(box.url, "/api/generate", body)
    lines = [json.loads(line) for line in raw.splitlines()]
    assert status == 200 and "error" in lines[-1] and not any(x.get("done") for x in lines)


async def test_client_disconnect_frees_the_backend_slot(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24,), num_parallel=1) as box:
        body = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 100_000}}
        async with aiohttp.ClientSession() as s, s.post(box.url + "/api/generate", json=body) as r:
            await r.content.readline()
            # the client is gone; the emulator's only slot must come free at once
        reply = await asyncio.wait_for(
            box.ollama().generate(model=MODEL, prompt="next", options={"num_predict": 2}),
            timeout=5,
        )
        assert reply.eval_count == 2


async def test_queue_full_gives_503_with_retry_after(tmp_path: Path) -> None:
    async with farm(
        tmp_path, gpus=(24,), num_parallel=1, queue={"max_per_model": 1, "max_total": 1}
    ) as box:
        body = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 2000}, "stream": False}
        running = [asyncio.ensure_future(post(box.url, "/api/generate", body)) for _ in range(2)]
        await wait_for(
            lambda: (
                box.sample(
                    "ollamux_routing_decisions_total", {"policy": "vram_queue", "reason": "queued"}
                )
                >= 1
            )
        )
        async with aiohttp.ClientSession() as s, s.post(box.url + "/api/generate", json=body) as r:
            assert r.status == 503
            assert r.headers["Retry-After"].isdigit()
            assert "error" in await r.json()
        for task in running:
            task.cancel()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/chat", b"{not json"),
        ("POST", "/api/generate", b""),
        ("POST", "/api/generate", b'{"model": "no-such-model"}'),
        ("POST", "/api/chat", b'{"model": "no-such-model", "messages": []}'),
        ("POST", "/api/embed", b'{"model": "no-such-model", "input": "x"}'),
        ("POST", "/api/show", b'{"model": "no-such-model"}'),
        ("POST", "/api/chat", b'{"messages": []}'),
        ("POST", "/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user"}]}'),
        ("GET", "/api/chat", b""),
        ("GET", "/api/nothing-here", b""),
        ("DELETE", "/api/tags", b""),
    ],
)
async def test_errors_are_exactly_ollamas(box: Farm, method: str, path: str, body: bytes) -> None:
    direct = str(box.servers[0].make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as s:
        async with s.request(method, direct + path, data=body) as r:
            want = (r.status, await r.read(), r.content_type)
        async with s.request(method, box.url + path, data=body) as r:
            got = (r.status, await r.read(), r.content_type)
    assert got == want
    assert want[0] >= 400


async def test_model_names_match_case_insensitively_like_ollama(box: Farm) -> None:
    reply = await box.ollama().generate(
        model="LLAMA3.2:1B", prompt="hi", options={"num_predict": 2}
    )
    assert reply.eval_count == 2
    assert (
        box.sample(
            "ollamux_routing_decisions_total", {"policy": "vram_queue", "reason": "cold_fit"}
        )
        == 1
    )


async def test_create_push_and_blobs_go_through_to_the_shared_store(box: Farm) -> None:
    client = box.ollama()
    progress = [
        p.status
        async for p in await client.create(
            model="helper:latest", from_=MODEL, system="be brief", stream=True
        )
    ]
    assert progress[-1] == "success"
    assert "helper:latest" in {m.model for m in (await client.list()).models}
    reply = await client.chat(
        model="helper", messages=[{"role": "user", "content": "x"}], options={"num_predict": 2}
    )
    assert reply.eval_count == 2  # routed like any model once the lists show it
    pushed = [p.status async for p in await client.push("helper:latest", stream=True)]
    assert pushed[-1] == "success"
    digest = "sha256:" + "0" * 64
    async with aiohttp.ClientSession() as s, s.head(box.url + f"/api/blobs/{digest}") as r:
        assert r.status == 404
    data = b"layer bytes"
    real = "sha256:" + hashlib.sha256(data).hexdigest()
    async with aiohttp.ClientSession() as s:
        async with s.post(box.url + f"/api/blobs/{real}", data=data) as r:
            assert r.status == 201
        async with s.head(box.url + f"/api/blobs/{real}") as r:
            assert r.status == 200
