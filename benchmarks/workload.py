"""Seeded workloads: every request of a scenario, with its prompt, its length and when it goes out.

Times are virtual seconds (the emulator's scale). A request either arrives at a fixed time (``at``)
or follows another one: it is sent ``think`` seconds after that one finished, the way a user answers
a reply or Open WebUI fires its task calls after a chat. Every contender gets the same requests with
the same bodies; only when follow-ups go out depends on how fast it answered.

Prompts are plain words sized so the emulator (which counts each word and each punctuation mark as
one token, and renders a chat as ``<role> content`` lines plus ``<assistant>``) sees exactly
``prompt_tokens``; the output length is ``options.num_predict``.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

CONTEXT = 8192
"""The demo box's context_length: longer prompts are cut to it (the emulator would cut them too)."""
ROLE_TOKENS = 3
"""``<user>`` is three tokens for the emulator: ``<``, ``user``, ``>``."""
TRACE_SLICE = Path(__file__).with_name("data") / "azure_llm_2023_conv_600-1200s.csv"

_VOCAB = (
    "time", "people", "way", "year", "water", "words", "number", "system", "data", "answer",
    "question", "model", "graphics", "card", "memory", "queue", "token", "proxy", "server",
    "request", "user", "chat", "reply", "idle", "busy", "load", "slot", "weight", "layer", "cache",
    "prompt", "context", "window", "batch", "stream", "route", "policy", "fleet", "instance",
    "replica", "eviction", "budget", "latency", "median", "tail", "spread", "pool", "share",
    "split", "copy", "learn", "plan", "read", "write", "check",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Req:
    """One request of a workload."""

    id: int
    kind: str
    """What it stands for: ``chat``, ``task`` (Open WebUI), ``short``, ``long``, ``flood``."""
    model: str
    prompt_tokens: int
    """Tokens of the rendered prompt, as the emulator counts them."""
    cached_tokens: int
    """Prefix left in a slot's prompt cache by the session's previous request, at best."""
    output_tokens: int
    stream: bool
    at: float = 0.0
    """Arrival in virtual seconds after the start (requests that follow no other one)."""
    after: int | None = None
    """The request this one waits for; it goes out ``think`` seconds after that one ended."""
    think: float = 0.0
    body: bytes = field(repr=False, default=b"")
    user: str = ""
    """Who sends it (replay's ``X-OpenWebUI-User-Id``); empty: no user header."""


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    title: str
    description: str
    speed: float
    """Emulator time compression for this scenario (chosen so the 2-core box is not CPU-bound)."""
    requests: tuple[Req, ...]
    gpus: tuple[tuple[str, float], ...] = ()
    """A box of its own: (name, GiB) per emulated GPU at speed 1.0; empty = the demo box."""
    users: int = 0
    """Concurrent chats its box is planned for (``ollamux plan --users``, the planned contender)."""
    contenders: tuple[str, ...] = ()
    """Who runs it when ``--contenders`` is not given; empty = every contender."""
    boxes: int = 1
    """Copies of the box behind one address (its GPUs that many times; benchmarks/two_box.py)."""

    @property
    def models(self) -> list[str]:
        return sorted({r.model for r in self.requests})


class _Text:
    """Filler text of an exact token count (one plain word = one token)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._words = [rng.choice(_VOCAB) for _ in range(4096)]

    def make(self, tag: str, tokens: int) -> str:
        """``tokens`` tokens: ``tag`` (one word, unique per message, so no two prompts share a
        prefix by chance) and then filler words."""
        parts = [tag]
        left = tokens - 1
        while left > 0:
            k = min(left, len(self._words))
            start = self._rng.randrange(len(self._words) - k + 1)
            parts.append(" ".join(self._words[start : start + k]))
            left -= k
        return " ".join(parts)


def _body(model: str, messages: list[dict[str, str]], output: int, *, stream: bool) -> bytes:
    payload = {
        "model": model,
        "messages": messages,
        "stream": stream,
        "options": {"num_predict": output},
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def prompt_tokens(content_tokens: Sequence[int]) -> int:
    """Tokens of a rendered chat whose messages hold ``content_tokens`` each."""
    return sum(ROLE_TOKENS + t for t in content_tokens) + ROLE_TOKENS


class _Conversation:
    """One chat: its history grows by the user's message and a stand-in for each answer."""

    def __init__(self, key: str, text: _Text) -> None:
        self.key = key
        self._text = text
        self._messages: list[dict[str, str]] = []
        self._tokens: list[int] = []
        self._turn = 0
        self._last_prompt = 0
        self._last_output = 0

    def ask(self, user_tokens: int, output: int) -> tuple[list[dict[str, str]], int, int]:
        """The next turn's messages, prompt tokens, and the prefix cached from the previous turn.

        The previous answer is a stand-in of its length (the client does not wait to read it), so
        a slot's cache holds the previous prompt, not the answer.
        """
        if self._turn:
            tag = f"a{self.key}x{self._turn}"
            answer = self._text.make(tag, self._last_output)
            self._messages.append({"role": "assistant", "content": answer})
            self._tokens.append(self._last_output)
        self._turn += 1
        user = self._text.make(f"u{self.key}x{self._turn}", user_tokens)
        self._messages.append({"role": "user", "content": user})
        self._tokens.append(user_tokens)
        trimmed = False
        while len(self._messages) > 1 and prompt_tokens(self._tokens) + output > CONTEXT - 16:
            del self._messages[:2], self._tokens[:2]  # the client drops the oldest exchange
            trimmed = True
        prompt = prompt_tokens(self._tokens)
        cached = 0 if trimmed else self._last_prompt
        self._last_prompt, self._last_output = prompt, output
        return list(self._messages), prompt, cached


class _Builder:
    """Collects requests with consecutive ids."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.text = _Text(rng)
        self.requests: list[Req] = []

    def add(
        self,
        *,
        kind: str,
        model: str,
        messages: list[dict[str, str]],
        prompt: int,
        cached: int,
        output: int,
        stream: bool = True,
        at: float = 0.0,
        after: int | None = None,
        think: float = 0.0,
        user: str = "",
    ) -> int:
        rid = len(self.requests)
        self.requests.append(
            Req(
                id=rid,
                kind=kind,
                model=model,
                prompt_tokens=prompt,
                cached_tokens=cached,
                output_tokens=output,
                stream=stream,
                at=round(at, 4),
                after=after,
                think=round(think, 4),
                body=_body(model, messages, output, stream=stream),
                user=user,
            )
        )
        return rid

    def single(
        self, kind: str, model: str, prompt: int, output: int, at: float, *, user: str = ""
    ) -> int:
        """A request with one user message and no history."""
        prompt = max(ROLE_TOKENS * 2 + 1, min(prompt, CONTEXT))
        content = self.text.make(f"r{len(self.requests)}", prompt - 2 * ROLE_TOKENS)
        messages = [{"role": "user", "content": content}]
        return self.add(
            kind=kind,
            model=model,
            messages=messages,
            prompt=prompt,
            cached=0,
            output=output,
            at=at,
            user=user,
        )

    def pick(self, mix: dict[str, float]) -> str:
        return self.rng.choices(list(mix), weights=list(mix.values()))[0]

    def arrivals(self, rate: float, window: float) -> list[float]:
        """Poisson arrivals at ``rate`` per virtual second over ``window`` seconds."""
        out, t = [], self.rng.expovariate(rate)
        while t < window:
            out.append(t)
            t += self.rng.expovariate(rate)
        return out

    def turns(self, mean: float, most: int) -> int:
        n = 1
        while n < most and self.rng.random() < 1 - 1 / mean:
            n += 1
        return n

    def lognormal(self, median: float, sigma: float, low: int, high: int) -> int:
        return int(min(max(self.rng.lognormvariate(math.log(median), sigma), low), high))


def load_trace(path: Path) -> list[tuple[float, int, int]]:
    """(arrival s, prompt tokens, output tokens) rows of a trace, arrivals from 0.

    Reads the committed slice (``offset_ms,context_tokens,generated_tokens``) or the original
    Azure file (``TIMESTAMP,ContextTokens,GeneratedTokens``).
    """
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        azure = header[0].strip().upper() == "TIMESTAMP"
        t0: datetime | None = None
        for rec in reader:
            if azure:
                moment = datetime.strptime(rec[0][:26], "%Y-%m-%d %H:%M:%S.%f")
                t0 = t0 or moment
                t = (moment - t0).total_seconds()
            else:
                t = int(rec[0]) / 1000
            rows.append((t, int(rec[1]), int(rec[2])))
    return rows


# --- scenarios -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Size:
    """How big a run is: the full run, or ``--quick``."""

    quick: bool = False
    seed: int = 0
    trace: Path = TRACE_SLICE

    def choose(self, full: float, quick: float) -> float:
        return quick if self.quick else full


TRACE_MIX = {"llama3.1:8b": 0.4, "llama3.2:3b": 0.2, "qwen2.5:14b": 0.25, "gemma3:27b": 0.15}
MULTI_MIX = {
    "llama3.2:3b": 0.2,
    "llama3.1:8b": 0.3,
    "qwen2.5:14b": 0.2,
    "gemma3:27b": 0.15,
    "qwen2.5:32b": 0.15,
}
OWUI_MIX = {"llama3.1:8b": 0.5, "qwen2.5:14b": 0.3, "gemma3:27b": 0.2}
TRACE_SHARE = 0.4
"""Share of the trace's requests replayed (seeded thinning): the trace's ~5.2 req/s is far more
than four GPUs serve; 40 % of it keeps the box busy without drowning it."""


BURST_MODEL = "llama3.1:8b"
BURST_SHARE = 0.6
"""Share of the trace replayed on one model: about 3 requests/s, ~60 % of what the box's four
llama3.1:8b copies serve, so the trace's bursts queue and the lulls drain them."""


def trace_label(size: Size) -> tuple[str, str]:
    """(name suffix, words) of the trace file: ``("", "the Azure LLM 2023 conversation trace from
    second 600")`` for the committed slice, the file's name for any other ``--trace``."""
    if size.trace.resolve() == TRACE_SLICE.resolve():
        return "", "the Azure LLM 2023 conversation trace from second 600"
    return f"-{size.trace.stem}", f"the trace file {size.trace.name}"


def _replay_trace(
    b: _Builder, size: Size, window: float, share: float, mix: dict[str, float]
) -> None:
    """A seeded ``share`` of the trace's first ``window`` seconds, each request on a model drawn
    from ``mix``."""
    for t, prompt, output in load_trace(size.trace):
        if t >= window:
            break
        if b.rng.random() < share:
            b.single("chat", b.pick(mix), prompt, max(output, 1), t)


def trace_scenario(size: Size) -> Scenario:
    b = _Builder(random.Random(f"{size.seed}:trace"))
    window = size.choose(360.0, 40.0)
    _replay_trace(b, size, window, TRACE_SHARE, TRACE_MIX)
    suffix, words = trace_label(size)
    return Scenario(
        name="trace" + suffix,
        title=f"Trace {size.trace.name}" if suffix else "Azure conversation trace",
        description=f"{window:g} s of {words} ({TRACE_SHARE:.0%} of its requests, seeded), real "
        f"prompt and output lengths, each request on a model drawn from {_mix(TRACE_MIX)}",
        speed=10.0,
        requests=tuple(b.requests),
    )


def trace_one_model_scenario(size: Size) -> Scenario:
    b = _Builder(random.Random(f"{size.seed}:trace-one-model"))
    window = size.choose(360.0, 40.0)
    _replay_trace(b, size, window, BURST_SHARE, {BURST_MODEL: 1.0})
    suffix, words = trace_label(size)
    return Scenario(
        name="trace-one-model" + suffix,
        title="One model on the trace's bursts",
        description=f"{window:g} s of {words} ({BURST_SHARE:.0%} of its requests, seeded), its "
        f"arrival times and real prompt and output lengths, every request on {BURST_MODEL}",
        speed=10.0,
        requests=tuple(b.requests),
    )


def _outputs(size: Size) -> list[int]:
    return [max(o, 1) for _t, _p, o in load_trace(size.trace)]


def _chats(
    b: _Builder,
    size: Size,
    *,
    window: float,
    session_rate: float,
    mix: dict[str, float],
    think_mean: float = 20.0,
    turns_mean: float = 4.0,
    tasks: bool = False,
) -> None:
    """Chat sessions arriving as a Poisson process; each turn follows the previous reply after a
    think time; with ``tasks``, Open WebUI's non-streamed title/tags/follow-up calls follow each
    reply (title and tags after the first one only, as Open WebUI does)."""
    outputs = _outputs(size)
    if size.quick:  # shorter sessions, so a quick run is not mostly one session's tail
        turns_mean, think_mean = min(turns_mean, 2.0), min(think_mean, 10.0)
    for n, start in enumerate(b.arrivals(session_rate, window)):
        model = b.pick(mix)
        chat = _Conversation(f"{n}", b.text)
        previous: int | None = None
        for turn in range(b.turns(turns_mean, 8)):
            user = b.lognormal(60, 1.0, 4, 1200)
            output = b.rng.choice(outputs)
            messages, prompt, cached = chat.ask(user, output)
            think = b.rng.expovariate(1 / think_mean)
            rid = b.add(
                kind="chat",
                model=model,
                messages=messages,
                prompt=prompt,
                cached=cached,
                output=output,
                at=start,
                after=previous,
                think=think if previous is not None else 0.0,
            )
            if tasks:
                jobs = [("follow", 300, 60)]
                if turn == 0:
                    jobs = [("title", 200, 12), ("tags", 260, 24), *jobs]
                for name, template, out in jobs:
                    seen = min(user + output, 2000)  # the task prompt quotes the exchange
                    content = b.text.make(f"{name}{n}x{turn}", template + seen)
                    b.add(
                        kind="task",
                        model=model,
                        messages=[{"role": "user", "content": content}],
                        prompt=prompt_tokens([template + seen]),
                        cached=0,
                        output=out,
                        stream=False,
                        after=rid,
                    )
            previous = rid


def one_model_scenario(size: Size) -> Scenario:
    b = _Builder(random.Random(f"{size.seed}:one-model"))
    window = size.choose(300.0, 45.0)
    _chats(b, size, window=window, session_rate=0.8, mix={"llama3.1:8b": 1.0})
    return Scenario(
        name="one-model",
        title="Many users, one 8B model",
        description=f"chat sessions on llama3.1:8b arriving at 0.8/s for {window:g} s, ~4 turns "
        f"each (20 s mean think time after each reply), output lengths from {trace_label(size)[1]}",
        speed=8.0,
        requests=tuple(b.requests),
    )


def multi_model_scenario(size: Size) -> Scenario:
    b = _Builder(random.Random(f"{size.seed}:multi-model"))
    window = size.choose(300.0, 45.0)
    _chats(b, size, window=window, session_rate=0.4, mix=MULTI_MIX)
    return Scenario(
        name="multi-model",
        title="Five models of different sizes",
        description=f"chat sessions at 0.4/s for {window:g} s on {_mix(MULTI_MIX)}: together "
        "~80 GiB of weights and KV cache, more than any one GPU",
        speed=size.choose(12.0, 30.0),
        requests=tuple(b.requests),
    )


def long_generation_scenario(size: Size) -> Scenario:
    b = _Builder(random.Random(f"{size.seed}:long-generation"))
    window = size.choose(300.0, 45.0)
    model = "llama3.1:8b"
    every = size.choose(60.0, 20.0)
    longs = [every / 3 + i * every for i in range(int(window // every))]
    events = [(t, "short") for t in b.arrivals(4.0, window)] + [(t, "long") for t in longs]
    for t, kind in sorted(events):
        if kind == "long":
            b.single("long", model, 1500, 4000, t)
        else:
            b.single(
                "short", model, b.lognormal(250, 0.7, 20, 2000), b.lognormal(60, 0.6, 8, 200), t
            )
    return Scenario(
        name="long-generation",
        title="Long generations among short ones",
        description=f"short chats on {model} at 4/s for {window:g} s (prompt ~250, output ~60 "
        f"tokens), and every {every:g} s one long generation (prompt 1500, output 4000 tokens)",
        speed=10.0,
        requests=tuple(b.requests),
    )


def open_webui_scenario(size: Size) -> Scenario:
    b = _Builder(random.Random(f"{size.seed}:open-webui"))
    window = size.choose(300.0, 60.0)
    _chats(b, size, window=window, session_rate=0.3, mix=OWUI_MIX, turns_mean=3.0, tasks=True)
    return Scenario(
        name="open-webui",
        title="Open WebUI: chats and their task calls",
        description=f"chat sessions at 0.3/s for {window:g} s on {_mix(OWUI_MIX)}; each reply is "
        "followed at once by Open WebUI's non-streamed task calls on the same model (title and "
        "tags after the first reply, follow-up suggestions after every reply)",
        speed=12.0,
        requests=tuple(b.requests),
    )


BOX_70B_MIX = {"llama3.3:70b": 0.6, "qwen2.5:32b": 0.4}
BOX_70B_GPUS = tuple((f"rtx4090-{i}", 24.0) for i in range(4))
BOX_70B_USERS = 16
"""Chats and task calls in flight at once the box is planned for: Open WebUI sends three task calls
at once after each reply."""
BOX_70B_CONTENDERS = (
    "ollamux_plan", "spread_keepalive", "spread_keepalive_np4", "vram_queue", "lower_bound",
)  # fmt: skip


def box_70b_scenario(size: Size) -> Scenario:
    """The box this project was made for: 4 x 24 GiB cards, a 70B model that fits on none alone
    and a 32B one, used through Open WebUI."""
    b = _Builder(random.Random(f"{size.seed}:70b-box"))
    window = size.choose(300.0, 90.0)
    _chats(b, size, window=window, session_rate=0.1, mix=BOX_70B_MIX, turns_mean=3.0, tasks=True)
    return Scenario(
        name="70b-box",
        title="The 70b box: 4 x 24 GiB, Open WebUI on a 70B and a 32B model",
        description=f"4 x 24 GiB GPUs; Open WebUI's chat sessions at 0.1/s for {window:g} s on "
        f"{_mix(BOX_70B_MIX)}, each reply followed by its non-streamed task calls (title and "
        "tags after the first, follow-ups after every reply); llama3.3:70b (43 GB) fits on no "
        "single card",
        speed=12.0,
        requests=tuple(b.requests),
        gpus=BOX_70B_GPUS,
        users=BOX_70B_USERS,
        contenders=BOX_70B_CONTENDERS,
    )


TWO_BOX = "two-box"
TWO_BOX_CONTENDERS = ("fronts_2x2", "front_8", "nginx_8", "random_2", "lower_bound")


def two_box_scenario(size: Size) -> Scenario:
    """The trace scenario's workload at twice its rate, on the demo box twice (two nodes)."""
    b = _Builder(random.Random(f"{size.seed}:{TWO_BOX}"))
    window = size.choose(360.0, 40.0)
    _replay_trace(b, size, window, 2 * TRACE_SHARE, TRACE_MIX)
    _suffix, words = trace_label(size)
    return Scenario(
        name=TWO_BOX,
        title="Two boxes behind one address",
        description=f"the demo box twice (2 nodes x 4 GPUs); {window:g} s of {words} "
        f"({2 * TRACE_SHARE:.0%} of its requests, seeded: twice the trace scenario's rate), real "
        f"prompt and output lengths, each request on a model drawn from {_mix(TRACE_MIX)}",
        speed=10.0,
        requests=tuple(b.requests),
        boxes=2,
        contenders=TWO_BOX_CONTENDERS,
    )


FAIRNESS = "fairness"
FAIRNESS_BASELINE = "fairness-baseline"
FAIR_MODEL = "qwen2.5:14b"
FAIR_USERS = 6
FAIR_RATE = 0.375
"""Chats per emulated second from each ordinary user: the six of them keep the box's four
qwen2.5:14b copies ~40 % busy; with the flood (ten times one user's rate) the box gets ~110 % of
what it serves."""
FLOOD_FACTOR = 10
FLOOD_USER = "flood"
FAIR_WARMUP_S = 15.0
"""Before the users start: 16 requests at once (one per slot of the box) load the model where
each contender puts it, so neither run's percentiles are cold loads."""


def fair_users(*, flood: bool) -> list[tuple[str, str, float]]:
    """(user, kind, requests per emulated second) of the fairness scenario's senders."""
    users = [(f"user-{i}", "chat", FAIR_RATE) for i in range(1, FAIR_USERS + 1)]
    if flood:
        users.append((FLOOD_USER, "flood", FAIR_RATE * FLOOD_FACTOR))
    return users


def _fairness(size: Size, *, flood: bool) -> Scenario:
    """The ordinary users' requests come first and from the same seed with or without the flood,
    so both runs send them identical requests at identical times."""
    b = _Builder(random.Random(f"{size.seed}:fairness"))
    window = size.choose(180.0, 60.0)
    for _ in range(16):
        b.single("warmup", FAIR_MODEL, 200, 200, 0.0, user="warmup")
    for user, kind, rate in fair_users(flood=flood):
        for t in b.arrivals(rate, window):
            prompt, output = b.lognormal(300, 0.8, 20, 3000), b.lognormal(100, 0.6, 16, 500)
            b.single(kind, FAIR_MODEL, prompt, output, FAIR_WARMUP_S + t, user=user)
    others = (
        f"after {FAIR_WARMUP_S:g} s of warm-up (16 requests at once, not counted), "
        f"{FAIR_USERS} users (user-1 to user-{FAIR_USERS}) each sending single chats to "
        f"{FAIR_MODEL} at {FAIR_RATE:g}/s (Poisson, prompt ~300 and output ~100 tokens) for "
        f"{window:g} s, each request with its sender's X-OpenWebUI-User-Id"
    )
    if not flood:
        return Scenario(
            name=FAIRNESS_BASELINE,
            title="Fairness: the users without the flood",
            description=f"the {FAIRNESS} scenario without its flooding user: {others}",
            speed=6.0,
            requests=tuple(b.requests),
        )
    return Scenario(
        name=FAIRNESS,
        title="Fairness: one user floods the box",
        description=f"{others}, and one more user ({FLOOD_USER}) sending the same chats at "
        f"{FAIR_RATE * FLOOD_FACTOR:g}/s, {FLOOD_FACTOR} times each other user's rate",
        speed=6.0,
        requests=tuple(b.requests),
    )


def fairness_scenario(size: Size) -> Scenario:
    return _fairness(size, flood=True)


def fairness_baseline_scenario(size: Size) -> Scenario:
    return _fairness(size, flood=False)


def head(scenario: Scenario, n: int, *, speed: float | None = None) -> Scenario:
    """The first ``n`` requests of ``scenario`` (a request only follows an earlier one, so they
    form a workload of their own), optionally at another speed: for smoke tests."""
    return Scenario(
        name=scenario.name,
        title=scenario.title,
        description=f"the first {n} requests of: {scenario.description}",
        speed=speed or scenario.speed,
        requests=scenario.requests[:n],
    )


def _mix(mix: dict[str, float]) -> str:
    return ", ".join(f"{m} {w:.0%}" for m, w in mix.items())


SCENARIOS: dict[str, Callable[[Size], Scenario]] = {
    "trace": trace_scenario,
    "trace-one-model": trace_one_model_scenario,
    "one-model": one_model_scenario,
    "multi-model": multi_model_scenario,
    "long-generation": long_generation_scenario,
    "open-webui": open_webui_scenario,
    "70b-box": box_70b_scenario,
    TWO_BOX: two_box_scenario,
    FAIRNESS_BASELINE: fairness_baseline_scenario,
    FAIRNESS: fairness_scenario,
}
