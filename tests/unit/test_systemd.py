"""Rendered systemd units (checked by systemd-analyze where present) and install/uninstall plans."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import config_from_dict, load_config
from proxy.errors import ConfigError
from proxy.instances.pinning import pin
from proxy.instances.unit_files import render
from tests.fakes.helpers import FAKES, REPO, write_fake_ollama

EXAMPLE = REPO / "config" / "example.yaml"
ANALYZE = shutil.which("systemd-analyze")
SYSTEMCTL = shutil.which("systemctl")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd); units unverified",
)
needs_systemctl = pytest.mark.skipif(
    SYSTEMCTL is None, reason="systemctl is not installed (Debian: apt-get install systemd)"
)


def rendered(tmp_path: Path, raw: dict[str, object] | None = None) -> dict[str, str]:
    config = load_config(EXAMPLE) if raw is None else config_from_dict(raw, source="box.yaml")
    ollama = write_fake_ollama(tmp_path / "bin")
    files = render(pin(config, None), ollama=str(ollama), ollamux=[sys.executable, "-m", "proxy"])
    return {f.path: f.text for f in files}


def test_render_writes_a_template_an_env_file_per_instance_the_proxy_and_a_target(
    tmp_path: Path,
) -> None:
    files = rendered(tmp_path)
    assert sorted(files) == [
        "/etc/ollamux/instances/gpu0.env",
        "/etc/ollamux/instances/gpu1.env",
        "/etc/ollamux/instances/gpu2.env",
        "/etc/ollamux/instances/gpu3.env",
        "/etc/ollamux/ollamux.yaml",
        "/etc/polkit-1/rules.d/50-ollamux.rules",
        "/etc/systemd/system/ollama@.service",
        "/etc/systemd/system/ollamux.service",
        "/etc/systemd/system/ollamux.target",
    ]
    template = files["/etc/systemd/system/ollama@.service"]
    for line in (
        f"ExecStart={tmp_path}/bin/ollama serve",
        "EnvironmentFile=/etc/ollamux/instances/%i.env",
        "User=ollama",
        "Group=ollama",
        "Restart=always",
        "PartOf=ollamux.target",
        "ProtectSystem=strict",
        "ReadWritePaths=-/usr/share/ollama",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "DeviceAllow=char-nvidia* rw",
    ):
        assert line in template.splitlines()
    assert "PrivateDevices=no" in template.splitlines()  # yes would hide the GPUs
    env = files["/etc/ollamux/instances/gpu0.env"].splitlines()
    assert 'CUDA_VISIBLE_DEVICES="GPU-00000000-0000-0000-0000-000000000000"' in env
    assert 'OLLAMA_HOST="127.0.0.1:11435"' in env
    assert 'OLLAMA_NUM_PARALLEL="4"' in env and 'OLLAMA_KEEP_ALIVE="5m"' in env
    assert 'CUDA_VISIBLE_DEVICES="2"' in files["/etc/ollamux/instances/gpu2.env"].splitlines()
    proxy = files["/etc/systemd/system/ollamux.service"].splitlines()
    units = "ollama@gpu0.service ollama@gpu1.service ollama@gpu2.service ollama@gpu3.service"
    assert f"Wants=network-online.target {units}" in proxy
    assert f"After=network-online.target {units}" in proxy
    command = f"ExecStart={sys.executable} -m proxy serve --config /etc/ollamux/ollamux.yaml"
    assert command in proxy
    target = files["/etc/systemd/system/ollamux.target"].splitlines()
    assert f"Wants=ollamux.service {units}" in target and "WantedBy=multi-user.target" in target


def test_the_proxy_config_connects_to_the_units_instead_of_starting_them(tmp_path: Path) -> None:
    text = rendered(tmp_path)["/etc/ollamux/ollamux.yaml"]
    path = tmp_path / "ollamux.yaml"
    path.write_text(text)
    config = load_config(path)
    original = load_config(EXAMPLE)
    assert config.instances != "auto" and original.instances != "auto"
    assert [(i.name, i.launcher, i.port, i.gpu) for i in config.instances] == [
        (i.name, "systemd", i.port, i.gpu) for i in original.instances
    ]
    assert config.listen == original.listen
    assert "emulator" not in yaml.safe_load(text) and "ollama_binary" not in text


def test_the_proxy_unit_gives_the_drain_time_to_stop(tmp_path: Path) -> None:
    raw: dict[str, object] = {"instances": [{"name": "a", "gpu": 0}]}
    proxy = rendered(tmp_path, raw)["/etc/systemd/system/ollamux.service"].splitlines()
    # SIGTERM to the proxy alone, so the instances it launched keep serving while it drains
    assert "KillMode=mixed" in proxy and "KillSignal=SIGTERM" in proxy
    assert "TimeoutStopSec=50" in proxy  # timeouts.drain (30 s) + instances' stop (10 s) + 10 s
    raw["timeouts"] = {"drain": "2m"}
    proxy = rendered(tmp_path, raw)["/etc/systemd/system/ollamux.service"].splitlines()
    assert "TimeoutStopSec=140" in proxy


def test_env_values_are_quoted_for_systemd_and_one_line_only(tmp_path: Path) -> None:
    raw: dict[str, object] = {
        "models_dir": "/srv/ollama models",
        "instances": [{"name": "a", "gpu": [0, 1], "spread": True, "env": {"X": 'a"b$c\\d'}}],
    }
    files = rendered(tmp_path, raw)
    env = files["/etc/ollamux/instances/a.env"].splitlines()
    assert 'CUDA_VISIBLE_DEVICES="0,1"' in env and 'OLLAMA_SCHED_SPREAD="1"' in env
    assert 'OLLAMA_MODELS="/srv/ollama models"' in env
    assert 'X="a\\"b\\$c\\\\d"' in env
    template = files["/etc/systemd/system/ollama@.service"]
    assert 'ReadWritePaths=-/usr/share/ollama "-/srv/ollama models"' in template.splitlines()
    raw["models_dir"] = "/home/me/models"
    home = rendered(tmp_path, raw)["/etc/systemd/system/ollama@.service"].splitlines()
    assert "ProtectHome=tmpfs" in home and "BindPaths=-/home/me/models" in home
    raw["instances"] = [{"name": "a", "gpu": 0, "env": {"X": "two\nlines"}}]
    with pytest.raises(ConfigError, match=r"instances\[0\].env.X: must be one line"):
        rendered(tmp_path, raw)
    raw["instances"] = [{"name": "a b", "gpu": 0}]
    with pytest.raises(ConfigError, match=r"instances\[0\].name: 'a b' cannot name a systemd unit"):
        rendered(tmp_path, raw)
    with pytest.raises(ConfigError, match="no instance with launcher process or systemd"):
        rendered(
            tmp_path, {"instances": [{"name": "e", "launcher": "external", "url": "http://h"}]}
        )


# --- the command, and systemd-analyze ------------------------------------------------------------


def ollamux(
    *args: str, path: Path, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{FAKES}:{REPO}",
        "PATH": f"{path}:{os.environ.get('PATH', '')}",
        **(extra or {}),
    }
    env.pop("FAKE_NVML", None)  # no GPUs: indexes stay indexes
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_analyze
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    write_fake_ollama(bin_dir)  # ExecStart must exist for verify
    out = tmp_path / "units"
    result = ollamux("systemd", "render", "--config", str(EXAMPLE), "--out", str(out), path=bin_dir)
    assert result.returncode == 0, result.stderr
    assert (out / "instances" / "gpu3.env").is_file() and (out / "ollamux.yaml").is_file()
    assert f"wrote {out / 'ollama@.service'} (for /etc/systemd/system/ollama@.service)" in (
        result.stdout
    )
    units = [str(out / name) for name in ("ollama@.service", "ollamux.service", "ollamux.target")]
    assert ANALYZE is not None
    verify = subprocess.run(
        [ANALYZE, "verify", *units], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr  # not even a warning (unknown key, ...)


@needs_analyze
def test_systemd_analyze_would_catch_a_broken_unit(tmp_path: Path) -> None:
    unit = tmp_path / "ollama@.service"
    unit.write_text("[Service]\nExecStart=/nonexistent/ollama serve\nRestartt=always\n")
    assert ANALYZE is not None
    verify = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode != 0 or "Unknown key" in verify.stderr


FAKE_SYSTEMCTL = """#!/bin/sh
echo "$@" >> "$FAKE_SYSTEMCTL_LOG"
case "$1" in
  is-enabled) echo enabled ;;
  is-active) echo active ;;
