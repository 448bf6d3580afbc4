"""A real Open WebUI 0.12.x on the proxy: its HTTP API, then its page in headless Chromium.

Open WebUI runs as a subprocess, started once for the module, from the command that
``OLLAMUX_OPENWEBUI`` names (``.ci/run`` installs it into a cached virtual environment and sets
it), else ``open-webui`` on PATH; the tests skip, saying so, when neither is there. It talks to
the farm's proxy over four emulated instances, keeps its state in a fresh ``DATA_DIR`` and runs
with every switch that keeps it off the network (no model downloads, no update checks).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from proxy.api.context import PROXY
from proxy.emulator import text
from tests.e2e.test_ui_browser import CHROMIUM, FLAGS
from tests.integration.farm import Farm, farm
from tests.processes import free_ports

MODEL = "llama3.2:1b"
OTHER = "qwen2.5:7b"
EMBED = "nomic-embed-text:latest"
START_S = 180
"""Bound on Open WebUI's start (about 20 s here; its first start compiles and migrates)."""
CALL_S = 60
"""Bound on each call through Open WebUI."""
WAIT_MS = 30_000
"""Bound on each wait for Open WebUI's page to show something."""
ANSWER_TOKENS = 24
"""Answers are cut at this many tokens (``max_tokens``, ``num_predict``), enough to stream."""
VOCABULARY = {word.lower() for word in text._WORDS} | {"."}  # the words it answers with


def open_webui_command() -> tuple[str | None, str]:
    """The ``open-webui`` command to run, or None and why not."""
    named = os.environ.get("OLLAMUX_OPENWEBUI", "")
    if named:
        if Path(named).is_file() and os.access(named, os.X_OK):
            return named, ""
        return None, f"OLLAMUX_OPENWEBUI={named} is not an executable file"
    found = shutil.which("open-webui")
    if found:
        return found, ""
    return None, (
        "needs Open WebUI 0.12.x: set OLLAMUX_OPENWEBUI to its `open-webui` command "
        "(.ci/run installs one with .ci/install-open-webui) or put `open-webui` on PATH"
    )


COMMAND, MISSING = open_webui_command()

pytestmark = [
    pytest.mark.openwebui,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(COMMAND is None, reason=MISSING),
]


@dataclass
class OpenWebUI:
    url: str
    token: str
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def offline_env(data_dir: Path, ollama_url: str, own_url: str) -> dict[str, str]:
    """Open WebUI's environment: the proxy as its one Ollama, no auth, nothing from the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "OPENAI_"))}
    env.update(
        DATA_DIR=str(data_dir),
        OLLAMA_BASE_URL=ollama_url,
        ENABLE_OLLAMA_API="True",
        ENABLE_OPENAI_API="False",
        WEBUI_AUTH="False",
        WEBUI_SECRET_KEY="ollamux-tests-" + "0" * 32,  # else it writes .webui_secret_key in its cwd
        CORS_ALLOW_ORIGIN=own_url,
        ENABLE_FORWARD_USER_INFO_HEADERS="True",  # X-OpenWebUI-Chat-Id, the proxy's session key
        # Offline: no Hugging Face, no embedding or reranking model of its own, no telemetry.
        OFFLINE_MODE="True",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAG_EMBEDDING_ENGINE="ollama",
        RAG_EMBEDDING_MODEL=EMBED,
        RAG_EMBEDDING_MODEL_AUTO_UPDATE="False",
        RAG_RERANKING_MODEL_AUTO_UPDATE="False",
        WHISPER_MODEL_AUTO_UPDATE="False",
        ENABLE_VERSION_UPDATE_CHECK="False",
        ANONYMIZED_TELEMETRY="False",
        DO_NOT_TRACK="True",
        SCARF_NO_ANALYTICS="True",
        NO_PROXY="127.0.0.1,localhost",
        AIOHTTP_CLIENT_TIMEOUT=str(CALL_S),
        PYTHONUNBUFFERED="1",
    )
    return env


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openwebui")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def box(workdir: Path) -> AsyncIterator[Farm]:
    async with farm(workdir / "farm") as running:
        yield running


@pytest.fixture(scope="module")
def process(workdir: Path, box: Farm) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Open WebUI serving on a free loopback port, ended (its whole group) with the module."""
    assert COMMAND is not None
    (port,) = free_ports(1)
    data = workdir / "data"
    data.mkdir()
    log = workdir / "open-webui.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [COMMAND, "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            env=offline_env(data, box.url, url),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc, url, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def webui(process: tuple[subprocess.Popen[bytes], str, Path]) -> OpenWebUI:
    """Waits (bounded) for its /health, then signs in as the admin that no-auth mode makes."""
    proc, url, log = process
    deadline = time.monotonic() + START_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Open WebUI exited with {proc.returncode}:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"Open WebUI did not answer /health in {START_S} s:\n{log_tail(log)}")
            try:
                async with http.get(url + "/health") as resp:
                    if resp.status == 200:
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # not listening yet
            await asyncio.sleep(0.5)
        signin = {"email": "admin@localhost", "password": "admin"}
        async with http.post(url + "/api/v1/auths/signin", json=signin) as resp:
            assert resp.status == 200, await resp.text()
            token = (await resp.json())["token"]
    return OpenWebUI(url=url, token=token, log=log)


