"""`ollamux agent`: NVML's readings as GET /gpus over real HTTP, read back with HttpGpuSource."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from proxy.commands.agent import RUNNING, open_nvml, serve_agent
from proxy.errors import GpuUnavailable
from proxy.gpu import GpuReading
from proxy.gpu.nvml import NvmlGpuSource
from proxy.gpu.remote import HttpGpuSource
from tests.fakes.helpers import FAKES, GIB, REPO, gpu, load_fake_nvml, nvml_env
from tests.processes import free_ports

MIG_GPU = {
    **gpu(2, util=0),
    "mig": True,
    "migs": [{"uuid": "MIG-aaaa", "name": "NVIDIA A100 1g.10gb", "total": 10 * GIB, "used": 0}],
}
FAKE_GPUS = [gpu(0, util=37), gpu(1, used=5 * GIB), MIG_GPU]


@contextlib.asynccontextmanager
async def agent(token: str = "") -> AsyncIterator[str]:
    """An agent on NVML (the fake's) on a free loopback port; yields its base URL."""
    (port,) = free_ports(1)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_agent("127.0.0.1", port, token=token, stop=stop))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            assert not task.done(), task.exception()
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/") as resp:
                    if resp.status == 200:
                        break
            await asyncio.sleep(0.02)
    try:
        yield url
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def get(url: str, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(headers=headers) as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def read(url: str, token: str = "") -> list[GpuReading]:
    async with aiohttp.ClientSession() as session:
        return await HttpGpuSource(session, url + "/gpus", token=token).read()


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_fake_nvml(monkeypatch, FAKE_GPUS)


async def test_gpus_are_what_nvml_reports_in_the_emulators_shape(fake_nvml: ModuleType) -> None:
    async with agent() as url:
        readings = await read(url)
        status, text = await get(url + "/gpus")
        assert await get(url + "/") == (200, RUNNING)
    assert status == 200
    body = json.loads(text)
    assert readings == await NvmlGpuSource(fake_nvml).read()
    assert [(r.index, r.uuid) for r in readings] == [
        (0, gpu(0)["uuid"]),
        (1, gpu(1)["uuid"]),
        (2, gpu(2)["uuid"]),
        (2, "MIG-aaaa"),
    ]
    assert readings[0].utilization == 0.37
    assert (readings[1].memory_used, readings[1].memory_free) == (5 * GIB, 19 * GIB)
    fields = {f.name for f in dataclasses.fields(GpuReading)}
    assert list(body) == ["gpus"] and all(set(item) == fields for item in body["gpus"])


async def test_a_token_is_required_when_set(fake_nvml: ModuleType) -> None:
    async with agent(token="s3cret") as url:
        for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, text = await get(url + "/gpus", **header)
            assert status == 401
            assert "Authorization: Bearer TOKEN" in json.loads(text)["error"]
        with pytest.raises(aiohttp.ClientResponseError) as denied:
            await read(url, token="wrong")
        assert denied.value.status == 401
        assert [r.uuid for r in await read(url, token="s3cret")][:2] == [
            gpu(0)["uuid"],
            gpu(1)["uuid"],
        ]
        assert await get(url + "/") == (200, RUNNING)  # only /gpus is behind the token


async def test_nvml_failing_after_start_is_a_503_with_a_reason(fake_nvml: ModuleType) -> None:
    async with agent() as url:
        fake_nvml.nvmlShutdown()  # the agent's NVML session is gone
        await asyncio.sleep(0.6)  # past the readings' cache
        status, text = await get(url + "/gpus")
    assert status == 503
    assert "cannot read the GPUs" in json.loads(text)["error"]


@pytest.mark.parametrize("gpus", [None, []], ids=["no driver", "no GPU"])
async def test_without_gpus_the_agent_does_not_start(
    monkeypatch: pytest.MonkeyPatch, gpus: list[dict[str, Any]] | None
) -> None:
    load_fake_nvml(monkeypatch, gpus)
    with pytest.raises(GpuUnavailable):
        await open_nvml()


def agent_command(*args: str, fake: str | None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{FAKES}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1"}
    env.pop("FAKE_NVML", None)
    env.pop("OLLAMUX_AGENT_TOKEN", None)
    if fake is not None:
        env["FAKE_NVML"] = fake
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "agent", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_command_without_nvml_exits_1_with_one_sentence() -> None:
    proc = agent_command(fake=None)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert out == "" and "Traceback" not in err
    assert err.startswith("ollamux: error: no NVIDIA driver found") and err.count("\n") == 1


def test_a_bad_listen_exits_2_naming_the_flag() -> None:
    proc = agent_command("--listen", "nope", fake=nvml_env([gpu(0)]))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--listen" in err and "HOST:PORT" in err


def test_the_command_serves_until_sigterm() -> None:
    (port,) = free_ports(1)
    proc = agent_command("--listen", f"127.0.0.1:{port}", fake=nvml_env([gpu(0), gpu(1)]))
    try:
        readings: list[GpuReading] = []
        deadline = time.monotonic() + 30
        while not readings and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                readings = asyncio.run(read(f"http://127.0.0.1:{port}"))
            time.sleep(0.05)
        assert [r.uuid for r in readings] == [gpu(0)["uuid"], gpu(1)["uuid"]]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "ollamux agent serving 2 GPU reading(s)" in err and "stopped" in err
