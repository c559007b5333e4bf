"""Outcomes on a fake clock: results → registry, retry back-off, metrics (read back as a scrape would),
staleness and the pages they cause (real registry, real metrics, real alert policy; no I/O)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from alerting.policy import Kind
from tests.unit.daemon_kit import SECRET, T0, World, backup_result, make_entry
from watcher.daemon.messages import (
    BackupFinished,
    DrillsFinished,
    LabelsJudged,
    PruneFinished,
    Registered,
    Removed,
    Renamed,
    RetagFinished,
)
from watcher.daemon.outcomes import next_attempt, retry_delay, staleness
from watcher.drill import DrillResult
from watcher.jobs import ALL_DATABASES_PLACEHOLDER
from watcher.retention import PruneResult

NAME = "scalr-app-db"
ID = f"{NAME}-id"
BACKUPS = "backup_watcher_backups_total"


def failed(world: World, database: str = "app", error: str = "pg_dump: error: boom") -> None:
    world.outcomes.job_finished(BackupFinished(ID, (backup_result(database, ok=False, at=world.clock.now(),
                                                                  error=error),)))


def succeeded(world: World, database: str = "app") -> None:
    world.outcomes.job_finished(BackupFinished(ID, (backup_result(database, at=world.clock.now()),)))


@pytest.mark.parametrize(("failures", "seconds"), [(1, 300), (2, 600), (3, 1200), (4, 2400), (5, 3600), (9, 3600)])
def test_retry_back_off_doubles_from_five_minutes_to_an_hour(failures: int, seconds: float) -> None:
    assert retry_delay(failures) == seconds


def test_next_attempt_is_the_next_slot_or_sooner_after_a_failure() -> None:
    assert next_attempt("0 3 * * *", "UTC", T0, 0, retry=True) == T0 + timedelta(days=1)
    assert next_attempt("0 3 * * *", "UTC", T0, 1, retry=True) == T0 + timedelta(minutes=5)
    assert next_attempt("0 3 * * *", "UTC", T0, 3, retry=True) == T0 + timedelta(minutes=20)
    # The slot comes first when it is sooner than the retry; an aborted backup waits for its slot.
    assert next_attempt("* * * * *", "UTC", T0, 4, retry=True) == T0 + timedelta(minutes=1)
    assert next_attempt("0 3 * * *", "UTC", T0, 1, retry=False) == T0 + timedelta(days=1)


def test_a_failed_dump_is_retried_with_back_off_paged_once_and_recovered_once() -> None:
    world = World()
    world.registry.register(make_entry(NAME))
    for attempt in range(1, 4):
        failed(world, error=f"pg_dump: role dumper does not exist (password {SECRET})")
        entry = world.registry.get(ID)
        assert entry is not None and entry.consecutive_failures == attempt and entry.state == "failing"
        assert entry.next_run == world.clock.now() + timedelta(seconds=retry_delay(attempt))
        world.clock.set(entry.next_run)
    assert world.pages.kinds() == [Kind.FAILED]
    assert "role dumper does not exist" in world.pages.sent[0].body and SECRET not in world.pages.sent[0].body
    assert world.sample(BACKUPS, target=NAME, database="app", result="failure") == 3
    assert world.sample("backup_watcher_consecutive_failures", target=NAME, engine="postgres") == 3
    succeeded(world)
    entry = world.registry.get(ID)
    assert entry is not None and entry.consecutive_failures == 0 and entry.state == "ok" and entry.last_error is None
    assert entry.next_run == (T0 + timedelta(days=1)).replace(hour=3, minute=0)
    assert world.pages.kinds() == [Kind.FAILED, Kind.RECOVERED]
    assert "after 3 failure(s)" in world.pages.sent[1].body
    succeeded(world)
    assert len(world.pages.sent) == 2, "successes after the recovery page nobody"
    assert world.sample(BACKUPS, target=NAME, database="app", result="success") == 2
    assert world.sample("backup_watcher_last_success_timestamp_seconds", target=NAME, database="app",
                        engine="postgres") == world.clock.now().timestamp()


def test_a_backup_aborted_at_shutdown_is_counted_but_neither_paged_nor_retried_early() -> None:
    world = World()
    world.registry.register(make_entry(NAME))
    world.cancel.set()
    failed(world, error="backup aborted by shutdown; no snapshot was written")
    entry = world.registry.get(ID)
    assert entry is not None and entry.next_run == T0 + timedelta(days=1)
    assert world.pages.sent == []
    assert world.sample(BACKUPS, target=NAME, database="app", result="failure") == 1


def test_a_crashed_job_fails_every_known_database() -> None:
    world = World()
    world.registry.register(make_entry(NAME, databases=("app", "billing"),
                                       snapshots={"app": T0 - timedelta(days=1), "billing": T0 - timedelta(days=1)}))
    world.outcomes.job_finished(BackupFinished(ID, error="RuntimeError: boom"))
    for database in ("app", "billing"):
        assert world.sample(BACKUPS, target=NAME, database=database, result="failure") == 1
    entry = world.registry.get(ID)
    assert entry is not None and entry.databases["billing"].last_error == "RuntimeError: boom"
    # A failure before any database was known is counted under "*".
    world.registry.register(make_entry("other-db", databases=()))
    world.outcomes.job_finished(BackupFinished("other-db-id", (backup_result(
        ALL_DATABASES_PLACEHOLDER, ok=False, target="other-db"),)))
    assert world.sample(BACKUPS, target="other-db", database="*", result="failure") == 1
    assert world.registry.get("other-db-id").consecutive_failures == 1  # type: ignore[union-attr]


def test_a_database_dropped_from_an_all_databases_target_leaves_it_and_its_series() -> None:
    world = World()
    world.registry.register(make_entry(NAME, databases=(), schedule="* * * * *", interval_s=60))
    world.outcomes.job_finished(BackupFinished(ID, (backup_result("app"), backup_result("extra"))))
    assert world.sample(BACKUPS, target=NAME, database="extra", result="success") == 1
    world.clock.advance(60)
    world.outcomes.job_finished(BackupFinished(ID, (backup_result("app", at=world.clock.now()),)))
    entry = world.registry.get(ID)
    assert entry is not None and sorted(entry.databases) == ["app"] and entry.state == "ok"
    assert world.sample(BACKUPS, target=NAME, database="extra", result="success") is None
    assert world.sample(BACKUPS, target=NAME, database="app", result="success") == 2
    # A failure before the listing drops nothing.
    world.outcomes.job_finished(BackupFinished(ID, (backup_result(ALL_DATABASES_PLACEHOLDER, ok=False),)))
    assert sorted(world.registry.get(ID).databases) == ["app"]  # type: ignore[union-attr]


def test_staleness_is_judged_against_one_and_a_half_intervals() -> None:
    fresh = make_entry(NAME, snapshots={"app": T0})
    assert staleness(fresh, T0 + timedelta(hours=36))[0] is False
    stale, detail = staleness(fresh, T0 + timedelta(hours=36, seconds=1))
    assert stale is True and "newest snapshot 2026-11-21 03:00 UTC, 36.0 h old (limit 36.0 h)" in detail
    # Never backed up: judged from its registration; stopped: said so.
    never = make_entry(NAME, stopped=True, registered_at=T0)
    stale, detail = staleness(never, T0 + timedelta(hours=37))
    assert stale is True and "no snapshot yet" in detail and "the container is stopped" in detail
    assert staleness(make_entry(NAME, interval_s=0, snapshots={"app": T0}), T0)[0] is False
    assert staleness(make_entry(NAME).__class__("bad-id", "bad-db"), T0) == (None, "")


def test_a_stale_target_is_paged_once_and_recovers_once_over_many_checks() -> None:
    world = World()
    world.registry.register(make_entry(NAME, schedule="* * * * *", interval_s=60, snapshots={"app": T0}, stopped=True))
    for _ in range(6):  # every 15 s for 90 s: fresh
        world.outcomes.check_health()
        world.clock.advance(15)
    assert world.pages.sent == []
    for _ in range(20):
        world.clock.advance(15)
        world.outcomes.check_health()
    assert world.pages.titles() == [f"[backup-watcher] FAILED: snapshot stale of {NAME}"]
    assert "the container is stopped" in world.pages.sent[0].body
    world.registry.record_snapshot(ID, "app", world.clock.now(), "new")
    world.outcomes.check_health()
    world.outcomes.check_health()
    assert world.pages.kinds() == [Kind.FAILED, Kind.RECOVERED]


def test_stale_while_backups_fail_is_the_incident_already_paged() -> None:
    world = World()
    world.registry.register(make_entry(NAME, schedule="* * * * *", interval_s=60, snapshots={"app": T0}))
    world.clock.advance(30)
    failed(world)
    world.clock.advance(120)
    world.outcomes.check_health()
    assert world.pages.titles() == [f"[backup-watcher] FAILED: backup of {NAME}"]


def test_a_lost_event_stream_is_paged_after_five_minutes_and_once() -> None:
    world = World()
    world.outcomes.stream_changed(True)
    assert world.sample("backup_watcher_docker_events_connected") == 1
    world.outcomes.stream_changed(False)
    assert world.sample("backup_watcher_docker_events_connected") == 0
    world.clock.advance(299)
    world.outcomes.check_health()
    assert world.pages.sent == []
    for _ in range(5):
        world.clock.advance(15)
        world.outcomes.check_health()
    assert world.pages.titles() == ["[backup-watcher] FAILED: Docker event stream of docker"]
    assert "disconnected from unix:///test.sock for 314s" in world.pages.sent[0].body
    world.outcomes.stream_changed(True)
    world.outcomes.check_health()
    assert world.pages.kinds() == [Kind.FAILED, Kind.RECOVERED]


def test_targets_stale_at_start_get_one_summary_then_a_recovery_each() -> None:
    world = World()
    old = {"app": T0 - timedelta(days=3)}
    for name in ("a-db", "b-db"):
        entry = world.registry.register(make_entry(name, snapshots=old))
        world.outcomes.noted(Registered(entry, T0))
    world.outcomes.noted(Registered(world.registry.register(make_entry("fresh-db", snapshots={"app": T0})), T0))
    world.outcomes.reconciled()
    world.outcomes.check_health()
    assert len(world.pages.sent) == 1
    summary = world.pages.sent[0]
    assert summary.title == "[backup-watcher] 2 target(s) without a recent snapshot on test-host"
    assert "- a-db: newest snapshot 2026-11-18 03:00 UTC, 72.0 h old" in summary.body and "fresh-db" not in summary.body
    # Later reconciles send no other summary; a target registered later is judged as usual.
    late = world.registry.register(make_entry("late-db", snapshots=old))
    world.outcomes.noted(Registered(late, T0))
    world.outcomes.reconciled()
    assert len(world.pages.sent) == 1
    world.outcomes.job_finished(BackupFinished("a-db-id", (backup_result(target="a-db"),)))
    world.registry.record_snapshot("a-db-id", "app", T0, "new")  # the inventory takes the job's snapshot
    world.outcomes.check_health()
    assert world.pages.titles()[1:] == ["[backup-watcher] RECOVERED: backup of a-db",
                                        "[backup-watcher] RECOVERED: snapshot stale of a-db",
                                        "[backup-watcher] FAILED: snapshot stale of late-db"]


def test_bad_labels_are_paged_once_and_their_fix_recovers() -> None:
    world = World()
    for _ in range(3):
        world.outcomes.noted(LabelsJudged("bad-db", "label backup-watcher.keep-daily='lots': must be a whole number"))
    assert world.pages.titles() == ["[backup-watcher] FAILED: labels of bad-db"]
    assert "keep-daily='lots'" in world.pages.sent[0].body
    world.outcomes.noted(LabelsJudged("bad-db", None))
    world.outcomes.noted(LabelsJudged("bad-db", None))
    assert world.pages.kinds() == [Kind.FAILED, Kind.RECOVERED]


def test_a_rename_carries_the_alert_state_and_drops_the_old_series_and_a_destroy_forgets_both() -> None:
    world = World()
    world.registry.register(make_entry(NAME))
    failed(world)
    world.outcomes.noted(Renamed(ID, NAME, "renamed-db"))
    assert world.sample(BACKUPS, target=NAME, database="app", result="failure") is None
    assert world.outcomes.policy.is_failing("renamed-db", world.pages.sent[0].concern)
    world.outcomes.noted(Removed(ID, "renamed-db", destroyed=True))
    assert not world.outcomes.policy.is_failing("renamed-db", world.pages.sent[0].concern)


def test_a_retag_ends_the_containers_job() -> None:
    world = World()
    world.registry.register(make_entry(NAME))
    world.registry.mark_running(ID)
    assert world.registry.get(ID).state == "running"  # type: ignore[union-attr]
    world.outcomes.job_finished(RetagFinished(ID, (("old-db", NAME),), error="moving history failed"))
    assert world.registry.get(ID).state == "pending"  # type: ignore[union-attr]


def test_prunes_are_counted_paged_on_failure_once_and_publish_the_repository_figures() -> None:
    world = World()
    assert world.sample("backup_watcher_prunes_total", result="failure") == 0
    world.outcomes.job_finished(PruneFinished(PruneResult(True, "r1", 3.0, 2, None, 4096, 7)))
    assert world.sample("backup_watcher_prunes_total", result="success") == 1
    assert world.sample("backup_watcher_prune_last_success_timestamp_seconds") == T0.timestamp()
    assert world.sample("backup_watcher_repository_size_bytes") == 4096
    assert world.sample("backup_watcher_repository_snapshots") == 7
    for _ in range(2):
        world.outcomes.job_finished(PruneFinished(PruneResult(False, "r2", 1.0, 0, "restic forget failed: locked")))
    world.outcomes.job_finished(PruneFinished(error="RuntimeError: crashed"))
    assert world.sample("backup_watcher_prunes_total", result="failure") == 3
    assert world.pages.titles() == ["[backup-watcher] FAILED: retention of repository"]


def test_drills_are_counted_per_database_and_paged_per_target() -> None:
    world = World()
    good = DrillResult(NAME, "app", True, "d1", T0, 12.0)
    bad = DrillResult("b-db", "app", False, "d2", T0, 3.0, error="orders: 9 rows restored, the dump holds 10")
    world.outcomes.job_finished(DrillsFinished((good, bad)))
    assert world.sample("backup_watcher_restore_drills_total", target=NAME, database="app", result="success") == 1
    assert world.sample("backup_watcher_restore_drill_last_success_timestamp_seconds", target=NAME,
                        database="app") == T0.timestamp()
    assert world.pages.titles() == ["[backup-watcher] FAILED: restore drill of b-db"]
    assert "9 rows restored" in world.pages.sent[0].body


def test_the_per_target_gauges_carry_the_targets_engine() -> None:
    world = World()
    entry = make_entry(NAME)
    assert entry.target is not None
    world.registry.register(dataclasses.replace(entry, target=dataclasses.replace(entry.target, engine="mariadb")))
    succeeded(world)
    assert world.sample("backup_watcher_last_success_timestamp_seconds", target=NAME, database="app",
                        engine="mariadb") == world.clock.now().timestamp()
    assert world.sample("backup_watcher_consecutive_failures", target=NAME, engine="mariadb") == 0
