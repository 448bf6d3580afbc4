"""The dispatcher's shortcut (views of the warm free instances only) decides as the full policy.

``vram_queue`` says ``warm_first``: when an instance has the model warm with a free slot, the
dispatcher shows it only those. On random snapshots of a fleet, the instance the dispatcher grants
must be the one the policy picks from every instance's view, and a request the policy would keep
waiting must wait.
"""

from __future__ import annotations

import random

import pytest

from proxy.balancer.dispatcher import Dispatcher
from proxy.balancer.policies.vram_queue import VramQueue
from proxy.balancer.state import InstanceState, LoadedModel, ModelBook, RouteRequest
from proxy.config import QueueConfig
from proxy.errors import QueueTimeout

GIB = 1024**3
MODELS = [f"m{i}:latest" for i in range(4)]


def snapshot(rng: random.Random) -> list[InstanceState]:
    fleet = []
    for i in range(rng.randint(1, 12)):
        inst = InstanceState(
            name=f"i{i}", url=f"http://127.0.0.1:{30000 + i}", slots=rng.randint(1, 4)
        )
        inst.healthy = rng.random() > 0.1
        inst.draining = rng.random() < 0.1
        inst.memory_free = None if rng.random() < 0.2 else rng.randint(0, 48) * GIB
        inst.models = frozenset(rng.sample(MODELS, rng.randint(1, len(MODELS))))
        for model in inst.models:
            roll = rng.random()
            if roll < 0.4:
                inst.loaded[model] = LoadedModel(name=model, size_vram=8 * GIB, context_length=0)
            elif roll < 0.5:
                inst.loading[model] = 8 * GIB
            if model in inst.loaded or model in inst.loading:
                busy = rng.randint(0, inst.slots)
                if busy:
                    inst.inflight[model] = busy
        fleet.append(inst)
    return fleet


@pytest.mark.parametrize("seed", range(300))
async def test_the_shortcut_grants_what_the_policy_picks_from_every_view(seed: int) -> None:
    rng = random.Random(seed)
    fleet = snapshot(rng)
    model = rng.choice(MODELS)
    book = ModelBook()
    for name in MODELS:
        book.set_file_size(name, rng.randint(1, 20) * GIB)
    policy = VramQueue()
    request = RouteRequest(
        model=model,
        est_size=book.estimate_size(model),
        service_s=book.estimate_service_s(model),
        load_s=book.estimate_load_s(model),
    )
    views = [
        i.view(model, slots=i.slots, affinity=False) for i in fleet if i.routable and i.has(model)
    ]
    expected = policy.select(request, views) if views else None
    dispatcher = Dispatcher(fleet, policy, book, QueueConfig(timeout=1))
    try:
        lease = await dispatcher.acquire(model, timeout=0)
    except QueueTimeout:
        assert expected is None
    except Exception as exc:  # no instance holds it, or none is routable
        assert not views, exc
    else:
        assert expected is not None
        assert (lease.instance.name, lease.decision.reason) == (expected.instance, expected.reason)
