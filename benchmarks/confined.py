"""A peer's round of the routing benchmark, in a loopback-only network namespace when it can be.

The parent (``run_peer``) writes what the round needs to a file and runs
``python -m benchmarks.confined JOB OUT`` under ``unshare --net``: the emulated instances, the
peer and the replaying client all live in that namespace, whose only interface is ``lo``, so
nothing the peer sends, advertises or listens on reaches any network. The child checks that it is
so before starting anything, replays the scenario and writes the contender's summary to OUT.
A peer that cannot be installed, confined (where it must be) or started is skipped with its
reason printed; the other contenders still run.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import peer_env
from benchmarks.contenders import Box
from benchmarks.procs import ROOT
from benchmarks.workload import Scenario

Round = Callable[..., Awaitable[dict[str, Any]]]
"""``routing.run_contender``'s shape (passed in: this module must not import routing)."""


def skip(name: str, reason: str) -> None:
    print(f"skipping {name}: {reason}", file=sys.stderr)


async def run_peer(
    scenario: Scenario,
    name: str,
    box: Box,
    *,
    run: Round,
    workdir: Path,
    seed: int,
    quiet: bool,
    requests_csv: Path | None,
    api: str,
) -> dict[str, Any] | None:
    """The summary of peer ``name`` on ``scenario``, or None (reason printed) when it cannot run."""
    job: dict[str, Any] = {
        "scenario": scenario, "name": name, "box": box, "workdir": workdir, "seed": seed,
        "quiet": quiet, "requests_csv": requests_csv, "api": api,
    }  # fmt: skip
    try:
        if peer_env.inside_loopback_namespace():
            return await _round(job, run)
        try:
            argv_prefix = peer_env.confined_argv([])
        except peer_env.Unavailable as exc:
            if name in peer_env.MUST_CONFINE:
                raise
            print(f"{name} runs without a network namespace ({exc})", file=sys.stderr)
            return await _round(job, run)
        return await _in_namespace(job, argv_prefix)
    except (peer_env.Unavailable, RuntimeError) as exc:
        skip(name, str(exc))
        return None


async def _round(job: dict[str, Any], run: Round) -> dict[str, Any]:
    return await run(
        job["scenario"], job["name"], job["box"], workdir=job["workdir"], seed=job["seed"],
        quiet=job["quiet"], requests_csv=job["requests_csv"], api=job["api"],
    )  # fmt: skip


async def _in_namespace(job: dict[str, Any], argv_prefix: list[str]) -> dict[str, Any]:
    workdir: Path = job["workdir"]
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{job['name']}.job.pickle"
    out = workdir / f"{job['name']}.summary.json"
    with path.open("wb") as f:
        pickle.dump(job, f)
    argv = [*argv_prefix, sys.executable, "-m", "benchmarks.confined", str(path), str(out)]
    env = {**os.environ, peer_env.NETNS_ENV: "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env)
    try:
        code = await proc.wait()
    except asyncio.CancelledError:
        proc.terminate()
        await proc.wait()
        raise
    if code != 0 or not out.exists():
        raise RuntimeError(f"its round in the network namespace exited {code} (output above)")
    summary: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """The child: ``python -m benchmarks.confined JOB OUT``, inside the namespace."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m benchmarks.confined JOB.pickle OUT.json", file=sys.stderr)
        return 2
    if not peer_env.inside_loopback_namespace():
        print(f"refusing to run: network interfaces besides lo: {peer_env.interfaces()}",
              file=sys.stderr)  # fmt: skip
        return 2
    from benchmarks.routing import run_contender

    with Path(args[0]).open("rb") as f:
        job = pickle.load(f)  # written by run_peer above, in this benchmark's own temp folder
    try:
        summary = asyncio.run(_round(job, run_contender))
    except (peer_env.Unavailable, RuntimeError) as exc:
        print(f"{job['name']}: {exc}", file=sys.stderr)
        return 1
    Path(args[1]).write_text(json.dumps(summary), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
