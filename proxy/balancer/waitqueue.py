"""One model's waiting requests, in the order they get a slot: interactive first, users in turn.

A request is ``interactive`` (a person watches it stream) or ``background`` (a non-streamed call:
Open WebUI's titles, tags and follow-ups, batch jobs); a background request gets a slot only when
no interactive one waits for the model. Within a class, users take turns: the next slot goes to
the user served longest ago (first come among users never served), and each user's own requests
keep their order. So one user's flood waits behind itself, not in front of everyone else, and a
user alone on the box sees plain first come, first served.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

INTERACTIVE = 0
BACKGROUND = 1
USERS_KEPT = 10_000
"""Users whose last turn is remembered; beyond that the longest-served-ago are forgotten."""


@dataclass(eq=False)
class Waiter:
    """One request waiting for a slot for ``model``."""

    model: str
    session: str
    exclude: frozenset[str]
    since: float
    future: asyncio.Future[Any] = field(repr=False)
    user: str = ""
    priority: int = INTERACTIVE
    num_ctx: int = 0


class WaitQueue:
    """The waiters of one model, one lane per (class, user)."""

    def __init__(self) -> None:
        self._lanes: dict[tuple[int, str], deque[Waiter]] = {}
        self._served: dict[str, int] = {}
        """When each user last got a slot (a counter, not a clock)."""
        self._ticks = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Waiter]:
        for lane in self._lanes.values():
            yield from lane

    def append(self, waiter: Waiter) -> None:
        self._lanes.setdefault((waiter.priority, waiter.user), deque()).append(waiter)
        self._size += 1

    def head(self) -> Waiter | None:
        """The waiter that gets the next slot (those that gave up are dropped on the way)."""
        best: tuple[tuple[int, int, float], tuple[int, str]] | None = None
        for key in list(self._lanes):
            lane = self._lanes[key]
            while lane and lane[0].future.done():
                lane.popleft()
                self._size -= 1
            if not lane:
                self._drop_lane(key)
                continue
            priority, user = key
            rank = (priority, self._served.get(user, -1), lane[0].since)
            if best is None or rank < best[0]:
                best = (rank, key)
        return None if best is None else self._lanes[best[1]][0]

    def pop_head(self, waiter: Waiter) -> None:
        """``waiter`` (the head) got its slot: its user goes to the back of the turn."""
        key = (waiter.priority, waiter.user)
        lane = self._lanes[key]
        assert lane[0] is waiter
        lane.popleft()
        self._size -= 1
        self._served[waiter.user] = next(self._ticks)
        if not lane:
            self._drop_lane(key)

    def remove(self, waiter: Waiter) -> None:
        """``waiter`` gave up."""
        key = (waiter.priority, waiter.user)
        lane = self._lanes.get(key)
        if lane is not None and waiter in lane:
            lane.remove(waiter)
            self._size -= 1
            if not lane:
                self._drop_lane(key)

    def make_room_for(self, user: str) -> Waiter | None:
        """The queue is full and ``user`` asks: the newest waiter of the user with the most
        waiting, taken out, when that user has at least two more waiting than ``user`` (so one
        user's flood gives way to the others; a user alone keeps first come, first served)."""
        counts: dict[str, int] = {}
        for (_priority, who), lane in self._lanes.items():
            counts[who] = counts.get(who, 0) + len(lane)
        heaviest = max(counts, key=lambda who: (counts[who], who), default=None)
        if heaviest is None or counts[heaviest] < counts.get(user, 0) + 2:
            return None
        lanes = [k for k in self._lanes if k[1] == heaviest]
        key = max(lanes, key=lambda k: (k[0], self._lanes[k][-1].since))  # background first
        victim = self._lanes[key][-1]
        self.remove(victim)
        return victim

    def _drop_lane(self, key: tuple[int, str]) -> None:
        del self._lanes[key]
        if len(self._served) > USERS_KEPT:  # forget the users served longest ago
            waiting = {u for _p, u in self._lanes}
            for user in sorted(self._served, key=self._served.__getitem__):
                if len(self._served) <= USERS_KEPT // 2:
                    break
                if user not in waiting:
                    del self._served[user]
