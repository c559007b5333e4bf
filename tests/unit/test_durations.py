"""Durations as operators write them."""

from __future__ import annotations

import pytest

from watcher.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("6h", 21600.0),
                                               ("1d", 86400.0), (" 2.5m ", 150.0), ("0", 0.0), ("5M", 300.0)])
def test_parse_duration_reads_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5s", "5 minutes", "1h30m", "5w"])
def test_parse_duration_refuses_what_it_cannot_read_and_says_what_it_accepts(text: str) -> None:
    with pytest.raises(DurationError, match=r"write e\.g\. 90s, 15m, 6h"):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(300.0, "5m"), (21600.0, "6h"), (90.0, "90s"), (86400.0, "1d"),
                                               (0.5, "0.5s")])
def test_format_duration_uses_the_largest_whole_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds
