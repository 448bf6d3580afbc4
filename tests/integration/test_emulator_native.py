"""The emulated Ollama's native API over real sockets: official client, raw HTTP, exact errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import ollama
import pytest

if TYPE_CHECKING:
    from conftest import Emulator, MakeEmulator

FAIL = (
    "model runner has unexpectedly stopped, this may be due to resource limitations or an "
    "internal error, check ollama server logs for details"
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=emulator.url) as client:
        yield client


async def call(
    http: aiohttp.ClientSession,
    emulator: Emulator,
    path: str,
    body: object = None,
    *,
    method: str = "POST",
    raw: str | bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """Status, Content-Type and body text of one request."""
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    async with http.request(method, emulator.url + path, data=data, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def lines(body: str) -> list[dict[str, Any]]:
    assert body.endswith("\n")
    return [json.loads(line) for line in body.splitlines()]


def parse_time(text: str) -> datetime:
    """Go's RFC3339Nano in UTC (fraction without trailing zeros), as Python 3.10 can read it."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z", text)
    assert match is not None, text
    fraction = (match.group(2) or "").rstrip("0")
    assert not (match.group(2) or "").endswith("0")  # Go trims trailing zeros
    return datetime.fromisoformat(f"{match.group(1)}.{fraction[:6]:0<6}+00:00")


# --- front door ------------------------------------------------------------------------------


async def test_root_head_and_version(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    assert await call(http, emulator, "/", method="GET") == (
        200,
        "text/plain; charset=utf-8",
        "Ollama is running",
    )
    status, _, body = await call(http, emulator, "/", method="HEAD")
    assert (status, body) == (200, "")
    status, ctype, body = await call(http, emulator, "/api/version", method="GET")
    assert (status, ctype) == (200, "application/json; charset=utf-8")
    assert body == '{"version":"0.32.15"}'


@pytest.mark.parametrize(
    ("method", "path", "status", "text"),
    [
        ("GET", "/api/generate", 405, "405 method not allowed"),
        ("HEAD", "/api/ps", 405, ""),
        ("POST", "/api/tags", 405, "405 method not allowed"),
        ("GET", "/api/nothing", 404, "404 page not found"),
        ("GET", "/v1/models/library/tiny", 404, "404 page not found"),
    ],
)
async def test_wrong_method_and_unknown_path_are_gin_text(
    http: aiohttp.ClientSession, emulator: Emulator, method: str, path: str, status: int, text: str
) -> None:
    assert await call(http, emulator, path, method=method) == (status, "text/plain", text)


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example.com", 403),
        ("evil.example.com:11434", 403),
        ("8.8.8.8", 403),
        ("localhost:11434", 200),
        ("ollama.internal", 200),
        ("box.local:80", 200),
        ("10.1.2.3:11434", 200),
        ("[::1]:11434", 200),
    ],
)
async def test_loopback_server_checks_host_header(
    http: aiohttp.ClientSession, emulator: Emulator, host: str, status: int
) -> None:
    got, _, body = await call(http, emulator, "/api/tags", method="GET", headers={"Host": host})
    assert got == status
    if status == 403:
        assert body == ""


async def test_server_bound_to_all_interfaces_skips_host_check(
    http: aiohttp.ClientSession, make_emulator: MakeEmulator
) -> None:
    emulator = await make_emulator(bind_host="0.0.0.0")
    status, _, _ = await call(http, emulator, "/", method="GET", headers={"Host": "evil.com"})
    assert status == 200


