"""Fleets whose servers differ: each holds its own models and memory, and the proxy routes right.

Emulated servers keep separate stores (as servers on other hosts do); a model is removed from
some of them straight on the server, behind the proxy's back, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.api.clients import runner_options
from proxy.api.context import PROXY
from proxy.app import build_app
from proxy.balancer.monitor import Monitor
from proxy.config import config_from_dict
from tests.integration.farm import Farm, farm

ONLY_ONE = "llama3.2:3b"
"""Held by gpu2 alone in these tests."""
EVERYWHERE = "llama3.2:1b"


async def call(
    method: str, url: str, payload: object = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    data = None if payload is None else json.dumps(payload).encode()
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, data=data, headers=headers) as r,
    ):
        return r.status, await r.read()


async def status(box: Farm) -> dict[str, Any]:
    code, body = await call("GET", box.url + "/proxy/status")
    assert code == 200
    return json.loads(body)  # type: ignore[no-any-return]


def instance(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(i for i in report["instances"] if i["name"] == name)


async def remove_behind_the_proxy(box: Farm, model: str, names: list[str]) -> None:
    """Delete ``model`` straight on the servers ``names``, not through the proxy."""
    for name in names:
        server = box.servers[int(name.removeprefix("gpu"))]
        code, _ = await call(
            "DELETE", f"http://127.0.0.1:{server.port}/api/delete", {"model": model}
        )
        assert code == 200


def chat(model: str, *, stream: bool, session: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
        "options": {"num_predict": 4},
    }
    if session:
        body["chat_id"] = session
    return body


async def test_a_model_one_server_holds_is_served_there_even_when_the_lists_are_stale(
    tmp_path: Path,
) -> None:
    quiet = {"health_interval": 60}  # no poll re-reads the lists: only the 404s correct them
    async with farm(tmp_path, gpus=(24, 24, 24), stores="separate", timeouts=quiet) as box:
        # The proxy read every list at start: all three hold ONLY_ONE. Now two lose it.
        await remove_behind_the_proxy(box, ONLY_ONE, ["gpu0", "gpu1"])
        replies = await asyncio.gather(
            *(call("POST", box.url + "/api/chat", chat(ONLY_ONE, stream=s)) for s in [True] * 4),
            call("POST", box.url + "/api/chat", chat(ONLY_ONE, stream=False)),
            call("POST", box.url + "/api/generate", {"model": ONLY_ONE, "prompt": "hi"}),
            call(
                "POST",
                box.url + "/v1/chat/completions",
                {"model": ONLY_ONE, "messages": [{"role": "user", "content": "hi"}]},
            ),
        )
        for code, body in replies:
            assert code == 200, body
            assert b'"error"' not in body
        report = await status(box)
        served = [r for r in report["recent"] if r["model"] == ONLY_ONE and r["status"] == 200]
        assert len(served) == len(replies)
        assert {r["instance"] for r in served} == {"gpu2"}
        for name in ("gpu0", "gpu1"):  # the 404s corrected their lists and loaded nothing
            entry = instance(report, name)
            assert ONLY_ONE not in entry["models"]
            assert ONLY_ONE not in [m["name"] for m in entry["loaded"]]
        assert ONLY_ONE in instance(report, "gpu2")["models"]
        assert box.sample("ollamux_retries_total") >= 1  # at least one 404 was tried again
        for name in ("gpu0", "gpu1"):  # a stale list is not the server's fault
            assert (instance(report, name)["strikes"], instance(report, name)["state"]) == (0, "up")


async def test_show_and_other_model_requests_go_to_a_server_that_has_it(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24, 24, 24), stores="separate") as box:
        await remove_behind_the_proxy(box, ONLY_ONE, ["gpu0", "gpu1"])
        await box_refresh(box)
        for _ in range(3):
            code, body = await call("POST", box.url + "/api/show", {"model": ONLY_ONE})
            assert code == 200, body
            assert json.loads(body)["details"]["parameter_size"]
        code, body = await call("GET", box.url + f"/v1/models/{ONLY_ONE}")
        assert code == 200, body
        code, body = await call("GET", box.url + "/api/tags")  # the union of every store
        assert ONLY_ONE in {m["name"] for m in json.loads(body)["models"]}
        # A model nobody has: Ollama's own 404, from one of them.
        code, body = await call("POST", box.url + "/api/show", {"model": "nobody:has"})
        assert code == 404 and b"not found" in body


async def box_refresh(box: Farm) -> None:
    """Let the proxy re-read every model list now (as it does after a pull or a delete)."""
    await monitor_of(box).refresh_tags()


def monitor_of(box: Farm) -> Monitor:
    app = box.proxy_server.app
    assert app is not None
    monitor = app[PROXY].monitor
    assert monitor is not None
    return monitor


async def test_pull_and_delete_reach_every_store(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24, 24, 24), stores="separate") as box:
        await remove_behind_the_proxy(box, ONLY_ONE, ["gpu0", "gpu1", "gpu2"])
        await box_refresh(box)
        code, body = await call("POST", box.url + "/api/pull", {"model": ONLY_ONE})
        assert code == 200
        lines = [json.loads(line) for line in body.splitlines()]
        assert lines[-1] == {"status": "success"}
        assert sum(1 for line in lines if line.get("status") == "success") == 1
        for server in box.servers:  # every separate store got it
            code, body = await call("GET", f"http://127.0.0.1:{server.port}/api/tags")
            assert ONLY_ONE in {m["name"] for m in json.loads(body)["models"]}
        report = await status(box)
        assert all(ONLY_ONE in i["models"] for i in report["instances"])

        code, body = await call("DELETE", box.url + "/api/delete", {"model": ONLY_ONE})
        assert (code, body) == (200, b"")
        for server in box.servers:
            code, body = await call("GET", f"http://127.0.0.1:{server.port}/api/tags")
            assert ONLY_ONE not in {m["name"] for m in json.loads(body)["models"]}
        code, body = await call("DELETE", box.url + "/api/delete", {"model": ONLY_ONE})
        assert code == 404 and b"not found" in body  # now nobody has it: Ollama's answer
        code, body = await call("POST", box.url + "/api/chat", chat(ONLY_ONE, stream=False))
        assert code == 404 and b"not found" in body


async def test_copy_reaches_every_store_that_has_the_source(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24, 24, 24), stores="separate") as box:
        await remove_behind_the_proxy(box, ONLY_ONE, ["gpu0"])
        await box_refresh(box)
        copy = {"source": ONLY_ONE, "destination": "mine:latest"}
        code, _ = await call("POST", box.url + "/api/copy", copy)
        assert code == 200
        report = await status(box)
        holders = sorted(i["name"] for i in report["instances"] if "mine:latest" in i["models"])
        assert holders == ["gpu1", "gpu2"]


async def test_external_servers_with_an_agent_get_replicas(tmp_path: Path) -> None:
    async with farm(
        tmp_path, gpus=(24, 24, 24), stores="separate", launcher="external_agent", num_parallel=1
    ) as box:
        report = await status(box)
        for entry in report["instances"]:
            assert entry["memory_source"] == "agent" and entry["lacks"] == []
            assert entry["memory_total"] == 24 * 1024**3
        replies = await asyncio.gather(
            *(call("POST", box.url + "/api/chat", chat(EVERYWHERE, stream=True)) for _ in range(9))
        )
        assert all(code == 200 for code, _ in replies)
        report = await status(box)
        used = {r["instance"] for r in report["recent"] if r["model"] == EVERYWHERE}
        assert len(used) == 3, report["recent"]  # replicas on the other two, not one queue
        reasons = {r["reason"] for r in report["recent"] if r["model"] == EVERYWHERE}
        assert "evict" not in reasons


async def test_external_servers_without_memory_say_what_they_lack(tmp_path: Path) -> None:
    async with farm(
        tmp_path, gpus=(24, 24), stores="separate", launcher="external", num_parallel=1
    ) as box:
        report = await status(box)
        for entry in report["instances"]:
            assert entry["memory_source"] == "learned"
            assert entry["lacks"] == ["gpu memory"]
        replies = await asyncio.gather(
            *(call("POST", box.url + "/api/chat", chat(EVERYWHERE, stream=True)) for _ in range(6))
        )
        assert all(code == 200 for code, _ in replies)
        report = await status(box)
        recent = [r for r in report["recent"] if r["model"] == EVERYWHERE]
        assert {r["instance"] for r in recent} == {"gpu0", "gpu1"}  # empty servers take a replica
        assert "evict" not in {r["reason"] for r in recent}  # nothing was there to evict
        await monitor_of(box).check_all()  # an /api/ps poll: the most it held is its memory's floor
        report = await status(box)
        for entry in report["instances"]:
            assert entry["lacks"] == ["gpu memory readings (learned)"]
            assert entry["memory_capacity"] > 0


# --- a client that leaves while the proxy reads a "not found" answer -----------------------------


def stalling_server(sent: asyncio.Event) -> web.Application:
    """A server that lists MODEL but answers its chats with a 404 whose body never ends."""

    async def chat_404(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(status=404, headers={"Content-Type": "application/json"})
        await out.prepare(request)
        await out.write(b'{"error":"model ')
        sent.set()
        await asyncio.sleep(3600)
        return out

    def answer(data: object) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(data)

        return handler

    def answer_text(text: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(text=text)

        return handler

    app = web.Application()
    app.router.add_get("/", answer_text("Ollama is running"))
    app.router.add_get("/api/tags", answer({"models": [{"name": EVERYWHERE, "size": 1}]}))
    app.router.add_get("/api/ps", answer({"models": []}))
    app.router.add_get("/api/version", answer({"version": "0.32.15"}))
    app.router.add_post("/api/chat", chat_404)
    return app


async def test_leaving_while_a_not_found_answer_is_read_frees_the_slot() -> None:
    sent = asyncio.Event()
    stub = TestServer(stalling_server(sent), host="127.0.0.1")
    await stub.start_server()
    url = f"http://127.0.0.1:{stub.port}"
    config = config_from_dict(
        {"instances": [{"name": "stub", "launcher": "external", "url": url, "num_parallel": 1}]}
    )
    proxy_server = TestServer(build_app(config, registry=CollectorRegistry()), host="127.0.0.1")
    try:
        await proxy_server.start_server(**runner_options(config.limits))
        proxy_url = str(proxy_server.make_url("")).rstrip("/")
        client = asyncio.ensure_future(
            call("POST", proxy_url + "/api/chat", chat(EVERYWHERE, stream=True))
        )
        await asyncio.wait_for(sent.wait(), 10)
        await asyncio.sleep(0.2)  # the proxy has the headers and waits for the rest of the body
        client.cancel()
        await asyncio.gather(client, return_exceptions=True)
        for _ in range(100):
            _, body = await call("GET", proxy_url + "/proxy/status")
            (entry,) = json.loads(body)["instances"]
            if entry["inflight_total"] == 0 and not entry["loading"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"a slot or a reservation leaked: {entry}")
        assert (entry["strikes"], entry["state"]) == (0, "up")
    finally:
        await proxy_server.close()
        await stub.close()


# --- who waits for whom ------------------------------------------------------------------------


async def test_a_chat_waits_less_than_background_calls_and_users_take_turns(
    tmp_path: Path,
) -> None:
    async with farm(tmp_path, gpus=(24,), num_parallel=1) as box:
        await call("POST", box.url + "/api/generate", {"model": EVERYWHERE, "keep_alive": -1})
        box.engines[0].faults.slow = 30.0  # the first request holds the one slot for a while
        long = {**chat(EVERYWHERE, stream=True), "options": {"num_predict": 3000}}
        first = asyncio.ensure_future(call("POST", box.url + "/api/chat", long))
        await asyncio.sleep(0.3)

        def sent(body: dict[str, Any], user: str, tag: str) -> asyncio.Future[tuple[int, bytes]]:
            headers = {"X-OpenWebUI-User-Id": user, "X-Request-Id": tag}
            return asyncio.ensure_future(call("POST", box.url + "/api/chat", body, headers))

        waiting = [sent(chat(EVERYWHERE, stream=False), "flood", f"bg{i}") for i in range(3)]
        await asyncio.sleep(0.2)
        waiting += [sent(chat(EVERYWHERE, stream=True), "flood", f"fl{i}") for i in range(3)]
        await asyncio.sleep(0.2)
        waiting.append(sent(chat(EVERYWHERE, stream=True), "ann", "ann"))
        await asyncio.sleep(0.2)
        assert (await status(box))["queued"] == 7
        box.engines[0].faults.slow = 1.0
        for code, _ in await asyncio.gather(first, *waiting):
            assert code == 200
        report = await status(box)
        served = [r["request_id"] for r in reversed(report["recent"]) if r["request_id"] != "-"]
        order = [tag for tag in served if tag[:2] in ("bg", "fl", "an")]
        # streamed chats before the non-streamed calls; ann's turn right after the flood's first
        assert order == ["fl0", "ann", "fl1", "fl2", "bg0", "bg1", "bg2"], order


async def test_a_replica_loads_in_the_background_and_no_request_waits_for_its_load(
    tmp_path: Path,
) -> None:
    async with farm(tmp_path, gpus=(24, 24), num_parallel=1) as box:
        await call("POST", box.url + "/api/generate", {"model": EVERYWHERE, "keep_alive": -1})
        long = {**chat(EVERYWHERE, stream=True), "options": {"num_predict": 400}}
        replies = await asyncio.gather(
            *(call("POST", box.url + "/api/chat", long) for _ in range(8))
        )
        assert all(code == 200 for code, _ in replies)
        report = await status(box)
        recent = [r for r in report["recent"] if r["endpoint"] == "/api/chat"]
        assert len(recent) == 8
        assert {r["instance"] for r in recent} == {"gpu0", "gpu1"}  # the replica served too
        assert {r["reason"] for r in recent} <= {"warm", "affinity"}  # none bound to a load
        assert instance(report, "gpu1")["reasons"].get("scale_out") == 1
        assert sorted(box.loaded()["gpu1"]) == [EVERYWHERE]


async def test_a_model_that_spilled_is_known_by_the_size_it_needs_not_what_fitted(
    tmp_path: Path,
) -> None:
    async with farm(tmp_path, gpus=(4,)) as box:  # 4 GiB: llama3.1:8b spills to CPU memory
        code, _ = await call("POST", box.url + "/api/generate", {"model": "llama3.1:8b"})
        assert code == 200
        await monitor_of(box).check_all()
        code, body = await call("GET", box.url + "/api/ps")
        (entry,) = json.loads(body)["models"]
        assert entry["size"] > entry["size_vram"]  # it spilled
        app = box.proxy_server.app
        assert app is not None
        assert app[PROXY].book.estimate_size("llama3.1:8b") == entry["size"]


# --- what a node publishes for a front ----------------------------------------------------------


async def test_a_node_publishes_per_model_what_a_front_needs(tmp_path: Path) -> None:
    async with farm(tmp_path, gpus=(24, 24, 24), stores="separate", num_parallel=2) as box:
        await remove_behind_the_proxy(box, ONLY_ONE, ["gpu0", "gpu1"])
        await box_refresh(box)
        await call("POST", box.url + "/api/generate", {"model": EVERYWHERE, "keep_alive": -1})
        box.engines[0].faults.slow = 30.0  # the next request holds a slot while we look
        long = {**chat(EVERYWHERE, stream=True), "options": {"num_predict": 3000}}
        holding = asyncio.ensure_future(call("POST", box.url + "/api/chat", long))
        for _ in range(100):
            code, body = await call("GET", box.url + "/proxy/node")
            node = json.loads(body)
            if node["models"][EVERYWHERE]["busy"] == 1:
                break
            await asyncio.sleep(0.05)
        assert code == 200 and node["schema"] == 1
        assert node["instances"] == {"up": 3, "total": 3}
        warm = node["models"][EVERYWHERE]
        assert {k: warm[k] for k in ("held", "warm", "slots", "busy", "free", "queued")} == {
            "held": 3,
            "warm": 1,
            "slots": 2,
            "busy": 1,
            "free": 1,
            "queued": 0,
        }
        assert warm["load_s"] > 0 and warm["service_s"] > 0
        assert node["models"][ONLY_ONE]["held"] == 1 and node["models"][ONLY_ONE]["warm"] == 0
        box.engines[0].faults.slow = 1.0
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)
