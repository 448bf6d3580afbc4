"""The outside peers' setup in the routing benchmark: LiteLLM's config, the OpenAI wire, skips."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks import peer_env
from benchmarks.openai_wire import openai_body, read_answer
from benchmarks.peers import MASTER_KEY, litellm_config

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]


def test_litellm_config_lists_every_model_on_every_instance() -> None:
    config = litellm_config("least-busy", URLS, ["llama3.1:8b", "qwen2.5:14b"], timeout=600.0)
    text = yaml.safe_dump(config, sort_keys=False)
    back = yaml.safe_load(text)
    deployments = [(m["model_name"], m["litellm_params"]["model"], m["litellm_params"]["api_base"])
                   for m in back["model_list"]]  # fmt: skip
    assert deployments == [
        ("llama3.1:8b", "ollama_chat/llama3.1:8b", URLS[0]),
        ("llama3.1:8b", "ollama_chat/llama3.1:8b", URLS[1]),
        ("qwen2.5:14b", "ollama_chat/qwen2.5:14b", URLS[0]),
        ("qwen2.5:14b", "ollama_chat/qwen2.5:14b", URLS[1]),
    ]
    assert back["router_settings"] == {"routing_strategy": "least-busy"}
    assert back["general_settings"]["master_key"] == MASTER_KEY
    assert back["litellm_settings"]["telemetry"] is False


def test_a_native_chat_becomes_an_openai_one() -> None:
    native = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,' \
             b'"options":{"num_predict":12}}'  # fmt: skip
    body = json.loads(openai_body(native))
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 12,
    }
    quiet = json.loads(openai_body(native.replace(b'"stream":true', b'"stream":false')))
    assert quiet["stream"] is False and "stream_options" not in quiet


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def test_a_stream_is_read_back_to_its_counts() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    answer = read_answer(_sse(chunk, finish, usage) + b"data: [DONE]\n\n", stream=True)
    assert (answer.error, answer.completion_tokens, answer.prompt_tokens) == ("", 3, 5)
    assert "[DONE]" in read_answer(_sse(chunk, finish), stream=True).error
    cut = read_answer(_sse(chunk) + b"data: [DONE]\n\n", stream=True)
    assert "finish_reason" in cut.error
    failed = read_answer(_sse({"error": {"message": "boom"}}) + b"data: [DONE]\n\n", stream=True)
    assert "boom" in failed.error


def test_a_whole_answer_is_read_back_to_its_counts() -> None:
    whole = {"choices": [{"message": {"content": "x"}}], "usage": {"completion_tokens": 7}}
    assert read_answer(json.dumps(whole).encode(), stream=False).completion_tokens == 7
    assert read_answer(b"not json", stream=False).error


def test_a_peer_that_cannot_install_is_skipped_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(peer: peer_env.Peer, **_: object) -> None:
        raise peer_env.Unavailable(f"cannot install {peer.requirement}: no index")

    monkeypatch.setattr(peer_env, "ensure_installed", refuse)
    kept = peer_env.prepare(["vram_queue", "litellm_shuffle", "nginx"])
    assert kept == ["vram_queue", "nginx"]
    assert "skipping litellm_shuffle: cannot install litellm[proxy]==" in capsys.readouterr().err


def test_the_cache_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    home = peer_env.venv_dir(peer_env.LITELLM)
    assert str(home) == f"{tmp_path}/ollamux-bench/litellm-{peer_env.LITELLM.version}"
