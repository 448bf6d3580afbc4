"""API keys through real sockets: the proxy over the emulated farm with ``auth.keys_file`` set."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import ollama
import openai
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.api import auth
from proxy.app import build_app
from proxy.config import config_from_dict
from proxy.errors import ConfigError
from proxy.keystore import add_key, revoke_key
from tests.integration.farm import Farm, farm
from tests.processes import REPO, ollamux_env

MODEL = "llama3.2:1b"
OTHER = "qwen2.5:0.5b"
NO_KEY = "unauthorized: this server needs an API key; send the header Authorization: Bearer <key>"
BAD_KEY = "unauthorized: the API key is not valid (mistyped, or revoked)"
CHAT = {"model": MODEL, "stream": False, "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 2}}  # fmt: skip
V1_CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Keyed:
    box: Farm
    path: Path
    full: str
    limited: str
    inference: str


@pytest.fixture
async def keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Keyed]:
    monkeypatch.setattr(auth, "POLL_INTERVAL", 0.05)  # reloads within a test's patience
    path = tmp_path / "keys.yaml"
    full = add_key(path, "webui")
    limited = add_key(path, "small", models=[MODEL])
    inference = add_key(path, "bot", inference_only=True)
    async with farm(tmp_path, auth={"keys_file": str(path)}) as box:
        yield Keyed(box, path, full, limited, inference)


async def call(
    url: str, method: str, path: str, key: str | None = None, payload: object = None, **kw: str
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    headers.update(kw)
    data = None if payload is None else json.dumps(payload).encode()
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url + path, data=data, headers=headers) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def test_no_key_gets_401_in_ollamas_and_openais_shape(keyed: Keyed) -> None:
    url = keyed.box.url
    status, headers, body = await call(url, "POST", "/api/chat", payload=CHAT)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {"error": NO_KEY}
    status, headers, body = await call(url, "POST", "/v1/chat/completions", payload=V1_CHAT)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(body) == {
        "error": {"message": NO_KEY, "type": "api_error", "param": None, "code": None}
    }
    status, _, body = await call(url, "GET", "/api/tags", keyed.full + "x")
    assert status == 401 and json.loads(body) == {"error": BAD_KEY}
    status, _, body = await call(url, "GET", "/api/tags", Authorization="Basic " + keyed.full)
    assert status == 401 and json.loads(body) == {"error": NO_KEY}
    for path in ("/api/version", "/api/ps", "/nothing/here"):
        assert (await call(url, "GET", path))[0] == 401
    assert keyed.box.sample("ollamux_auth_refused_total", {"reason": "no_key"}) == 6


async def test_right_key_passes_and_health_probes_stay_open(
    keyed: Keyed, caplog: pytest.LogCaptureFixture
) -> None:
    url = keyed.box.url
    with caplog.at_level(logging.INFO, logger="ollamux.access"):
        status, _, body = await call(url, "POST", "/api/chat", keyed.full, CHAT)
        assert status == 200 and json.loads(body)["done"]
    line = next(r.getMessage() for r in caplog.records if "path=/api/chat" in r.getMessage())
    assert line.endswith(" key=webui") and keyed.full not in caplog.text
    status, _, _ = await call(url, "GET", "/api/tags", Authorization="bEaReR " + keyed.full)
    assert status == 200  # the scheme in any case
    for method in ("GET", "HEAD"):
        status, _, body = await call(url, method, "/")
        assert status == 200 and body == (b"Ollama is running" if method == "GET" else b"")
    for path in ("/proxy/status", "/proxy/instances", "/metrics"):
        assert (await call(url, "GET", path))[0] == 200  # auth.protect_status is off
    assert keyed.box.sample("ollamux_key_requests_total", {"key": "webui"}) == 2
    assert keyed.box.sample("ollamux_key_requests_total", {"key": "anonymous"}) == 5


async def test_official_clients_send_the_key(keyed: Keyed) -> None:
    native = ollama.AsyncClient(
        host=keyed.box.url, headers={"Authorization": f"Bearer {keyed.full}"}
    )
    compat = openai.AsyncOpenAI(base_url=keyed.box.url + "/v1", api_key=keyed.full)
    keyed.box.clients += [native, compat]
    reply = await native.chat(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3}
    )
    assert reply.done and reply.eval_count == 3
    assert MODEL in {m.model for m in (await native.list()).models}
    done = await compat.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert done.usage is not None and done.usage.completion_tokens == 3
    refused = openai.AsyncOpenAI(base_url=keyed.box.url + "/v1", api_key="olx_wrong")
    keyed.box.clients.append(refused)
    with pytest.raises(openai.AuthenticationError):
        await refused.models.list()
    bare = ollama.AsyncClient(host=keyed.box.url)
    keyed.box.clients.append(bare)
    with pytest.raises(ollama.ResponseError) as caught:
        await bare.list()
    assert caught.value.status_code == 401 and caught.value.error == NO_KEY


async def test_a_revoked_key_is_refused_without_a_restart(
    keyed: Keyed, caplog: pytest.LogCaptureFixture
) -> None:
    url = keyed.box.url
    assert (await call(url, "GET", "/api/tags", keyed.full))[0] == 200
    revoke_key(keyed.path, "webui")

    async def refused() -> bool:
        return (await call(url, "GET", "/api/tags", keyed.full))[0] == 401

    await wait_async(refused)
    assert (await call(url, "GET", "/api/tags", keyed.inference))[0] == 200
    assert keyed.box.sample("ollamux_key_requests_total", {"key": "webui"}) == 0  # series gone
    with caplog.at_level(logging.ERROR, logger="ollamux.auth"):
        keyed.path.write_text("keys: [broken\n")
        await wait_async(lambda: "API keys not reloaded" in caplog.text)
    assert f"{keyed.path}: line 2: not valid YAML" in caplog.text
    assert (await call(url, "GET", "/api/tags", keyed.inference))[0] == 200  # kept in force
    assert (await call(url, "GET", "/api/tags", keyed.full))[0] == 401


async def test_a_model_limited_key_sees_and_uses_only_its_models(keyed: Keyed) -> None:
    url, key = keyed.box.url, keyed.limited
    status, _, body = await call(url, "POST", "/api/chat", key, {**CHAT, "model": OTHER})
    assert status == 403
    assert json.loads(body) == {
        "error": f"forbidden: the API key 'small' may not use the model '{OTHER}'"
    }
    status, _, body = await call(
        url, "POST", "/v1/chat/completions", key, {**V1_CHAT, "model": OTHER}
    )
    assert status == 403 and json.loads(body)["error"]["message"].endswith(f"'{OTHER}'")
    assert (await call(url, "POST", "/api/chat", key, CHAT))[0] == 200
    assert (await call(url, "POST", "/v1/chat/completions", key, V1_CHAT))[0] == 200
    tricks: list[object] = [
        {**CHAT, "Model": OTHER},  # Ollama matches JSON keys case-insensitively
        {"model": MODEL, "name": OTHER},
        {"source": MODEL, "destination": OTHER},
    ]
    for trick in tricks:
        assert (await call(url, "POST", "/api/chat", key, trick))[0] == 403
    assert (await call(url, "GET", f"/v1/models/{OTHER}", key))[0] == 403
    status, _, body = await call(url, "GET", "/api/tags", key)
    assert status == 200 and [m["name"] for m in json.loads(body)["models"]] == [MODEL]
    status, _, body = await call(url, "GET", "/v1/models", key)
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [MODEL]
    status, _, body = await call(url, "GET", "/api/tags", keyed.full)
    assert len(json.loads(body)["models"]) > 1  # the full key sees every model


async def test_an_inference_only_key_cannot_manage_models(keyed: Keyed) -> None:
    url, key = keyed.box.url, keyed.inference
    for path, payload in (
        ("/api/pull", {"model": OTHER}),
        ("/api/copy", {"source": MODEL, "destination": "mine:1b"}),
        ("/api/delete", {"model": MODEL}),
    ):
        method = "DELETE" if path == "/api/delete" else "POST"
        status, _, body = await call(url, method, path, key, payload)
        assert status == 403 and "is for inference only" in json.loads(body)["error"]
    status, _, body = await call(url, "GET", "/api/tags", keyed.full)
    assert "mine:1b" not in {m["name"] for m in json.loads(body)["models"]}  # nothing copied
    assert (await call(url, "POST", "/api/chat", key, CHAT))[0] == 200
    assert (await call(url, "POST", "/api/show", key, {"model": MODEL}))[0] == 200
    assert (await call(url, "POST", "/api/copy", keyed.full,
                       {"source": MODEL, "destination": "mine:1b"}))[0] == 200  # fmt: skip


async def test_protect_status_puts_status_behind_a_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "ops", inference_only=True)
    async with farm(tmp_path, auth={"keys_file": str(path), "protect_status": True}) as box:
        for target in ("/proxy/status", "/proxy/instances", "/metrics"):
            assert (await call(box.url, "GET", target))[0] == 401
            assert (await call(box.url, "GET", target, key))[0] == 200
        assert (await call(box.url, "GET", "/"))[0] == 200
        status, _, _ = await call(box.url, "POST", "/proxy/instances/gpu0/drain", key)
        assert status == 403  # a limited key is no admin credential


def test_a_malformed_key_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  webui: {sha256: nothex}\n")
    config = config_from_dict(
        {"instances": [], "auth": {"keys_file": str(path)}}, source="ollamux.yaml"
    )
    with pytest.raises(ConfigError) as caught:
        build_app(config, registry=CollectorRegistry())
    assert (
        str(caught.value) == f"{path}: keys.webui.sha256: must be 64 hex digits (the key's SHA-256)"
    )


def test_keys_command_add_list_revoke(tmp_path: Path) -> None:
    config = tmp_path / "ollamux.yaml"
    config.write_text("auth:\n  keys_file: keys.yaml\n")

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", "keys", *args],
            cwd=REPO, env=ollamux_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    added = keys("add", "webui", "--config", str(config), "--models", "llama3.2,qwen3:8b")
    assert added.returncode == 0 and added.stdout.startswith("olx_")
    key = added.stdout.strip()
    assert "only time the key is shown" in added.stderr
    assert key not in (tmp_path / "keys.yaml").read_text()
    again = keys("add", "webui", "--config", str(config))
    assert again.returncode == 1 and "a key named 'webui' exists already" in again.stderr
    assert keys("add", "bot", "--config", str(config), "--inference-only").returncode == 0
    listed = keys("list", "--config", str(config))
    assert listed.returncode == 0 and key not in listed.stdout
    assert listed.stdout.splitlines()[0].split() == [
        "NAME",
        "MODELS",
        "INFERENCE",
        "ONLY",
        "CREATED",
    ]
    assert listed.stdout.splitlines()[1].split()[:3] == ["webui", "llama3.2:latest,qwen3:8b", "no"]
    assert listed.stdout.splitlines()[2].split()[:3] == ["bot", "(all)", "yes"]
    revoked = keys("revoke", "webui", "--config", str(config))
    assert revoked.returncode == 0 and "revoked the key 'webui'" in revoked.stdout
    as_json = json.loads(keys("list", "--json", "--config", str(config)).stdout)
    assert [k["name"] for k in as_json] == ["bot"] and "sha256" not in as_json[0]
    unknown = keys("revoke", "webui", "--config", str(config))
    assert unknown.returncode == 1 and "no key named 'webui'" in unknown.stderr
    unset = keys("list")
    assert unset.returncode == 2 and "auth.keys_file: is not set" in unset.stderr
    bad = keys("add", "two words", "--config", str(config))
    assert bad.returncode == 2 and "cannot name a key" in bad.stderr
    assert "Traceback" not in unset.stderr + bad.stderr + unknown.stderr
    assert keys("add").returncode == 2  # NAME missing: argparse's usage error


async def wait_async(check: object, timeout: float = 10.0) -> None:
    """Until the async (or plain) predicate holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_the_key_is_not_passed_to_the_instances(
    keyed: Keyed, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.forward

    seen: list[dict[str, str]] = []
    original = proxy.forward.upstream_headers

    def spy(headers: object, replace: object = None) -> object:
        sent = original(headers, replace)  # type: ignore[arg-type]
        seen.append(dict(sent))  # what goes upstream
        return sent

    monkeypatch.setattr(proxy.forward, "upstream_headers", spy)
    assert (await call(keyed.box.url, "POST", "/api/chat", keyed.full, CHAT))[0] == 200
    assert (await call(keyed.box.url, "POST", "/api/show", keyed.limited, {"model": MODEL}))[
        0
    ] == 200
    assert len(seen) == 2 and not any("Authorization" in h for h in seen)


async def test_protected_status_takes_a_key_or_the_admin_token(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "ops")
    admin = "a" * 32
    raw = {
        "instances": [],
        "admin_token": admin,
        "auth": {"keys_file": str(path), "protect_status": True},
    }
    config = config_from_dict(raw, source="ollamux.yaml")
    server = TestServer(build_app(config, registry=CollectorRegistry()), host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        assert (await call(url, "GET", "/proxy/instances"))[0] == 401
        assert (await call(url, "GET", "/proxy/instances", admin))[0] == 200
        assert (await call(url, "GET", "/proxy/status", key))[0] == 200
        assert (await call(url, "GET", "/api/tags", admin))[0] == 401  # admin is not an API key

        async def status(env: dict[str, str]) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "status", "--json", "--url", url,
                cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode or 0, (out + err).decode()

        code, text = await status(ollamux_env())
        assert code == 1 and "answered 401" in text
        code, text = await status({**ollamux_env(), "OLLAMUX_API_KEY": key})
        assert code == 0 and json.loads(text)["instances"] == []
    finally:
        await server.close()
