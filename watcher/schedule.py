"""Cron schedule math: five-field croniter expressions read as wall-clock time in a zone, DST-correct."""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from croniter import croniter

# Enough slots to see a weekend gap even in a minute-by-minute weekday schedule.
INTERVAL_LOOKAHEAD_SLOTS = 10080


def _cron(expression: str, start: datetime | None = None) -> croniter:
    """croniter's iterator of `expression`'s slots from `start`; raises as croniter does (ValueError, KeyError).

    croniter is imported on first use: its import runs file(1) on the Python binary (a 32-bit check) and costs
    a one-shot command that computes no schedule about 10 ms of CPU.
    """
    from croniter import croniter  # noqa: PLC0415 - lazy on purpose (the docstring)

    return croniter(expression, start)


# The built-in schedules (WATCHER_SCHEDULE's and WATCHER_DRILL_SCHEDULE's defaults): valid, as
# tests/unit/test_schedule.py shows with croniter, so a configuration that keeps them is read without it.
DEFAULT_SCHEDULE = "0 3 * * *"
DEFAULT_DRILL_SCHEDULE = "0 5 1 * *"
_BUILT_IN = frozenset({DEFAULT_SCHEDULE, DEFAULT_DRILL_SCHEDULE})


def validate_cron(expression: str) -> str | None:
    """Returns why `expression` is not a valid five-field cron schedule, or None if it is."""
    return None if expression in _BUILT_IN else croniter_problem(expression)


def croniter_problem(expression: str) -> str | None:
    """validate_cron's verdict as croniter gives it, for any expression, the built-in ones too."""
    fields = expression.split()
    if len(fields) != 5:
        return f"a schedule has 5 fields (minute hour day month weekday), this has {len(fields)}"
    try:
        _cron(expression)
    except (ValueError, KeyError) as exc:
        return _bad_field(fields) or f"not a valid cron expression ({exc})"
    # croniter accepts dates that never come (30 February) and only fails when asked for a slot; the
    # daemon asks at registration, so such a schedule must be refused here, not found out there.
    # The probe starts in a leap year's January so that a schedule on 29 February passes.
    probe_start = datetime(2000, 1, 1)
    try:
        _cron(expression, probe_start).get_next(datetime)
        _cron(expression, probe_start).get_prev(datetime)
    except ValueError:
        return "this schedule never comes round (a day that no month has, e.g. 30 February)"
    return None


CRON_FIELDS = (("minute", "0-59"), ("hour", "0-23"), ("day of month", "1-31"), ("month", "1-12 or jan-dec"),
               ("weekday", "0-7 or sun-sat"))


def _bad_field(fields: list[str]) -> str | None:
    """Names the first of five cron fields that croniter refuses on its own, with its range; None if
    each is fine alone (then only their combination is wrong)."""
    for index, ((name, allowed), value) in enumerate(zip(CRON_FIELDS, fields, strict=True)):
        alone = ["*"] * 5
        alone[index] = value
        try:
            _cron(" ".join(alone))
        except (ValueError, KeyError):
            return f"the {name} field {value!r} is not valid (allowed: {allowed}, lists, ranges and steps)"
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
    slots = _cron(expression, wall)
    while True:
        candidate = slots.get_next(datetime)
        assert isinstance(candidate, datetime)
        instant = _resolve_wall_time(candidate, zone)
        if instant > after:
            return instant


def interval_seconds(expression: str, timezone: str, around: datetime) -> float:
    """Returns the nominal interval of the schedule: the largest gap between its slots over a week.

    Measured on wall-clock time, so a daily schedule is 24 h also across a DST change. Cached per
    expression, zone and day: targets usually share a handful of schedules.
    """
    return _interval_on(expression, timezone, around.astimezone(zoneinfo.ZoneInfo(timezone)).date())


@functools.lru_cache(maxsize=256)
def _interval_on(expression: str, timezone: str, day: date) -> float:
    start = datetime(day.year, day.month, day.day)
    slots = _cron(expression, start)
    slot = slots.get_next(datetime)
    # Every day alike (no day, month or weekday restriction): two days show every gap.
    every_day_alike = expression.split()[2:] == ["*", "*", "*"]
    horizon = slot + timedelta(days=2 if every_day_alike else 8)
    largest = timedelta(0)
    for _ in range(INTERVAL_LOOKAHEAD_SLOTS):
        following = slots.get_next(datetime)
        largest = max(largest, following - slot)
        slot = following
        if slot > horizon:
            break
    return largest.total_seconds()


def previous_run(expression: str, before: datetime, timezone: str) -> datetime:
    """Returns the latest slot at or before `before` (aware), as an aware UTC datetime."""
    zone = zoneinfo.ZoneInfo(timezone)
    wall = before.astimezone(zone).replace(tzinfo=None)
    # croniter's get_prev is exclusive of its start; step one second past `before` to include it.
    slots = _cron(expression, wall + timedelta(seconds=1))
    while True:
        candidate = slots.get_prev(datetime)
        assert isinstance(candidate, datetime)
        instant = _resolve_wall_time(candidate, zone)
        if instant <= before:
            return instant


def first_run(expression: str, timezone: str, newest_snapshot: datetime | None, now: datetime) -> datetime:
    """When a newly registered target is first backed up.

    Now, if it has no snapshot at all, or if its newest snapshot is older than the schedule's most
    recent slot (a slot was missed while the watcher was down or the container was away);
    otherwise at its next slot.
    """
    if newest_snapshot is None or newest_snapshot < previous_run(expression, now, timezone):
        return now
    return next_run(expression, now, timezone)
