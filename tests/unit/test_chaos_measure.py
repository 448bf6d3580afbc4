"""The chaos benchmark's measures: how a request is classified, time to detect and to recover."""

from __future__ import annotations

from benchmarks.chaos import table
from benchmarks.chaos_box import Sample
from benchmarks.chaos_client import Call
from benchmarks.chaos_measure import (
    counts,
    detect,
    marked,
    quiet,
    recover,
    routed_after,
    timeline,
    within,
)


def _call(sent: float, end: float | None, **kw: object) -> Call:
    call = Call(model="m", sent=sent, end=end)
    for key, value in kw.items():
        setattr(call, key, value)
    return call


def _ok(sent: float, end: float, ttfb: float = 0.1) -> Call:
    return _call(sent, end, status=200, first=sent + ttfb, done=True)


def test_each_way_a_request_ends_has_one_kind() -> None:
    calls = [
        _ok(0, 1),
        _call(0, 1, status=503),
        _call(0, 1, status=413),
        _call(0, 1, refused_connection=True),
        _call(0, 1, status=502),
        _call(0, 1, status=200, hung=True),  # headers, then nothing by the deadline
        _call(0, 1, status=200, first=0.5, error_line=True),
        _call(0, 1, status=200, first=0.5),  # closed without an error line
        _call(0, 1, status=200, first=0.5, hung=True),
        _call(0, 1, cancelled=True),
        _call(0, 1, status=200, first=0.5, done=True, cancelled=True),  # answered before
    ]
    assert [c.kind for c in calls] == [
        "ok", "refused", "refused", "refused", "lost", "lost", "cut", "silent", "silent",
        "cancelled", "ok",
    ]  # fmt: skip
    got = counts(calls)
    assert got == {"requests": 11, "ok": 2, "refused": 3, "lost": 2, "cut": 1, "silent": 2,
                   "cancelled": 1, "hung": 2}  # fmt: skip


def _samples(rows: list[tuple[float, str, int, int, int]]) -> list[Sample]:
    """(t, target's state, its in flight, its routed count, the other's routed count)."""
    return [
        Sample(t=t, states={"a": state, "b": "up"}, inflight={"a": inflight, "b": 1},
               bindings={"a": mine, "b": other}, slots={"a": 4, "b": 4})
        for t, state, inflight, mine, other in rows
    ]  # fmt: skip


def test_detect_is_the_first_sample_marking_the_instance() -> None:
    samples = _samples([(0.0, "up", 2, 10, 10), (1.0, "up", 2, 12, 12), (1.2, "ejected", 0, 12, 13),
                        (1.4, "up", 0, 13, 14)])  # fmt: skip
    assert marked(samples, "a", 0.5) == 0.7
    assert detect(samples, "a", 0.5) == 0.7
    assert timeline(samples, "a")[1:] == [[1.0, "up", 2, 12], [1.2, "ejected", 0, 12],
                                          [1.4, "up", 0, 13]]  # fmt: skip


def test_a_quiet_instance_counts_only_once_it_holds_nothing() -> None:
    # routed nothing new from t=1, but holds 4 stuck requests until t=5
    rows = [(0.0, "up", 3, 10, 10), (1.0, "up", 4, 11, 12)]
    rows += [(t / 2, "up", 4, 11, 12 + t) for t in range(3, 10)]
    rows += [(t / 2, "up", 0, 11, 12 + t) for t in range(10, 20)]
    samples = _samples(rows)
    assert quiet(samples, "a", 0.5) == 4.5  # from t=5, when it let go of them
    assert detect(samples, "a", 0.5) == 4.5
    # nothing routed anywhere: the load stopped, not a detection
    idle = _samples([(t / 2, "up", 0, 11, 12) for t in range(20)])
    assert quiet(idle, "a", 0.0) is None
    # the samples end before a quiet stretch could be told
    assert quiet(samples[:6], "a", 0.5) is None


def test_routed_after_counts_from_the_last_sample_before() -> None:
    samples = _samples([(0.0, "up", 0, 10, 10), (1.0, "up", 4, 14, 12), (2.0, "up", 4, 14, 20)])
    assert routed_after(samples, "a", 0.5) == (4, 14)
    assert routed_after(samples, "a", 1.5) == (0, 8)


def test_recover_waits_for_every_disturbed_request_and_the_rate() -> None:
    # 5 answers a second before the fault at t=10 and from t=12 on
    calls = [_ok(t / 5, t / 5 + 0.5) for t in range(40, 50)]
    calls += [_ok(t / 5, t / 5 + 0.5) for t in range(60, 100)]
    got = recover(calls, 10.0, 20.0)
    assert got is not None and 1.0 < got <= 2.0  # the rate is back once answers come again
    # a request sent at t=11 waits 5 s for its first byte (a hang, retried elsewhere): over at 16
    slow = [*calls, _ok(11.0, 16.5, ttfb=5.0)]
    got = recover(slow, 10.0, 20.0)
    assert got is not None and 6.0 <= got < 6.1
    # a stream running at the fault that hangs to the end: never over before the load ends
    assert recover([*calls, _call(9.0, 20.0, status=200, first=9.2, hung=True)], 10.0, 20.0) is None
    # one that was cut at t=10.5 with an error line is over then
    cut = recover([*calls, _call(9.0, 10.5, status=200, first=9.2, error_line=True)], 10.0, 20.0)
    assert cut is not None and 1.0 < cut <= 2.0
    # no answers at all after the fault
    assert recover(calls[:10], 10.0, 20.0) is None


def test_within_ten_percent() -> None:
    assert within(100, 110) is True
    assert within(100, 111) is False
    assert within(None, 100) is None


def test_table_shows_censored_times_and_goals() -> None:
    row = {"scenario": "hang warm", "label": "hang warm", "requests": 3, "ok": 2, "refused": 0,
           "lost": 1, "cut": 0, "silent": 0, "window_s": 16.0, "detect_s": None,
           "recover_s": 2.5, "rss_before_mb": 42.0, "rss_after_mb": 43.4, "rss_peak_mb": 44.0,
           "inflight_left": 4, "notes": ["x"],
           "goals": [{"goal": "detect <= 15 s", "met": False}]}  # fmt: skip
    text = table({"rows": [row, {"scenario": "body", "error": "boom"}]})
    line = text.splitlines()[2]
    assert "| >16 | 2.5 |" in line
    assert "42 → 43 (44)" in line
    assert "detect <= 15 s ✗ (x)" in line
    assert "failed to run: boom" in text.splitlines()[3]