async def test_origin_rules(http: aiohttp.ClientSession, make_emulator: MakeEmulator) -> None:
    emulator = await make_emulator(origins=("https://webui.example.com",))
    url = emulator.url + "/api/tags"
    async with http.get(url, headers={"Origin": "https://evil.example.com"}) as resp:
        assert (resp.status, await resp.text()) == (403, "")
    for origin in ("http://localhost:3000", "https://webui.example.com", "app://obsidian.md"):
        async with http.get(url, headers={"Origin": origin}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == origin
    preflight = {"Origin": "http://localhost:8080", "Access-Control-Request-Method": "POST"}
    async with http.options(emulator.url + "/api/chat", headers=preflight) as resp:
        assert resp.status == 204
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert "Content-Type" in resp.headers["Access-Control-Allow-Headers"]


# --- generate and chat -----------------------------------------------------------------------


async def test_generate_non_streamed_with_client(client: ollama.AsyncClient) -> None:
    resp = await client.generate(model="tiny", prompt="Why is the sky blue?", stream=False,
                                 options={"num_predict": 7})  # fmt: skip
    assert resp.model == "tiny"  # echoed as sent, not "tiny:latest"
    assert resp.done and resp.done_reason == "length"
    assert resp.response and resp.eval_count == 7
    assert resp.prompt_eval_count and resp.prompt_eval_count > 5
    assert resp.total_duration and resp.load_duration and resp.eval_duration
    assert resp.total_duration >= resp.load_duration + resp.eval_duration
    assert resp.context and all(isinstance(i, int) for i in resp.context)


async def test_generate_stream_shape(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    body = {"model": "tiny", "prompt": "hello", "options": {"num_predict": 4, "seed": 1}}
    status, ctype, text = await call(http, emulator, "/api/generate", body)
    assert (status, ctype) == (200, "application/x-ndjson")
    chunks = lines(text)
    assert len(chunks) == 5
    for chunk in chunks[:-1]:
        assert list(chunk) == ["model", "created_at", "response", "done"]
        assert chunk["model"] == "tiny" and chunk["done"] is False and chunk["response"]
        parse_time(chunk["created_at"])
    final = chunks[-1]
    assert list(final) == [
        "model", "created_at", "response", "done", "done_reason", "context", "total_duration",
        "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
        "eval_duration",
    ]  # fmt: skip
    assert final["response"] == "" and final["eval_count"] == 4
    assert all(isinstance(final[k], int) for k in ("total_duration", "load_duration"))
    # the same seed and prompt give the same answer
    again = lines((await call(http, emulator, "/api/generate", body))[2])
    assert [c["response"] for c in again] == [c["response"] for c in chunks]


async def test_generate_raw_has_no_context(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    body = {"model": "tiny", "prompt": "x", "raw": True, "stream": False,
            "options": {"num_predict": 2}}  # fmt: skip
    status, ctype, text = await call(http, emulator, "/api/generate", body)
    assert (status, ctype) == (200, "application/json; charset=utf-8")
    assert not text.endswith("\n")
    assert "context" not in json.loads(text)
    body = {"model": "tiny", "prompt": "x", "raw": True, "system": "be nice"}
    assert await call(http, emulator, "/api/generate", body) == (
        400,
        "application/json; charset=utf-8",
        '{"error":"raw mode does not support template, system, or context"}',
    )


async def test_chat_streamed_with_client(client: ollama.AsyncClient) -> None:
    parts = []
    final = None
    stream = await client.chat(model="tiny:latest", messages=[{"role": "user", "content": "hi"}],
                               stream=True, options={"num_predict": 5})  # fmt: skip
    async for chunk in stream:
        if chunk.done:
            final = chunk
        else:
            assert chunk.message.role == "assistant"
            parts.append(chunk.message.content)
    assert len(parts) == 5 and final is not None
    assert final.model == "tiny:latest" and final.message.content == ""
    assert final.done_reason == "length" and final.eval_count == 5


async def test_chat_non_streamed_shape(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    body = {"model": "tiny", "messages": [{"role": "USER", "content": "hi"}], "stream": False}
    status, _, text = await call(http, emulator, "/api/chat", body)
    reply = json.loads(text)
    assert status == 200
    assert list(reply)[:6] == ["model", "created_at", "message", "done_reason", "done",
                               "total_duration"]  # fmt: skip
    assert reply["done_reason"] == "stop" and reply["message"]["content"]
    assert "context" not in reply


async def test_empty_prompt_loads_and_keep_alive_zero_unloads(
    client: ollama.AsyncClient, emulator: Emulator
) -> None:
    loaded = await client.generate(model="tiny", prompt="")
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert loaded.eval_count is None and loaded.total_duration is None  # no metrics at all
    assert [m.model for m in (await client.ps()).models] == ["tiny:latest"]
    unloaded = await client.generate(model="tiny", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert (await client.ps()).models == []
    # chat with no messages does the same, and unloading a model that is not loaded is fine
    chat = await client.chat(model="tiny", messages=[], keep_alive="0s")
    assert chat.done_reason == "unload" and chat.message.content == ""
    chat = await client.chat(model="tiny", messages=[])
    assert chat.done_reason == "load" and chat.message.role == "assistant"


async def test_keep_alive_forever_is_292_years_and_bad_values_are_go_errors(
    http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    await call(http, emulator, "/api/generate", {"model": "tiny", "keep_alive": -1})
    _, _, text = await call(http, emulator, "/api/ps", method="GET")
    (entry,) = json.loads(text)["models"]
    assert parse_time(entry["expires_at"]).year - datetime.now().year in (291, 292, 293)
    for value, error in [
        ("10", 'time: missing unit in duration "10"'),
        ("-1", 'time: missing unit in duration "-1"'),
        (True, "Unsupported type: 'bool'"),
        ([1], "Unsupported type: '[]interface {}'"),
    ]:
        body = {"model": "tiny", "prompt": "x", "keep_alive": value}
        status, _, text = await call(http, emulator, "/api/generate", body)
        assert (status, json.loads(text)) == (400, {"error": error})


async def test_ps_entry(client: ollama.AsyncClient, emulator: Emulator) -> None:
    await client.generate(model="tiny", prompt="", keep_alive="10m", options={"num_ctx": 2048})
    (entry,) = (await client.ps()).models
    assert entry.model == "tiny:latest" and entry.size and entry.size > 1e9
    assert entry.size_vram == entry.size
    assert entry.context_length == 2048 and entry.digest and len(entry.digest) == 64
    assert entry.details and entry.details.parameter_size == "1.0B"
    assert entry.expires_at is not None
    left = (entry.expires_at - datetime.now(entry.expires_at.tzinfo)).total_seconds()
    assert 0 < left <= 600 / 200 + 1  # ten virtual minutes at 200x


# --- embeddings ------------------------------------------------------------------------------


async def test_embed_vectors_are_normalised_and_legacy_is_not(client: ollama.AsyncClient) -> None:
    resp = await client.embed(model="embed", input=["first text", "second text"])
    assert len(resp.embeddings) == 2 and all(len(v) == 16 for v in resp.embeddings)
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-5) for v in resp.embeddings)
    assert resp.embeddings[0] != resp.embeddings[1]
    assert resp.prompt_eval_count == 4 and resp.load_duration and resp.total_duration
    cut = await client.embed(model="embed", input="first text", dimensions=4)
    assert len(cut.embeddings[0]) == 4 and math.isclose(math.hypot(*cut.embeddings[0]), 1.0,
                                                         rel_tol=1e-5)  # fmt: skip
    legacy = await client.embeddings(model="embed", prompt="first text")
    assert len(legacy.embedding) == 16 and not math.isclose(math.hypot(*legacy.embedding), 1.0)
    # equal texts give equal vectors (modulo normalisation)
    norm = math.hypot(*legacy.embedding)
    assert [round(x / norm, 5) for x in legacy.embedding] == [
        round(x, 5) for x in resp.embeddings[0]
    ]


async def test_embed_edge_cases(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    assert await call(http, emulator, "/api/embed", {"model": "embed"}) == (
        200,
        "application/json; charset=utf-8",
        '{"model":"embed","embeddings":[]}',
    )
    assert (await call(http, emulator, "/api/embeddings", {"model": "embed"}))[2] == (
        '{"embedding":[]}'
    )
    long_input = " ".join(["word"] * 100)  # the model's context is 64
    body: dict[str, Any] = {"model": "embed", "input": long_input}
    status, _, text = await call(http, emulator, "/api/embed", body)
    assert status == 200 and json.loads(text)["prompt_eval_count"] == 64
    body = {"model": "embed", "input": long_input, "truncate": False}
    assert (await call(http, emulator, "/api/embed", body))[::2] == (
        400,
        '{"error":"the input length exceeds the context length"}',
    )
    body = {"model": "embed", "input": ["ok", 3]}
    assert (await call(http, emulator, "/api/embed", body))[::2] == (
        400,
        '{"error":"invalid input type"}',
    )


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ("/api/chat", {"model": "nope", "messages": []}, 404, "model 'nope' not found"),
        ("/api/embed", {"model": "nope", "input": "x"}, 404,
         'model "nope" not found, try pulling it first'),
        ("/api/embeddings", {"model": "nope", "prompt": "x"}, 404,
         'model "nope" not found, try pulling it first'),
        ("/api/show", {"model": "nope"}, 404, "model 'nope:latest' not found"),
        ("/api/copy", {"source": "nope", "destination": "x"}, 404, 'model "nope" not found'),
        ("/api/generate", {"prompt": "x"}, 404, "model '' not found"),
        ("/api/embed", {"input": "x"}, 404, "model '' not found"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/show", {}, 400, "model is required"),
        ("/api/embeddings", {"prompt": "x"}, 400, "model is required"),
        ("/api/push", {}, 400, "model is required"),
        ("/api/pull", {}, 400, "invalid model name"),
        ("/api/generate", {"model": "bad name!", "prompt": "x"}, 400, "invalid model name"),
        ("/api/chat", {"model": "a:b:c?", "messages": []}, 400, "invalid model name"),
        ("/api/copy", {"source": "tiny", "destination": "no way"}, 400,
         'destination "no way" is invalid'),
        ("/api/generate", {"model": "embed", "prompt": "x"}, 400,
         '"embed" does not support generate'),
        ("/api/generate", {"model": "embed", "prompt": ""}, 400,
         '"embed" does not support generate'),
        ("/api/chat", {"model": "embed", "messages": [{"role": "user", "content": "x"}]}, 400,
         '"embed" does not support chat'),
        ("/api/chat", {"model": "vision:2b", "messages": [], "tools": [{"type": "function"}]},
         400, "registry.ollama.ai/library/vision:2b does not support tools"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "think": True}, 400,
         '"tiny" does not support thinking'),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_predict": "7"}}, 500,
         'option "num_predict" must be of type integer'),
        ("/api/generate", {"model": "tiny", "prompt": "x", "format": "xml"}, 500,
         'invalid format: "xml"; expected "json" or a valid JSON Schema object'),
        ("/api/create", {"model": "mine"}, 400, "neither 'from' or 'files' was specified"),
    ],
)  # fmt: skip
async def test_error_statuses_and_bodies(
    http: aiohttp.ClientSession,
    emulator: Emulator,
    path: str,
    body: object,
    status: int,
    error: str,
) -> None:
    got, ctype, text = await call(http, emulator, path, body)
    assert (got, ctype, json.loads(text)) == (
        status,
        "application/json; charset=utf-8",
        {"error": error},
    )


async def test_delete_errors(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    for body, status, error in [
        ({"model": "nope"}, 404, "model 'nope' not found"),
        ({}, 400, "model is required"),
        ({"model": "x y"}, 400, 'name "x y" is invalid'),
    ]:
        got, _, text = await call(http, emulator, "/api/delete", body, method="DELETE")
        assert (got, json.loads(text)) == (status, {"error": error})


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("", "missing request body"),
        ("  \n", "missing request body"),
        ('{"model": "tiny"', "unexpected EOF"),
        ("x", "invalid character 'x' looking for beginning of value"),
        ("{model: 1}", "invalid character 'm' looking for beginning of object key string"),
        ('{"model" "tiny"}', "invalid character '\"' after object key"),
        ('{"model": "tiny",}', "invalid character '}' looking for beginning of object key string"),
        ('{"model": tru}', "invalid character '}' in literal true (expecting 'e')"),
        ('{"model": "tiny" "prompt": 1}', "invalid character '\"' after object key:value pair"),
        ('{"context": [1 2]}', "invalid character '2' after array element"),
        ('{"prompt": "a\nb"}', "invalid character '\\n' in string literal"),
        ('{"num": 1.}', "invalid character '}' after decimal point in numeric literal"),
        ('{"model": 1}', "json: cannot unmarshal number into Go struct field "
                         "GenerateRequest.model of type string"),
        ('{"model": "tiny", "prompt": ["a"]}', "json: cannot unmarshal array into Go struct "
                                                "field GenerateRequest.prompt of type string"),
        ('{"model": "tiny", "context": [1.5]}', "json: cannot unmarshal number 1.5 into Go "
                                                 "struct field GenerateRequest.context of type "
                                                 "int"),
        ('{"model": "tiny", "stream": "yes"}', "json: cannot unmarshal string into Go struct "
                                                "field GenerateRequest.stream of type bool"),
        ('{"model": "tiny", "options": []}', "json: cannot unmarshal array into Go struct field "
                                              "GenerateRequest.options of type "
                                              "map[string]interface {}"),
        ("[1]", "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
    ],
)  # fmt: skip
async def test_bad_json_gets_go_decoder_text(
    http: aiohttp.ClientSession, emulator: Emulator, raw: str, error: str
) -> None:
    status, _, text = await call(http, emulator, "/api/generate", raw=raw)
    assert (status, json.loads(text)) == (400, {"error": error})


async def test_go_struct_field_path_for_nested_and_case_insensitive_keys(
    http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": 5}]}
    status, _, text = await call(http, emulator, "/api/chat", body)
    assert (status, json.loads(text)["error"]) == (
        400,
        "json: cannot unmarshal number into Go struct field Message.messages.content of type "
        "string",
    )
    upper: dict[str, Any] = {"MODEL": "tiny", "Prompt": "hi", "Stream": False,
                             "options": {"num_predict": 1}}  # fmt: skip
    status, _, text = await call(http, emulator, "/api/generate", upper)
    assert status == 200 and json.loads(text)["eval_count"] == 1


async def test_go_html_escaping_in_json(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    _, _, text = await call(http, emulator, "/api/show", {"model": "tiny"})
    assert "\\u003c|eot_id|\\u003e" in text and "<" not in text
    assert json.loads(text)["parameters"].endswith('"<|eot_id|>"')


# --- faults ----------------------------------------------------------------------------------


async def test_die_after_tokens_ends_stream_with_error_line(
    http: aiohttp.ClientSession, emulator: Emulator, client: ollama.AsyncClient
) -> None:
    status, _, text = await call(http, emulator, "/emulator/faults", {"die_after_tokens": 2})
    assert status == 200 and json.loads(text)["die_after_tokens"] == 2
    body: dict[str, Any] = {"model": "tiny", "prompt": "x", "options": {"num_predict": 10}}
    status, ctype, text = await call(http, emulator, "/api/generate", body)
    chunks = lines(text)
    assert (status, ctype) == (200, "application/x-ndjson")
    assert [c.get("done") for c in chunks[:2]] == [False, False]
    assert chunks[2:] == [{"error": FAIL}]  # no done line
    with pytest.raises(ollama.ResponseError, match="unexpectedly stopped"):
        async for _ in await client.chat(model="tiny", messages=[{"role": "user", "content": "x"}],
                                         stream=True):  # fmt: skip
            pass
    # not streamed: the error is the response
    body["stream"] = False
    assert (await call(http, emulator, "/api/generate", body))[::2] == (500, json.dumps(
        {"error": FAIL}, separators=(",", ":")))  # fmt: skip


async def test_fail_next_is_500_before_the_first_byte(
    http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    await call(http, emulator, "/emulator/faults", {"fail_next": 2})
    for path, body in [
        ("/api/generate", {"model": "tiny", "prompt": "x"}),
        ("/api/embed", {"model": "embed", "input": "x"}),
    ]:
        status, ctype, text = await call(http, emulator, path, body)
        assert (status, ctype, json.loads(text)) == (
            500,
            "application/json; charset=utf-8",
            {"error": FAIL},
        )
    status, _, text = await call(http, emulator, "/emulator/faults", method="GET")
    assert json.loads(text)["fail_next"] == 0
    assert (await call(http, emulator, "/api/generate", {"model": "tiny", "prompt": "x"}))[0] == 200
    bad = await call(http, emulator, "/emulator/faults", {"fail_nxt": 1})
    assert bad[0] == 400 and "unknown fault" in bad[2]


async def test_scheduler_queue_full_is_503(
    http: aiohttp.ClientSession, make_emulator: MakeEmulator
) -> None:
    emulator = await make_emulator(max_queue=1)
    emulator.engine.faults.slow = 1000.0  # loads take ~10 real seconds: the queue stays full
    loading = asyncio.ensure_future(call(http, emulator, "/api/generate", {"model": "tiny"}))
    await asyncio.sleep(0.05)  # the scheduler took it: loading
    queued = asyncio.ensure_future(call(http, emulator, "/api/generate", {"model": "vision:2b"}))
    await asyncio.sleep(0.05)  # waits in the queue, which is now full
    status, _, text = await call(http, emulator, "/api/embed", {"model": "embed", "input": "x"})
    assert (status, json.loads(text)) == (
        503,
        {"error": "server busy, please try again.  maximum pending requests exceeded"},
    )
    for task in (loading, queued):
        task.cancel()
    await asyncio.gather(loading, queued, return_exceptions=True)


# --- model management ------------------------------------------------------------------------


async def test_tags_and_show(client: ollama.AsyncClient) -> None:
    models = {m.model: m for m in (await client.list()).models}
    assert set(models) == {"tiny:latest", "vision:2b", "embed:latest"}  # remote is not pulled
    tiny = models["tiny:latest"]
    assert tiny.size == 1_000_000_000 and tiny.digest and len(tiny.digest) == 64
    assert tiny.details and tiny.details.format == "gguf" and tiny.details.family == "llama"
    show = await client.show("tiny")
    assert show.capabilities == ["completion", "tools"]
    assert show.modelinfo and show.modelinfo["llama.context_length"] == 8192
    assert show.details and show.details.parameter_size == "1.0B" and show.template
    embed = await client.show("embed")
    assert embed.capabilities == ["embedding"]


async def test_pull_progress_then_copy_and_delete(client: ollama.AsyncClient) -> None:
    statuses = [p async for p in await client.pull("remote:1b", stream=True)]
    names = [s.status for s in statuses]
    assert names[0] == "pulling manifest"
    assert names[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    weights = [s for s in statuses if s.total and s.total > 1e8]
    assert len(weights) >= 5  # 0.4 GB at 1 GB/s, a line every 60 ms
    assert weights[0].status == f"pulling {(weights[0].digest or '')[7:19]}"
    done = [s.completed or 0 for s in weights]
    assert done == sorted(done) and done[-1] == weights[-1].total
    models = {m.model: m for m in (await client.list()).models}
    assert next(iter(models)) == "remote:1b"  # newest first
    # pulling again finds every layer on disk: one line each
    again = [p.status async for p in await client.pull("remote:1b", stream=True)]
    assert len(again) == len(set(again)) and again[-1] == "success"

    assert (await client.copy("remote:1b", "mine:v1")).status == "success"
    copied = {m.model: m.digest for m in (await client.list()).models}
    assert copied["mine:v1"] == copied["remote:1b"]
    assert (await client.delete("mine:v1")).status == "success"
    assert "mine:v1" not in {m.model for m in (await client.list()).models}
    with pytest.raises(ollama.ResponseError) as info:
        await client.delete("mine:v1")
    assert info.value.status_code == 404


async def test_pull_unknown_model(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    status, ctype, text = await call(http, emulator, "/api/pull", {"model": "nosuch"})
    assert (status, ctype) == (200, "application/x-ndjson")
    assert lines(text) == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    body = {"model": "nosuch", "stream": False}
    assert (await call(http, emulator, "/api/pull", body))[::2] == (
        500,
        '{"error":"pull model manifest: file does not exist"}',
    )
    body = {"model": "remote:1b", "stream": False}
    assert (await call(http, emulator, "/api/pull", body))[::2] == (200, '{"status":"success"}')


async def test_shared_model_dir_is_seen_by_every_server(
    make_emulator: MakeEmulator, tmp_path: Path
) -> None:
    manifest = tmp_path / "manifests/registry.ollama.ai/library/tiny/latest"
    async with (
        ollama.AsyncClient(host=(await make_emulator(root=tmp_path)).url) as first,
        ollama.AsyncClient(host=(await make_emulator(root=tmp_path)).url) as second,
    ):
        assert manifest.is_file()
        async for _ in await first.pull("remote:1b", stream=True):
            pass
        assert "remote:1b" in {m.model for m in (await second.list()).models}
        await second.delete("remote:1b")
        assert "remote:1b" not in {m.model for m in (await first.list()).models}
        assert manifest.is_file() and not manifest.with_name("1b").exists()


async def test_create_push_and_blobs(
    http: aiohttp.ClientSession, emulator: Emulator, client: ollama.AsyncClient
) -> None:
    created = await client.create(model="pirate", from_="tiny", system="Talk like a pirate.",
                                  stream=True)  # fmt: skip
    statuses = [p.status or "" async for p in created]
    assert statuses[-2:] == ["writing manifest", "success"]
    assert any(s.startswith("using existing layer sha256:") for s in statuses)
    assert any(s.startswith("creating new layer sha256:") for s in statuses)
    show = json.loads((await call(http, emulator, "/api/show", {"model": "pirate"}))[2])
    assert show["system"] == "Talk like a pirate."
    assert 'SYSTEM """Talk like a pirate."""' in show["modelfile"]
    assert (await client.generate(model="pirate", prompt="hi", options={"num_predict": 2})).done

    pushed = [p.status async for p in await client.push("pirate", stream=True)]
    assert pushed[0] == "retrieving manifest" and pushed[-2:] == ["pushing manifest", "success"]

    data = b"adapter weights"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = f"/api/blobs/{digest}"
    assert (await call(http, emulator, path, method="HEAD"))[0] == 404
    assert (await call(http, emulator, path, raw=data))[0] == 201
    assert (await call(http, emulator, path, raw=data))[0] == 200
    assert (await call(http, emulator, path, method="HEAD"))[0] == 200
    wrong = "sha256:" + "0" * 64
    status, _, text = await call(http, emulator, f"/api/blobs/{wrong}", raw=data)
    assert (status, json.loads(text)["error"]) == (
        400,
        f'digest mismatch, expected "{wrong}", got "{digest}"',
    )
    assert (await call(http, emulator, "/api/blobs/sha256:xyz", method="HEAD"))[0] == 400


async def test_gpus_endpoint(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    await call(http, emulator, "/api/generate", {"model": "tiny"})
    status, _, text = await call(http, emulator, "/gpus", method="GET")
    (gpu,) = json.loads(text)["gpus"]
    assert status == 200
    assert list(gpu) == ["index", "uuid", "name", "memory_total", "memory_used", "memory_free",
                         "utilization"]  # fmt: skip
    assert gpu["name"] == "rtx4090" and gpu["memory_total"] == 24 * 1024**3
    assert gpu["memory_used"] > 1e9 and gpu["memory_used"] + gpu["memory_free"] == 24 * 1024**3
    assert 0 <= gpu["utilization"] <= 1
