"""The stall bound of a dump (WATCHER_STALL_TIMEOUT, SPEC §11): a stream that moves no data for that long ends.

A dump from a paused container, a hung server or frozen storage sends nothing and never ends by
itself; WATCHER_DUMP_TIMEOUT would end it only hours later. The exec helper (`python -m
watcher.dockerexec --stall-timeout S`) sees every piece of the stream, so the watch lives there: it
counts the pieces that pass (`counting`), and a thread of its own looks at the count every
`interval` seconds. When nothing moved for the bound, the helper says which side was silent (the
command in the container, or restic not taking what it was given) and exits with EXIT_STALLED: its
stream to the engine closes, the engine closes the command's output (pg_dump ends on its next write),
and restic, seeing its source fail, writes no snapshot.

Restores and drills are not watched: pg_restore takes no input and sends nothing for as long as an
index build takes, which may be far longer than any stall of a dump.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from watcher.durations import format_duration

# Like timeout(1): the helper's status when it gave up on a silent stream.
EXIT_STALLED = 124
T = TypeVar("T")
STALL_BOUND_NAMES = "the bound is WATCHER_STALL_TIMEOUT or the label backup-watcher.stall-timeout"


class StallWatch:
    """How long a stream has moved nothing, from the pieces it counted; pure (the clock is given)."""

    def __init__(self, bound_s: float, now: Callable[[], float]) -> None:
        self.bound_s = bound_s
        self._now = now
        self._pieces = 0
        self._seen = 0
        self._moved_at = now()
        self._passing_on = False

    def counting(self, sink: Callable[[T], object]) -> Callable[[T], None]:
        """Wraps a sink of the stream's pieces: each piece counts as progress when it arrives, and while
        the sink holds it (a write blocked by a reader that takes nothing) the stall is the reader's."""
        def count(piece: T) -> None:
            self._pieces += 1
            self._passing_on = True
            try:
                sink(piece)
            finally:
                self._passing_on = False
        return count

    def stalled(self) -> bool:
        """Looks at the stream now; returns True when no piece arrived for `bound_s` seconds."""
        now = self._now()
        if self._pieces != self._seen:
            self._seen = self._pieces
            self._moved_at = now
            return False
        return now - self._moved_at >= self.bound_s

    def problem(self, program: str) -> str:
        """The sentence that says which side of the stream was silent, and for how long."""
        bound = format_duration(self.bound_s)
        if self._passing_on:
            return (f"restic took no data from {program} for {bound}: is the repository's storage or backend "
                    f"hanging? The dump was aborted ({STALL_BOUND_NAMES})")
        return (f"no data from {program} for {bound}: is the container paused, its server hung or its storage "
                f"frozen? The dump was aborted ({STALL_BOUND_NAMES})")


class Watchdog:
    """Looks at a StallWatch every `interval` seconds from a thread of its own until stopped, and calls
    `on_stall` (once) when the stream stalled. Use as a context manager around the stream."""

    def __init__(self, watch: StallWatch, on_stall: Callable[[], None], interval: float) -> None:
        self.watch = watch
        self._on_stall = on_stall
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stall-watchdog")
        self.fired = False

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self.watch.stalled():
                self.fired = True
                self._on_stall()
                return

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def look_interval(bound_s: float) -> float:
    """How often a watchdog looks: a tenth of the bound, between 0.1 s and 5 s (a stall is seen at most
    that much after the bound)."""
    return min(5.0, max(0.1, bound_s / 10))


def monotonic_watch(bound_s: float) -> StallWatch:
    """A StallWatch on the monotonic clock."""
    return StallWatch(bound_s, time.monotonic)
