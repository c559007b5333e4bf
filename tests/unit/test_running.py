"""The book of jobs: each job's start and end, renames and destroys, slots and what a newcomer waits for."""

from __future__ import annotations

from datetime import timedelta

from tests.unit.daemon_kit import T0, make_target
from watcher.daemon.messages import (
    BackupFinished,
    DrillsFinished,
    LabelsJudged,
    PruneFinished,
    RefreshFinished,
    Removed,
    Renamed,
    RetagFinished,
)
from watcher.daemon.running import BackupJob, Book, DrillJob, PruneJob, RefreshJob, RetagJob


def test_each_job_starts_and_ends_in_the_book() -> None:
    target = make_target("a-db")
    book = Book()
    book = book.started(BackupJob(target.container_id, target))
    assert book.busy(target.container_id) and book.slots_in_use == 1 and book.others == 0 and not book.idle
    book = book.started(DrillJob((target,), T0 + timedelta(days=30)))
    assert book.slots_in_use == 2 and book.others == 1 and book.next_drill == T0 + timedelta(days=30)
    book = book.started(RefreshJob())
    assert book.others == 2
    book = book.finished(BackupFinished(target.container_id))
    assert book.backed_up_since_prune and not book.busy(target.container_id) and book.slots_in_use == 1
    book = book.finished(DrillsFinished()).finished(RefreshFinished())
    assert book.idle
    book = book.started(PruneJob((target,)))
    assert book.prune and not book.backed_up_since_prune and not book.idle
    assert book.finished(PruneFinished()).idle


def test_a_rename_waits_in_the_book_then_runs_then_ends() -> None:
    book = Book().noted(Renamed("c1", "old-db", "mid-db")).noted(Renamed("c1", "mid-db", "new-db"))
    assert book.pending_retags == {"c1": (("old-db", "mid-db"), ("mid-db", "new-db"))}
    assert book.held_names() == {"old-db", "mid-db"}
    book = book.started(RetagJob("c1", book.pending_retags["c1"]))
    assert book.pending_retags == {} and book.busy("c1") and book.held_names() == {"old-db", "mid-db"}
    book = book.finished(RetagFinished("c1", ()))
    assert book.idle and book.held_names() == frozenset()


def test_a_destroyed_container_drops_its_waiting_retag_and_other_changes_leave_the_book() -> None:
    book = Book().noted(Renamed("c1", "old-db", "new-db"))
    assert book.noted(Removed("c1", "new-db", destroyed=False)) == book
    assert book.noted(LabelsJudged("new-db", None)) == book
    assert book.noted(Removed("c1", None, destroyed=True)).pending_retags == {}
