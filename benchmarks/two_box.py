"""The two-box scenario's contenders: the demo box twice, as two nodes or as eight instances.

The box handed in has both boxes' GPUs (``Box.for_scenario`` with ``Scenario.boxes`` = 2): the
first half is node 0's, the second node 1's.

- ``fronts_2x2``: two nodes (each ``ollamux serve`` over its 4 emulated instances) and two fronts
  (each ``ollamux serve`` with the two nodes as ``launcher: node`` instances); the client sends
  requests to the fronts in turn, as a Service over two front replicas would;
- ``front_8``: one ``ollamux serve`` (vram_queue) over all 8 emulated instances, the ideal one
  front could do;
- ``nginx_8``: nginx ``least_conn`` over the 8 instances;
- ``random_2``: the two nodes and no front; the client picks one node URL at random per request,
  as Open WebUI does with both in ``OLLAMA_BASE_URLS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.contenders import (
    Box,
    Running,
    _nginx,
    _ollamux,
    _random_pick,
    box_config,
    start_instances,
)
from benchmarks.procs import Child, children_of, free_port, ollamux_argv, wait_http
from benchmarks.workload import Req

NODES = 2
FRONT_HEALTH_S = 0.5
"""Emulated seconds between a front's reads of each node's state (the README's example)."""


async def start(
    name: str,
    box: Box,
    speed: float,
    workdir: Path,
    children: list[Child],
    timeout: float,
    seed: int,
) -> Running:
    """Start two-box contender ``name``; its processes are appended to ``children``."""
    if name == "front_8":
        running = await _ollamux("vram_queue", box, speed, workdir, children, timeout)
        return dataclasses.replace(running, name=name)
    if name == "nginx_8":
        urls, pids = await start_instances(box, speed, workdir, children, timeout)
        return dataclasses.replace(await _nginx(urls, pids, workdir, children), name=name)
    nodes = [
        await _node(k, _node_box(box, k), speed, workdir, children, timeout) for k in range(NODES)
    ]
    node_urls = [n.url for n in nodes]
    backends = [b for n in nodes for b in n.backends]
    backend_pids = [p for n in nodes for p in n.backend_pids]
    node_pids = [n.pid for n in nodes]
    if name == "random_2":
        return Running(
            name=name,
            pick=_random_pick(node_urls, seed),
            backends=backends,
            front=node_pids,
            backend_pids=backend_pids,
        )
    if name != "fronts_2x2":
        raise ValueError(f"unknown two-box contender {name!r}")
    fronts = [await _front(k, node_urls, speed, workdir, children, timeout) for k in range(2)]
    return Running(
        name=name,
        pick=_alternate([url for url, _ in fronts]),
        backends=backends,
        front=[*(pid for _, pid in fronts), *node_pids],
        backend_pids=backend_pids,
        notes="the client sends request i to front i mod 2; CPU 'front' counts fronts and nodes",
    )


def _node_box(box: Box, k: int) -> Box:
    per = len(box.gpus) // NODES
    return dataclasses.replace(box, gpus=box.gpus[k * per : (k + 1) * per])


def _alternate(urls: list[str]) -> Callable[[Req], str]:
    """Request ``i`` to ``urls[i % len(urls)]``: the same split in every run."""
    return lambda req: urls[req.id % len(urls)]


@dataclasses.dataclass(frozen=True)
class _Node:
    url: str
    pid: int
    backends: list[str]
    backend_pids: list[int]


async def _node(
    k: int, box: Box, speed: float, workdir: Path, children: list[Child], timeout: float
) -> _Node:
    """``ollamux serve`` (vram_queue) over the node's emulated instances."""
    listen = free_port()
    ports = [free_port() for _ in box.gpus]
    config = box_config(
        box, speed=speed, policy="vram_queue", listen_port=listen, ports=ports, timeout=timeout
    )
    running = await _serve(f"node{k}", config, workdir, children)
    return _Node(
        url=running[0],
        pid=running[1],
        backends=[f"http://127.0.0.1:{p}" for p in ports],
        backend_pids=children_of(running[1]),
    )


async def _front(
    k: int, node_urls: list[str], speed: float, workdir: Path, children: list[Child], timeout: float
) -> tuple[str, int]:
    """``ollamux serve`` whose instances are the nodes."""
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "instances": [
            {"name": f"node{i}", "launcher": "node", "url": url} for i, url in enumerate(node_urls)
        ],
        "routing": {"policy": "vram_queue"},
        "timeouts": {"health_interval": max(FRONT_HEALTH_S / speed, 0.02)},
        "queue": {"timeout": timeout},
    }
    return await _serve(f"front{k}", config, workdir, children)


async def _serve(
    label: str, config: dict[str, Any], workdir: Path, children: list[Child]
) -> tuple[str, int]:
    """Start ``ollamux serve`` on ``config``; (URL, pid) once it lists the models and is ready."""
    path = workdir / f"{label}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    argv = ollamux_argv("--log-level", "warning", "serve", "--config", str(path))
    child = Child(label, argv, log=workdir / f"{label}.log")
    children.append(child)
    url = "http://" + str(config["listen"])
    await wait_http(url + "/api/tags", child=child, expect="llama3.1:8b")
    await wait_http(url + "/proxy/ready", child=child)
    return url, child.pid
