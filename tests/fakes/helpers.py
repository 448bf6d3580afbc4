"""Test doubles for a GPU box: the fake ``pynvml`` loaded in process, and a fake ``ollama`` on PATH.

The fake ``ollama`` records its argv, pid and ``OLLAMA_*``/``CUDA_*`` environment to
``$FAKE_OLLAMA_RECORD/<port>.jsonl`` (one line per start), exits at once with a CUDA-like error
while a file ``crash-<port>`` exists there, and otherwise becomes an emulated Ollama on
``$OLLAMA_HOST`` with one 24 GiB GPU, reading the ``OLLAMA_*`` settings as Ollama does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

FAKES = Path(__file__).resolve().parent
REPO = FAKES.parents[1]
GIB = 1024**3


def gpu(n: int, **extra: Any) -> dict[str, Any]:
    """A fake GPU: UUID ``GPU-<n repeated>``, 24 GiB with 1 GiB used."""
    digit = str(n)[-1]
    uuid = f"GPU-{digit * 8}-{digit * 4}-{digit * 4}-{digit * 4}-{digit * 12}"
    return {"uuid": uuid, "name": "NVIDIA RTX 4090", "total": 24 * GIB, "used": GIB, **extra}


def nvml_env(gpus: list[dict[str, Any]] | None, error: str | None = None) -> str:
    """The ``$FAKE_NVML`` value for these GPUs (or this error)."""
    return json.dumps({"gpus": gpus or [], "error": error})


def load_fake_nvml(
    monkeypatch: pytest.MonkeyPatch, gpus: list[dict[str, Any]] | None, error: str | None = None
) -> ModuleType:
    """Make ``import pynvml`` give a fresh fake with these GPUs; None = no driver at all."""
    if gpus is None and error is None:
        monkeypatch.delenv("FAKE_NVML", raising=False)
    else:
        monkeypatch.setenv("FAKE_NVML", nvml_env(gpus, error))
    spec = importlib.util.spec_from_file_location("pynvml", FAKES / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


FAKE_OLLAMA = """\
#!{python}
import json, os, sys
record = os.environ["FAKE_OLLAMA_RECORD"]
host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434")
port = host.rsplit(":", 1)[1]
env = {{k: v for k, v in os.environ.items() if k.startswith(("OLLAMA_", "CUDA_"))}}
with open(os.path.join(record, port + ".jsonl"), "a") as out:
    out.write(json.dumps({{"argv": sys.argv, "pid": os.getpid(), "env": env}}) + "\\n")
if os.path.exists(os.path.join(record, "crash-" + port)):
    print("Error: CUDA error: out of memory (fake)", flush=True)
    sys.exit(2)
argv = [sys.executable, "-m", "proxy", "emulate", "--quiet", "--listen", host,
        "--gpu", "fake" + port + ":24", "--speed", "50"]
if os.environ.get("OLLAMA_MODELS"):
    argv += ["--models-dir", os.environ["OLLAMA_MODELS"]]
os.execv(sys.executable, argv)
"""


def write_fake_ollama(bin_dir: Path) -> Path:
    """An executable ``ollama`` in ``bin_dir`` (see the module docstring)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "ollama"
    path.write_text(textwrap.dedent(FAKE_OLLAMA.format(python=sys.executable)))
    path.chmod(0o755)
    return path


def records(record_dir: Path, port: int) -> list[dict[str, Any]]:
    """Every start of the fake ``ollama`` on ``port``, oldest first."""
    path = record_dir / f"{port}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def box_env(bin_dir: Path, record_dir: Path, gpus: list[dict[str, Any]] | None) -> dict[str, str]:
    """The environment of an `ollamux` subprocess on a fake GPU box."""
    record_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": f"{FAKES}{os.pathsep}{REPO}",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_OLLAMA_RECORD": str(record_dir),
    }
    if gpus is None:
        env.pop("FAKE_NVML", None)
    else:
        env["FAKE_NVML"] = nvml_env(gpus)
    return env
