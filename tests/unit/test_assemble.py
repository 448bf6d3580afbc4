"""proxy.assemble: non-streamed answers rebuilt from streams, byte for byte as Ollama writes them.

The streams here are written as Ollama HEAD writes them (server/routes.go, middleware/openai.go,
openai/openai.go): Go's field order, omitted empty fields, HTML escapes, raw float text. The
expected bodies are what Ollama's own ``stream:false`` path makes of the same chunks.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.assemble import INCOMPLETE, Assembler, upstream_body, wants_stream
from proxy.assemble.openai_answer import MIDSTREAM
from proxy.assemble.wire import Events, Lines, dumps, loads

NATIVE = "application/json; charset=utf-8"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def run(path: str, body: bytes, request: dict[str, Any] | None = None, step: int = 0,
        **kwargs: Any) -> Assembler:  # fmt: skip
    """An Assembler fed ``body`` whole (step 0) or in pieces of ``step`` bytes."""
    builder = Assembler(path, request, **kwargs)
    pieces = [body] if step == 0 else [body[i : i + step] for i in range(0, len(body), step)]
    for piece in pieces:
        builder.feed(piece)
    return builder


def ndjson(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def sse(*payloads: str) -> bytes:
    return "".join(f"data: {p}\n\n" for p in payloads).encode()


# --- /api/chat -------------------------------------------------------------------------------

CHAT = ndjson(
    '{"model":"qwen3","created_at":"2026-08-21T10:00:00.1Z","message":{"role":"assistant",'
    '"content":"","thinking":"Let me"},"done":false}',
    '{"model":"qwen3","created_at":"2026-08-21T10:00:00.2Z","message":{"role":"assistant",'
    '"content":"","thinking":" think \\u003ca\\u0026b\\u003e"},"done":false}',
    '{"model":"qwen3","created_at":"2026-08-21T10:00:00.3Z","message":{"role":"assistant",'
    '"content":"H\\u00e9 \\"q\\"\\n\\u2028😀"},"done":false}',
    '{"model":"qwen3","created_at":"2026-08-21T10:00:00.4Z","message":{"role":"assistant",'
    '"content":"","tool_calls":[{"id":"call_1","function":{"index":0,"name":"get_weather",'
    '"arguments":{"city":"Tokyo","days":2}}}]},"done":false}',
    '{"model":"qwen3","created_at":"2026-08-21T10:00:00.5Z","message":{"role":"assistant",'
    '"content":""},"done":true,"done_reason":"stop","total_duration":5000,"load_duration":100,'
    '"prompt_eval_count":3,"prompt_eval_duration":200,"eval_count":4,"eval_duration":300}',
)
CHAT_WHOLE = (
    '{"model":"qwen3","created_at":"2026-08-21T10:00:00.5Z","message":{"role":"assistant",'
    '"content":"Hé \\"q\\"\\n\\u2028😀","thinking":"Let me think \\u003ca\\u0026b\\u003e",'
    '"tool_calls":[{"id":"call_1","function":{"index":0,"name":"get_weather",'
    '"arguments":{"city":"Tokyo","days":2}}}]},"done":true,"done_reason":"stop",'
    '"total_duration":5000,"load_duration":100,"prompt_eval_count":3,"prompt_eval_duration":200,'
    '"eval_count":4,"eval_duration":300}'
)


@pytest.mark.parametrize("step", [0, 1, 7, 64])
def test_chat_concatenates_thinking_content_and_tool_calls(step: int) -> None:
    builder = run("/api/chat", CHAT, {"model": "qwen3", "tools": TOOLS}, step)
    assert builder.done and builder.error is None
    assert builder.result() == (200, CHAT_WHOLE.encode(), NATIVE)


def test_chat_without_tools_keeps_only_the_last_chunks_tool_calls() -> None:
    """Ollama merges tool calls only when the request offered tools (routes.go)."""
    status, body, _ = run("/api/chat", CHAT, {"model": "qwen3", "messages": []}).result()
    answer = json.loads(body)
    assert status == 200 and "tool_calls" not in answer["message"]
    assert answer["message"]["thinking"] == "Let me think <a&b>"
    # with no request given, every chunk's calls are merged
    assert "tool_calls" in json.loads(run("/api/chat", CHAT).result()[1])["message"]


def test_chat_keeps_the_last_chunks_own_order_fields_and_images() -> None:
    """v0.9-era order (done_reason before done), unknown fields and images stay as they came."""
    stream = ndjson(
        '{"model":"m","created_at":"T1","message":{"role":"assistant","content":"a"},"done":false}',
        '{"model":"m","created_at":"T1","message":{"role":"assistant","content":"b","thinking":'
        '"t"},"done":false}',
        '{"model":"m","created_at":"T2","message":{"role":"assistant","content":"",'
        '"images":["aGk="],"tool_name":"x"},"done_reason":"length","done":true,"future":1,'
        '"eval_count":2}',
    )
    body = run("/api/chat", stream).result()[1]
    assert body == (
        b'{"model":"m","created_at":"T2","message":{"role":"assistant","content":"ab",'
        b'"thinking":"t","images":["aGk="],"tool_name":"x"},"done_reason":"length","done":true,'
        b'"future":1,"eval_count":2}'
    )


def test_logprobs_are_collected_with_their_numbers_as_written() -> None:
    first = (
        '{"token":"Hi","logprob":-1e-7,"bytes":[72,105],"top_logprobs":[{"token":"Hi",'
        '"logprob":-1e-7},{"token":"Yo","logprob":-16.250000000000004}]}'
    )
    second = '{"token":"!","logprob":-0.5}'
    stream = ndjson(
        f'{{"model":"m","created_at":"T","message":{{"role":"assistant","content":"Hi"}},'
        f'"done":false,"logprobs":[{first}]}}',
        f'{{"model":"m","created_at":"T","message":{{"role":"assistant","content":"!"}},'
        f'"done":false,"logprobs":[{second}]}}',
        '{"model":"m","created_at":"T","message":{"role":"assistant","content":""},"done":true,'
        '"done_reason":"stop","eval_count":2}',
    )
    assert (
        run("/api/chat", stream).result()[1]
        == (
            '{"model":"m","created_at":"T","message":{"role":"assistant","content":"Hi!"},"done":true,'
            f'"done_reason":"stop","logprobs":[{first},{second}],"eval_count":2}}'
        ).encode()
    )


def test_in_band_error_is_ollamas_unstreamed_500() -> None:
    stream = CHAT.split(b"\n")[0] + b'\n{"error":"boom \\u003cgpu\\u003e"}\n'
    builder = run("/api/chat", stream)
    assert builder.error == "boom <gpu>" and not builder.done
    assert builder.result() == (500, b'{"error":"boom \\u003cgpu\\u003e"}', NATIVE)


def test_a_stream_that_stops_early_is_incomplete() -> None:
    builder = run("/api/chat", CHAT[: CHAT.rindex(b'{"model"')])
    assert not builder.done and builder.error is None
    status, body, ctype = builder.result()
    assert (status, json.loads(body), ctype) == (500, {"error": INCOMPLETE}, NATIVE)
    cut = run("/api/chat", CHAT[:-20])  # the last line itself cut short
    assert cut.result()[0] == 500 and not cut.done


def test_garbage_and_lines_after_the_end() -> None:
    assert run("/api/chat", b"not json\n").error is not None
    assert run("/api/chat", b"[1,2]\n").error is not None
    after = run("/api/chat", CHAT + b'{"error":"late"}\nrubbish\n')
    assert after.done and after.error is None
    assert after.result()[1] == run("/api/chat", CHAT).result()[1]


def test_single_object_without_newline_is_a_whole_answer() -> None:
    """Ollama's load/unload reply is one c.JSON object, even to a streamed request."""
    load = (
        b'{"model":"m","created_at":"T","message":{"role":"assistant","content":""},"done":true,'
        b'"done_reason":"load"}'
    )
    builder = run("/api/chat", load)
    assert not builder.done  # the last line is only read once the body has ended
    builder.end()
    assert builder.done and builder.result() == (200, load, NATIVE)
    builder = Assembler("/api/chat")
    builder.start(200, NATIVE)
    builder.feed(load[:10])
    builder.feed(load[10:])
    assert builder.result() == (200, load, NATIVE) and builder.done


