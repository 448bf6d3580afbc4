"""The instance layout for a box: which GPUs form a group, which stay single, and their slots.

A pure function of the GPUs, the models users run, the context and the expected concurrent chats
(``ollamux plan`` reads NVML or flags and prints the result). Memory follows Ollama's estimate
(shared/reference/ollama.md §6.4-6.5): a loaded model takes its weights plus the KV cache of
``num_parallel`` slots of ``context`` tokens each, and every GPU a runner uses keeps Ollama's
minimum reserve and a compute buffer free.

The rules, in order:

1. A model that fits no single card, even with one slot, gets a *group*: one instance over the
   fewest of the largest cards left whose memory holds its weights and the KV cache of the chats
   expected on it, with ``spread: false`` (so that the smaller models still go to one card each).
   One card stays out of the group while other models need a card of their own.
2. Every card left is a single instance and serves the models that fit it.
3. ``num_parallel`` of an instance is the chats expected per model (``users`` shared evenly by the
   models), cut to what fits next to the largest model it serves, never more than
   :data:`MAX_PARALLEL` and never less than 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import ConfigError

__all__ = [
    "GIB",
    "MAX_PARALLEL",
    "PER_GPU_BYTES",
    "Card",
    "Model",
    "Plan",
    "PlannedInstance",
    "config_dict",
    "plan",
]

GIB = 1024**3
PER_GPU_BYTES = 457 * 1024**2 + int(0.3 * GIB)
"""Kept free on every GPU a runner uses: Ollama's minimum reserve (457 MiB) and the runner's CUDA
context and compute buffer (~0.3 GiB, as the emulator's placement counts it)."""
MAX_PARALLEL = 16
"""The most slots planned per instance: past it a batch slows every chat more than it helps."""


@dataclass(frozen=True, kw_only=True)
class Card:
    """One GPU of the box."""

    index: int
    name: str
    memory: int
    """Total bytes."""
    uuid: str = ""

    @property
    def usable(self) -> int:
        return max(self.memory - PER_GPU_BYTES, 0)

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.name}, {_gib(self.memory)})"


@dataclass(frozen=True, kw_only=True)
class Model:
    """One model users run: its weights and its KV cache per token of context."""

    name: str
    weights: int
    """Bytes of the model file (the weights as loaded)."""
    kv_per_token: int
    """Bytes of KV cache per token of context, one slot."""

    def kv_slot(self, context: int) -> int:
        return self.kv_per_token * context


@dataclass(frozen=True, kw_only=True)
class PlannedInstance:
    """One Ollama server of the plan."""

    name: str
    cards: tuple[Card, ...]
    models: tuple[str, ...]
    """The listed models it is planned for (the largest first)."""
    num_parallel: int
    free_after: int
    """Bytes left over its cards once the largest model and its slots are loaded."""

    @property
    def group(self) -> bool:
        return len(self.cards) > 1


@dataclass(frozen=True, kw_only=True)
class Plan:
    instances: tuple[PlannedInstance, ...]
    context: int
    users: int
    lines: tuple[str, ...] = field(default=())
    """The reasoning, one plain sentence per line."""


