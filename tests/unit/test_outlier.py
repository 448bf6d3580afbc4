"""Outlier ejection (proxy/balancer/outlier.py) with an injected clock and the shipped defaults."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from proxy.balancer.outlier import Outliers
from proxy.balancer.state import InstanceState
from proxy.config import EjectionConfig

DEFAULTS = EjectionConfig()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Outliers with a fake clock, recording its callbacks."""

    def __init__(self, config: EjectionConfig = DEFAULTS) -> None:
        self.clock = Clock()
        self.ejected: list[str] = []
        self.changes = 0
        self.outliers = Outliers(
            config, clock=self.clock, on_change=self._changed, on_eject=self._eject
        )

    def _changed(self) -> None:
        self.changes += 1

    def _eject(self, inst: InstanceState) -> None:
        self.ejected.append(inst.name)

    def fail(self, inst: InstanceState, times: int, kind: str = "timeout") -> None:
        for _ in range(times):
            self.outliers.failure(inst, kind)


def up(name: str = "gpu0") -> InstanceState:
    return InstanceState(name=name, url=f"http://{name}", slots=4, healthy=True)


def test_the_nth_failure_in_a_row_ejects_for_the_base_time() -> None:
    rec, inst = Recorder(), up()
    rec.fail(inst, DEFAULTS.consecutive - 1)
    assert inst.strikes == DEFAULTS.consecutive - 1 and not inst.ejected and inst.routable
    assert rec.ejected == [] and rec.changes == 0

    rec.fail(inst, 1, kind="midstream")
    assert inst.ejected and not inst.routable and inst.state == "ejected"
    assert inst.ejected_until == rec.clock.now + DEFAULTS.base
    assert inst.ejections == 1 and inst.strikes == 0
    assert rec.ejected == ["gpu0"] and rec.changes == 1


def test_each_kind_counts_and_an_unknown_one_is_refused() -> None:
    rec, inst = Recorder(), up()
    for kind in ("timeout", "status", "midstream"):
        rec.outliers.failure(inst, kind)
    assert inst.ejected
    with pytest.raises(ValueError, match="unknown failure kind"):
        rec.outliers.failure(up("gpu1"), "client_gone")


def test_a_success_clears_the_strikes() -> None:
    rec, inst = Recorder(), up()
    rec.fail(inst, DEFAULTS.consecutive - 1)
    rec.outliers.success(inst)
    assert inst.strikes == 0
    rec.fail(inst, DEFAULTS.consecutive - 1)
    assert not inst.ejected and rec.ejected == []


def test_no_probe_before_the_back_off_is_over() -> None:
    rec, inst = Recorder(), up()
    assert not rec.outliers.due_for_probe(inst)
    rec.fail(inst, DEFAULTS.consecutive)
    assert rec.outliers.seconds_left(inst) == DEFAULTS.base
    rec.clock.now += DEFAULTS.base - 0.1
    assert not rec.outliers.due_for_probe(inst)
    rec.clock.now += 0.1
    assert rec.outliers.due_for_probe(inst) and rec.outliers.seconds_left(inst) == 0
    assert inst.ejected, "it stays out until a probe passes"
    assert rec.outliers.seconds_left(up("gpu1")) is None


def test_failed_probes_double_the_back_off_up_to_the_cap() -> None:
    rec, inst = Recorder(), up()
    rec.fail(inst, DEFAULTS.consecutive)
    lengths = [inst.ejected_until - rec.clock.now]
    for _ in range(8):
        rec.clock.now = inst.ejected_until
        rec.outliers.probe_failed(inst, "no answer")
        lengths.append(inst.ejected_until - rec.clock.now)
    assert lengths == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert inst.ejected and rec.ejected == ["gpu0"], "a failed probe is not a new ejection"
    assert rec.changes == 1


def test_a_passed_probe_re_admits_and_a_relapse_backs_off_longer() -> None:
    rec, inst = Recorder(), up()
    rec.fail(inst, DEFAULTS.consecutive)
    rec.clock.now = inst.ejected_until
    rec.outliers.probe_passed(inst)
    assert not inst.ejected and inst.routable and inst.strikes == 0
    assert inst.ejections == 1 and rec.changes == 2

    rec.fail(inst, DEFAULTS.consecutive)
    assert inst.ejected and inst.ejected_until == rec.clock.now + 2 * DEFAULTS.base
    assert rec.ejected == ["gpu0", "gpu0"]


def test_a_readmitted_instance_is_on_probation_until_its_ejections_decay() -> None:
    rec, inst = Recorder(), up()
    rec.fail(inst, DEFAULTS.consecutive)
    rec.clock.now = inst.ejected_until
    rec.outliers.probe_passed(inst)
    rec.outliers.failure(inst, "midstream")  # one failure, not N: it relapsed
    assert inst.ejected and inst.ejected_until == rec.clock.now + 2 * DEFAULTS.base
    rec.clock.now = inst.ejected_until
    rec.outliers.probe_passed(inst)
    rec.clock.now += 1000
    rec.outliers.success(inst)  # served cleanly long enough: forgiven
    assert inst.ejections == 0
    for _ in range(DEFAULTS.consecutive - 1):
        rec.outliers.failure(inst, "timeout")
    assert not inst.ejected  # a fresh start: N in a row again