def test_errors_before_the_stream_keep_their_status() -> None:
    builder = Assembler("/api/generate")
    builder.start(500, "application/json")  # streamResponse's bare content type
    builder.feed(b'{"error":"llama-server process has terminated: oom"}')
    assert builder.result() == (
        500,
        b'{"error":"llama-server process has terminated: oom"}',
        NATIVE,
    )
    assert builder.error == "llama-server process has terminated: oom" and not builder.done
    builder = Assembler("/v1/chat/completions")
    builder.start(404, "application/json")
    error = (
        b'{"error":{"message":"model \'x\' not found","type":"not_found_error","param":null,'
        b'"code":null}}\n'
    )
    builder.feed(error)
    assert builder.result() == (404, error, "application/json")
    assert builder.error == "model 'x' not found"
    builder = Assembler("/api/chat")
    builder.start(403, "")
    assert builder.result() == (403, b"", "") and builder.error == "the instance answered 403"


# --- /api/generate ---------------------------------------------------------------------------


def test_generate_keeps_context_and_puts_thinking_after_response() -> None:
    stream = ndjson(
        '{"model":"m","created_at":"T1","response":"","thinking":"hmm","done":false}',
        '{"model":"m","created_at":"T2","response":"Once","done":false}',
        '{"model":"m","created_at":"T3","response":" upon","done":false}',
        '{"model":"m","created_at":"T4","response":"","done":true,"done_reason":"length",'
        '"context":[1,2,3],"total_duration":9,"eval_count":2,"tool_calls":[{"function":{"index":0,'
        '"name":"f","arguments":{}}}]}',
    )
    builder = run("/api/generate", stream, step=5)
    assert builder.done
    assert builder.result()[1] == (
        b'{"model":"m","created_at":"T4","response":"Once upon","thinking":"hmm","done":true,'
        b'"done_reason":"length","context":[1,2,3],"total_duration":9,"eval_count":2,'
        b'"tool_calls":[{"function":{"index":0,"name":"f","arguments":{}}}]}'
    )


