"""What the proxy reads from a request body to route it (api/body.py), small bodies and large."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.api.body import LONG_STRING, OFF_LOOP, parse_json, parse_model_request

PAD = "x" * (OFF_LOOP + 1)
"""Makes a body large enough to be parsed in a worker thread."""


@pytest.mark.parametrize("pad", ["", PAD], ids=["inline", "thread"])
async def test_every_turn_of_a_conversation_has_one_session_key(pad: str) -> None:
    system = {"role": "system", "content": "be nice"}
    turn1 = [system, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    other = [system, {"role": "user", "content": "something else"}]

    async def key(messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": "m", "messages": messages, "pad": pad}).encode()
        info = await parse_model_request(body, {})
        assert info is not None
        return info.session

    assert await key(turn1) == await key(turn2) != await key(other)
    header = await parse_model_request(
        json.dumps({"model": "m", "messages": [], "pad": pad}).encode(),
        {"X-OpenWebUI-Chat-Id": "chat-1"},
    )
    assert header is not None and header.session == "chat-1"


async def test_a_large_body_gets_the_same_key_as_a_small_one() -> None:
    messages = [{"role": "user", "content": "hi"}]
    small = json.dumps({"model": "m", "messages": messages}).encode()
    large = json.dumps({"model": "m", "messages": messages, "options": {"pad": PAD}}).encode()
    assert len(small) <= OFF_LOOP < len(large)
    a, b = await parse_model_request(small, {}), await parse_model_request(large, {})
    assert a is not None and b is not None and a.session == b.session


@pytest.mark.parametrize("pad", [b"", b" " * (OFF_LOOP + 1)], ids=["inline", "thread"])
async def test_unparseable_or_modelless_bodies_are_left_to_the_instance(pad: bytes) -> None:
    assert await parse_model_request(b"{not json" + pad, {}) is None
    assert await parse_model_request(b"[]" + pad, {}) is None
    assert await parse_model_request(b'{"messages": []}' + pad, {}) is None
    assert await parse_model_request(b'{"model": ""}' + pad, {}) is None
    assert await parse_model_request(b'{"model": 7}' + pad, {}) is None
    assert await parse_model_request(b"\xff\xfe" + pad, {}) is None
    deep = b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert await parse_model_request(deep + pad, {}) is None  # no traceback, no 500


async def test_empty_prompt_with_keep_alive_zero_is_an_unload() -> None:
    unload = await parse_model_request(b'{"model": "m", "prompt": "", "keep_alive": 0}', {})
    load = await parse_model_request(b'{"model": "m", "prompt": ""}', {})
    chat = await parse_model_request(b'{"model": "m", "prompt": "hi", "keep_alive": 0}', {})
    embed = await parse_model_request(b'{"model": "m", "input": "", "keep_alive": 0}', {})
    assert unload is not None and unload.unload
    assert load is not None and not load.unload
    assert chat is not None and not chat.unload
    assert embed is not None and not embed.unload


async def test_stream_follows_ollamas_default_for_the_path() -> None:
    body = b'{"model": "m", "messages": []}'
    native = await parse_model_request(body, {}, "/api/chat")
    openai = await parse_model_request(body, {}, "/v1/chat/completions")
    off = await parse_model_request(b'{"model": "m", "stream": false}', {}, "/api/generate")
    assert native is not None and native.stream and native.data == {"model": "m", "messages": []}
    assert openai is not None and not openai.stream
    assert off is not None and not off.stream


@pytest.mark.parametrize("pad", ["", PAD], ids=["inline", "thread"])
async def test_parse_json_matches_json_loads(pad: str) -> None:
    text = '{"a": [1, 2.5, null, true], "b": {"c": "PAD"}, "d": {"k": 1, "k": 2}}'
    text = text.replace("PAD", pad)
    parsed = await parse_json(text.encode())
    assert parsed == json.loads(text) and parsed["d"] == {"k": 2}  # the last duplicate wins
    with pytest.raises(ValueError):
        await parse_json(b"{" + pad.encode())


async def test_long_strings_count_in_the_key_by_their_content() -> None:
    """An image or a pasted file in the first turn is hashed, not encoded, but still tells two
    conversations apart."""
    image_a, image_b = "a" * (LONG_STRING + 1), "a" * LONG_STRING + "b"

    async def key(image: str, turns: int) -> str:
        messages: list[dict[str, Any]] = [{"role": "user", "content": "?", "images": [image]}]
        messages += [{"role": "assistant", "content": "!"}, {"role": "user", "content": "?"}][
            : 2 * (turns - 1)
        ]
        info = await parse_model_request(
            json.dumps({"model": "m", "messages": messages}).encode(), {}
        )
        assert info is not None and info.session
        return info.session

    assert await key(image_a, 1) == await key(image_a, 2) != await key(image_b, 1)
