"""Cron math (watcher.schedule): validation, next_run in UTC and across Europe/Berlin DST, intervals."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from watcher.schedule import (
    DEFAULT_DRILL_SCHEDULE,
    DEFAULT_SCHEDULE,
    croniter_problem,
    interval_seconds,
    next_run,
    validate_cron,
)

BERLIN = ZoneInfo("Europe/Berlin")


def runs_on_local_day(expression: str, day: date, zone: str) -> list[datetime]:
    """Every next_run slot whose wall-clock date in `zone` is `day`, iterating from the day before."""
    tz = ZoneInfo(zone)
    cursor = datetime(day.year, day.month, day.day, tzinfo=tz) - timedelta(hours=12)
    end = datetime(day.year, day.month, day.day, tzinfo=tz) + timedelta(days=1, hours=12)
    found = []
    for _ in range(200):
        cursor = next_run(expression, cursor, zone)
        if cursor > end:
            break
        if cursor.astimezone(tz).date() == day:
            found.append(cursor)
    return found


@pytest.mark.parametrize("expression", ["0 3 * * *", "*/5 * * * *", "30 2 * * 0", "0 5 1 * *", "0 0 1 1 *",
                                        "15,45 8-18 * * 1-5", "  0 3 * * *  ", "0 0 29 2 *", "0 3 31 * *"])
def test_validate_cron_accepts(expression: str) -> None:
    assert validate_cron(expression) is None


@pytest.mark.parametrize("expression", ["", "0 3 * *", "0 3 * * * *", "60 3 * * *", "0 24 * * *",
                                        "0 3 32 * *", "0 3 * 13 *", "0 3 * * 8", "a b c d e", "@daily"])
def test_validate_cron_rejects(expression: str) -> None:
    why = validate_cron(expression)
    assert isinstance(why, str)
    assert why


@pytest.mark.parametrize("expression", ["0 3 30 2 *", "0 3 31 4 *", "0 3 31 2,4,6,9,11 *"])
def test_validate_cron_rejects_a_day_that_never_comes(expression: str) -> None:
    # croniter builds these and fails only when asked for a slot: the daemon would crash at
    # registration instead of disabling the one container.
    why = validate_cron(expression)
    assert why is not None and "never comes round" in why


def test_validate_cron_says_how_many_fields() -> None:
    why = validate_cron("0 3 * *")
    assert why is not None
    assert "5" in why
    assert "4" in why


def test_next_run_utc() -> None:
    result = next_run("0 3 * * *", datetime(2026, 1, 1, 12, 0, tzinfo=UTC), "UTC")
    assert result == datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    assert result.utcoffset() == timedelta(0)


def test_next_run_is_strictly_after() -> None:
    slot = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    assert next_run("0 3 * * *", slot, "UTC") == datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    assert next_run("0 3 * * *", slot - timedelta(microseconds=1), "UTC") == slot


def test_next_run_reads_schedule_in_the_zone() -> None:
    winter = next_run("0 3 * * *", datetime(2026, 1, 10, tzinfo=UTC), "Europe/Berlin")
    summer = next_run("0 3 * * *", datetime(2026, 7, 10, tzinfo=UTC), "Europe/Berlin")
    assert winter == datetime(2026, 1, 10, 2, 0, tzinfo=UTC)
    assert summer == datetime(2026, 7, 10, 1, 0, tzinfo=UTC)


def test_next_run_does_not_depend_on_the_offset_of_after() -> None:
    instant = datetime(2026, 5, 5, 20, 0, tzinfo=UTC)
    assert next_run("0 3 * * *", instant, "Europe/Berlin") == next_run(
        "0 3 * * *", instant.astimezone(ZoneInfo("America/New_York")), "Europe/Berlin")


def test_spring_forward_gap_slot_runs_once_at_a_real_instant() -> None:
    # 2026-03-29 in Berlin: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist that day.
    day = date(2026, 3, 29)
    runs = runs_on_local_day("30 2 * * *", day, "Europe/Berlin")
    assert len(runs) == 1
    (run,) = runs
    gap_end = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert gap_end <= run <= gap_end + timedelta(minutes=30)
    local = run.astimezone(BERLIN)
    assert local.utcoffset() == timedelta(hours=2)  # CEST: after the gap
    # the days around it are untouched
    assert runs_on_local_day("30 2 * * *", date(2026, 3, 28), "Europe/Berlin") == [
        datetime(2026, 3, 28, 1, 30, tzinfo=UTC)]
    assert runs_on_local_day("30 2 * * *", date(2026, 3, 30), "Europe/Berlin") == [
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC)]


def test_spring_forward_next_run_from_just_before_the_gap() -> None:
    before = datetime(2026, 3, 29, 1, 59, tzinfo=BERLIN)
    run = next_run("30 2 * * *", before, "Europe/Berlin")
    assert datetime(2026, 3, 29, 1, 0, tzinfo=UTC) <= run <= datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def test_fall_back_repeated_slot_runs_once() -> None:
    # 2026-10-25 in Berlin: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice on the wall clock.
    runs = runs_on_local_day("30 2 * * *", date(2026, 10, 25), "Europe/Berlin")
    assert len(runs) == 1


def test_fall_back_other_slots_that_day_run_once() -> None:
    assert runs_on_local_day("0 4 * * *", date(2026, 10, 25), "Europe/Berlin") == [
        datetime(2026, 10, 25, 3, 0, tzinfo=UTC)]
    assert runs_on_local_day("0 1 * * *", date(2026, 10, 25), "Europe/Berlin") == [
        datetime(2026, 10, 24, 23, 0, tzinfo=UTC)]


def test_utc_has_no_dst_surprises() -> None:
    assert len(runs_on_local_day("30 2 * * *", date(2026, 10, 25), "UTC")) == 1
    assert len(runs_on_local_day("30 2 * * *", date(2026, 3, 29), "UTC")) == 1


@pytest.mark.parametrize(("expression", "seconds"), [
    ("*/5 * * * *", 300),
    ("0 3 * * *", 86400),
    ("0 * * * *", 3600),
    ("0 3 * * 0", 7 * 86400),
])
def test_interval_seconds(expression: str, seconds: float) -> None:
    assert interval_seconds(expression, "UTC", datetime(2026, 1, 7, tzinfo=UTC)) == seconds
    assert interval_seconds(expression, "Europe/Berlin", datetime(2026, 1, 7, tzinfo=UTC)) == seconds


def test_interval_seconds_is_the_largest_gap() -> None:
    # 08:00 and 20:00 on weekdays: the largest gap is over the weekend (Fri 20:00 -> Mon 08:00).
    # (2026-01-08 is a Thursday, so the weekend lies within the next few slots.)
    assert interval_seconds("0 8,20 * * 1-5", "UTC", datetime(2026, 1, 8, tzinfo=UTC)) == 60 * 3600


@pytest.mark.parametrize(("expression", "named"), [
    ("0 25 * * *", "the hour field '25' is not valid (allowed: 0-23"),
    ("61 * * * *", "the minute field '61' is not valid (allowed: 0-59"),
    ("0 0 32 * *", "the day of month field '32' is not valid (allowed: 1-31"),
    ("0 0 * 13 *", "the month field '13' is not valid (allowed: 1-12 or jan-dec"),
    ("0 0 * * 8", "the weekday field '8' is not valid (allowed: 0-7 or sun-sat"),
    ("*/0 * * * *", "the minute field '*/0' is not valid"),
])
def test_validate_cron_names_the_field_that_is_out_of_range(expression: str, named: str) -> None:
    assert named in (validate_cron(expression) or "")


@pytest.mark.parametrize("expression", [DEFAULT_SCHEDULE, DEFAULT_DRILL_SCHEDULE])
def test_built_in_schedules_pass_croniter(expression: str) -> None:
    # validate_cron takes them without croniter: this is what makes that safe.
    assert croniter_problem(expression) is None
    assert validate_cron(expression) is None
