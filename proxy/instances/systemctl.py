"""`ollamux systemd render|install|uninstall|status`: the rendered units written, and systemctl run.

Install, as steps (each printed; ``--dry-run`` prints them and does nothing):

1. write the files :func:`proxy.instances.unit_files.render` returns, and a manifest
   (``/etc/ollamux/installed.json``) naming them and the stock ``ollama.service``'s state;
2. ``systemctl daemon-reload``;
3. ``systemctl disable --now ollama.service`` if it was enabled or running: it holds port 11434,
   which the proxy takes over, so clients (Open WebUI) need no change;
4. ``systemctl enable --now ollamux.target``.

Uninstall reads the manifest and undoes exactly that: stops and disables the target, the proxy and
the instances, removes the files, reloads, and enables and starts the stock unit again as it was.

``--root DIR`` installs into a system image at DIR, as ``systemctl --root`` does: files go under
DIR and only ``enable``/``disable`` run (offline, on DIR); nothing is started, stopped or reloaded.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from proxy import __version__
from proxy.config import Config, load_config
from proxy.errors import LaunchError, OllamuxError
from proxy.instances.pinning import pin_with_nvml
from proxy.instances.process import find_ollama
from proxy.instances.stock import carry_over
from proxy.instances.unit_files import (
    ENV_DIR,
    ETC_DIR,
    OLLAMA_HOME,
    PROXY_UNIT,
    TARGET,
    USER,
    Account,
    UnitFile,
    instance_unit,
    local_instances,
    render,
)

__all__ = ["install", "ollamux_command", "render_to", "restart_unit", "status", "uninstall"]

log = logging.getLogger("ollamux.systemd")

MANIFEST = f"{ETC_DIR}/installed.json"
STOCK = "ollama.service"
DEFAULT_OLLAMA = "/usr/local/bin/ollama"
"""Where Ollama's install script puts the binary; used for rendering when none is found."""


@dataclass(frozen=True)
class _Write:
    file: UnitFile


@dataclass(frozen=True)
class _Remove:
    path: str


@dataclass(frozen=True)
class _Run:
    args: tuple[str, ...]
    """systemctl's arguments."""


_Action = _Write | _Remove | _Run


# --- render --------------------------------------------------------------------------------------


def ollamux_command() -> list[str]:
    """How systemd should start ollamux: the ``ollamux`` script beside this Python, or ``-m``."""
    script = Path(sys.executable).parent / "ollamux"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("ollamux")
    return [str(Path(found).absolute())] if found else [sys.executable, "-m", "proxy"]


def unreachable(command: Sequence[str]) -> str | None:
    """Why the service user may not be able to start ``command``: a folder on the way to it that
    other users cannot enter (a virtual environment in a private home), or None."""
    program = Path(command[0])
    for folder in program.parents:
        try:
            mode = folder.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            return (
                f"the unit starts {program}, under {folder} (mode {stat.S_IMODE(mode):o}), which "
                "other users cannot enter, so the service user cannot start it; install ollamux "
                "system-wide (pipx install ollamux, or a virtual environment in /opt/ollamux) and "
                "render the units again from there"
            )
    return None


def rendered(config: Config, *, strict: bool, account: Account | None = None) -> list[UnitFile]:
    """The files for a pinned ``config``; with ``strict`` a missing ``ollama`` is an error."""
    try:
        ollama = find_ollama(config)
    except LaunchError as exc:
        if strict:
            raise
        log.warning("%s; the unit runs %s for now", exc, DEFAULT_OLLAMA)
        ollama = DEFAULT_OLLAMA
    command = ollamux_command()
    problem = unreachable(command)
    if problem:
        log.warning("%s", problem)
    return render(config, ollama=ollama, ollamux=command, account=account)


def render_to(config_path: str, out: str, *, stdout: TextIO | None = None) -> None:
    """`ollamux systemd render`: the units, env files and proxy config into ``out`` (flat)."""
    stdout = stdout or sys.stdout
    files = rendered(pin_with_nvml(load_config(config_path)), strict=False)
    base = Path(out)
    for file in files:
        sub = "instances" if file.path.startswith(ENV_DIR + "/") else ""
        target = base / sub / Path(file.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file.text, encoding="utf-8")
        target.chmod(file.mode)
        stdout.write(f"wrote {target} (for {file.path})\n")


# --- install, uninstall, status ------------------------------------------------------------------


def install(
    config_path: str, *, root: str = "/", dry_run: bool = False, out: TextIO | None = None
) -> None:
    """`ollamux systemd install`: see the module's docstring for the steps."""
    out = out or sys.stdout
    offline = Path(root).resolve() != Path("/")
    _check_privileges(root, dry_run=dry_run, offline=offline, out=out)
    carried = carry_over(pin_with_nvml(load_config(config_path)), root, Account())
    config = carried.config
    if carried.lines:
        out.write(f"carried over from the stock {STOCK} and its drop-ins:\n")
        out.writelines(f"  {line}\n" for line in carried.lines)
    else:
        out.write(f"nothing to carry over from {STOCK}: it sets no Environment= or User=\n")
    for warning in carried.warnings:
        out.write(f"warning: {warning}\n")
    files = rendered(config, strict=not dry_run, account=carried.account)
    previous = _read_manifest(root)
    units = [instance_unit(i.name) for i in local_instances(config)]
    stock = previous["stock"] if previous else _stock_state(root, offline=offline)
    manifest = {
        "ollamux": __version__,
        "config": str(Path(config_path).resolve()),
        "files": [f.path for f in files],
        "units": units,
        "stock": stock,
    }
    actions: list[_Action] = [_Write(f) for f in files]
    if previous:
        gone = [u for u in previous.get("units", []) if u not in units]
        if gone:
            actions.append(_Run(("stop", *gone)))
        keep = {f.path for f in files}
        actions += [_Remove(p) for p in previous.get("files", []) if p not in keep]
    text = json.dumps(manifest, indent=2) + "\n"
    actions.append(_Write(UnitFile(path=MANIFEST, text=text, mode=0o644)))
    actions.append(_Run(("daemon-reload",)))
    if stock["enabled"] == "enabled" or stock["active"] == "active":
        actions.append(_Run(("disable", "--now", STOCK)))
    actions.append(_Run(("enable", "--now", TARGET)))
    _execute(actions, root=root, dry_run=dry_run, offline=offline, out=out)


def uninstall(*, root: str = "/", dry_run: bool = False, out: TextIO | None = None) -> None:
    """`ollamux systemd uninstall`: undo what the manifest says install did."""
    out = out or sys.stdout
    offline = Path(root).resolve() != Path("/")
    manifest = _read_manifest(root)
    if manifest is None:
        raise OllamuxError(
            f"nothing to uninstall: {_under(root, MANIFEST)} is missing "
            "(`ollamux systemd install` writes it)"
        )
    _check_privileges(root, dry_run=dry_run, offline=offline, out=out, user=False)
    actions: list[_Action] = [
        _Run(("disable", "--now", TARGET)),
        _Run(("stop", PROXY_UNIT, *manifest.get("units", []))),
    ]
    actions += [_Remove(p) for p in [*manifest.get("files", []), MANIFEST]]
    actions += [_Remove(ENV_DIR), _Remove(ETC_DIR)]  # directories, only when empty
    actions.append(_Run(("daemon-reload",)))
    stock = manifest.get("stock", {})
    if stock.get("enabled") == "enabled":
        actions.append(_Run(("enable", STOCK)))
    if stock.get("active") == "active":
        actions.append(_Run(("start", STOCK)))
    _execute(actions, root=root, dry_run=dry_run, offline=offline, out=out)


def status(config_path: str | None = None, *, out: TextIO | None = None) -> None:
    """`ollamux systemd status`: systemctl's view of the target, the proxy and the instances."""
    out = out or sys.stdout
    units = [TARGET, PROXY_UNIT]
    if config_path:
        config = pin_with_nvml(load_config(config_path))
        units += [instance_unit(i.name) for i in local_instances(config)]
    else:
        units.append("ollama@*.service")
    units.append(STOCK)
    result = _systemctl("list-units", "--all", "--no-pager", "--plain", *units, check=True)
    out.write(result.stdout)


