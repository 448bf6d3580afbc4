"""The contenders of the routing benchmark, each started fresh on free loopback ports.

- ``vram_queue``, ``least_connections``, ``round_robin``: ``ollamux serve`` with a generated config
  (the demo box, that policy) - the proxy and its four emulated instances, as a user runs them;
- ``random``: the same four emulated instances with no proxy; the benchmark client picks one at
  random per request among those that list the model, as Open WebUI does with several
  ``OLLAMA_BASE_URLS``;
- ``nginx``: the Debian nginx with ``least_conn`` in front of the same four instances;
- ``spread_np4`` / ``spread_np16``: one emulated Ollama over all four GPUs with
  ``OLLAMA_SCHED_SPREAD``, with the per-GPU servers' NUM_PARALLEL and with four times it;
- ``litellm_least_busy``, ``litellm_shuffle``, ``herd``: routers someone else wrote, in front of
  the same four instances (benchmarks/peers.py);
- ``spread_keepalive`` (``_npN``): the setup ollamux replaces, exactly: one Ollama over all the
  GPUs with ``OLLAMA_SCHED_SPREAD=1`` and ``OLLAMA_KEEP_ALIVE=-1``, NUM_PARALLEL left at Ollama's
  default (1), or N;
- ``ollamux_plan``: ``ollamux serve`` (vram_queue) with the instances ``ollamux plan`` proposes
  for the box's GPUs and the scenario's models (proxy/planner.py), groups of GPUs included;
- ``fronts_2x2``, ``front_8``, ``nginx_8``, ``random_2``: the two-box scenario's (two nodes,
  benchmarks/two_box.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks import emulator_knobs
from benchmarks.openai_wire import NATIVE
from benchmarks.peer_env import PEERS
from benchmarks.procs import ROOT, Child, children_of, free_port, ollamux_argv, wait_http
from benchmarks.workload import Req, Scenario
from proxy.config import GpuSpec, load_config

DEMO_CONFIG = ROOT / "config" / "demo.yaml"
PROXIED = ("vram_queue", "least_connections", "round_robin")
VARIANTS = {"vram_queue_oc1": ("vram_queue", {"overcommit": 1})}
"""ollamux with a routing setting other than its default: name -> (policy, routing keys)."""
CONTENDERS = (*PROXIED, "random", "nginx", "spread_np4", "spread_np16", *PEERS)
PLANNED = "ollamux_plan"
BOX_CONTENDERS = (PLANNED, "spread_keepalive", "spread_keepalive_np4")
TWO_BOX_CONTENDERS = ("fronts_2x2", "front_8", "nginx_8", "random_2")
"""Run only when named (a scenario with a box of its own names them; so are the two-box ones)."""
LOWER_BOUND = "lower_bound"


@dataclass(frozen=True, kw_only=True)
class Box:
    """The emulated machine every contender runs on (config/demo.yaml by default)."""

    gpus: tuple[GpuSpec, ...]
    num_parallel: int
    context_length: int
    spread_knobs: tuple[str, ...] = ()
    """Flags of benchmarks.emulator_knobs for the spread servers (the sensitivity runs)."""
    models: tuple[str, ...] = ()
    """The models users run, for ``ollamux_plan``'s planner."""
    users: int = 4
    """Concurrent chats ``ollamux_plan`` plans for."""

    def for_scenario(self, scenario: Scenario) -> Box:
        """This box, or the scenario's own GPUs (at the same NUM_PARALLEL and context)."""
        gpus = self.gpus
        if scenario.gpus:
            gpus = tuple(GpuSpec(name=n, memory_gib=gib) for n, gib in scenario.gpus)
        if scenario.boxes > 1:  # box k's GPUs named <name>-b<k>: one config can list them all
            gpus = tuple(
                GpuSpec(name=f"{g.name}-b{k}", memory_gib=g.memory_gib, speed=g.speed)
                for k in range(scenario.boxes)
                for g in gpus
            )
        users = scenario.users or self.users
        return dataclasses.replace(self, gpus=gpus, models=tuple(scenario.models), users=users)

    @classmethod
    def from_config(cls, path: Path = DEMO_CONFIG) -> Box:
        config = load_config(path)
        assert config.instances != "auto"
        inst = config.instances[0]
        return cls(
            gpus=config.emulator.gpus,
            num_parallel=inst.num_parallel,
            context_length=inst.context_length,
        )


