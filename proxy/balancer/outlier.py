"""Outlier ejection: takes instances whose requests keep failing out of rotation for a back-off.

An instance whose requests fail ``ejection.consecutive`` times in a row (connect errors, timeouts,
5xx answers, streams that break mid-way) is *ejected*: no new request goes there for
``base * 2**ejections`` seconds (at most ``max``), where ``ejections`` counts its recent ejections.
Once that time is over it stays out until the monitor's real probe (a one-token generation on a
model it has loaded) passes; a failed probe ejects it again for the next, doubled, back-off.

A re-admitted instance keeps its ``ejections``, so one that relapses backs off longer. The count
decays after sustained success: each time the instance has served without a failed request for as
long as its last ejection lasted, and a request there then succeeds, ``ejections`` drops by one.

``Outliers`` owns ``strikes``, ``ejected``, ``ejected_until`` and ``ejections`` of every
``InstanceState``; the monitor owns ``healthy``. A failed connection also asks the monitor to check
the instance at once (``on_refused``): a process that is gone is marked down within milliseconds.
Outcomes on an instance that is down or already ejected are not counted (the exchanges the router
ends when that happens included): the health check, or the probe, decides for it. As in Envoy,
ejection is capped: at most half of the instances that are up are ejected at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from prometheus_client import Counter

from proxy.balancer.state import InstanceState
from proxy.config import EjectionConfig

log = logging.getLogger("ollamux.health")

KINDS = frozenset({"connect", "timeout", "status", "midstream"})
"""What failed: no connection, no answer in time, a 5xx answer, a stream cut mid-way."""


class Outliers:
    """Ejects instances whose requests keep failing.

    Owns ``strikes``, ``ejected``, ``ejected_until`` and ``ejections`` of each instance."""

    def __init__(
        self,
        config: EjectionConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
        on_eject: Callable[[InstanceState], None] = lambda inst: None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._on_eject = on_eject
        self._counter: Counter | None = None
        self._peers: list[InstanceState] = []
        self._clean_since: dict[str, float] = {}
        """When each re-admitted instance last failed or came back: the start of its clean run."""
        self.on_refused: Callable[[InstanceState], None] = lambda inst: None
        """Called on a ``connect`` failure; the ``Monitor`` that takes this object sets it to
        check the instance at once and mark it down if ``GET /`` fails too (its process is gone)."""

    def track(self, instances: Sequence[InstanceState], counter: Counter | None = None) -> None:
        """Watch ``instances`` (all of them: the ejection cap counts them) and count ejections in
        ``counter`` (``ollamux_ejections_total{backend}``), with a series for each from the start
        so that ``increase()`` sees the first one."""
        self._peers = list(instances)
        self._counter = counter
        if counter is not None:
            for inst in instances:
                counter.labels(inst.name)

    # --- what the router reports ---------------------------------------------------------------

    def success(self, inst: InstanceState) -> None:
        """A request there ended well: its strikes are cleared and past ejections decay."""
        if inst.ejected:
            return  # an exchange that outlived its ejection proves nothing: the probe decides
        inst.strikes = 0
        self._decay(inst)

    def failure(self, inst: InstanceState, kind: str) -> None:
        """A request there failed (``kind`` in ``KINDS``); the Nth in a row ejects it, or the
        first one while it is on probation (back from an ejection not yet forgiven)."""
        if kind not in KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected one of {sorted(KINDS)}")
        if not inst.healthy or inst.ejected:
            return  # its own exchanges, ended when it went down or was ejected, included
        if kind == "connect":
            self.on_refused(inst)
        inst.strikes += 1
        self._clean_since[inst.name] = self._clock()
        # back from an ejection it has not lived down yet: on probation, one failure sends it back
        needed = 1 if inst.ejections else self.config.consecutive
        if inst.strikes < needed:
            return
        if not self._may_eject():
            if inst.strikes == needed:
                log.warning(
                    "instance %s (%s) failed %d requests in a row but stays in rotation: half of "
                    "the instances that are up are ejected already",
                    inst.name,
                    inst.url,
                    inst.strikes,
                )
            return  # it is ejected on its next failure once another one is back
        strikes = inst.strikes
        seconds = self._eject(inst)
        log.warning(
            "instance %s (%s) is ejected for %gs: %d failed request(s) in a row, the last: %s",
            inst.name,
            inst.url,
            seconds,
            strikes,
            kind,
        )
        if self._counter is not None:
            self._counter.labels(inst.name).inc()
        self._on_eject(inst)
        self._on_change()

    # --- what the monitor asks and reports -----------------------------------------------------

    def due_for_probe(self, inst: InstanceState) -> bool:
        """Ejected, and its back-off is over: a probe decides whether it takes traffic again."""
        return inst.ejected and self._clock() >= inst.ejected_until

    def probe_passed(self, inst: InstanceState) -> None:
        """Re-admit it; ``ejections`` stays, so a relapse backs off longer (it decays later)."""
        if not inst.ejected:
            return
        inst.ejected = False
        inst.strikes = 0
        self._clean_since[inst.name] = self._clock()
        log.info(
            "instance %s (%s) passed its probe: back in rotation (%d recent ejections)",
            inst.name,
            inst.url,
            inst.ejections,
        )
        self._on_change()

    def probe_failed(self, inst: InstanceState, why: str = "") -> None:
        """Keep it out for the next, doubled, back-off."""
        if not inst.ejected:
            return
        seconds = self._eject(inst)
        log.warning(
            "instance %s (%s) failed its probe%s: ejected for another %gs",
            inst.name,
            inst.url,
            f" ({why})" if why else "",
            seconds,
        )

    def came_up(self, inst: InstanceState) -> None:
        """It answers again after being down: strikes from before (refused connects) are void.

        Coming back up does not eject it; an instance that was ejected stays so until its probe."""
        inst.strikes = 0

    def seconds_left(self, inst: InstanceState) -> float | None:
        """Back-off left before its next probe (0 once due); None when it is not ejected."""
        if not inst.ejected:
            return None
        return max(inst.ejected_until - self._clock(), 0.0)

    # --- internals ------------------------------------------------------------------------------

    def backoff(self, ejections: int) -> float:
        """How long an ejection lasts after ``ejections`` earlier ones: base, doubled each time."""
        if ejections >= 64:  # 2**64 * base is past any cap
            return self.config.max
        return min(self.config.base * float(2**ejections), self.config.max)

    def _may_eject(self) -> bool:
        """At most half of the instances that are up are ejected at once (one always may be).

        When most instances fail at once the fault is seldom theirs (a model that crashes
        everywhere, a request that breaks any runner): ejecting them all would turn some failed
        requests into every request refused, for every model."""
        up = [p for p in self._peers if p.healthy]
        return sum(p.ejected for p in up) < max(1, len(up) // 2)

    def _eject(self, inst: InstanceState) -> float:
        seconds = self.backoff(inst.ejections)
        inst.ejected = True
        inst.ejected_until = self._clock() + seconds
        inst.ejections += 1
        inst.strikes = 0
        return seconds

    def _decay(self, inst: InstanceState) -> None:
        """One ejection forgiven per clean stretch as long as the last ejection lasted."""
        start = self._clean_since.get(inst.name)
        if start is None or inst.ejections == 0:
            return
        now = self._clock()
        while inst.ejections > 0:
            stretch = self.backoff(inst.ejections - 1)
            if now - start < stretch:
                break
            start += stretch
            inst.ejections -= 1
        self._clean_since[inst.name] = start
