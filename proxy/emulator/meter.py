"""GPU utilization as nvidia-smi reports it: the share of a recent window the GPU was busy."""

from __future__ import annotations

from collections import deque


class BusyMeter:
    """Records busy intervals of one GPU and reports the busy share of the last ``window`` s."""

    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self._since: float | None = None
        self._done: deque[tuple[float, float]] = deque()

    def set_busy(self, busy: bool, now: float) -> None:
        if busy and self._since is None:
            self._since = now
        elif not busy and self._since is not None:
            self._done.append((self._since, now))
            self._since = None
        self._trim(now)

    def utilization(self, now: float) -> float:
        self._trim(now)
        start = now - self.window
        busy = sum(max(0.0, end - max(begin, start)) for begin, end in self._done)
        if self._since is not None:
            busy += now - max(self._since, start)
        return min(max(busy / self.window, 0.0), 1.0)

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][1] < now - self.window:
            self._done.popleft()
