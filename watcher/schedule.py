"""Cron schedule math: five-field croniter expressions read in a time zone, correct across DST."""

from __future__ import annotations

import zoneinfo
from datetime import datetime, timedelta

from croniter import croniter


def validate_cron(expression: str) -> str | None:
    """Returns why `expression` is not a valid five-field cron schedule, or None if it is."""
    fields = expression.split()
    if len(fields) != 5:
        return f"a schedule has 5 fields (minute hour day month weekday), this has {len(fields)}"
    try:
        croniter(expression)
    except (ValueError, KeyError) as exc:
        return f"not a valid cron expression ({exc})"
    return None


def next_run(expression: str, after: datetime, timezone: str) -> datetime:
    """Returns the first slot strictly after `after` (aware), as an aware UTC datetime.

    The expression is read as wall-clock time in `timezone`: a slot that falls in a DST gap
    runs at the first valid instant after it, and a slot inside a repeated hour runs once.
    """
    zone = zoneinfo.ZoneInfo(timezone)
    local = after.astimezone(zone)
    result = croniter(expression, local).get_next(datetime)
    assert isinstance(result, datetime)
    return result.astimezone(zoneinfo.ZoneInfo("UTC"))


def interval_seconds(expression: str, timezone: str, around: datetime) -> float:
    """Returns the nominal interval of the schedule: the largest gap between its next few slots."""
    slot = next_run(expression, around, timezone)
    largest = timedelta(0)
    for _ in range(6):
        following = next_run(expression, slot, timezone)
        largest = max(largest, following - slot)
        slot = following
    return largest.total_seconds()
