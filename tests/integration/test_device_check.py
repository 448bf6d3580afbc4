"""scripts/device-check.sh against a fake nvidia-smi and the fake NVML: agree, mismatch, absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.helpers import FAKES, GIB, REPO, gpu, nvml_env

SCRIPT = REPO / "scripts" / "device-check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

SMI = """#!/bin/sh
case "$*" in
  -L) echo "GPU 0: NVIDIA RTX 4090 (UUID: {uuid0})" ;;
  *) echo "index, uuid, memory.total [MiB], memory.used [MiB]"
     echo "0, {uuid0}, 24576 MiB, {used} MiB"
     echo "1, {uuid1}, 24576 MiB, 1024 MiB" ;;
esac
"""


def run(
    tmp_path: Path, *, uuid1: str = gpu(1)["uuid"], used: int = 900
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(SMI.format(uuid0=gpu(0)["uuid"], uuid1=uuid1, used=used))
    smi.chmod(0o755)
    python = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{python}:/usr/bin:/bin",
        "PYTHONPATH": f"{FAKES}:{REPO}",
        "FAKE_NVML": nvml_env([gpu(0), gpu(1)]),
        "OLLAMUX": f"{sys.executable} -m proxy",
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def test_agreeing_readings_pass(tmp_path: Path) -> None:
    result = run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agree on 2 GPU(s)" in result.stdout
    assert f"{GIB * 24 // 2**20}/24576" in result.stdout


def test_a_different_uuid_or_used_memory_fails(tmp_path: Path) -> None:
    result = run(tmp_path, uuid1="GPU-someone-else")
    assert result.returncode == 1
    assert "MISMATCH: GPU 1: uuid differ" in result.stderr
    result = run(tmp_path, used=9000)  # 8 GiB apart: not the driver's reserve
    assert result.returncode == 1
    assert "MISMATCH: GPU 0: memory.used differ" in result.stderr


def test_without_nvidia_smi_there_is_nothing_to_compare(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    if shutil.which("nvidia-smi", path=env["PATH"]):
        pytest.skip("this machine has nvidia-smi")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "nvidia-smi is not on PATH" in result.stderr