@pytest_asyncio.fixture(loop_scope="module")
async def http(webui: OpenWebUI) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=CALL_S)
    async with aiohttp.ClientSession(headers=webui.headers(), timeout=timeout) as session:
        yield session


def from_emulator(answer: str) -> bool:
    """Whether ``answer`` is the emulator's text: its own words, capitalised, and full stops."""
    words = text.tokenize(answer.lower())
    return bool(words) and all(word in VOCABULARY for word in words)


def chats_seen(box: Farm, model: str) -> int:
    """Chats the proxy answered with 200 for ``model``, on any instance."""
    total = 0.0
    for family in box.registry.collect():
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "ollamux_requests_total"
                and labels.get("model") == model
                and labels.get("endpoint") == "/api/chat"
                and labels.get("code") == "200"
            ):
                total += sample.value
    return int(total)


async def openai_stream(
    http: aiohttp.ClientSession, webui: OpenWebUI, model: str, prompt: str, **extra: Any
) -> tuple[str, int]:
    """A streaming chat on Open WebUI's own /api/chat/completions: the answer and its chunks."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": ANSWER_TOKENS,
    }
    answer, chunks, done = "", 0, False
    async with http.post(webui.url + "/api/chat/completions", json={**body, **extra}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                done = True
                break
            delta = json.loads(data)["choices"][0]["delta"]
            if delta.get("content"):
                answer += delta["content"]
                chunks += 1
    assert done, "the stream ended without data: [DONE]"
    return answer, chunks


async def ollama_stream(
    http: aiohttp.ClientSession, webui: OpenWebUI, model: str, prompt: str
) -> tuple[str, int]:
    """A streaming chat on Open WebUI's Ollama proxy /ollama/api/chat: the answer and its chunks."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "options": {"num_predict": ANSWER_TOKENS},
    }
    answer, chunks, done = "", 0, False
    async with http.post(webui.url + "/ollama/api/chat", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        async for raw in resp.content:
            if not raw.strip():
                continue
            line = json.loads(raw)
            assert "error" not in line, line
            if line["message"].get("content"):
                answer += line["message"]["content"]
                chunks += 1
            if line.get("done"):
                done = True
                assert line["model"] == model
    assert done, "the stream ended without a done line"
    return answer, chunks


async def test_concurrent_streaming_chats_on_both_endpoints(
    webui: OpenWebUI, http: aiohttp.ClientSession, box: Farm
) -> None:
    async with http.get(webui.url + "/api/models") as resp:
        assert resp.status == 200, await resp.text()
        listed = {m["id"] for m in (await resp.json())["data"]}
    assert {MODEL, OTHER, EMBED} <= listed  # the emulator's models, through the proxy's /api/tags

    before = {m: chats_seen(box, m) for m in (MODEL, OTHER)}
    calls = [
        call(http, webui, model, f"tell me about routing, take {i}")
        for model in (MODEL, OTHER)
        for call in (openai_stream, ollama_stream)
        for i in range(2)
    ]
    results = await asyncio.gather(*calls)
    for answer, chunks in results:
        assert chunks > 1, answer  # streamed, not one block
        assert from_emulator(answer), answer
    for model in (MODEL, OTHER):
        assert chats_seen(box, model) - before[model] >= 4  # each went through the proxy
    assert any(m for m in box.loaded().values() if MODEL in m)
    assert any(m for m in box.loaded().values() if OTHER in m)


async def test_an_embedding_through_open_webui_is_the_emulators(
    webui: OpenWebUI, http: aiohttp.ClientSession, box: Farm
) -> None:
    body = {"model": EMBED, "input": ["open webui", "behind the proxy"]}
    async with http.post(webui.url + "/ollama/api/embed", json=body) as resp:
        assert resp.status == 200, await resp.text()
        through_webui = (await resp.json())["embeddings"]
    async with (
        aiohttp.ClientSession() as direct,
        direct.post(box.url + "/api/embed", json=body) as resp,
    ):
        assert resp.status == 200
        from_proxy = (await resp.json())["embeddings"]
    assert len(through_webui) == 2 and len(through_webui[0]) == 768
    assert through_webui == from_proxy  # deterministic per text: the same vectors both ways


async def test_chats_carrying_a_chat_id_reach_the_proxy_as_one_session(
    webui: OpenWebUI, http: aiohttp.ClientSession, box: Farm
) -> None:
    """Turns sent as its page sends them, into saved chats: Open WebUI answers them in the
    background into the chat and forwards the chat's id (X-OpenWebUI-Chat-Id), which the proxy
    takes as the session to keep on one instance."""
    chat_ids = []
    for title in ("first chat", "second chat"):
        form: dict[str, Any] = {
            "chat": {"title": title, "models": [MODEL], "messages": [], "history": {}}
        }
        async with http.post(webui.url + "/api/v1/chats/new", json=form) as resp:
            assert resp.status == 200, await resp.text()
            chat_ids.append((await resp.json())["id"])

    async def saved_answer(chat_id: str, message_id: str) -> str:
        deadline = time.monotonic() + CALL_S
        while time.monotonic() < deadline:
            async with http.get(f"{webui.url}/api/v1/chats/{chat_id}") as resp:
                assert resp.status == 200, await resp.text()
                saved = (await resp.json())["chat"]["history"]["messages"].get(message_id, {})
            if saved.get("done"):
                assert not saved.get("error"), saved
                return str(saved["content"])
            await asyncio.sleep(0.2)
        raise AssertionError(f"no answer saved in chat {chat_id} after {CALL_S} s")

    async def conversation(chat_id: str) -> list[str]:
        messages: list[dict[str, str]] = []
        answers = []
        parent: str | None = None
        for turn in range(3):
            prompt = f"turn {turn} of {chat_id}"
            messages.append({"role": "user", "content": prompt})
            asked, reply = str(uuid.uuid4()), str(uuid.uuid4())
            body = {
                "model": MODEL,
                "messages": messages,
                "stream": True,
                "max_tokens": ANSWER_TOKENS,
                "chat_id": chat_id,
                "id": reply,
                "parent_id": parent,
                "user_message": {
                    "id": asked,
                    "parentId": parent,
                    "role": "user",
                    "content": prompt,
                },
            }
            async with http.post(webui.url + "/api/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
            answer = await saved_answer(chat_id, reply)
            assert from_emulator(answer), answer
            messages.append({"role": "assistant", "content": answer})
            answers.append(answer)
            parent = reply
        return answers

    conversations = await asyncio.gather(*(conversation(c) for c in chat_ids))
    assert all(len(set(answers)) == 3 for answers in conversations)  # each turn a new answer

    dispatcher = box.proxy_server.app[PROXY].router.dispatcher
    for chat_id in chat_ids:
        served_by = dispatcher.session_instance(chat_id)  # keyed by the header's chat id
        assert served_by is not None, f"the proxy never saw chat {chat_id} as a session"
        assert MODEL in box.loaded()[served_by]


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
@pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None,
    reason="needs the playwright Python package (pip install playwright)",
)
async def test_its_page_streams_an_answer_from_the_proxy(webui: OpenWebUI, box: Farm) -> None:
    """Headless Chromium on Open WebUI's page: pick a model, type, see the answer stream in."""
    from playwright.async_api import WebSocket, async_playwright, expect

    deltas: list[str] = []
    finished = asyncio.Event()

    def on_frame(payload: str | bytes) -> None:
        """Open WebUI streams the answer to its page as socket.io events, one per delta."""
        if not isinstance(payload, str) or not payload.startswith('42["events"'):
            return
        data = json.loads(payload[2:])[1]["data"]
        if data["type"] == "response:completion" and "delta" in data["data"]:
            deltas.append(data["data"]["delta"])
        if data["type"] == "chat:completion" and data["data"].get("done"):
            finished.set()

    def on_websocket(ws: WebSocket) -> None:
        ws.on("framereceived", on_frame)

    before = chats_seen(box, MODEL)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("websocket", on_websocket)
            await page.goto(webui.url + "/")
            # A fresh install greets with its release notes first.
            await page.get_by_role("button", name="Okay, Let's Go!").click(timeout=WAIT_MS)

            picker = page.locator("#model-selector-model-button")
            await picker.click(timeout=WAIT_MS)
            await page.locator("#model-search-input").fill(MODEL)
            await page.locator(f'button[aria-label="Select {MODEL} model"]').click(timeout=WAIT_MS)
            await expect(picker).to_contain_text(MODEL, timeout=WAIT_MS)

            await page.locator("#chat-input").click()
            await page.keyboard.type("hello from a browser, through the proxy")
            await page.keyboard.press("Enter")

            await asyncio.wait_for(finished.wait(), WAIT_MS / 1000)
            assert len(deltas) > 1, deltas  # streamed to the page piece by piece
            answer = "".join(deltas).strip()
            assert from_emulator(answer), answer
            shown = page.locator(".chat-assistant #response-content-container").last
            await expect(shown).to_have_text(answer, timeout=WAIT_MS)
            await expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}$"), timeout=WAIT_MS)
            chat_id = page.url.rsplit("/", 1)[1]
        finally:
            await browser.close()

    assert chats_seen(box, MODEL) > before  # the proxy answered it
    dispatcher = box.proxy_server.app[PROXY].router.dispatcher
    assert dispatcher.session_instance(chat_id) is not None  # with the chat's id as its session
