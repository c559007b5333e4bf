"""Readiness of containers whose PostgreSQL does not answer, on a fake clock (SPEC §11).

A due target whose PostgreSQL is not known to serve is probed outside the concurrency slots, so a live
target is never kept waiting behind it; a failed probe counts as a failed backup (paged once) and backs the
target off: a minute, doubling, at most its schedule interval, one quick probe per attempt. Pure logic: the
scheduler's plan, the outcomes of probes on a fake clock, the status row.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from alerting.policy import Kind
from tests.unit.daemon_kit import T0, World, backup_result, make_entry
from watcher.daemon.messages import BackupFinished, ProbeFinished
from watcher.daemon.running import BackupJob, Book, ProbeJob
from watcher.daemon.scheduler import View, needs_probe, not_ready_delay, plan, probe_wait
from watcher.registry import TargetState
from watcher.status import status_rows

DEAD, LIVE = "a-dead-db", "b-live-db"
HOUR = 3600.0


def started(entry: TargetState, seconds_ago: float) -> TargetState:
    assert entry.target is not None
    return replace(entry, target=replace(entry.target, started_at=T0.timestamp() - seconds_ago))


def view(*entries: TargetState, concurrency: int = 1) -> View:
    return View(tuple(sorted(entries, key=lambda e: e.name)), concurrency, "UTC", ready_timeout_s=120.0)


@pytest.mark.parametrize(("streak", "seconds"), [(1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (30, 3600)])
def test_back_off_doubles_from_a_minute_up_to_the_schedule_interval(streak: int, seconds: float) -> None:
    assert not_ready_delay(streak, HOUR) == timedelta(seconds=seconds)


def test_back_off_of_an_unknown_interval_stops_at_a_day() -> None:
    assert not_ready_delay(40, None) == timedelta(days=1)


def test_a_young_container_is_probed_first_a_settled_or_unknown_one_is_dumped_at_once() -> None:
    entry = make_entry(DEAD)
    assert needs_probe(started(entry, 5), T0)
    assert not needs_probe(started(entry, 600), T0)
    assert not needs_probe(entry, T0), "an unknown age is the job's to probe"
    assert not needs_probe(replace(started(entry, 5), ready_seen=True), T0)
    assert needs_probe(replace(started(entry, 600), not_ready_streak=2), T0)


def test_the_first_probe_waits_what_is_left_of_the_bound_later_ones_probe_once() -> None:
    assert probe_wait(started(make_entry(DEAD), 5), T0, 120.0) == 115.0
    assert probe_wait(started(make_entry(DEAD), 100), T0, 120.0) == 30.0, "at least half a minute"
    assert probe_wait(started(make_entry(DEAD), 100), T0, 10.0) == 10.0, "never more than the bound"
    assert probe_wait(replace(started(make_entry(DEAD), 5), not_ready_streak=1), T0, 120.0) == 0.0


def test_a_probe_takes_no_slot_and_the_live_target_gets_it_even_with_one_slot() -> None:
    dead = started(make_entry(DEAD, next_run=T0 - timedelta(minutes=5)), 5)  # most overdue
    live = make_entry(LIVE, next_run=T0)
    jobs = plan(view(dead, live), Book(), T0)
    assert [type(job) for job in jobs] == [ProbeJob, BackupJob]
    assert isinstance(jobs[0], ProbeJob) and jobs[0].container_id == dead.container_id
    assert jobs[0].wait_s == 115.0 and isinstance(jobs[1], BackupJob)
    assert jobs[1].target.name == LIVE
    # The dead one's probe runs on: the live one still gets the one slot, and nothing probes twice.
    assert plan(view(dead, live), Book(probes=frozenset({dead.container_id})), T0) == [jobs[1]]
    assert Book(probes=frozenset({"x"})).slots_in_use == 0 and not Book(probes=frozenset({"x"})).idle


def test_a_target_seen_serving_is_backed_up_without_a_probe_in_the_job_either() -> None:
    seen = replace(started(make_entry(LIVE), 5), ready_seen=True)
    (job,) = plan(view(seen), Book(), T0)
    assert job == BackupJob(seen.container_id, seen.target, ready=True)  # type: ignore[arg-type]


def probe_failed(world: World, entry_id: str) -> None:
    world.outcomes.job_finished(ProbeFinished(entry_id, False, "PostgreSQL in a-dead-db did not accept "
                                                              "connections within 120s: no response"))


def test_failed_probes_back_off_page_once_and_say_until_when() -> None:
    world = World()
    entry = world.registry.register(make_entry(DEAD, schedule="0 * * * *", interval_s=HOUR,
                                               snapshots={"app": T0 - timedelta(hours=2)}))
    waits = []
    for _ in range(8):
        probe_failed(world, entry.container_id)
        now = world.clock.now()
        after = world.registry.get(entry.container_id)
        assert after is not None and after.next_run is not None
        waits.append((after.next_run - now).total_seconds())
        (row,) = status_rows(world.registry.view(), now)
        assert row["backing_off_until"] == after.next_run.isoformat() and row["state"] == "failing"
        assert str(row["last_error"]).startswith("backing off until ")
        world.clock.set(after.next_run)
    # A minute, doubling, never past the next hourly slot.
    assert waits[:3] == [60.0, 120.0, 240.0] and max(waits) == HOUR
    assert world.pages.kinds() == [Kind.FAILED]
    assert world.sample("backup_watcher_backups_total", target=DEAD, database="app", result="failure") == 8


def test_a_probe_that_finds_postgres_serving_ends_the_back_off_and_the_backup_follows() -> None:
    world = World()
    entry = world.registry.register(started(make_entry(DEAD), 5))
    probe_failed(world, entry.container_id)
    backing_off = world.registry.get(entry.container_id)
    assert backing_off is not None and backing_off.not_ready_streak == 1 and backing_off.next_run is not None
    world.clock.set(backing_off.next_run)
    world.outcomes.job_finished(ProbeFinished(entry.container_id, True))
    ready = world.registry.get(entry.container_id)
    assert ready is not None and ready.ready_seen and ready.not_ready_streak == 0
    (job,) = plan(view(ready), Book(), world.clock.now())
    assert isinstance(job, BackupJob) and job.ready
    world.outcomes.job_finished(BackupFinished(entry.container_id, (backup_result(at=world.clock.now()),)))
    assert world.pages.kinds() == [Kind.FAILED, Kind.RECOVERED]
    (row,) = status_rows(world.registry.view(), world.clock.now())
    assert row["backing_off_until"] is None


def test_a_backup_that_found_postgres_down_after_its_wait_backs_off_too() -> None:
    world = World()
    entry = world.registry.register(make_entry(DEAD))
    down = replace(backup_result(ok=False, at=T0, error="PostgreSQL in a-dead-db did not accept connections"),
                   not_ready=True)
    world.outcomes.job_finished(BackupFinished(entry.container_id, (down,)))
    after = world.registry.get(entry.container_id)
    assert after is not None and after.not_ready_streak == 1 and not after.ready_seen
    assert after.next_run == T0 + timedelta(minutes=1)
    assert needs_probe(after, T0 + timedelta(minutes=1)), "its next attempt is a probe, outside the slots"
