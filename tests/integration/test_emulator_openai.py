"""The emulated Ollama's OpenAI-compatible API (/v1) with the official openai client and raw SSE."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

if TYPE_CHECKING:
    from conftest import Emulator

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=emulator.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, emulator: Emulator, path: str, body: object = None, raw: str = ""
) -> tuple[int, str, str]:
    data = raw if body is None else json.dumps(body)
    async with http.post(emulator.url + path, data=data) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def events(body: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, parsed (``[DONE]`` stays a string)."""
    assert body.endswith("\n\n")
    out: list[Any] = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block
        payload = block.removeprefix("data: ")
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def test_chat_completion(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=6)
    assert resp.object == "chat.completion" and resp.model == "tiny"
    assert resp.id.startswith("chatcmpl-") and 0 <= int(resp.id.split("-")[1]) <= 998
    assert resp.system_fingerprint == "fp_ollama"
    (choice,) = resp.choices
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.content
    assert resp.usage is not None and resp.usage.completion_tokens == 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 6


async def test_chat_stream_has_head_shape(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    content, finish, usage = chunks[:4], chunks[4], chunks[5]
    assert len(chunks) == 6
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert all(c.choices[0].delta.content and c.choices[0].finish_reason is None for c in content)
    assert finish.choices[0].delta.content is None and finish.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 4


async def test_chat_stream_raw_sse(http: aiohttp.ClientSession, emulator: Emulator) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 2, "stream": True}
    status, ctype, text = await post(http, emulator, "/v1/chat/completions", body)
    assert (status, ctype) == (200, "text/event-stream")
    data = events(text)
    assert data[-1] == "[DONE]"
    assert [d["choices"][0]["delta"] for d in data[1:-1]][-1] == {}
    assert list(data[0]) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert data[0]["object"] == "chat.completion.chunk"
    assert len(data) == 4  # 2 content chunks, the finish chunk, [DONE]; no usage chunk


async def test_text_completions(client: openai.AsyncOpenAI, http: aiohttp.ClientSession,
                                emulator: Emulator) -> None:  # fmt: skip
    resp = await client.completions.create(model="tiny", prompt="Once upon", max_tokens=3)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].text and resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    data = events((await post(http, emulator, "/v1/completions", body))[2])
    assert data[-1] == "[DONE]"
    assert [d["choices"][0]["finish_reason"] for d in data[:3]] == [None, None, "length"]
    assert data[0]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert data[3]["choices"] == [] and data[3]["usage"]["completion_tokens"] == 2


async def test_embeddings_float_and_base64(
    client: openai.AsyncOpenAI, http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    resp = await client.embeddings.create(model="embed", input=["a b", "c"],
                                          encoding_format="float")  # fmt: skip
    assert [d.index for d in resp.data] == [0, 1] and resp.model == "embed"
    assert all(math.isclose(math.hypot(*d.embedding), 1, rel_tol=1e-5) for d in resp.data)
    assert resp.usage.prompt_tokens == 3
    body = {"model": "embed", "input": "a b", "encoding_format": "base64"}
    status, _, text = await post(http, emulator, "/v1/embeddings", body)
    packed = base64.b64decode(json.loads(text)["data"][0]["embedding"])
    vector = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert status == 200 and [round(x, 5) for x in vector] == [
        round(x, 5) for x in resp.data[0].embedding
    ]
    default = await client.embeddings.create(model="embed", input="a b")  # client asks for base64
    assert [round(x, 5) for x in default.data[0].embedding] == [round(x, 5) for x in vector]


async def test_models(client: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in client.models.list()]
    assert set(ids) == {"tiny:latest", "vision:2b", "embed:latest"}
    model = await client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "library")
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("nope")
    assert info.value.body == {
        "message": "model 'nope:latest' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    ("path", "body", "raw", "status", "message", "kind"),
    [
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, "", 400,
         "[] is too short - 'messages'", "invalid_request_error"),
        ("/v1/chat/completions", {"model": "nope", "messages": USER}, "", 404,
         "model 'nope' not found", "not_found_error"),
        ("/v1/chat/completions", {"messages": USER}, "", 400, "model is required",
         "invalid_request_error"),
        ("/v1/chat/completions", None, "", 400, "EOF", "invalid_request_error"),
        ("/v1/chat/completions", None, "{", 400, "unexpected EOF", "invalid_request_error"),
        ("/v1/chat/completions", {"model": 1, "messages": USER}, "", 400,
         "json: cannot unmarshal number into Go struct field ChatCompletionRequest.model of "
         "type string", "invalid_request_error"),
        ("/v1/chat/completions", {"model": "embed", "messages": USER}, "", 400,
         '"embed" does not support chat', "invalid_request_error"),
        ("/v1/chat/completions",
         {"model": "tiny", "messages": [{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}, "", 400,
         "image URLs are not currently supported, please use base64 encoded data instead",
         "invalid_request_error"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a"]}, "", 400,
         "json: cannot unmarshal array into Go struct field CompletionRequest.prompt of type "
         "string", "invalid_request_error"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, "", 404, "model 'nope' not found",
         "not_found_error"),
        ("/v1/embeddings", {"model": "embed", "input": []}, "", 400, "invalid input",
         "invalid_request_error"),
        ("/v1/embeddings", {"model": "embed", "input": "x", "encoding_format": "hex"}, "", 400,
         "Invalid value for 'encoding_format' = hex. Supported values: ['float', 'base64'].",
         "invalid_request_error"),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, "", 404,
         'model "nope" not found, try pulling it first', "not_found_error"),
    ],
)  # fmt: skip
async def test_errors_are_openai_objects(
    http: aiohttp.ClientSession,
    emulator: Emulator,
    path: str,
    body: object,
    raw: str,
    status: int,
    message: str,
    kind: str,
) -> None:
    got, ctype, text = await post(http, emulator, path, body, raw)
    assert got == status and ctype.startswith("application/json")
    assert json.loads(text) == {
        "error": {"message": message, "type": kind, "param": None, "code": None}
    }


async def test_runner_failure_is_api_error_before_first_byte_and_empty_chunk_after(
    client: openai.AsyncOpenAI, http: aiohttp.ClientSession, emulator: Emulator
) -> None:
    emulator.engine.faults.fail_next = 1
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="tiny", messages=USER)
    assert info.value.status_code == 500 and info.value.body is not None
    assert info.value.body["type"] == "api_error"  # type: ignore[index]
    emulator.engine.faults.die_after_tokens = 2
    body = {"model": "tiny", "messages": USER, "max_tokens": 5, "stream": True}
    status, _, text = await post(http, emulator, "/v1/chat/completions", body)
    data = events(text)
    assert status == 200 and "[DONE]" not in data  # the stream just stops
    assert [d["choices"][0]["delta"].get("content") for d in data] == [
        data[0]["choices"][0]["delta"]["content"],
        data[1]["choices"][0]["delta"]["content"],
        "",
    ]


async def test_keep_alive_is_ignored_on_v1(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    await client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=1, extra_body={"keep_alive": 0}
    )
    assert [m.model.name for m in emulator.engine.ps()] == ["tiny:latest"]