@dataclass(kw_only=True)
class Running:
    """A started contender: where requests go and what to watch."""

    name: str
    pick: Callable[[Req], str]
    """The base URL a request is sent to."""
    backends: list[str]
    """The emulated Ollama servers behind it (their /api/ps and /gpus are sampled)."""
    metrics_url: str | None = None
    front: list[int] = field(default_factory=list)
    """Pids of the proxy or nginx (their CPU time is reported)."""
    backend_pids: list[int] = field(default_factory=list)
    notes: str = ""
    api: str = NATIVE
    """Which chat endpoint the client uses (benchmarks/openai_wire.py)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with every request (a peer's API key)."""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def box_config(
    box: Box, *, speed: float, policy: str, listen_port: int, ports: list[int], timeout: float
) -> dict[str, Any]:
    """An ollamux config for the box: one emulated instance per GPU on the given ports.

    The proxy's own timers run in wall time while the emulators compress time by ``speed``, so
    the health/poll interval is compressed like them (2 s of emulated time, the default).
    """
    return {
        "listen": f"127.0.0.1:{listen_port}",
        "models_dir": "",
        "emulator": {
            "speed": speed,
            "gpus": [
                {"name": g.name, "memory_gib": g.memory_gib, "speed": g.speed} for g in box.gpus
            ],
        },
        "instances": [
            {
                "name": f"gpu{i}",
                "launcher": "emulated",
                "gpu": g.name,
                "port": port,
                "num_parallel": box.num_parallel,
                "context_length": box.context_length,
            }
            for i, (g, port) in enumerate(zip(box.gpus, ports, strict=True))
        ],
        "routing": {"policy": policy},
        "timeouts": {"health_interval": max(2.0 / speed, 0.05)},
        "queue": {"timeout": timeout},
    }


def planned_config(box: Box, *, speed: float, listen_port: int, timeout: float) -> dict[str, Any]:
    """An ollamux config (vram_queue) with the instances ``ollamux plan`` proposes for the box's
    GPUs, the models users run and ``box.users`` chats at the box's context."""
    from proxy.commands.plan import parse_model
    from proxy.planner import Card, config_dict, plan

    cards = [Card(index=i, name=g.name, memory=g.memory_bytes) for i, g in enumerate(box.gpus)]
    models = [parse_model(m) for m in box.models]
    proposed = config_dict(
        plan(cards, models, context=box.context_length, users=box.users), emulated=True
    )
    config = box_config(
        box,
        speed=speed,
        policy="vram_queue",
        listen_port=listen_port,
        ports=[0] * len(box.gpus),
        timeout=timeout,
    )
    config["instances"] = [{**i, "port": free_port()} for i in proposed["instances"]]
    return config