def test_ejections_decay_after_sustained_success() -> None:
    """One ejection is forgiven per clean stretch as long as the last ejection lasted."""
    rec, inst = Recorder(), up()
    rec.fail(inst, DEFAULTS.consecutive)
    for _ in range(2):  # ejected for 5 s, then 10 s, then 20 s: ejections == 3
        rec.clock.now = inst.ejected_until
        rec.outliers.probe_failed(inst)
    rec.clock.now = inst.ejected_until
    rec.outliers.probe_passed(inst)
    assert inst.ejections == 3
    start = rec.clock.now

    rec.clock.now = start + 19
    rec.outliers.success(inst)
    assert inst.ejections == 3, "not clean for as long as the last ejection (20 s) yet"
    rec.clock.now = start + 20
    rec.outliers.success(inst)
    assert inst.ejections == 2

    rec.clock.now += 1000  # a long clean stretch forgives the rest at once
    rec.outliers.success(inst)
    assert inst.ejections == 0
    rec.fail(inst, DEFAULTS.consecutive)
    assert inst.ejected_until == rec.clock.now + DEFAULTS.base


def test_outcomes_on_an_ejected_or_down_instance_do_not_count() -> None:
    rec, inst = Recorder(), up()
    rec.fail(inst, DEFAULTS.consecutive)
    until = inst.ejected_until
    rec.fail(inst, 5)  # exchanges that were in flight when it was ejected
    rec.outliers.success(inst)
    assert inst.ejected and inst.ejected_until == until and rec.ejected == ["gpu0"]

    down = up("gpu1")
    down.healthy = False
    rec.fail(down, 5)
    assert not down.ejected and down.strikes == 0


def test_a_failed_connect_counts_and_asks_the_monitor_to_check() -> None:
    """The monitor checks it at once; once it is down, racing requests no longer count."""
    rec, inst = Recorder(), up()
    seen: list[str] = []
    rec.outliers.on_refused = lambda i: seen.append(i.name)
    rec.fail(inst, 1, kind="connect")
    assert seen == ["gpu0"] and inst.strikes == 1

    inst.healthy = False  # what the monitor's check found: the process is gone
    rec.fail(inst, DEFAULTS.consecutive, kind="connect")
    assert seen == ["gpu0"] and inst.strikes == 1 and not inst.ejected and rec.ejected == []


def test_coming_back_up_clears_strikes_and_does_not_eject() -> None:
    rec, inst = Recorder(), up()
    rec.fail(inst, DEFAULTS.consecutive - 1)
    rec.outliers.came_up(inst)
    assert inst.strikes == 0 and not inst.ejected
    rec.fail(inst, DEFAULTS.consecutive - 1)
    assert not inst.ejected


def test_probe_outcomes_on_an_instance_not_ejected_change_nothing() -> None:
    rec, inst = Recorder(), up()
    rec.outliers.probe_failed(inst)
    rec.outliers.probe_passed(inst)
    assert not inst.ejected and inst.ejections == 0 and rec.changes == 0


def test_ejections_are_counted_per_instance_from_zero() -> None:
    registry = CollectorRegistry()
    counter = Counter("ollamux_ejections", "doc", ["backend"], registry=registry)
    rec, inst = Recorder(), up()
    rec.outliers.track([inst, up("gpu1")], counter)

    def sample(name: str) -> float | None:
        return registry.get_sample_value("ollamux_ejections_total", {"backend": name})

    assert sample("gpu0") == 0 and sample("gpu1") == 0
    rec.fail(inst, DEFAULTS.consecutive)
    rec.clock.now = inst.ejected_until
    rec.outliers.probe_failed(inst)
    assert sample("gpu0") == 1 and sample("gpu1") == 0


def test_one_warning_line_per_ejection(caplog: pytest.LogCaptureFixture) -> None:
    rec, inst = Recorder(), up()
    with caplog.at_level(logging.INFO, logger="ollamux.health"):
        rec.fail(inst, DEFAULTS.consecutive, kind="status")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "gpu0" in caplog.text and "ejected for 5s" in caplog.text and "status" in caplog.text


def test_at_most_half_of_the_instances_that_are_up_are_ejected_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fault on every instance at once is seldom theirs: half of them stay in rotation."""
    rec = Recorder()
    box = [up(f"gpu{i}") for i in range(4)]
    rec.outliers.track(box)
    for inst in box:
        rec.fail(inst, DEFAULTS.consecutive)
    assert [i.ejected for i in box] == [True, True, False, False]
    assert "gpu2" in caplog.text and "stays in rotation" in caplog.text

    rec.clock.now = box[0].ejected_until
    rec.outliers.probe_passed(box[0])
    rec.fail(box[2], 1)  # its strikes were kept: its next failure ejects it
    assert box[2].ejected and not box[3].ejected

    box[3].healthy = False  # 3 up, 2 of them ejected: already over half
    rec.fail(box[0], DEFAULTS.consecutive)
    assert not box[0].ejected


def test_a_lone_instance_may_be_ejected() -> None:
    rec, inst = Recorder(), up()
    rec.outliers.track([inst])
    rec.fail(inst, DEFAULTS.consecutive)
    assert inst.ejected
