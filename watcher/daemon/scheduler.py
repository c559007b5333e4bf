"""The scheduler: a pure function from what is known, what runs and the time to the jobs to start now.

No clock, no I/O, no state of its own: `plan(view, running, now)` decides; the loop starts what it
returns. The rules, in the order they are applied:
- nothing starts while a prune runs (backups wait out a prune);
- the move of a renamed container's history starts when nothing but backups runs and the container
  itself has no job running (a backup under the old name ends first, so that it is moved too);
- the restore drill starts at its slot when a concurrency slot is free (drills share
  WATCHER_CONCURRENCY with backups, and never run two at a time);
- due backups start, most overdue first, while slots are free, never two of one target at once, and
  never for a container that took a renamed container's old name before that history has moved
  (it would move the newcomer's first snapshots into the other history);
- a due target whose PostgreSQL is not known to serve (a container that started moments ago, or one
  whose probes failed) is probed first, outside the slots: waiting for a server that may never answer
  never holds a slot a live target needs. After a failed probe it backs off, a minute doubling up to
  its schedule interval, with one quick probe per attempt (`not_ready_delay`, `probe_wait`);
- due copies start (`watcher.copies.due_copies`: after a pass, at their schedule's slot, or to retry),
  one run per copy at a time, outside the backup slots, so a slow or unreachable copy never holds up a
  backup; before the prune, so that a pass's snapshots reach the copies before the primary forgets any;
- the prune starts after a pass: something was backed up since the last prune, nothing runs and
  nothing is due; never where pruning is off (WATCHER_PRUNE=false: another host prunes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from watcher.copies import CopyTurn, due_copies
from watcher.daemon.running import BackupJob, Book, CopyJob, DrillJob, Job, ProbeJob, PruneJob, RetagJob
from watcher.registry import TargetState
from watcher.schedule import next_run

# A container up this long has finished its start-up (initdb, init scripts): it is dumped at once.
SETTLED_AFTER_SECONDS = 120.0
# The least a container that started recently is waited for, however long ago it started.
MIN_READY_WAIT_SECONDS = 30.0
NOT_READY_BASE_SECONDS = 60.0


@dataclass(frozen=True)
class View:
    """What the scheduler reads: every watched container and the settings that shape a plan."""

    entries: tuple[TargetState, ...]
    concurrency: int
    timezone: str
    drill_schedule: str | None = None
    prune: bool = True
    ready_timeout_s: float = 120.0  # WATCHER_READY_TIMEOUT
    copy_turns: Mapping[str, CopyTurn] = field(default_factory=dict)


def not_ready_delay(streak: int, interval_s: float | None) -> timedelta:
    """How long a target whose PostgreSQL did not answer `streak` probes in a row waits for its next
    attempt: a minute, doubling, at most its schedule interval (a day when unknown)."""
    cap = interval_s if interval_s is not None else 86400.0
    return timedelta(seconds=min(NOT_READY_BASE_SECONDS * 2 ** max(0, streak - 1), max(cap, NOT_READY_BASE_SECONDS)))


def uptime(entry: TargetState, now: datetime) -> float | None:
    """Seconds since the target's container started, None when unknown."""
    started = entry.target.started_at if entry.target is not None else None
    return None if started is None else max(0.0, now.timestamp() - started)


def needs_probe(entry: TargetState, now: datetime) -> bool:
    """Whether a due target is probed before its backup: its PostgreSQL has not been seen serving since it
    was registered, and its container started moments ago (initdb may still run) or a probe failed.
    A container of unknown age is left to the job, which probes it itself."""
    if entry.ready_seen:
        return False
    age = uptime(entry, now)
    return entry.not_ready_streak > 0 or (age is not None and age < SETTLED_AFTER_SECONDS)


def probe_wait(entry: TargetState, now: datetime, ready_timeout_s: float) -> float:
    """How long the probe of a target waits for its PostgreSQL: what is left of WATCHER_READY_TIMEOUT since
    its start (MIN_READY_WAIT_SECONDS at least, never more than the bound), or 0 (one probe) once it backs
    off after failed probes."""
    if entry.not_ready_streak > 0:
        return 0.0
    left = ready_timeout_s - (uptime(entry, now) or 0.0)
    return max(min(MIN_READY_WAIT_SECONDS, ready_timeout_s), left)


def due(entries: Iterable[TargetState], now: datetime) -> list[TargetState]:
    """The targets whose backup is due now (running or not), most overdue first."""
    ready = [e for e in entries if e.target is not None and not e.stopped
             and e.next_run is not None and e.next_run <= now]
    return sorted(ready, key=lambda e: e.next_run or now)


def held(view: View, running: Book, now: datetime) -> list[TargetState]:
    """Due targets that wait for the history of their name to move to a renamed container."""
    names = running.held_names()
    if not names:
        return []
    return [e for e in due(view.entries, now) if e.name in names and not running.busy(e.container_id)]


def _retag(view: View, book: Book, now: datetime) -> Job | None:
    if book.others:
        return None
    for container_id, renames in book.pending_retags.items():
        entry = next((e for e in view.entries if e.container_id == container_id), None)
        if entry is not None and not book.busy(container_id):
            return RetagJob(container_id, renames)
    return None


def _drill(view: View, book: Book, now: datetime) -> Job | None:
    if (view.drill_schedule is None or book.next_drill is None or book.next_drill > now or book.drill
            or book.slots_in_use >= view.concurrency):
        return None
    targets = tuple(e.target for e in view.entries if e.target is not None and e.target.drill and not e.stopped)
    return DrillJob(targets, next_run(view.drill_schedule, now, view.timezone))


def _backup(view: View, book: Book, now: datetime) -> Job | None:
    names = book.held_names()
    for entry in due(view.entries, now):
        if entry.target is None or book.busy(entry.container_id) or entry.name in names:
            continue
        if needs_probe(entry, now):
            return ProbeJob(entry.container_id, entry.target, probe_wait(entry, now, view.ready_timeout_s))
        if book.slots_in_use < view.concurrency:
            return BackupJob(entry.container_id, entry.target, ready=entry.ready_seen)
    return None


def _copy(view: View, book: Book, now: datetime) -> Job | None:
    due = due_copies(view.copy_turns, book.copies, now)
    return CopyJob(due[0]) if due else None


def _prune(view: View, book: Book, now: datetime) -> Job | None:
    if not view.prune or not book.backed_up_since_prune or not book.idle or due(view.entries, now):
        return None
    return PruneJob(tuple(e.target for e in view.entries if e.target is not None))


_STEPS: tuple[Callable[[View, Book, datetime], Job | None], ...] = (_retag, _drill, _backup, _copy, _prune)


def plan(view: View, running: Book, now: datetime) -> list[Job]:
    """The jobs to start now, in order; `running` is the book before any of them starts."""
    if running.prune:
        return []
    jobs: list[Job] = []
    book = running
    for step in _STEPS:
        while (job := step(view, book, now)) is not None:
            jobs.append(job)
            book = book.started(job)
    return jobs