def plan(
    cards: Sequence[Card], models: Sequence[Model], *, context: int = 8192, users: int = 4
) -> Plan:
    """The layout for ``cards`` and ``models``; ConfigError naming the model that fits nowhere."""
    if not cards:
        raise ConfigError(
            "no GPU to plan for; give --gpu NAME:GIB, e.g. --gpu rtx4090:24", path="--gpu"
        )
    if not models:
        raise ConfigError(
            "no model to plan for; give --model NAME, e.g. --model qwen2.5:32b", path="--model"
        )
    if context < 1:
        raise ConfigError("must be >= 1, e.g. 8192", path="--context")
    if users < 1:
        raise ConfigError("must be >= 1, e.g. 8", path="--users")
    models = sorted(models, key=lambda m: (-m.weights, m.name))
    left = sorted(cards, key=lambda c: (-c.memory, c.index))
    target = min(max(math.ceil(users / len(models)), 1), MAX_PARALLEL)
    lines = [
        f"{len(cards)} GPU(s), {len(models)} model(s), context {context} tokens, {users} "
        f"concurrent chat(s) expected: {target} per model.",
    ]
    for m in models:
        lines.append(
            f"{m.name}: {_gib(m.weights)} of weights + {_gib(m.kv_slot(context))} of KV cache "
            f"per chat at context {context}."
        )
        _check_fits(m, cards, context)
    largest = left[0]
    big = [m for m in models if _slots(m, (largest,), context) < 1]
    small = [m for m in models if m not in big]
    instances: list[PlannedInstance] = []
    for n, m in enumerate(big):
        last = n + 1 == len(big)
        group = _group(m, left, 0 if last and not small else 1, target, context, lines)
        left = [c for c in left if c not in group]
        if last and left and not small:  # nothing else fits these alone: more room for the group
            lines.append(
                f"{_names(left)}: no listed model fits alone, so the group takes them too "
                f"(room for more chats or smaller models later)."
            )
            group, left = tuple(sorted((*group, *left), key=lambda c: c.index)), []
        lines.append(
            f"With spread: false, Ollama splits {m.name} over the group's cards and puts a "
            "smaller model on one card of it."
        )
        instances.append(_instance(group, [m], target, context, lines))
    for card in sorted(left, key=lambda c: c.index):
        fitting = [m for m in small if _slots(m, (card,), context) >= 1]
        if not fitting:
            lines.append(f"{card.label}: no listed model fits it; it stays single and idle.")
            continue
        instances.append(_instance((card,), fitting, target, context, lines))
    _share_groups(instances, small, context, lines)
    ordered = tuple(sorted(instances, key=lambda i: i.cards[0].index))
    return Plan(instances=ordered, context=context, users=users, lines=tuple(lines))


def _check_fits(m: Model, cards: Sequence[Card], context: int) -> None:
    usable = sum(c.usable for c in cards)
    need = m.weights + m.kv_slot(context)
    if need > usable:
        raise ConfigError(
            f"{m.name} needs {_gib(need)} ({_gib(m.weights)} of weights + "
            f"{_gib(m.kv_slot(context))} of KV cache for one chat at context {context}) and fits "
            f"on no GPU{_together(cards)} ({_gib(usable)} usable); use a "
            "smaller quantization or context (--context), or more GPUs",
            path="--model",
        )


def _slots(m: Model, cards: Sequence[Card], context: int) -> int:
    """Chats ``m`` serves at once on ``cards`` (0: it does not fit)."""
    room = sum(c.usable for c in cards) - m.weights
    per = m.kv_slot(context)
    if room < per:
        return 0
    return room // per if per else MAX_PARALLEL


def _group(
    m: Model, left: list[Card], keep: int, target: int, context: int, lines: list[str]
) -> tuple[Card, ...]:
    """The fewest of the largest cards left that hold ``m`` with ``target`` slots."""
    largest = left[0] if left else None
    if largest is not None:
        lines.append(
            f"{m.name} fits on no single card: the largest, {largest.label}, has "
            f"{_gib(largest.usable)} usable, it needs {_gib(m.weights + m.kv_slot(context))} "
            "for one chat."
        )
    pool = left[: max(len(left) - keep, 0)]
    if _slots(m, pool, context) < 1:
        pool = left  # it needs the card kept for the others: they will share its group
    if _slots(m, pool, context) < 1:
        raise ConfigError(
            f"{m.name} does not fit on the {len(left)} GPU(s) left after the models larger than "
            f"it ({_gib(sum(c.usable for c in left))} usable); plan fewer or smaller models, or "
            "a shorter --context",
            path="--model",
        )
    tried = []
    for k in range(2, len(pool) + 1):
        slots = _slots(m, pool[:k], context)
        tried.append(f"{k} cards: {_gib(sum(c.usable for c in pool[:k]))} usable, {slots} chat(s)")
        if slots >= target:
            break
    lines.append(f"{m.name} on a group: " + "; ".join(tried) + ".")
    k = len(tried) + 1
    chosen = tuple(sorted(pool[:k], key=lambda c: c.index))
    if _slots(m, chosen, context) >= target:
        why = f"the fewest cards that hold {target} chat(s) at once"
    else:
        why = f"all the cards it may take, short of the {target} chat(s) expected"
    if keep and len(pool) < len(left):
        why += f", keeping {keep} card(s) for the other models"
    lines.append(f"{m.name}: a group of {k} cards, {_names(chosen)}: {why}.")
    return chosen


