"""`ollamux emulate` with the emulator's model of a layer split changed, for the sensitivity runs.

    python -m benchmarks.emulator_knobs --split-penalty 0.15 --prefill-gain 1.2 --batch-cap 6 \
        -- emulate --gpu a:24 --gpu b:24 --spread ...

Three numbers of the emulator decide how one Ollama spread over several GPUs compares with one
per GPU, and none is measured on this project's hardware (shared/reference/performance.md gives
them): the per-token slowdown per extra GPU of a split (``emulator.spread_penalty``, 6 %), the
prefill speed-up of a split over four GPUs (x1.45: 15 % per extra GPU) and the cap on a batch's
aggregate decode speed (x3.7 one sequence's). The routing benchmark's spread contenders are started
through this module with other values; the package ``proxy`` is not changed, its constants are
replaced in this process only, before the server starts.

With one GPU per server and at most 4 sequences per model (the per-GPU contenders) none of the
three changes anything: a split needs two GPUs, and the cap binds from 6 sequences up.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.procs import ollamux_argv

GPUS = 4
"""The box's GPUs: a spread model is split over all of them, the prefill gain is stated at 4."""


@dataclass(frozen=True)
class Knobs:
    """One setting of the three numbers; the defaults are the emulator's own."""

    split_penalty: float = 0.06
    prefill_gain: float = 1.45
    """Prefill speed over ``GPUS`` GPUs relative to one (1 + per-GPU gain x (GPUS - 1))."""
    batch_cap: float = 3.7

    def flags(self) -> tuple[str, ...]:
        return (
            f"--split-penalty={self.split_penalty:g}",
            f"--prefill-gain={self.prefill_gain:g}",
            f"--batch-cap={self.batch_cap:g}",
        )

    def label(self) -> str:
        return (
            f"penalty {self.split_penalty:.0%}, prefill x{self.prefill_gain:g}, "
            f"cap x{self.batch_cap:g}"
        )


DEFAULT = Knobs()


def argv(knobs: Sequence[str], *args: str) -> list[str]:
    """``ollamux ARGS``, through this module when ``knobs`` (flags of it) are given."""
    if not knobs:
        return ollamux_argv(*args)
    return [sys.executable, "-m", "benchmarks.emulator_knobs", *knobs, "--", *args]


def apply(knobs: Knobs) -> None:
    """Replace the emulator's numbers in this process (fails loudly if they were renamed)."""
    from proxy.emulator import launch, runner

    for name in ("_BATCH_CAP", "_SPLIT_PREFILL_GAIN"):
        if not hasattr(runner, name):
            raise RuntimeError(f"proxy.emulator.runner.{name} is gone: update {__name__}")
    runner._BATCH_CAP = knobs.batch_cap
    runner._SPLIT_PREFILL_GAIN = (knobs.prefill_gain - 1) / (GPUS - 1)
    plan = launch.plan_emulator

    def planned(options: Any, environ: Mapping[str, str]) -> Any:
        got = plan(options, environ)
        settings = dataclasses.replace(got.settings, spread_penalty=knobs.split_penalty)
        return dataclasses.replace(got, settings=settings)

    launch.plan_emulator = planned


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.emulator_knobs")
    parser.add_argument("--split-penalty", type=float, default=DEFAULT.split_penalty)
    parser.add_argument("--prefill-gain", type=float, default=DEFAULT.prefill_gain)
    parser.add_argument("--batch-cap", type=float, default=DEFAULT.batch_cap)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- and ollamux's arguments")
    ns = parser.parse_args(args)
    rest = ns.rest[1:] if ns.rest[:1] == ["--"] else ns.rest
    apply(Knobs(ns.split_penalty, ns.prefill_gain, ns.batch_cap))
    from proxy.cli import main as ollamux

    return ollamux(rest)


if __name__ == "__main__":
    sys.exit(main())
