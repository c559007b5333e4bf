"""Durations as operators write them (SPEC §4): `90s`, `15m`, `6h`, `1d`; a plain number is seconds."""

from __future__ import annotations

import re

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")


class DurationError(ValueError):
    """A duration that cannot be read; the message says what is accepted."""


def parse_duration(text: str) -> float:
    """Returns the duration `text` stands for, in seconds.

    Raises DurationError when `text` is not a non-negative number with an optional unit s, m, h or d.
    """
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise DurationError(f"{text!r} is not a duration: write e.g. 90s, 15m, 6h or 1d (a plain number is seconds)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """Returns `seconds` in the largest unit that writes it whole (`5m`, `6h`, `90s`)."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
