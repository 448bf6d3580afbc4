"""The proxy's edge: Host and Origin refused as Ollama refuses them, CORS answered as it answers.

Every refusal and every preflight is compared with the same request sent straight to an emulated
Ollama of the farm (bound to 127.0.0.1, like a stock Ollama).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.app import build_app
from proxy.config import Config, CorsConfig, config_from_dict
from proxy.errors import ConfigError
from tests.integration.farm import Farm, farm

MODEL = "llama3.2:1b"
EVIL = "https://evil.example"
PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}

Answer = tuple[int, bytes, dict[str, str]]


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Farm]:
    async with farm(tmp_path, gpus=(24, 24)) as f:
        yield f


def direct(box: Farm) -> str:
    return str(box.servers[0].make_url("")).rstrip("/")


async def call(
    url: str, method: str, path: str, headers: dict[str, str], data: bytes | None = None
) -> Answer:
    """Status, body and headers (all but Date) of one request."""
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url + path, headers=headers, data=data) as r,
    ):
        kept = {k: v for k, v in r.headers.items() if k != "Date"}
        return r.status, await r.read(), kept


@contextlib.asynccontextmanager
async def proxy(config: Config) -> AsyncIterator[str]:
    """A proxy built from ``config`` with build_app, served on 127.0.0.1 whatever its listen."""
    server = TestServer(build_app(config, registry=CollectorRegistry()), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def with_cors(config: Config, *origins: str) -> Config:
    return dataclasses.replace(config, cors=CorsConfig(origins=origins))


REQUESTS = [
    ("GET", "/api/tags", None),
    ("POST", "/api/chat", json.dumps({"model": MODEL, "messages": []}).encode()),
    ("POST", "/api/copy", json.dumps({"source": MODEL, "destination": "x"}).encode()),
    ("OPTIONS", "/api/chat", None),
]


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS)
async def test_a_foreign_host_is_refused_exactly_as_ollama_refuses_it(
    box: Farm, method: str, path: str, body: bytes | None
) -> None:
    headers = {"Host": "attacker.rebind.example:11434"}
    want = await call(direct(box), method, path, headers, body)
    got = await call(box.url, method, path, headers, body)
    assert got == want
    assert want[:2] == (403, b"")


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS)
async def test_a_foreign_origin_is_refused_exactly_as_ollama_refuses_it(
    box: Farm, method: str, path: str, body: bytes | None
) -> None:
    headers = {"Origin": EVIL, "Access-Control-Request-Method": "POST"}
    want = await call(direct(box), method, path, headers, body)
    got = await call(box.url, method, path, headers, body)
    assert got == want
    assert want[:2] == (403, b"")


async def test_the_machine_s_own_names_are_allowed_hosts(box: Farm) -> None:
    for host in (socket.gethostname(), "localhost:11434", "box.local", "[::1]:11434", "10.1.2.3"):
        status, _, _ = await call(box.url, "GET", "/api/version", {"Host": host})
        assert status == 200, host


@pytest.mark.parametrize(
    "path", ["/api/chat", "/v1/chat/completions", "/proxy/instances/gpu0/drain"]
)
async def test_a_preflight_is_answered_with_ollama_s_headers_on_every_path(
    box: Farm, path: str
) -> None:
    want = await call(direct(box), "OPTIONS", "/api/chat", PREFLIGHT)
    got = await call(box.url, "OPTIONS", path, PREFLIGHT)
    assert got == want
    assert want[0] == 204
    assert want[2]["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "POST" in want[2]["Access-Control-Allow-Methods"]
    assert "Content-Type" in want[2]["Access-Control-Allow-Headers"]
    assert (await instances(box.url))["gpu0"] == "up"  # the preflight drained nothing


async def test_allowed_origins_get_ollama_s_cors_headers(
    box: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_ORIGINS", " https://env-one.example , http://10.0.0.* ")
    config = with_cors(box.config, "https://webui.example.com")
    origins = [
        "http://localhost:3000",
        "chrome-extension://abcdef",
        "https://webui.example.com",  # cors.origins
        "https://env-one.example",  # OLLAMA_ORIGINS
        "http://10.0.0.7:8080",  # OLLAMA_ORIGINS, wildcard
    ]
    async with proxy(config) as url:
        for origin in origins:
            status, _, headers = await call(url, "GET", "/api/tags", {"Origin": origin})
            assert status == 200, origin
            assert headers["Access-Control-Allow-Origin"] == origin
            assert headers["Vary"] == "Origin"
        for origin in origins[:2]:  # Ollama's defaults: the same headers as Ollama sends
            want = await call(direct(box), "GET", "/api/version", {"Origin": origin})
            got = await call(url, "GET", "/api/version", {"Origin": origin})
            assert got[0] == want[0] == 200
            for name in ("Access-Control-Allow-Origin", "Vary"):
                assert got[2][name] == want[2][name]
        payload = json.dumps({"model": MODEL, "prompt": "hi", "options": {"num_predict": 3}})
        status, body, headers = await call(  # a stream carries them too
            url, "POST", "/api/generate", {"Origin": origins[2]}, payload.encode()
        )
        assert status == 200 and b'"done":true' in body
        assert headers["Access-Control-Allow-Origin"] == origins[2]
        status, _, _ = await call(url, "GET", "/api/tags", {"Origin": "https://env-two.example"})
        assert status == 403


async def test_a_cross_site_form_post_drains_nothing_and_copies_nothing(box: Farm) -> None:
    form = {"Origin": EVIL, "Content-Type": "text/plain"}
    status, body, _ = await call(box.url, "POST", "/proxy/instances/gpu1/drain", form)
    assert (status, body) == (403, b"")
    copy = json.dumps({"source": MODEL, "destination": "pwned-by-website"}).encode()
    status, body, _ = await call(box.url, "POST", "/api/copy", form, copy)
    assert (status, body) == (403, b"")
    status, body, _ = await call(box.url, "POST", "/api/delete", form, copy)
    assert (status, body) == (403, b"")
    assert await instances(box.url) == {"gpu0": "up", "gpu1": "up"}
    status, body, _ = await call(direct(box), "GET", "/api/tags", {})
    names = {m["name"] for m in json.loads(body)["models"]}
    assert MODEL in names and not any(n.startswith("pwned") for n in names)


async def test_listening_on_all_interfaces_skips_the_host_check_but_not_origin(box: Farm) -> None:
    config = dataclasses.replace(box.config, listen="0.0.0.0:1")
    async with proxy(config) as url:
        status, body, _ = await call(url, "GET", "/api/version", {"Host": "ollama.example.com"})
        assert status == 200 and b"version" in body
        status, body, _ = await call(url, "GET", "/api/version", {"Origin": EVIL})
        assert (status, body) == (403, b"")


def test_a_bad_cors_origin_is_a_config_error_naming_the_field() -> None:
    raw = {"cors": {"origins": ["https://ok.example", "webui.example.com"]}}
    with pytest.raises(ConfigError, match=r"c\.yaml: cors\.origins\[1\]: 'webui\.example\.com'"):
        config_from_dict(raw, source="c.yaml")
    with pytest.raises(ConfigError, match=r"cors\.origins\[0\]: .* more than one '\*'"):
        config_from_dict({"cors": {"origins": ["http://*.example:*"]}})


def test_a_bad_ollama_origins_entry_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLLAMA_ORIGINS", "https://ok.example,webui.example.com")
    with pytest.raises(ConfigError, match=r"environment: OLLAMA_ORIGINS: 'webui\.example\.com'"):
        build_app(config_from_dict({"instances": []}))


async def instances(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/proxy/instances") as r:
        assert r.status == 200
        return {i["name"]: i["state"] for i in (await r.json())["instances"]}
