"""Client-connection settings: the server's idle timeout and the open-files limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.api.clients import runner_options
from proxy.config import LimitsConfig

resource = pytest.importorskip("resource")


def test_client_idle_is_the_servers_keepalive_timeout() -> None:
    assert runner_options(LimitsConfig(client_idle=12.5)) == {"keepalive_timeout": 12.5}


def test_the_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip(f"the hard limit here ({hard}) cannot show it")
    code = (
        "import resource\n"
        "from proxy.api.clients import raise_open_files_limit\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (32, {hard}))\n"
        "now = raise_open_files_limit()\n"
        "print(now, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).parents[2],  # the repository, so `proxy` imports
    )
    assert out.stdout.split() == [str(hard), str(hard)]