def test_generate_raw_has_no_context_and_logprobs_go_last() -> None:
    stream = ndjson(
        '{"model":"m","created_at":"T","response":"a","done":false,"logprobs":[{"token":"a",'
        '"logprob":-0.25}]}',
        '{"model":"m","created_at":"T","response":"","done":true,"done_reason":"stop",'
        '"eval_count":1}',
    )
    assert run("/api/generate", stream).result()[1] == (
        b'{"model":"m","created_at":"T","response":"a","done":true,"done_reason":"stop",'
        b'"eval_count":1,"logprobs":[{"token":"a","logprob":-0.25}]}'
    )


# --- /v1/chat/completions --------------------------------------------------------------------


def chunk(delta: str, finish: str = "null", extra: str = "") -> str:
    return (
        '{"id":"chatcmpl-7","object":"chat.completion.chunk","created":1787300000,"model":"qwen3",'
        f'"system_fingerprint":"fp_ollama","choices":[{{"index":0,"delta":{delta},'
        f'"finish_reason":{finish}{extra}}}]}}'
    )


USAGE = (
    '{"id":"chatcmpl-7","object":"chat.completion.chunk","created":1787300000,"model":"qwen3",'
    '"system_fingerprint":"fp_ollama","choices":[],"usage":{"prompt_tokens":26,'
    '"completion_tokens":4,"total_tokens":30}}'
)
CALL = (
    '{"id":"call_1","index":0,"type":"function","function":{"name":"get_weather",'
    '"arguments":"{\\"city\\":\\"Tokyo\\"}"}}'
)
V1_CHAT = sse(
    chunk('{"role":"assistant","reasoning":"Let me \\u003cthink\\u003e"}',
          extra=',"logprobs":{"content":[{"token":"L","logprob":-1e-7}]}'),
    chunk('{"content":"Hi"}'),
    chunk(f'{{"content":"","tool_calls":[{CALL}]}}'),
    chunk("{}", '"tool_calls"'),
    USAGE,
    "[DONE]",
)  # fmt: skip
V1_CHAT_WHOLE = (
    '{"id":"chatcmpl-7","object":"chat.completion","created":1787300012,"model":"qwen3",'
    '"system_fingerprint":"fp_ollama","choices":[{"index":0,"message":{"role":"assistant",'
    f'"content":"Hi","reasoning":"Let me \\u003cthink\\u003e","tool_calls":[{CALL}]}},'
    '"finish_reason":"tool_calls","logprobs":{"content":[{"token":"L","logprob":-1e-7}]}}],'
    '"usage":{"prompt_tokens":26,"completion_tokens":4,"total_tokens":30}}\n'
)


