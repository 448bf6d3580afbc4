"""Ollama's request bodies as Go structs (``api.*`` native, ``openai.*`` /v1) for gojson.

The field names are the JSON keys; the Go type names are what decode errors print, e.g.
``json: cannot unmarshal number into Go struct field ChatRequest.messages of type []api.Message``.
"""

from __future__ import annotations

from proxy.emulator.gojson import (
    ANY,
    BOOL,
    BYTES,
    DURATION,
    FLOAT,
    INT,
    STRING,
    THINK,
    GoType,
    map_of,
    slice_of,
    struct_of,
)

# fmt: off
OPTIONS = map_of(ANY)
IMAGES = slice_of(BYTES, "[]api.ImageData")
MESSAGE = struct_of("api.Message", role=STRING, content=STRING, thinking=STRING, images=IMAGES,
                    tool_calls=slice_of(ANY, "[]api.ToolCall"), tool_name=STRING,
                    tool_call_id=STRING)
_COMMON = {"model": STRING, "stream": BOOL, "format": ANY, "keep_alive": DURATION,
           "options": OPTIONS, "think": THINK, "truncate": BOOL, "shift": BOOL, "logprobs": BOOL,
           "top_logprobs": INT}

GENERATE = struct_of("api.GenerateRequest", prompt=STRING, suffix=STRING, system=STRING,
                     template=STRING, context=slice_of(INT), raw=BOOL, images=IMAGES,
                     _debug_render_only=BOOL, **_COMMON)
CHAT = struct_of("api.ChatRequest", messages=slice_of(MESSAGE, "[]api.Message"),
                 tools=slice_of(ANY, "api.Tools"), **_COMMON)
EMBED = struct_of("api.EmbedRequest", model=STRING, input=ANY, truncate=BOOL, dimensions=INT,
                  keep_alive=DURATION, options=OPTIONS)
EMBEDDINGS = struct_of("api.EmbeddingRequest", model=STRING, prompt=STRING, keep_alive=DURATION,
                       options=OPTIONS)

SHOW = struct_of("api.ShowRequest", model=STRING, system=STRING, template=STRING, verbose=BOOL,
                 options=OPTIONS, name=STRING)
_TRANSFER = {"model": STRING, "insecure": BOOL, "username": STRING, "password": STRING,
             "stream": BOOL, "name": STRING}
PULL = struct_of("api.PullRequest", **_TRANSFER)
PUSH = struct_of("api.PushRequest", **_TRANSFER)
CREATE = struct_of("api.CreateRequest", **{"model": STRING, "stream": BOOL, "quantize": STRING,
                   "from": STRING, "files": map_of(STRING), "adapters": map_of(STRING),
                   "template": STRING, "license": ANY, "system": STRING,
                   "parameters": map_of(ANY), "messages": slice_of(MESSAGE, "[]api.Message"),
                   "renderer": STRING, "parser": STRING, "name": STRING})
COPY = struct_of("api.CopyRequest", source=STRING, destination=STRING)
DELETE = struct_of("api.DeleteRequest", model=STRING, name=STRING)

FLOAT32 = GoType("float32", "float")
V1_STREAM_OPTIONS = struct_of("openai.StreamOptions", include_usage=BOOL)
V1_MESSAGE = struct_of("openai.Message", role=STRING, content=ANY, reasoning=STRING,
                       tool_calls=slice_of(ANY, "[]openai.ToolCall"), name=STRING,
                       tool_call_id=STRING)
V1_CHAT = struct_of("openai.ChatCompletionRequest", model=STRING,
                    messages=slice_of(V1_MESSAGE, "[]openai.Message"), stream=BOOL,
                    stream_options=V1_STREAM_OPTIONS, max_tokens=INT, seed=INT, stop=ANY,
                    temperature=FLOAT, frequency_penalty=FLOAT, presence_penalty=FLOAT,
                    top_p=FLOAT, response_format=ANY, tools=slice_of(ANY, "[]api.Tool"),
                    reasoning=ANY, reasoning_effort=STRING, logprobs=BOOL, top_logprobs=INT)
V1_COMPLETION = struct_of("openai.CompletionRequest", model=STRING, prompt=STRING,
                          frequency_penalty=FLOAT32, max_tokens=INT, presence_penalty=FLOAT32,
                          seed=INT, stop=ANY, stream=BOOL, stream_options=V1_STREAM_OPTIONS,
                          temperature=FLOAT32, top_p=FLOAT32, suffix=STRING)
V1_EMBED = struct_of("openai.EmbedRequest", input=ANY, model=STRING, dimensions=INT,
                     encoding_format=STRING)
# fmt: on