esac
"""


def box_config(tmp_path: Path) -> Path:
    ollama = write_fake_ollama(tmp_path / "bin")
    path = tmp_path / "box.yaml"
    path.write_text(
        f"ollama_binary: {ollama}\n"
        "instances:\n  - {name: gpu0, gpu: GPU-aaaa}\n  - {name: gpu1, gpu: GPU-bbbb}\n"
    )
    return path


def test_install_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    systemctl = bin_dir / "systemctl"
    config = box_config(tmp_path)
    systemctl.write_text(FAKE_SYSTEMCTL)
    systemctl.chmod(0o755)
    log = tmp_path / "systemctl.log"
    extra = {"FAKE_SYSTEMCTL_LOG": str(log)}
    result = ollamux(
        "systemd", "install", "--config", str(config), "--dry-run", path=bin_dir, extra=extra
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dry run: nothing is written")
    assert "would write /etc/systemd/system/ollama@.service (mode 0644)" in lines
    assert "would write /etc/ollamux/instances/gpu1.env (mode 0600)" in lines
    assert "would write /etc/ollamux/ollamux.yaml (mode 0640, group ollama)" in lines
    assert "would write /etc/ollamux/installed.json (mode 0644)" in lines
    steps = [line for line in lines if line.startswith("would run")]
    assert steps == [
        "would run systemctl daemon-reload",
        "would run systemctl disable --now ollama.service",  # stock was enabled and active
        "would run systemctl enable --now ollamux.target",
    ]
    # only questions were asked
    assert log.read_text().splitlines() == ["is-enabled ollama.service", "is-active ollama.service"]
    result = ollamux(
        "systemd",
        "uninstall",
        "--dry-run",
        "--root",
        str(tmp_path / "r"),
        path=bin_dir,
        extra=extra,
    )
    assert result.returncode == 1
    assert "nothing to uninstall" in result.stderr and "Traceback" not in result.stderr


def stock_root(tmp_path: Path) -> Path:
    """A system image with the stock ollama.service installed and enabled."""
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "ollama.service").write_text(
        "[Unit]\nDescription=Ollama Service\n[Service]\nExecStart=/usr/bin/ollama serve\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    (units / "multi-user.target.wants" / "ollama.service").symlink_to(
        "/etc/systemd/system/ollama.service"
    )
    return root


@needs_systemctl
def test_install_dry_run_against_a_root_reads_the_stock_state_there(tmp_path: Path) -> None:
    root = stock_root(tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    config = box_config(tmp_path)
    result = ollamux(
        "systemd",
        "install",
        "--config",
        str(config),
        "--dry-run",
        "--root",
        str(root),
        path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"would write {root}/etc/systemd/system/ollama@.service (mode 0644)" in lines
    assert "skip systemctl daemon-reload (--root: not the running system)" in lines
    assert f"would run systemctl --root={root} disable ollama.service" in lines
    assert f"would run systemctl --root={root} enable ollamux.target" in lines
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


@needs_systemctl
def test_install_then_uninstall_into_a_root_restores_the_stock_unit(tmp_path: Path) -> None:
    root = stock_root(tmp_path)
    units = root / "etc/systemd/system"
    config = box_config(tmp_path)
    result = ollamux(
        "systemd", "install", "--config", str(config), "--root", str(root), path=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (units / "ollama@.service").is_file() and (units / "ollamux.target").is_file()
    assert (root / "etc/ollamux/instances/gpu0.env").stat().st_mode & 0o777 == 0o600
    assert not (units / "multi-user.target.wants" / "ollama.service").exists()  # disabled
    assert (units / "multi-user.target.wants" / "ollamux.target").is_symlink()  # enabled
    manifest = (root / "etc/ollamux/installed.json").read_text()
    assert '"enabled": "enabled"' in manifest
    # installing again keeps the stock state it found the first time
    again = ollamux(
        "systemd", "install", "--config", str(config), "--root", str(root), path=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert '"enabled": "enabled"' in (root / "etc/ollamux/installed.json").read_text()

    result = ollamux("systemd", "uninstall", "--root", str(root), path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (units / "ollama@.service").exists() and not (units / "ollamux.service").exists()
    assert not (root / "etc/ollamux").exists()
    assert not (units / "multi-user.target.wants" / "ollamux.target").exists()
    assert (units / "multi-user.target.wants" / "ollama.service").is_symlink()  # enabled again
    assert (units / "ollama.service").is_file()


# --- deploy/systemd: config/example.yaml rendered, kept in step with the renderer ---------------

DEPLOY = REPO / "deploy" / "systemd"


def example_files() -> dict[str, str]:
    """config/example.yaml rendered for a host with Ollama and ollamux in /usr/local/bin."""
    config = config_from_dict(yaml.safe_load(EXAMPLE.read_text()), source="config/example.yaml")
    files = render(
        pin(config, None), ollama="/usr/local/bin/ollama", ollamux=["/usr/local/bin/ollamux"]
    )
    out = {}
    for file in files:
        sub = "instances/" if file.path.startswith("/etc/ollamux/instances/") else ""
        out[sub + Path(file.path).name] = file.text
    return out


def unversioned(text: str) -> str:
    return re.sub(r"ollamux \d+\.\d+\.\d+\S*", "ollamux VERSION", text)


def test_deploy_examples_are_the_example_config_rendered() -> None:
    expected = example_files()
    found = {str(p.relative_to(DEPLOY)): p.read_text() for p in DEPLOY.rglob("*") if p.is_file()}
    found.pop("README.md", None)
    assert sorted(found) == sorted(expected), "regenerate: python -m tests.unit.test_systemd"
    for name, text in expected.items():
        assert unversioned(found[name]) == unversioned(text), (
            f"deploy/systemd/{name} is stale; regenerate: python -m tests.unit.test_systemd"
        )


if __name__ == "__main__":  # python -m tests.unit.test_systemd: rewrite deploy/systemd
    for name, text in example_files().items():
        (DEPLOY / name).parent.mkdir(parents=True, exist_ok=True)
        (DEPLOY / name).write_text(text)
        print(f"wrote deploy/systemd/{name}")


def test_a_program_in_a_private_folder_is_reported_unreachable(tmp_path: Path) -> None:
    from proxy.instances.systemctl import unreachable

    home = tmp_path / "home"
    program = home / "venv" / "bin" / "ollamux"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    home.chmod(0o755)
    open_home = unreachable([str(program), "serve"])  # pytest's own base folder may be private
    assert open_home is None or f"under {home} " not in open_home
    home.chmod(0o700)  # a home directory as most distributions create it
    problem = unreachable([str(program), "serve"])
    assert problem is not None and f"under {home} (mode 700)" in problem
    assert "pipx install ollamux" in problem