@pytest.mark.parametrize("step", [0, 1, 13])
def test_v1_chat_completion_from_head_shaped_stream(step: int) -> None:
    """``created`` is the last native chunk's time: the first chunk's plus the time between."""
    request = {"model": "qwen3", "messages": [], "tools": TOOLS}
    clock = iter([100.0, 112.5]).__next__  # read at the first chunk and at the finish chunk
    builder = run("/v1/chat/completions", V1_CHAT, request, step, clock=clock)
    assert builder.done and builder.error is None
    assert builder.result() == (200, V1_CHAT_WHOLE.encode(), "application/json")


def test_v1_chat_from_the_older_stream_shape_with_crlf() -> None:
    """<= v0.32.5: role in every delta, finish_reason on the last content chunk."""
    stream = sse(
        chunk('{"role":"assistant","content":"Hel"}'),
        chunk('{"role":"assistant","content":"lo"}'),
        chunk('{"role":"assistant","content":""}', '"length"').replace("1787300000", "1787300003"),
        USAGE,
        "[DONE]",
    ).replace(b"\n", b"\r\n")
    body = run("/v1/chat/completions", b": comment\r\nevent: x\r\n" + stream).result()[1]
    answer = json.loads(body)
    assert answer["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "finish_reason": "length",
        }
    ]
    assert answer["created"] == 1787300003  # each chunk had its own time: the last native one's


def test_v1_chat_without_tools_keeps_the_last_deltas_calls_and_reason() -> None:
    stream = sse(
        chunk(f'{{"role":"assistant","content":"","tool_calls":[{CALL}]}}'),
        chunk('{"content":"done"}'),
        chunk("{}", '"tool_calls"'),
        USAGE,
    )
    answer = json.loads(run("/v1/chat/completions", stream, {"model": "qwen3"}).result()[1])
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "done"}
    assert choice["finish_reason"] == "stop"


def test_v1_done_needs_finish_and_usage() -> None:
    no_usage = run("/v1/chat/completions", sse(chunk('{"content":"x"}'), chunk("{}", '"stop"')))
    assert not no_usage.done and no_usage.result()[0] == 500
    without_done_marker = sse(chunk('{"content":"x"}'), chunk("{}", '"stop"'), USAGE)
    assert run("/v1/chat/completions", without_done_marker).done


def test_v1_mid_stream_error_is_an_api_error() -> None:
    """Ollama's native error line comes out of its /v1 layer as a chunk with an empty model."""
    stream = sse(chunk('{"role":"assistant","content":"x"}'), chunk('{"content":""}').replace(
        '"model":"qwen3"', '"model":""'))  # fmt: skip
    builder = run("/v1/chat/completions", stream)
    assert builder.error == MIDSTREAM and not builder.done
    status, body, ctype = builder.result()
    assert (status, ctype) == (500, "application/json") and body.endswith(b"}\n")
    assert json.loads(body) == {
        "error": {"message": MIDSTREAM, "type": "api_error", "param": None, "code": None}
    }
    event = run("/v1/completions", sse('{"error":{"message":"overloaded"}}'))
    assert event.error == "overloaded"
    assert run("/v1/completions", sse("{broken")).error is not None


# --- /v1/completions -------------------------------------------------------------------------


def completion(
    text: str,
    finish: str,
    created: int,
    usage: str = ',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}',
) -> str:
    return (
        f'{{"id":"cmpl-5","object":"text_completion","created":{created},"choices":[{{"text":'
        f'"{text}","index":0,"finish_reason":{finish}}}],"model":"m",'
        f'"system_fingerprint":"fp_ollama"{usage}}}'
    )


def test_v1_completion_takes_the_usage_chunk_not_the_zeroed_ones() -> None:
    stream = sse(
        completion("Once", "null", 1787300000),
        completion(" upon", "null", 1787300001),
        completion("", '"length"', 1787300002),
        '{"id":"cmpl-5","object":"text_completion","created":1787300002,"choices":[],"model":"m",'
        '"system_fingerprint":"fp_ollama","usage":{"prompt_tokens":5,"completion_tokens":2,'
        '"total_tokens":7}}',
        "[DONE]",
    )
    builder = run("/v1/completions", stream, step=3)
    assert builder.done
    assert builder.result() == (
        200,
        b'{"id":"cmpl-5","object":"text_completion","created":1787300002,"model":"m",'
        b'"system_fingerprint":"fp_ollama","choices":[{"text":"Once upon","index":0,'
        b'"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":2,'
        b'"total_tokens":7}}\n',
        "application/json",
    )


