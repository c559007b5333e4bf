"""The scheduler's plan, rule by rule: slots, concurrency, drills, retags, the prune after a pass (pure)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from tests.unit.daemon_kit import T0, make_entry
from watcher.daemon.running import BackupJob, Book, DrillJob, PruneJob, RetagJob
from watcher.daemon.scheduler import View, held, plan
from watcher.registry import TargetState

MINUTE = timedelta(minutes=1)


def view(*entries: TargetState, concurrency: int = 2, drill_schedule: str | None = None, prune: bool = True) -> View:
    return View(tuple(sorted(entries, key=lambda e: e.name)), concurrency, "UTC", drill_schedule, prune=prune)


def backups(jobs: object) -> list[str]:
    assert isinstance(jobs, list)
    return [job.target.name for job in jobs if isinstance(job, BackupJob)]


def test_a_due_target_is_backed_up_one_not_yet_due_is_not() -> None:
    due, later = make_entry("a-db", next_run=T0), make_entry("b-db", next_run=T0 + MINUTE)
    assert backups(plan(view(due, later), Book(), T0)) == ["a-db"]
    assert backups(plan(view(due, later), Book(), T0 - timedelta(seconds=1))) == []


def test_most_overdue_first_and_never_more_than_the_concurrency() -> None:
    entries = [make_entry(f"db-{i}", next_run=T0 - i * MINUTE) for i in range(4)]
    assert backups(plan(view(*entries, concurrency=2), Book(), T0)) == ["db-3", "db-2"]
    # Two run: no slot is free for the others until one ends.
    running = Book(backups=frozenset({"db-3-id", "db-2-id"}))
    assert plan(view(*entries, concurrency=2), running, T0) == []
    assert backups(plan(view(*entries, concurrency=2), Book(backups=frozenset({"db-3-id"})), T0)) == ["db-2"]


def test_a_target_is_never_backed_up_twice_at_once() -> None:
    entry = make_entry("a-db", next_run=T0)
    assert plan(view(entry), Book(backups=frozenset({entry.container_id})), T0 + MINUTE) == []


def test_stopped_and_rejected_containers_are_not_backed_up() -> None:
    stopped = make_entry("a-db", stopped=True)
    rejected = TargetState("bad-id", "bad-db", next_run=T0)
    assert plan(view(stopped, rejected), Book(), T0) == []


def test_the_prune_follows_a_pass_once_nothing_runs_and_nothing_is_due() -> None:
    done = make_entry("a-db", next_run=T0 + timedelta(days=1))
    after_pass = Book(backed_up_since_prune=True)
    assert done.target is not None
    jobs = plan(view(done), after_pass, T0)
    assert jobs == [PruneJob((done.target,))]
    assert after_pass.started(jobs[0]).backed_up_since_prune is False
    # Not before the pass ends, not with a backup still due, not without a backup since the last prune.
    assert plan(view(done), Book(backups=frozenset({"x-id"}), backed_up_since_prune=True), T0) == []
    assert backups(plan(view(done, make_entry("b-db", next_run=T0)), after_pass, T0)) == ["b-db"]
    assert plan(view(done), Book(), T0) == []
    # A backup held back (its name waits for the move of a renamed container's history) is still due.
    newcomer = make_entry("old-db", next_run=T0)
    waiting = replace(after_pass, pending_retags={"gone-id": (("old-db", "x-db"),)})
    assert plan(view(done, newcomer), waiting, T0) == []
    # Nor while a drill, a retag or a refresh runs.
    for busy in (Book(drill=True), Book(retags={"x-id": (("o", "n"),)}), Book(refresh=True)):
        assert plan(view(done), replace(busy, backed_up_since_prune=True), T0) == []


def test_no_prune_ever_where_pruning_is_off() -> None:
    done = make_entry("a-db", next_run=T0 + timedelta(days=1))
    after_pass = Book(backed_up_since_prune=True)
    assert plan(view(done, prune=False), after_pass, T0) == []
    assert plan(view(done, prune=False), after_pass, T0 + timedelta(days=30)) != [], "backups still run"
    assert not [job for job in plan(view(done, prune=False), after_pass, T0 + timedelta(days=30))
                if isinstance(job, PruneJob)]


def test_the_prune_covers_stopped_targets_too() -> None:
    stopped = make_entry("a-db", stopped=True)
    assert plan(view(stopped), Book(backed_up_since_prune=True), T0) == [PruneJob((stopped.target,))]  # type: ignore[arg-type]


def test_nothing_starts_while_a_prune_runs() -> None:
    entry = make_entry("a-db", next_run=T0)
    pruning = Book(prune=True, pending_retags={"a-db-id": (("old", "a-db"),)}, next_drill=T0)
    assert plan(view(entry, drill_schedule="* * * * *"), pruning, T0) == []


def test_a_retag_waits_for_the_containers_own_job_and_for_every_other_non_backup_job() -> None:
    entry = make_entry("new-db", next_run=T0 + timedelta(days=1))
    pending = {entry.container_id: (("old-db", "new-db"),)}
    retag = RetagJob(entry.container_id, (("old-db", "new-db"),))
    assert plan(view(entry), Book(pending_retags=pending), T0) == [retag]
    # The backup that runs under the old name ends first, so that its snapshot moves too.
    assert plan(view(entry), Book(pending_retags=pending, backups=frozenset({entry.container_id})), T0) == []
    assert plan(view(entry), Book(pending_retags=pending, refresh=True), T0) == []
    # A retag of a container no longer known waits (its destroy drops it from the book).
    assert plan(view(), Book(pending_retags=pending), T0) == []


def test_one_retag_at_a_time() -> None:
    a, b = make_entry("a-db", next_run=None), make_entry("b-db", next_run=None)
    pending = {a.container_id: (("x", "a-db"),), b.container_id: (("y", "b-db"),)}
    jobs = plan(view(a, b), Book(pending_retags=pending), T0)
    assert jobs == [RetagJob(a.container_id, (("x", "a-db"),))]


def test_a_newcomer_under_a_renamed_containers_old_name_waits_for_the_retag() -> None:
    renamed = make_entry("renamed-db", next_run=T0 + timedelta(days=1))
    newcomer = make_entry("old-db", next_run=T0)
    renames = {renamed.container_id: (("old-db", "renamed-db"),)}
    for book in (Book(pending_retags=renames, backups=frozenset({renamed.container_id})), Book(retags=renames)):
        assert backups(plan(view(renamed, newcomer), book, T0)) == []
        assert [e.name for e in held(view(renamed, newcomer), book, T0)] == ["old-db"]
    # Once the history has moved, the newcomer's first backup goes ahead.
    assert backups(plan(view(renamed, newcomer), Book(), T0)) == ["old-db"]
    assert held(view(renamed, newcomer), Book(), T0) == []


def test_the_drill_starts_at_its_slot_and_shares_the_concurrency() -> None:
    entry = make_entry("a-db", next_run=T0 + timedelta(days=1))
    book = Book(next_drill=T0)
    jobs = plan(view(entry, concurrency=1, drill_schedule="0 5 1 * *"), book, T0)
    assert jobs == [DrillJob((entry.target,), T0.replace(month=12, day=1, hour=5))]  # type: ignore[arg-type]
    assert book.started(jobs[0]).slots_in_use == 1
    # Every slot taken by backups: the drill waits; a running drill takes a backup's slot.
    assert plan(view(entry, concurrency=1, drill_schedule="0 5 1 * *"), Book(next_drill=T0, backups=frozenset(
        {"x-id"})), T0) == []
    due = [make_entry(f"db-{i}", next_run=T0) for i in range(3)]
    assert backups(plan(view(*due, concurrency=2, drill_schedule="0 5 1 * *"), Book(drill=True), T0)) == ["db-0"]
    # Not before its slot, and never two at once.
    assert plan(view(entry, drill_schedule="0 5 1 * *"), Book(next_drill=T0 + MINUTE), T0) == []
    assert plan(view(entry, drill_schedule="0 5 1 * *"), Book(next_drill=T0, drill=True), T0) == []


def test_a_drill_skips_opted_out_and_stopped_targets_and_a_slot_with_none_passes() -> None:
    out = make_entry("out-db", drill=False, next_run=None)
    stopped = make_entry("stopped-db", stopped=True)
    jobs = plan(view(out, stopped, drill_schedule="* * * * *"), Book(next_drill=T0), T0)
    assert jobs == [DrillJob((), T0 + MINUTE)]
    after = Book(next_drill=T0).started(jobs[0])
    assert after.drill is False and after.next_drill == T0 + MINUTE and after.idle


def test_backups_drill_and_retag_start_together_in_one_plan() -> None:
    renamed = make_entry("renamed-db", next_run=T0 + timedelta(days=1))
    due = make_entry("due-db", next_run=T0)
    book = Book(pending_retags={renamed.container_id: (("old-db", "renamed-db"),)}, next_drill=T0)
    jobs = plan(view(renamed, due, concurrency=2, drill_schedule="* * * * *"), book, T0)
    assert [type(job).__name__ for job in jobs] == ["RetagJob", "DrillJob", "BackupJob"]
