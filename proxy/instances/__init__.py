"""How backends come to exist: supervised processes per launcher, systemd units, external URLs.

fleet.py         every instance of a config up until stopped (`ollamux serve`); restarts on request
supervisor.py    generic children: start, readiness, restarts with backoff, crash-loop limit, stop
child.py         one child process: its own process group, parent-death signal, output, stop
pinning.py       `instances: auto` expanded and GPU indexes made UUIDs, from what NVML finds
process.py       the `process` launcher: `ollama serve` pinned to its GPU(s), its environment
ports.py         is a port free, and if not, which process holds it
emulated.py      the command line of one emulated instance
unit_files.py    the systemd units, env files and proxy config for a config, rendered as text
systemctl.py     the units written (render, install, uninstall) and systemctl run; restarts
"""

from __future__ import annotations
