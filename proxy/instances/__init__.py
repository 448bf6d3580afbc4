"""How backends come to exist: supervised processes per launcher, and external URLs checked.

fleet.py       every instance of a config up until stopped (`ollamux serve`)
supervisor.py  generic child processes: spawn, readiness, restarts, stop with no orphans
emulated.py    the command line of one emulated instance
"""

from __future__ import annotations