async def restart_unit(unit: str) -> None:
    """``systemctl restart UNIT``; LaunchError with systemctl's words if it fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "systemctl", "restart", unit,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    except OSError as exc:
        why = exc.strerror or exc
        raise LaunchError(f"cannot run systemctl to restart {unit}: {why}") from None
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        said = output.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        raise LaunchError(f"systemctl restart {unit} failed: {said}")


# --- helpers -------------------------------------------------------------------------------------


def _check_privileges(
    root: str, *, dry_run: bool, offline: bool, out: TextIO, user: bool = True
) -> None:
    if dry_run:
        out.write("dry run: nothing is written and systemctl only answers questions\n")
        return
    if not offline and os.geteuid() != 0:
        raise OllamuxError("writing to /etc and running systemctl needs root: run it with sudo")
    if not offline and shutil.which("systemctl") is None:
        raise OllamuxError("systemctl is not on PATH: this host does not run systemd")
    if user and not offline:
        try:
            grp.getgrnam(USER)
        except KeyError:
            raise OllamuxError(
                f"the user and group {USER} do not exist: install Ollama first (its installer "
                f"creates them), or: sudo useradd -r -s /bin/false -U -m -d {OLLAMA_HOME} {USER}"
            ) from None


def _stock_state(root: str, *, offline: bool) -> dict[str, str]:
    """Whether the stock ollama.service is enabled and running, as systemctl says."""
    if shutil.which("systemctl") is None:
        return {"enabled": "unknown", "active": "unknown"}
    prefix = (f"--root={root}",) if offline else ()
    enabled = _systemctl(*prefix, "is-enabled", STOCK).stdout.strip() or "not-found"
    # Offline there is no running manager to ask: nothing runs in an image.
    active = "inactive" if offline else _systemctl("is-active", STOCK).stdout.strip()
    return {"enabled": enabled, "active": active}


def _systemctl(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            ["systemctl", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
    except OSError as exc:
        raise OllamuxError(f"cannot run systemctl: {exc.strerror or exc}") from None
    if check and result.returncode != 0:
        said = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        said = "; ".join(line.strip() for line in said.splitlines() if line.strip())
        raise OllamuxError(f"systemctl {' '.join(args)} failed: {said}")
    return result


def _read_manifest(root: str) -> dict[str, Any] | None:
    path = Path(_under(root, MANIFEST))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise OllamuxError(f"cannot read {path}: {exc}; remove it to start afresh") from None
    if not isinstance(data, dict) or not isinstance(data.get("stock"), dict):
        raise OllamuxError(f"{path} is not an ollamux manifest; remove it to start afresh")
    return data


def _under(root: str, path: str) -> str:
    return str(Path(root) / path.lstrip("/"))


def _offline_args(args: Sequence[str], root: str) -> tuple[str, ...] | None:
    """The offline form of a systemctl command on an image at ``root``, or None if it has none."""
    if args[0] not in ("enable", "disable"):
        return None  # daemon-reload, start, stop need the running manager
    return (f"--root={root}", *(a for a in args if a != "--now"))


def _execute(
    actions: list[_Action], *, root: str, dry_run: bool, offline: bool, out: TextIO
) -> None:
    verb = "would " if dry_run else ""
    for action in actions:
        if isinstance(action, _Write):
            file = action.file
            path = Path(_under(root, file.path))
            group = f", group {file.group}" if file.group else ""
            out.write(f"{verb}write {path} (mode {file.mode:04o}{group})\n")
            if not dry_run:
                _write(path, file, chown=not offline)
        elif isinstance(action, _Remove):
            path = Path(_under(root, action.path))
            if path.is_dir():
                if not dry_run and not any(path.iterdir()):
                    path.rmdir()
                    out.write(f"removed {path}/\n")
                elif dry_run:
                    out.write(f"would remove {path}/ if empty\n")
            elif path.exists() or dry_run:
                out.write(f"{verb}remove {path}\n")
                if not dry_run:
                    path.unlink(missing_ok=True)
        else:
            args = _offline_args(action.args, root) if offline else action.args
            if args is None:
                shown = " ".join(action.args)
                out.write(f"skip systemctl {shown} (--root: not the running system)\n")
                continue
            out.write(f"{verb}run systemctl {' '.join(args)}\n")
            if not dry_run:
                _systemctl(*args, check=True)
    if not dry_run:
        out.write("done\n")


def _write(path: Path, file: UnitFile, *, chown: bool) -> None:
    """Write ``file`` at ``path`` atomically, with its mode (and group, on the real system)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.ollamux-new")
    temporary.write_text(file.text, encoding="utf-8")
    temporary.chmod(file.mode)
    if chown and file.group:  # the group exists: _check_privileges made sure
        os.chown(temporary, -1, grp.getgrnam(file.group).gr_gid)
    os.replace(temporary, path)
