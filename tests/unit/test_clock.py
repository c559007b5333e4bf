"""The fake clock the daemon's unit tests run on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from watcher.clock import FakeClock, SystemClock

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def test_fake_clock_moves_both_readings_together_and_only_forward() -> None:
    clock = FakeClock(T0)
    start = clock.monotonic()
    assert clock.advance(90) == T0 + timedelta(seconds=90) and clock.monotonic() == start + 90
    assert clock.set(T0 + timedelta(hours=1)) == clock.now() == T0 + timedelta(hours=1)
    assert clock.monotonic() == start + 3600
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        FakeClock(datetime(2026, 1, 1))  # a naive time is what it refuses


def test_system_clock_is_aware_utc() -> None:
    now = SystemClock().now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
