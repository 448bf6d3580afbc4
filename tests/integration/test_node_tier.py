"""Fronts in front of nodes: each node an ollamux over its own emulated GPUs, each front an
ollamux whose instances are the nodes (``launcher: node``), all on 127.0.0.1 sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.api.clients import runner_options
from proxy.app import build_app
from proxy.config import config_from_dict
from proxy.errors import ConfigError
from proxy.keystore import add_key
from tests.integration.farm import Farm, farm

MODELS = ("llama3.2:1b", "llama3.2:3b", "qwen2.5:7b")


@contextlib.asynccontextmanager
async def front(nodes: list[Farm], *, api_key: str = "") -> AsyncIterator[str]:
    """An ollamux whose instances are ``nodes``; yields its URL."""
    key = {"api_key": api_key} if api_key else {}
    raw = {
        "instances": [
            {"name": f"node{i}", "launcher": "node", "url": box.url, **key}
            for i, box in enumerate(nodes)
        ],
        "timeouts": {"health_interval": 0.1, "health_timeout": 1.0, "connect": 1.0},
    }
    config = config_from_dict(raw, source="test")
    server = TestServer(build_app(config, registry=CollectorRegistry()), host="127.0.0.1")
    await server.start_server(**runner_options(config.limits))
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def chat(session: aiohttp.ClientSession, url: str, model: str, i: int) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"hello {i}"}],
        "options": {"num_predict": 30},
    }
    async with session.post(url + "/api/chat", json=body) as resp:
        assert resp.status == 200, await resp.text()
        lines = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
    assert lines[-1]["done"] and lines[-1]["eval_count"] == 30
    return lines[-1]


async def test_two_fronts_over_two_nodes_serve_a_burst_without_waiting_inside_ollama(
    tmp_path: Path,
) -> None:
    async with (
        farm(tmp_path / "a", gpus=(24, 24), num_parallel=2) as node_a,
        farm(tmp_path / "b", gpus=(24, 24), num_parallel=2) as node_b,
        front([node_a, node_b]) as front_1,
        front([node_a, node_b]) as front_2,
    ):
        waited_inside = 0
        done = asyncio.Event()

        async def watch() -> None:  # requests queued inside an emulated Ollama, at any moment
            nonlocal waited_inside
            while not done.is_set():
                waited_inside = max(
                    waited_inside, node_a.waiting_inside() + node_b.waiting_inside()
                )
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        async with aiohttp.ClientSession() as session:
            replies = await asyncio.gather(
                *(chat(session, (front_1, front_2)[i % 2], MODELS[i % 3], i) for i in range(24))
            )
            done.set()
            await watcher
            assert len(replies) == 24
            served = {}
            for name, box in (("a", node_a), ("b", node_b)):
                async with session.get(box.url + "/proxy/status") as resp:
                    status = await resp.json()
                served[name] = sum(sum(i["reasons"].values()) for i in status["instances"])
            assert served["a"] > 0 and served["b"] > 0, served  # both boxes took work
            assert waited_inside == 0  # the nodes bound every request to a free slot
            async with session.get(front_1 + "/proxy/status") as resp:
                status = await resp.json()
            assert {i["name"] for i in status["instances"]} == {"node0", "node1"}
            assert all(i["state"] == "up" and i["lacks"] == [] for i in status["instances"])
            async with session.get(front_1 + "/api/tags") as resp:
                names = {m["name"] for m in (await resp.json())["models"]}
            assert set(MODELS) <= names


async def test_a_node_takes_no_settings_of_its_own() -> None:
    for key, value in (("num_parallel", 2), ("gpu_source", "http://x:1"), ("port", 5)):
        raw = {
            "instances": [{"name": "n", "launcher": "node", "url": "http://x:11434", key: value}]
        }
        try:
            config_from_dict(raw)
        except ConfigError as exc:
            assert f"instances[0].{key}" in str(exc) and "launcher node" in str(exc)
        else:
            raise AssertionError(f"{key} was accepted for a node")


async def test_a_node_that_dies_mid_burst_loses_nothing_that_had_not_started(
    tmp_path: Path,
) -> None:
    async with (
        farm(tmp_path / "a", gpus=(24, 24), num_parallel=2) as node_a,
        farm(tmp_path / "b", gpus=(24, 24), num_parallel=2) as node_b,
        front([node_a, node_b]) as url,
    ):
        body = {"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}]}
        body["options"] = {"num_predict": 200}

        async def one(session: aiohttp.ClientSession) -> tuple[int, list[dict[str, Any]]]:
            async with session.post(url + "/api/chat", json=body) as resp:
                raw = await resp.read()
            return resp.status, [json.loads(x) for x in raw.splitlines() if x.strip()]

        async with aiohttp.ClientSession() as session:
            burst = [asyncio.ensure_future(one(session)) for _ in range(16)]
            await asyncio.sleep(0.3)
            await node_b.proxy_server.close()  # box b goes away, streams and all
            results = await asyncio.gather(*burst)
        for status, lines in results:
            assert status == 200, lines  # none that had not started was lost
            if "error" in lines[-1]:  # broken mid-stream: it had started on box b
                assert len(lines) > 1 and "error" not in lines[0]
            else:
                assert lines[-1]["done"] and lines[-1]["eval_count"] == 200
        finished = sum(1 for _, lines in results if "error" not in lines[-1])
        assert finished >= 8  # box a's share at least


async def test_a_front_reaches_nodes_that_need_a_key_with_its_own(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "front")
    auth = {"keys_file": str(keys), "protect_status": True}
    async with (
        farm(tmp_path / "a", gpus=(24,), auth=auth) as node,
        front([node], api_key=key) as url,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(node.url + "/proxy/node") as resp:
            assert resp.status == 401  # the node is closed without a key
        reply = await chat(session, url, MODELS[0], 0)  # the client sends no key at all
        assert reply["done"]
        async with session.get(url + "/proxy/status") as resp:
            (entry,) = (await resp.json())["instances"]
        assert entry["state"] == "up" and MODELS[0] in entry["models"]
