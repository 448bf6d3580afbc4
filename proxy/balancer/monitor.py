"""Keeps InstanceState current: health checks, probes of ejected instances, /api/ps and /api/tags
polls, GPU memory reads.

The monitor owns ``healthy`` (and ``failures``, the GPU readings); ``Outliers`` owns the ejection
fields. It never writes ``loaded`` or ``loading``: each /api/ps poll goes to ``on_loaded`` with the
time it was asked, and the router (which marks models loaded as their first tokens come) merges it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from functools import partial
from typing import Any

import aiohttp

from proxy.balancer.outlier import Outliers
from proxy.balancer.state import InstanceState, LoadedModel, ModelBook
from proxy.config import EjectionConfig, TimeoutConfig
from proxy.gpu import GpuReading, GpuSource
from proxy.names import model_key

log = logging.getLogger("ollamux.health")

FAILS_TO_DOWN = 2
"""Consecutive failed health checks before an instance that was up is marked down."""
TAGS_EVERY = 10
"""Poll /api/tags on every Nth round (models change rarely; pulls refresh it at once)."""
PROBE_PROMPT = "hi"
NODE_SCHEMA = 1
"""The version of ``GET /proxy/node`` this proxy reads (``api/node_state.py`` writes it)."""


class Monitor:
    """One loop that checks every instance each ``health_interval`` and updates its state.

    Each round: ``GET /`` (two failures in a row mark an instance down, ``on_down`` fires), then
    /api/ps, /api/tags now and then, /api/version and the GPU source. An ejected instance whose
    back-off is over gets a real probe, in its own task so that it never delays the other checks:
    a one-token generation on a model it has loaded (see ``probe``).
    """

    def __init__(
        self,
        instances: list[InstanceState],
        book: ModelBook,
        session: aiohttp.ClientSession,
        timeouts: TimeoutConfig,
        gpu_sources: Mapping[str, GpuSource],
        *,
        outliers: Outliers | None = None,
        on_change: Callable[[], None] = lambda: None,
        on_down: Callable[[InstanceState], None] = lambda inst: None,
        on_loaded: Callable[[InstanceState, dict[str, LoadedModel], float], None] = (
            lambda inst, loaded, asked_at: None
        ),
    ) -> None:
        self.instances = instances
        self.book = book
        self._session = session
        self._timeouts = timeouts
        self._gpu_sources = gpu_sources
        self._on_change = on_change
        self._on_down = on_down
        self._on_loaded = on_loaded
        self.outliers = outliers if outliers is not None else Outliers(EjectionConfig())
        self.outliers.on_refused = self._refused
        self._round = 0
        self._timeout = aiohttp.ClientTimeout(total=timeouts.health_timeout)
        self.probe_timeout = max(timeouts.first_token, timeouts.health_timeout)
        """A probe is one token on a loaded model: it gets a warm request's first-token time."""
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        """Probes and re-checks in flight, by (what, instance name): one of each at a time."""
        self._closed = False

    async def run(self) -> None:
        """Check forever; the first round runs at once. Probes in flight end with it."""
        try:
            while True:
                await self.check_all()
                await asyncio.sleep(self._timeouts.health_interval)
        finally:
            await self.close()

    async def check_all(self) -> None:
        full = self._round % TAGS_EVERY == 0
        self._round += 1
        before = [_placement_state(inst) for inst in self.instances]
        await asyncio.gather(*(self._check(inst, full=full) for inst in self.instances))
        if before != [_placement_state(inst) for inst in self.instances]:
            self._on_change()  # only then can a queued request have become placeable

    async def wait_probes(self) -> None:
        """Until the probes and re-checks started so far have ended (their outcome recorded)."""
        await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the probes and re-checks in flight, start no more; instances stay as they are."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def refresh_tags(self, instances: Iterable[InstanceState] | None = None) -> None:
        """Re-read the model lists of ``instances`` (default: all) that are up (after a pull, a
        delete, a copy); one that cannot be read keeps its list."""
        chosen = self.instances if instances is None else instances
        await asyncio.gather(
            *(self._poll_tags(inst) for inst in chosen if inst.healthy),
            return_exceptions=True,
        )
        self._on_change()

    def recheck_models(self, inst: InstanceState) -> None:
        """Re-read ``inst``'s model list soon, in the background (it answered "not found" for a
        model its list had)."""
        self._spawn("tags", inst, partial(self.refresh_tags, [inst]))

    # --- one instance ---------------------------------------------------------------------------

    async def _answers(self, inst: InstanceState) -> bool:
        """``GET /`` answers 200 within ``health_timeout``."""
        try:
            async with self._session.get(
                inst.url + "/", timeout=self._timeout, headers=inst.auth()
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _check(self, inst: InstanceState, *, full: bool) -> None:
        if not await self._answers(inst):
            inst.failures += 1
            if inst.failures >= FAILS_TO_DOWN or not inst.healthy:
                self._set_health(inst, False, "it does not answer GET /")
            return
        inst.failures = 0
        came_up = not inst.healthy
        try:
            if inst.capacity is not None:  # another ollamux: one summary says it all
                await self._poll_node(inst)
            else:
                await self._poll_ps(inst)
                if full or came_up:
                    await self._poll_tags(inst)
            if full or came_up:
                await self._poll_version(inst)
            await self._poll_gpus(inst)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.warning("instance %s: polling failed: %s", inst.name, exc or type(exc).__name__)
        if came_up:
            self.outliers.came_up(inst)  # coming back does not eject it; an ejected one stays so
        self._set_health(inst, True, "it answers")
        if self.outliers.due_for_probe(inst):
            self._spawn("probe", inst, partial(self._probe_and_report, inst))

    def _refused(self, inst: InstanceState) -> None:
        """A request could not connect (or its connection broke): check it now, not next round.

        A process that is gone refuses ``GET /`` too and is marked down within milliseconds; a
        connection that broke alone (one stale pooled connection) leaves it up."""
        self._spawn("recheck", inst, partial(self._recheck, inst))

    async def _recheck(self, inst: InstanceState) -> None:
        if not await self._answers(inst):
            self._set_health(inst, False, "a request could not connect and GET / fails")

    def _spawn(
        self, what: str, inst: InstanceState, work: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """Run ``work`` in its own task unless the same ``what`` runs for ``inst`` already."""
        key = (what, inst.name)
        if key in self._tasks or self._closed:
            return
        task = asyncio.get_running_loop().create_task(work())
        self._tasks[key] = task
        task.add_done_callback(partial(self._task_ended, key))

    def _task_ended(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s of instance %s failed unexpectedly", *key, exc_info=task.exception())

    def _set_health(self, inst: InstanceState, healthy: bool, why: str) -> None:
        if inst.healthy != healthy:
            level = logging.INFO if healthy else logging.WARNING
            state = "up" if healthy else "down"
            log.log(level, "instance %s (%s) is %s: %s", inst.name, inst.url, state, why)
            inst.healthy = healthy
            if not healthy:
                inst.gpus = ()
                self._on_down(inst)  # the router ends the exchanges still open there
            self._on_change()

    # --- probes of ejected instances ------------------------------------------------------------

    async def probe(self, inst: InstanceState) -> str | None:
        """Whether ``inst`` serves again: None when it does, else why not.

        A non-streamed one-token ``/api/generate`` of ``hi`` on the model /api/ps lists first (the
        one used last), within ``probe_timeout``. ``num_ctx`` is the context /api/ps reports for it,
        so the probe reuses the loaded runner instead of reloading it with another context.
        ``keep_alive`` is left out: Ollama then keeps the runner's own setting (a client's ``-1``
        stays) and only restarts its idle timer, as after any request. An embedding-only model
        answers 400 to a generation and gets a one-input ``/api/embed`` instead. A 4xx answer
        passes (the server judged the request); with nothing loaded, answering ``GET /`` (which
        the check just did) is the probe.
        """
        model = next(iter(inst.loaded.values()), None)
        if model is None:
            return None
        try:
            return await asyncio.wait_for(self._probe_model(inst, model), self.probe_timeout)
        except asyncio.TimeoutError:
            return f"no answer from {model.name} in {self.probe_timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__} {exc}".strip()

    async def _probe_model(self, inst: InstanceState, model: LoadedModel) -> str | None:
        options: dict[str, Any] = {"num_predict": 1}
        if model.context_length > 0:
            options["num_ctx"] = model.context_length
        body = {"model": model.name, "prompt": PROBE_PROMPT, "stream": False, "options": options}
        status, data = await self._post(inst, "/api/generate", body)
        if status == 400 and "does not support generate" in str(data.get("error", "")):
            options.pop("num_predict")
            embed = {"model": model.name, "input": PROBE_PROMPT, "options": options}
            status, data = await self._post(inst, "/api/embed", embed)
            return _judge(status, data, "embeddings")
        return _judge(status, data, "done")

    async def _probe_and_report(self, inst: InstanceState) -> None:
        why = await self.probe(inst)
        if why is None:
            self.outliers.probe_passed(inst)
        else:
            self.outliers.probe_failed(inst, why)

    async def _post(
        self, inst: InstanceState, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        async with self._session.post(inst.url + path, json=body, headers=inst.auth()) as resp:
            raw = await resp.read()
        try:
            data = _json_object(raw)
        except ValueError:
            data = {"error": f"unreadable answer: {raw[:80]!r}"}
        return resp.status, data

    # --- polls ----------------------------------------------------------------------------------

    async def _get_json(self, inst: InstanceState, path: str) -> Any:
        async with self._session.get(
            inst.url + path, timeout=self._timeout, headers=inst.auth()
        ) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def _poll_ps(self, inst: InstanceState) -> None:
        asked_at = time.monotonic()
        data = await self._get_json(inst, "/api/ps")
        loaded = {}
        for entry in data.get("models") or []:
            name = model_key(str(entry.get("name") or entry.get("model", "")))
            model = LoadedModel(
                name=name,
                size_vram=int(entry.get("size_vram", 0)),
                context_length=int(entry.get("context_length", 0)),
                size=int(entry.get("size", 0)),
            )
            loaded[name] = model
            stats = self.book.stats(name)
            if model.size_vram:  # spilled to CPU memory: it needs all of its size on a GPU
                stats.size_vram = max(model.size_vram, model.size)
            stats.max_ctx = max(stats.max_ctx, model.context_length)
        if inst.memory_source == "learned":  # the most it held at once: a floor of its memory
            held = sum(m.size_vram for m in loaded.values())
            inst.memory_capacity = max(inst.memory_capacity, held)
        self._on_loaded(inst, loaded, asked_at)

    async def _poll_tags(self, inst: InstanceState) -> None:
        data = await self._get_json(inst, "/api/tags")
        models = set()
        for entry in data.get("models") or []:
            name = str(entry.get("name") or entry.get("model", ""))
            self.book.set_file_size(name, int(entry.get("size", 0)))
            models.add(model_key(name))
        inst.models = frozenset(models)

    async def _poll_node(self, inst: InstanceState) -> None:
        """A node's published state (``GET /proxy/node``): the models it holds and runs, and how
        many requests this proxy may have in flight there per model: those it has now plus the
        node's free slots less what already waits in the node's queue; a model it holds but runs
        nowhere takes one request (the node loads it) until the node says more."""
        asked_at = time.monotonic()
        data = await self._get_json(inst, "/proxy/node")
        if not isinstance(data, dict) or data.get("schema") != NODE_SCHEMA:
            raise ValueError(f"GET /proxy/node is not schema {NODE_SCHEMA}: is it an ollamux?")
        held, loaded, capacity = set(), {}, {}
        for raw, entry in (data.get("models") or {}).items():
            name = model_key(str(raw))
            if not isinstance(entry, dict) or int(entry.get("held", 0)) <= 0:
                continue
            held.add(name)
            mine = inst.inflight.get(name, 0)
            if int(entry.get("warm", 0)) > 0:
                loaded[name] = LoadedModel(name=name, size_vram=0, context_length=0)
                room = int(entry.get("free", 0)) - int(entry.get("queued", 0))
                capacity[name] = mine + max(room, 0)
            else:
                capacity[name] = max(mine, 1)
        inst.models = frozenset(held)
        inst.capacity = capacity
        self._on_loaded(inst, loaded, asked_at)

    async def _poll_version(self, inst: InstanceState) -> None:
        data = await self._get_json(inst, "/api/version")
        inst.version = str(data.get("version", ""))

    async def _poll_gpus(self, inst: InstanceState) -> None:
        source = self._gpu_sources.get(inst.name)
        if source is None:
            return
        try:
            readings = await source.read()
        except BaseException:
            inst.gpus = ()  # stale readings must not feed the GPU gauges
            raise
        mine = [g for g in readings if _owns(inst, g)]
        inst.gpus = tuple(mine)
        if not mine:
            return
        inst.memory_total = sum(g.memory_total for g in mine)
        inst.memory_free = sum(g.memory_free for g in mine)
        inst.utilization = max(g.utilization for g in mine)


def _placement_state(inst: InstanceState) -> tuple[object, ...]:
    """What the monitor writes that a placement depends on (health, models, memory, a node's
    capacity)."""
    return (
        inst.healthy,
        inst.models,
        tuple(inst.loaded),
        inst.memory_free,
        inst.memory_capacity,
        None if inst.capacity is None else tuple(sorted(inst.capacity.items())),
    )


def _owns(inst: InstanceState, gpu: GpuReading) -> bool:
    """Whether ``gpu`` is one of ``inst``'s (named by UUID or index; none named = all)."""
    return not inst.gpu_uuids or gpu.uuid in inst.gpu_uuids or str(gpu.index) in inst.gpu_uuids


def _json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object; ValueError when it is not one."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _judge(status: int, data: dict[str, Any], expect: str) -> str | None:
    """A probe's answer: None when it passes, else why it does not."""
    error = data.get("error")
    if status >= 500:
        return f"answered {status}" + (f": {error}" if error else "")
    if 400 <= status < 500:
        return None
    if status != 200 or error or not data.get(expect):
        return f"answered {status} without {expect!r}" + (f": {error}" if error else "")
    return None
