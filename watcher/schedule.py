"""Cron schedule math: five-field croniter expressions read as wall-clock time in a zone, DST-correct."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta

from croniter import croniter

# Enough slots to see a weekend gap even in a minute-by-minute weekday schedule.
INTERVAL_LOOKAHEAD_SLOTS = 10080


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


def _resolve_wall_time(naive: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    """The UTC instant of a wall-clock time in `zone`.

    A repeated wall time (DST fall-back) resolves to its first occurrence; a wall time that does
    not exist (DST spring-forward gap) resolves to the first instant after the gap.
    """
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return first
    # In a gap, fold=1 applies the offset after the jump and lands before the gap; walk forward
    # minute by minute (transitions happen on whole minutes) to the jump itself.
    instant = naive.replace(tzinfo=zone, fold=1).astimezone(UTC).replace(second=0, microsecond=0)
    while instant.astimezone(zone).replace(tzinfo=None) < naive:
        instant += timedelta(minutes=1)
    return instant


def next_run(expression: str, after: datetime, timezone: str) -> datetime:
    """Returns the first slot strictly after `after` (aware), as an aware UTC datetime.

    The expression is read as wall-clock time in `timezone`: a slot that falls in a DST gap
    runs at the first valid instant after it, and a slot inside a repeated hour runs once.
    """
    zone = zoneinfo.ZoneInfo(timezone)
    wall = after.astimezone(zone).replace(tzinfo=None)
    slots = croniter(expression, wall)
    while True:
        candidate = slots.get_next(datetime)
        assert isinstance(candidate, datetime)
        instant = _resolve_wall_time(candidate, zone)
        if instant > after:
            return instant


def interval_seconds(expression: str, timezone: str, around: datetime) -> float:
    """Returns the nominal interval of the schedule: the largest gap between its slots over a week."""
    slot = next_run(expression, around, timezone)
    horizon = slot + timedelta(days=8)
    largest = timedelta(0)
    for _ in range(INTERVAL_LOOKAHEAD_SLOTS):
        following = next_run(expression, slot, timezone)
        largest = max(largest, following - slot)
        slot = following
        if slot > horizon:
            break
    return largest.total_seconds()
