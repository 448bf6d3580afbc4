"""NVML discovery, the NVML GPU source and GPU pinning, against a fake ``pynvml``."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import pytest

from proxy.commands.gpus import gpus_json, gpus_table
from proxy.config import config_from_dict
from proxy.errors import ConfigError, GpuUnavailable, LaunchError
from proxy.gpu import GpuReading
from proxy.gpu.nvml import discover, local_gpu_source
from proxy.instances.pinning import pin, pin_with_nvml
from tests.fakes.helpers import FAKES, GIB, REPO, gpu, load_fake_nvml, nvml_env

MIG_GPU = gpu(
    9,
    name="NVIDIA A100 80GB",
    total=80 * GIB,
    mig=True,
    migs=[
        {"uuid": "MIG-aaaa", "name": "A100 3g.40gb", "total": 40 * GIB, "used": 0},
        None,  # an empty slot
        {"uuid": "MIG-bbbb", "name": "A100 3g.40gb", "total": 40 * GIB, "used": GIB},
    ],
)


def test_discover_reads_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    processes = [{"pid": 4242, "used": 2 * GIB}, {"pid": 4243, "used": None}]
    load_fake_nvml(monkeypatch, [gpu(0, util=37, processes=processes), gpu(1, mig=False)])
    gpus = discover()
    assert [g.reading.index for g in gpus] == [0, 1]
    first = gpus[0].reading
    assert first == GpuReading(
        index=0,
        uuid=gpu(0)["uuid"],
        name="NVIDIA RTX 4090",
        memory_total=24 * GIB,
        memory_used=GIB,
        memory_free=23 * GIB,
        utilization=0.37,
    )
    assert gpus[0].mig_mode is None and gpus[1].mig_mode is False
    assert [(p.pid, p.used_memory) for p in gpus[0].processes] == [(4242, 2 * GIB), (4243, None)]


def test_mig_devices_are_listed_and_read_under_their_own_uuid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    load_fake_nvml(monkeypatch, [gpu(0), MIG_GPU])
    (plain, mig) = discover()
    assert mig.mig_mode is True
    assert [(m.index, m.uuid, m.memory_free) for m in mig.mig_devices] == [
        (0, "MIG-aaaa", 40 * GIB),
        (2, "MIG-bbbb", 39 * GIB),
    ]
    assert [r.uuid for r in mig.readings()] == [MIG_GPU["uuid"], "MIG-aaaa", "MIG-bbbb"]
    assert plain.readings() == [plain.reading]


async def test_the_router_source_reads_gpus_and_mig_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    load_fake_nvml(monkeypatch, [gpu(0, util=50), MIG_GPU])
    source = await local_gpu_source()
    assert source is not None
    readings = await source.read()
    assert [r.uuid for r in readings] == [gpu(0)["uuid"], MIG_GPU["uuid"], "MIG-aaaa", "MIG-bbbb"]
    assert readings[0].utilization == 0.5
    assert readings[2].index == 1 and readings[2].memory_total == 40 * GIB


async def test_no_driver_means_no_source_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    load_fake_nvml(monkeypatch, None)
    with caplog.at_level(logging.WARNING):
        assert await local_gpu_source() is None
    assert "no NVIDIA driver found" in caplog.text


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (None, "no NVIDIA driver found (NVML's library libnvidia-ml.so.1 is missing)"),
        ("driver_not_loaded", "the NVIDIA driver is installed but not loaded"),
        ("no_permission", "NVML refused access to the GPUs"),
    ],
)
def test_discover_without_a_usable_driver_says_why(
    monkeypatch: pytest.MonkeyPatch, error: str | None, expected: str
) -> None:
    load_fake_nvml(monkeypatch, None, error)
    with pytest.raises(GpuUnavailable) as info:
        discover()
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_a_driver_without_gpus_is_unavailable_too(monkeypatch: pytest.MonkeyPatch) -> None:
    load_fake_nvml(monkeypatch, [])
    with pytest.raises(GpuUnavailable, match="reports no NVIDIA GPU on this host"):
        discover()


def test_json_has_the_keys_of_gpus_then_mig_and_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    load_fake_nvml(monkeypatch, [gpu(0, processes=[{"pid": 1, "used": GIB}]), MIG_GPU])
    data = json.loads(gpus_json(discover()))
    reading_keys = [f.name for f in dataclasses.fields(GpuReading)]
    for entry in data["gpus"]:
        assert list(entry)[: len(reading_keys)] == reading_keys
        assert GpuReading.from_json(entry).uuid == entry["uuid"]  # what the proxy reads
        assert {"mig_mode", "mig_devices", "processes"} <= set(entry)
    assert data["gpus"][1]["mig_devices"][1]["uuid"] == "MIG-bbbb"
    table = gpus_table(discover())
    assert table.splitlines()[0].split()[:3] == ["GPU", "UUID", "NAME"]
    assert "1:2  MIG-bbbb" in table and "24.0 GiB" in table


# --- pinning -----------------------------------------------------------------------------------


def test_auto_makes_one_process_instance_per_gpu_and_mig_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    load_fake_nvml(monkeypatch, [gpu(0), gpu(1), MIG_GPU])
    config = pin_with_nvml(config_from_dict({"listen": "127.0.0.1:11436"}))
    assert config.instances != "auto"
    assert [(i.name, i.launcher, i.gpu, i.port) for i in config.instances] == [
        ("gpu0", "process", (gpu(0)["uuid"],), 11435),
        ("gpu1", "process", (gpu(1)["uuid"],), 11437),  # 11436 is the proxy's
        ("gpu2-mig0", "process", ("MIG-aaaa",), 11438),
        ("gpu2-mig2", "process", ("MIG-bbbb",), 11439),
    ]


def test_auto_without_nvml_points_at_a_config_and_the_demo() -> None:
    with pytest.raises(LaunchError) as info:
        pin(config_from_dict({}), None, "no NVIDIA driver found")
    message = str(info.value)
    assert message.startswith("no config given, and NVML finds no GPU")
    assert "no NVIDIA driver found" in message and "ollamux demo" in message


def test_indexes_become_uuids_and_uuids_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    load_fake_nvml(monkeypatch, [gpu(0), gpu(1), gpu(2), MIG_GPU])
    raw = {
        "instances": [
            {"name": "a", "gpu": 1},
            {"name": "b", "gpu": gpu(0)["uuid"]},
            {"name": "c", "gpu": [2, "MIG-bbbb"], "spread": True},
            {
                "name": "e",
                "launcher": "external",
                "url": "http://h:1",
                "gpu": 7,
                "gpu_source": "http://h:11433",
            },
        ]
    }
    config = pin_with_nvml(config_from_dict(raw, source="box.yaml"))
    assert config.instances != "auto"
    assert [i.gpu for i in config.instances] == [
        (gpu(1)["uuid"],),
        (gpu(0)["uuid"],),
        (gpu(2)["uuid"], "MIG-bbbb"),
        (7,),  # external instances are not this host's business
    ]
    with pytest.raises(ConfigError, match=r"box.yaml: instances\[0\].gpu: this host has no GPU 5"):
        pin_with_nvml(config_from_dict({"instances": [{"name": "a", "gpu": 5}]}, source="box.yaml"))
    with pytest.raises(ConfigError, match="'GPU-nope' is not a GPU of this host; its GPUs are 0"):
        pin_with_nvml(config_from_dict({"instances": [{"name": "a", "gpu": "GPU-nope"}]}))
    same = {"instances": [{"name": "a", "gpu": 0}, {"name": "b", "gpu": gpu(0)["uuid"]}]}
    with pytest.raises(ConfigError, match=r"instances\[1\].gpu: GPU GPU-0+.* already owned"):
        pin_with_nvml(config_from_dict(same))


def test_without_nvml_listed_gpus_stay_as_given_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    load_fake_nvml(monkeypatch, None)
    raw = {"instances": [{"name": "a", "gpu": 2}, {"name": "b", "gpu": "GPU-x"}]}
    with caplog.at_level(logging.WARNING):
        config = pin_with_nvml(config_from_dict(raw))
    assert config.instances != "auto"
    assert [i.gpu for i in config.instances] == [(2,), ("GPU-x",)]
    assert "instances[0].gpu (a) stays GPU index 2" in caplog.text
    assert "GPU-x" not in caplog.text


# --- the command -------------------------------------------------------------------------------


def ollamux_gpus(*args: str, fake: str | None) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": f"{FAKES}:{REPO}", "PATH": "/usr/bin:/bin"}
    if fake is not None:
        env["FAKE_NVML"] = fake
    return subprocess.run(
        [sys.executable, "-m", "proxy", "gpus", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_gpus_command_prints_a_table_and_json() -> None:
    fake = nvml_env([gpu(0), gpu(1)])
    table = ollamux_gpus(fake=fake)
    assert table.returncode == 0, table.stderr
    assert gpu(1)["uuid"] in table.stdout and table.stdout.startswith("GPU  UUID")
    as_json = ollamux_gpus("--json", fake=fake)
    assert as_json.returncode == 0
    assert [g["index"] for g in json.loads(as_json.stdout)["gpus"]] == [0, 1]


@pytest.mark.parametrize("fake", [None, nvml_env([])], ids=["no driver", "no GPU"])
def test_gpus_command_without_gpus_is_one_sentence_and_exit_1(fake: str | None) -> None:
    result = ollamux_gpus(fake=fake)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("ollamux: error: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
