"""What the proxy reads from a request body to route it: model, session, unload."""

from __future__ import annotations

import json

from proxy.api.relay import parse


def test_every_turn_of_a_conversation_has_one_session_key() -> None:
    system = {"role": "system", "content": "be nice"}
    turn1 = [system, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    other = [system, {"role": "user", "content": "something else"}]

    def key(messages: list[dict[str, str]]) -> str:
        info = parse(json.dumps({"model": "m", "messages": messages}).encode(), {})
        assert info is not None
        return info.session

    assert key(turn1) == key(turn2) != key(other)
    header = parse(b'{"model": "m", "messages": []}', {"X-OpenWebUI-Chat-Id": "chat-1"})
    assert header is not None and header.session == "chat-1"


def test_unparseable_or_modelless_bodies_are_left_to_the_instance() -> None:
    assert parse(b"{not json", {}) is None
    assert parse(b"[]", {}) is None
    assert parse(b'{"messages": []}', {}) is None


def test_empty_prompt_with_keep_alive_zero_is_an_unload() -> None:
    unload = parse(b'{"model": "m", "prompt": "", "keep_alive": 0}', {})
    load = parse(b'{"model": "m", "prompt": ""}', {})
    chat = parse(b'{"model": "m", "prompt": "hi", "keep_alive": 0}', {})
    assert unload is not None and unload.unload
    assert load is not None and not load.unload
    assert chat is not None and not chat.unload