def nginx_conf(prefix: Path, port: int, upstreams: list[int]) -> str:
    """nginx as people put it in front of several Ollama servers, made fit for token streams."""
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in upstreams)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
{temp}
    upstream ollama {{
        least_conn;
        zone ollama 64k;
{servers}
        keepalive 512;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        client_body_buffer_size 1m;
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # a loopback Ollama refuses Host names it does not know (403)
            proxy_set_header Host 127.0.0.1;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_connect_timeout 5s;
        }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def start(
    name: str,
    box: Box,
    *,
    speed: float,
    workdir: Path,
    seed: int = 0,
    timeout: float = 3600.0,
    api: str = NATIVE,
) -> AsyncIterator[Running]:
    """Start contender ``name`` fresh (nothing loaded), yield it, stop every process; the client
    talks to it on ``api`` (LiteLLM serves only the OpenAI one and gets it whatever ``api`` is)."""
    workdir.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    try:
        if name in PEERS:
            from benchmarks import peers  # it builds on this module

            yield await peers.start_peer(name, box, speed, workdir, children, timeout, api)
            return
        if name in PROXIED or name in VARIANTS:
            running = await _ollamux(name, box, speed, workdir, children, timeout)
        elif name in ("random", "nginx"):
            urls, pids = await start_instances(box, speed, workdir, children, timeout)
            if name == "random":
                running = Running(
                    name=name, pick=_random_pick(urls, seed), backends=urls, backend_pids=pids
                )
            else:
                running = await _nginx(urls, pids, workdir, children)
        elif name.startswith("spread_np"):
            num_parallel = int(name.removeprefix("spread_np"))
            running = await _spread(box, speed, num_parallel, workdir, children)
        elif name.startswith("spread_keepalive"):
            np = name.removeprefix("spread_keepalive").removeprefix("_np")
            running = await _spread(
                box, speed, int(np or 1), workdir, children, keep_alive="-1", name=name
            )
        elif name == PLANNED:
            running = await _ollamux(name, box, speed, workdir, children, timeout)
        elif name in TWO_BOX_CONTENDERS:
            from benchmarks import two_box  # it builds on this module

            running = await two_box.start(name, box, speed, workdir, children, timeout, seed)
        else:
            raise ValueError(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")
        running.api = api
        yield running
    finally:
        for child in reversed(children):
            child.stop()


async def _ollamux(
    policy: str, box: Box, speed: float, workdir: Path, children: list[Child], timeout: float
) -> Running:
    listen = free_port()
    if policy == PLANNED:
        config = planned_config(box, speed=speed, listen_port=listen, timeout=timeout)
        ports = [i["port"] for i in config["instances"]]
    else:
        ports = [free_port() for _ in box.gpus]
        base, routing = VARIANTS.get(policy, (policy, {}))
        config = box_config(
            box, speed=speed, policy=base, listen_port=listen, ports=ports, timeout=timeout
        )
        config["routing"].update(routing)
    path = workdir / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    # warning level: no access-log line per request (nginx runs with access_log off too)
    argv = ollamux_argv("--log-level", "warning", "serve", "--config", str(path))
    child = Child(policy, argv, log=workdir / f"{policy}.log")
    children.append(child)
    url = f"http://127.0.0.1:{listen}"
    await wait_http(url + "/api/tags", child=child, expect="llama3.1:8b")
    return Running(
        name=policy,
        pick=lambda _req: url,
        backends=[f"http://127.0.0.1:{p}" for p in ports],
        metrics_url=url + "/metrics",
        front=[child.pid],
        backend_pids=children_of(child.pid),
    )


async def start_instances(
    box: Box, speed: float, workdir: Path, children: list[Child], timeout: float
) -> tuple[list[str], list[int]]:
    """The box's four emulated instances, started from the same generated config as ollamux's."""
    ports = [free_port() for _ in box.gpus]
    config = box_config(
        box, speed=speed, policy="round_robin", listen_port=free_port(), ports=ports,
        timeout=timeout,
    )  # fmt: skip
    path = workdir / "instances.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    started = []
    for i, port in enumerate(ports):
        argv = ollamux_argv(
            "--log-level", "warning", "emulate", "--quiet", "--config", str(path),
            "--instance", f"gpu{i}", "--listen", f"127.0.0.1:{port}",
        )  # fmt: skip
        child = Child(f"gpu{i}", argv, log=workdir / f"gpu{i}.log")
        children.append(child)
        started.append(child)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    for child, url in zip(started, urls, strict=True):
        await wait_http(url + "/", child=child)
    return urls, [c.pid for c in started]


def _random_pick(urls: list[str], seed: int) -> Callable[[Req], str]:
    """Open WebUI's ``random.choice`` among the backends listing the model (all of them here);
    seeded per request, so a request goes to the same backend in every run."""

    def pick(req: Req) -> str:
        return random.Random(f"{seed}:{req.id}").choice(urls)

    return pick


async def _nginx(urls: list[str], pids: list[int], workdir: Path, children: list[Child]) -> Running:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
    prefix = workdir / "nginx"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)  # the worker may run as another user when started by root
    port = free_port()
    upstreams = [int(u.rsplit(":", 1)[1]) for u in urls]
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, upstreams), encoding="utf-8")
    child = Child("nginx", [binary, "-p", str(prefix), "-c", str(conf)], log=workdir / "nginx.log")
    children.append(child)
    url = f"http://127.0.0.1:{port}"
    await wait_http(url + "/", child=child)
    return Running(
        name="nginx",
        pick=lambda _req: url,
        backends=urls,
        front=[child.pid, *children_of(child.pid)],
        backend_pids=pids,
    )


async def _spread(
    box: Box,
    speed: float,
    num_parallel: int,
    workdir: Path,
    children: list[Child],
    *,
    keep_alive: str = "",
    name: str = "",
) -> Running:
    port = free_port()
    keep = ["--keep-alive", keep_alive] if keep_alive else []
    gpus = [f"--gpu={g.name}:{g.memory_gib:g}:{g.speed:g}" for g in box.gpus]
    argv = emulator_knobs.argv(
        box.spread_knobs,
        "--log-level", "warning", "emulate", "--quiet", "--listen", f"127.0.0.1:{port}", *gpus,
        "--spread", "--num-parallel", str(num_parallel),
        "--context-length", str(box.context_length), "--speed", f"{speed:g}", *keep,
    )  # fmt: skip
    name = name or f"spread_np{num_parallel}"
    child = Child(name, argv, log=workdir / f"{name}.log")
    children.append(child)
    url = f"http://127.0.0.1:{port}"
    await wait_http(url + "/", child=child)
    return Running(name=name, pick=lambda _req: url, backends=[url], backend_pids=[child.pid])


def describe(box: Box) -> dict[str, Any]:
    return {
        "gpus": [{k: v for k, v in dataclasses.asdict(g).items() if k != "uuid"} for g in box.gpus],
        "num_parallel": box.num_parallel,
        "context_length": box.context_length,
    }