def test_v1_completion_load_reply() -> None:
    usage = (
        '{"id":"cmpl-5","object":"text_completion","created":1,"choices":[],"model":"m",'
        '"system_fingerprint":"fp_ollama","usage":{"prompt_tokens":0,"completion_tokens":0,'
        '"total_tokens":0}}'
    )
    builder = run("/v1/completions", sse(completion("", '"load"', 1), usage, "[DONE]"))
    answer = json.loads(builder.result()[1])
    assert builder.done and answer["choices"][0] == {
        "text": "",
        "index": 0,
        "finish_reason": "load",
    }


# --- the request side ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "data", "streams"),
    [
        ("/api/chat", {}, True),
        ("/api/chat", {"stream": None}, True),
        ("/api/chat", {"stream": False}, False),
        ("/api/generate", {"Stream": False}, False),  # Go matches keys case-insensitively
        ("/api/generate", {"stream": False, "STREAM": True}, True),  # the last one wins
        ("/api/pull", {}, True),
        ("/v1/chat/completions", {}, False),
        ("/v1/chat/completions", {"stream": True}, True),
        ("/v1/completions", {"stream": False}, False),
        ("/v1/responses", {"stream": True}, True),
        ("/api/embed", {"stream": True}, False),
    ],
)
def test_wants_stream(path: str, data: dict[str, Any], streams: bool) -> None:
    assert wants_stream(path, data) is streams


def test_upstream_body_asks_for_a_stream_and_keeps_the_rest() -> None:
    data = {"model": "m", "Stream": False, "messages": [{"role": "user", "content": "é"}],
            "options": {"temperature": 0.1}}  # fmt: skip
    sent = json.loads(upstream_body("/api/chat", data) or b"")
    assert sent == {"model": "m", "messages": data["messages"], "options": {"temperature": 0.1},
                    "stream": True}  # fmt: skip
    v1 = {"model": "m", "prompt": "x", "stream_options": {"include_usage": False}}
    assert json.loads(upstream_body("/v1/completions", v1) or b"") == {
        "model": "m",
        "prompt": "x",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert json.loads(upstream_body("/v1/chat/completions", {"model": "m"}) or b"")["stream"]


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("/api/chat", {"model": "m"}),  # already streamed
        ("/v1/chat/completions", {"model": "m", "stream": True}),
        ("/v1/responses", {"model": "m"}),
        ("/v1/messages", {"model": "m"}),
        ("/api/embed", {"model": "m"}),
        ("/api/chat", {"model": "m", "stream": False, "_debug_render_only": True}),
        ("/v1/chat/completions", {"model": "m", "stream": "no"}),  # Ollama's 400 stays Ollama's
        ("/v1/chat/completions", {"model": "m", "stream": 0}),
        ("/v1/completions", {"model": "m", "stream_options": "x"}),
        ("/v1/completions", {"model": "m", "stream_options": {"include_usage": 1}}),
    ],
)
def test_upstream_body_leaves_what_it_cannot_assemble(path: str, data: dict[str, Any]) -> None:
    assert upstream_body(path, data) is None


def test_assembler_refuses_other_paths() -> None:
    with pytest.raises(ValueError, match="/v1/responses"):
        Assembler("/v1/responses")


# --- wire ------------------------------------------------------------------------------------


def test_go_json_writing() -> None:
    text = (
        '{"a":"<&>\\u2028\\u2029","b":[1,-2.5e-7,-0,0,true,false,null],"c":{"d":"\\u0001\\b\\t"}}'
    )
    value = loads(text)
    assert dumps(value) == (
        '{"a":"\\u003c\\u0026\\u003e\\u2028\\u2029","b":[1,-2.5e-7,-0,0,true,false,null],'
        '"c":{"d":"\\u0001\\b\\t"}}'
    )
    with pytest.raises(TypeError):
        dumps({"x": 1.5})


def test_framing_in_pieces() -> None:
    lines = Lines()
    long = b"x" * 100_000
    got: list[bytes] = []
    for i in range(0, len(long), 1000):
        got += lines.feed(long[i : i + 1000])
    assert got == []
    assert lines.feed(b"\n\nnext") == [long] and lines.tail() == b"next"
    events = Events()
    assert events.feed(b"data: a\ndata: b\n") == []
    assert events.feed(b"\n\ndata:c\n\n") == ["a\nb", "c"]