def _instance(
    cards: tuple[Card, ...], models: list[Model], target: int, context: int, lines: list[str]
) -> PlannedInstance:
    first = models[0]
    fits = _slots(first, cards, context)
    num_parallel = max(min(fits, target, MAX_PARALLEL), 1)
    free = sum(c.usable for c in cards) - first.weights - num_parallel * first.kv_slot(context)
    name = f"gpu{cards[0].index}" + (f"-{cards[-1].index}" if len(cards) > 1 else "")
    serves = ", ".join(m.name for m in models)
    if fits >= target:
        why = f"the {target} chat(s) expected per model"
    else:
        why = f"all that fits next to {first.name}'s weights ({target} expected: the rest queue)"
    lines.append(
        f"{name} ({_names(cards)}): serves {serves}; num_parallel {num_parallel}, {why}; "
        f"{_gib(free)} left over."
    )
    return PlannedInstance(
        name=name,
        cards=cards,
        models=tuple(m.name for m in models),
        num_parallel=num_parallel,
        free_after=free,
    )


def _share_groups(
    instances: list[PlannedInstance],
    small: list[Model],
    context: int,
    lines: list[str],
) -> None:
    """Say which smaller models a group can also hold, each on one of its cards."""
    served = {name for inst in instances if not inst.group for name in inst.models}
    for n, inst in enumerate(instances):
        if not inst.group:
            continue
        per_card = inst.free_after // len(inst.cards)
        also = [m for m in small if m.weights + inst.num_parallel * m.kv_slot(context) <= per_card]
        homeless = [m.name for m in small if m.name not in served]
        if also:
            lines.append(
                f"{inst.name}: {', '.join(m.name for m in also)} also fit on one of its cards next "
                f"to {inst.models[0]} (~{_gib(per_card)} left per card): the router sends them "
                "there when the single cards are busy."
            )
            instances[n] = PlannedInstance(
                name=inst.name,
                cards=inst.cards,
                models=(*inst.models, *(m.name for m in also)),
                num_parallel=inst.num_parallel,
                free_after=inst.free_after,
            )
        for name in homeless:
            if name not in {m.name for m in also}:
                lines.append(
                    f"{name}: no card of its own is left and it does not fit next to "
                    f"{inst.models[0]}: the two will take turns on {inst.name} (loads)."
                )


def config_dict(result: Plan, *, emulated: bool = False) -> dict[str, Any]:
    """The plan as an ollamux config: ``instances`` (and, ``emulated``, the ``emulator`` box)."""
    names = [c.name for inst in result.instances for c in inst.cards]
    clash = len(set(names)) < len(names)

    def gpu(c: Card) -> int | str:
        if not emulated:
            return c.index
        return f"{c.name}-{c.index}" if clash else c.name

    out: dict[str, Any] = {}
    if emulated:
        cards = sorted((c for inst in result.instances for c in inst.cards), key=lambda c: c.index)
        out["emulator"] = {
            "gpus": [{"name": gpu(c), "memory_gib": round(c.memory / GIB, 2)} for c in cards]
        }
    out["instances"] = [
        {
            "name": inst.name,
            **({"launcher": "emulated"} if emulated else {}),
            "gpu": [gpu(c) for c in inst.cards] if inst.group else gpu(inst.cards[0]),
            "spread": False,
            "num_parallel": inst.num_parallel,
            "context_length": result.context,
        }
        for inst in result.instances
    ]
    return out


def _together(cards: Sequence[Card]) -> str:
    return f", not even all {len(cards)} together" if len(cards) > 1 else ""


def _names(cards: Sequence[Card]) -> str:
    return "+".join(f"GPU {c.index}" for c in sorted(cards, key=lambda c: c.index))


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"
