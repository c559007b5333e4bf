"""Time, injected: the daemon's parts read the clock they are given, never the system's directly.

`SystemClock` is wired in once by the command line; tests pass a `FakeClock` and move it by hand,
so schedules, retries and staleness are checked in milliseconds instead of real minutes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Wall time for schedules and records, monotonic time for intervals."""

    def now(self) -> datetime:
        """The current time, aware, in UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (only differences mean anything)."""
        ...


class SystemClock:
    """The machine's clocks."""

    def now(self) -> datetime:
        """The current time, aware, in UTC."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """time.monotonic()."""
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to: both readings advance together."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware start time")
        self._now = start.astimezone(UTC)
        self._monotonic = 1000.0

    def now(self) -> datetime:
        """The fake current time."""
        return self._now

    def monotonic(self) -> float:
        """The fake monotonic reading."""
        return self._monotonic

    def advance(self, seconds: float) -> datetime:
        """Moves both readings forward; returns the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += timedelta(seconds=seconds)
        self._monotonic += seconds
        return self._now

    def set(self, moment: datetime) -> datetime:
        """Moves forward to `moment` (aware); returns it."""
        return self.advance((moment - self._now).total_seconds())
