"""Routers someone else wrote, as contenders: LiteLLM's proxy and Ollama Herd, each in front of
the box's four emulated instances, started fresh from their pinned virtual environments.

- ``litellm_least_busy`` / ``litellm_shuffle``: ``litellm --config`` with one deployment per
  (model, instance) as ``ollama_chat/<model>`` at that instance, ``routing_strategy`` least-busy or
  simple-shuffle (its default); it serves clients only on ``/v1``, so the client talks OpenAI to it
  whatever ``--api`` says; a master key; telemetry and the remote cost map off.
- ``herd``: ``herd`` (the router) and one ``herd-node`` per instance with ``OLLAMA_NUM_PARALLEL``
  set to the box's; telemetry, auto-pull and its LLM-written fleet briefing off; its heartbeat and
  poll intervals compressed by the scenario's speed like ollamux's health interval. It runs only
  inside a loopback-only network namespace (benchmarks/confined.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks import peer_env
from benchmarks.contenders import Box, Running, start_instances
from benchmarks.openai_wire import OPENAI
from benchmarks.procs import Child, free_port

MASTER_KEY = "sk-ollamux-bench"
"""LiteLLM refuses to start its proxy's key checks without one; it never leaves loopback."""
LITELLM_ENV = {
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOG": "ERROR",
    "DISABLE_ADMIN_UI": "True",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
}
HERD_HEARTBEAT_S = 5.0
"""Herd's default node heartbeat and poll interval (wall seconds on a real box)."""


def litellm_config(
    strategy: str, urls: list[str], models: list[str], *, timeout: float
) -> dict[str, Any]:
    """LiteLLM's proxy config: every model on every instance, routed by ``strategy``."""
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"ollama_chat/{model}",
                    "api_base": url,
                    "timeout": timeout,
                    "stream_timeout": timeout,
                },
            }
            for model in models
            for url in urls
        ],
        "router_settings": {"routing_strategy": strategy},
        "litellm_settings": {"request_timeout": timeout, "telemetry": False},
        "general_settings": {"master_key": MASTER_KEY},
    }


async def start_peer(
    name: str,
    box: Box,
    speed: float,
    workdir: Path,
    children: list[Child],
    timeout: float,
    api: str,
) -> Running:
    """Start peer ``name`` and the instances behind it (stopped by the caller via ``children``)."""
    urls, pids = await start_instances(box, speed, workdir, children, timeout)
    models = await _models(urls[0])
    if name in peer_env.LITELLM_STRATEGIES:
        strategy = peer_env.LITELLM_STRATEGIES[name]
        running = await _litellm(name, strategy, urls, models, workdir, children, timeout)
    elif name == peer_env.HERD_NAME:
        running = await _herd(box, speed, urls, workdir, children, api)
    else:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(peer_env.PEERS)}")
    running.backends = urls
    running.backend_pids = pids
    return running


async def _models(url: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(url + "/api/tags") as resp:
        data = await resp.json(content_type=None)
    return sorted(str(m["name"]) for m in data.get("models") or [])


async def _litellm(
    name: str,
    strategy: str,
    urls: list[str],
    models: list[str],
    workdir: Path,
    children: list[Child],
    timeout: float,
) -> Running:
    home = peer_env.ensure_installed(peer_env.LITELLM, log=workdir / "install.log")
    path = workdir / f"{name}.yaml"
    config = litellm_config(strategy, urls, models, timeout=timeout)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    port = free_port()
    argv = [
        str(home / "bin" / "litellm"), "--config", str(path), "--host", "127.0.0.1",
        "--port", str(port), "--num_workers", "1",
    ]  # fmt: skip
    child = Child(name, argv, log=workdir / f"{name}.log", env=LITELLM_ENV, cwd=workdir)
    children.append(child)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}

    def ready(data: Any) -> bool:
        listed = {str(m.get("id")) for m in data.get("data") or []}
        return set(models) <= listed

    await wait_json(url + "/v1/models", ready, child=child, headers=headers, timeout=180.0)
    return Running(
        name=name,
        pick=lambda _req: url,
        backends=urls,
        front=[child.pid],
        api=OPENAI,
        headers=headers,
        notes=f"LiteLLM {peer_env.LITELLM.version}, routing_strategy {strategy}, on /v1",
    )


async def _herd(
    box: Box, speed: float, urls: list[str], workdir: Path, children: list[Child], api: str
) -> Running:
    if not peer_env.inside_loopback_namespace():
        raise peer_env.Unavailable("herd runs only inside a loopback-only network namespace")
    home = peer_env.ensure_installed(peer_env.HERD, log=workdir / "install.log")
    interval = max(HERD_HEARTBEAT_S / speed, 0.2)
    env = {
        "HOME": str(workdir / "herd-home"),
        "FLEET_NODE_TELEMETRY": "false",
        "FLEET_AUTO_PULL": "false",
        "FLEET_FLEET_INTELLIGENCE": "false",
        "FLEET_DATA_DIR": str(workdir / "herd-data"),
        "FLEET_HEARTBEAT_INTERVAL": f"{interval:g}",
        "FLEET_HEARTBEAT_TIMEOUT": f"{3 * interval:g}",
        "FLEET_HEARTBEAT_OFFLINE": f"{6 * interval:g}",
        "FLEET_REBALANCE_INTERVAL": f"{interval:g}",
    }
    (workdir / "herd-home").mkdir(exist_ok=True)
    port = free_port()
    router = f"http://127.0.0.1:{port}"
    argv = [str(home / "bin" / "herd"), "--host", "127.0.0.1", "--port", str(port)]
    child = Child("herd", argv, log=workdir / "herd.log", env=env, cwd=workdir)
    children.append(child)
    front = [child]
    for i, url in enumerate(urls):
        node_env = {
            **env,
            "FLEET_NODE_DATA_DIR": str(workdir / f"herd-node{i}"),
            "FLEET_NODE_HEARTBEAT_INTERVAL": f"{interval:g}",
            "FLEET_NODE_POLL_INTERVAL": f"{interval:g}",
            "OLLAMA_NUM_PARALLEL": str(box.num_parallel),
        }
        node_argv = [
            str(home / "bin" / "herd-node"), "--node-id", f"gpu{i}", "--ollama-host", url,
            "--router-url", router,
        ]  # fmt: skip
        node = Child(f"herd-node{i}", node_argv, log=workdir / f"herd-node{i}.log", env=node_env,
                     cwd=workdir)  # fmt: skip
        children.append(node)
        front.append(node)

    def ready(data: Any) -> bool:
        return int((data.get("fleet") or {}).get("nodes_online") or 0) >= len(urls)

    await wait_json(router + "/fleet/status", ready, child=child, timeout=180.0)
    return Running(
        name="herd",
        pick=lambda _req: router,
        backends=urls,
        front=[c.pid for c in front],
        api=api,
        notes=f"Ollama Herd {peer_env.HERD.version} (router + {len(urls)} node agents) on {api}",
    )


async def wait_json(
    url: str,
    ready: Any,
    *,
    child: Child,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> None:
    """Wait until ``url`` answers 200 with JSON that ``ready`` accepts; RuntimeError if not."""
    deadline = time.monotonic() + timeout
    last = ""
    async with aiohttp.ClientSession(headers=headers) as session:
        while True:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited early:\n{child.tail()}")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    last = f"HTTP {resp.status}"
                    if resp.status == 200 and ready(await resp.json(content_type=None)):
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{url} was not ready within {timeout:g} s ({last}):\n{child.tail()}"
                )
            await asyncio.sleep(0.2)
