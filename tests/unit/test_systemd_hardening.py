"""The rendered units' systemd-analyze security score, and install carrying over the stock unit."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.config import config_from_dict
from proxy.instances.pinning import pin
from proxy.instances.stock import carry_over, ollama_host
from proxy.instances.unit_files import Account, render
from tests.unit.test_systemd import box_config, ollamux

ANALYZE = shutil.which("systemd-analyze")
# Measured with systemd 252: ollama@.service 1.6, ollamux.service 1.5 (before: 7.3 and 6.3; the
# stock ollama.service scores 9.2). The thresholds leave a margin for other systemd versions.
THRESHOLDS = {"ollama@.service": 2.5, "ollamux.service": 2.5}


def exposure(unit: Path) -> float:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=unit.parent,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)
@pytest.mark.parametrize("listen", ["127.0.0.1:11434", "0.0.0.0:80"])
def test_rendered_units_score_below_the_threshold(tmp_path: Path, listen: str) -> None:
    raw: dict[str, object] = {
        "listen": listen,
        "models_dir": "/home/me/models",
        "instances": [{"name": "gpu0", "gpu": 0}, {"name": "gpu1", "gpu": 1}],
    }
    config = pin(config_from_dict(raw, source="box.yaml"), None)
    for file in render(config, ollama="/usr/local/bin/ollama", ollamux=["/usr/local/bin/ollamux"]):
        name = Path(file.path).name
        if name in THRESHOLDS:
            (tmp_path / name).write_text(file.text)
            score = exposure(tmp_path / name)
            assert score <= THRESHOLDS[name], f"{name} scores {score}"
            lines = file.text.splitlines()
            if name == "ollamux.service" and listen.endswith(":80"):
                assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in lines
            elif name == "ollamux.service":
                assert "CapabilityBoundingSet=" in lines and "MemoryDenyWriteExecute=yes" in lines
            else:
                assert "MemoryDenyWriteExecute=yes" not in lines  # CUDA's JIT needs W+X


def test_ollama_host_is_read_as_ollama_reads_it() -> None:
    assert ollama_host("0.0.0.0") == "0.0.0.0:11434"
    assert ollama_host("0.0.0.0:8080") == "0.0.0.0:8080"
    assert ollama_host("http://10.0.0.2") == "10.0.0.2:80"
    assert ollama_host(":11500") == "127.0.0.1:11500"
    assert ollama_host("[::]:11434") == "[::]:11434"
    with pytest.raises(ValueError):
        ollama_host("host:notaport")


def stock_with_dropin(root: Path) -> None:
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd/system/ollama.service").write_text(
        "[Unit]\nDescription=Ollama Service\n[Service]\nExecStart=/usr/bin/ollama serve\n"
        'User=ollama\nGroup=ollama\nEnvironment="PATH=/usr/bin:/bin"\n'
    )
    dropins = root / "etc/systemd/system/ollama.service.d"
    dropins.mkdir(parents=True)
    (dropins / "override.conf").write_text(
        "[Service]\n"
        'Environment="OLLAMA_HOST=0.0.0.0:11434" OLLAMA_KEEP_ALIVE=1h\n'
        "Environment=OLLAMA_FLASH_ATTENTION=1 'OLLAMA_ORIGINS=http://a.example,chrome-extension://*'\n"
        "Environment=OLLAMA_NUM_PARALLEL=2 CUDA_VISIBLE_DEVICES=0\n"
        "EnvironmentFile=/etc/ollama.env\nEnvironmentFile=-/etc/missing.env\n"
    )
    (root / "etc/ollama.env").write_text(
        '# models on the big disk\nOLLAMA_MODELS="/srv/ollama models"\nOLLAMA_KV_CACHE_TYPE=q8_0\n'
    )


def test_carry_over_maps_each_setting_and_names_what_it_cannot(tmp_path: Path) -> None:
    stock_with_dropin(tmp_path)
    raw: dict[str, object] = {
        "instances": [{"name": "a", "gpu": 0}, {"name": "b", "gpu": 1, "num_parallel": 8}]
    }
    config = pin(config_from_dict(raw, source="box.yaml"), None)
    carried = carry_over(config, str(tmp_path), Account())
    assert carried.config.listen == "0.0.0.0:11434"
    assert carried.config.models_dir == "/srv/ollama models"
    assert carried.config.instances != "auto"
    a, b = carried.config.instances
    assert (a.keep_alive, a.num_parallel, b.num_parallel) == ("1h", 2, 8)  # b's own value kept
    assert a.env == {"OLLAMA_FLASH_ATTENTION": "1", "OLLAMA_KV_CACHE_TYPE": "q8_0"} == b.env
    assert carried.account.proxy_env == {"OLLAMA_ORIGINS": "http://a.example,chrome-extension://*"}
    text = "\n".join(carried.lines)
    assert (
        "CUDA_VISIBLE_DEVICES=0 (/etc/systemd/system/ollama.service.d/override.conf) not "
        "carried: each instance is pinned to its GPU" in text
    )
    assert "PATH=/usr/bin:/bin (/usr/lib/systemd/system/ollama.service) not carried" in text
    assert (
        "OLLAMA_NUM_PARALLEL=2 (/etc/systemd/system/ollama.service.d/override.conf) -> "
        "instances' num_parallel (not b: your config sets num_parallel)" in text
    )
    assert "missing.env" not in text  # "-": optional
    assert any("the proxy will listen on 0.0.0.0:11434" in w for w in carried.warnings)
    files = {f.path: f.text for f in render(
        carried.config, ollama="/usr/bin/ollama", ollamux=["/usr/bin/ollamux"],
        account=carried.account,
    )}  # fmt: skip
    proxy = files["/etc/systemd/system/ollamux.service"].splitlines()
    assert 'Environment="OLLAMA_ORIGINS=http://a.example,chrome-extension://*"' in proxy
    env = files["/etc/ollamux/instances/a.env"].splitlines()
    assert 'OLLAMA_KV_CACHE_TYPE="q8_0"' in env and 'OLLAMA_MODELS="/srv/ollama models"' in env


def test_install_dry_run_prints_what_it_carried_over(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stock_with_dropin(root)
    config = box_config(tmp_path)
    result = ollamux(
        "systemd", "install", "--config", str(config), "--dry-run", "--root", str(root),
        path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "carried over from the stock ollama.service and its drop-ins:" in out
    assert (
        "  OLLAMA_HOST=0.0.0.0:11434 (/etc/systemd/system/ollama.service.d/override.conf) "
        "-> listen: 0.0.0.0:11434" in out
    )
    assert (
        "  OLLAMA_MODELS=/srv/ollama models (/etc/ollama.env) -> models_dir: /srv/ollama models"
        in out
    )
    assert "warning: the proxy will listen on 0.0.0.0:11434" in out
    assert "Traceback" not in result.stderr
