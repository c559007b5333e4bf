"""The target registry: what the daemon knows about every container it watches.

Only the daemon's loop thread changes it, and only through the named transitions below (no
free-form update). Readers on other threads (the metrics scrape, the status endpoint) take
`view()`, an immutable copy made under the lock, so a scrape never waits on Docker or restic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from watcher.discovery import Rejected, Target

if TYPE_CHECKING:
    from watcher.jobs import BackupResult

PENDING, RUNNING, OK, FAILING, INVALID, STOPPED = "pending", "running", "ok", "failing", "invalid", "stopped"
STATES = (PENDING, RUNNING, OK, FAILING, INVALID, STOPPED)


@dataclass(frozen=True)
class DatabaseState:
    """One database of a target: its newest snapshot and its last results."""

    last_snapshot: datetime | None = None
    last_snapshot_id: str | None = None
    last_success: datetime | None = None
    last_failure: datetime | None = None
    last_error: str | None = None
    note: str | None = None  # what a user should know about its last snapshot (globals without passwords)
    # Its newest dump is a flagged shrunken dump (watcher.anomaly); None until the daemon has judged it.
    size_anomaly: bool | None = None


@dataclass(frozen=True)
class TargetState:
    """One watched container, valid (target) or not (rejected)."""

    container_id: str
    name: str
    target: Target | None = None
    rejected: Rejected | None = None
    running_job: bool = False
    stopped: bool = False
    next_run: datetime | None = None
    interval_s: float | None = None
    databases: dict[str, DatabaseState] = field(default_factory=dict)
    last_error: str | None = None
    consecutive_failures: int = 0
    registered_at: datetime | None = None
    # Readiness of its PostgreSQL (SPEC §11): seen accepting connections since this registration, and how
    # many probes in a row found it not accepting them (then it backs off until `next_run`).
    ready_seen: bool = False
    not_ready_streak: int = 0

    @property
    def state(self) -> str:
        """One of STATES."""
        if self.rejected is not None:
            return INVALID
        if self.stopped:
            return STOPPED
        if self.running_job:
            return RUNNING
        if self.consecutive_failures:
            return FAILING
        if any(db.last_success or db.last_snapshot for db in self.databases.values()):
            return OK
        return PENDING

    @property
    def judged_snapshot(self) -> datetime | None:
        """The snapshot time this target's freshness is judged by; see `judged_snapshot_time`."""
        return judged_snapshot_time(self.target is not None and self.target.all_databases, self.databases)


def judged_snapshot_time(all_databases: bool, databases: Mapping[str, DatabaseState]) -> datetime | None:
    """The snapshot time a target's freshness (staleness, catch-up, status age) is judged by.

    For named databases, the least recent of their newest snapshots, None if any has none: each of
    them must be fresh. For `databases=all`, the newest of them: the set follows the databases that
    exist, and one dropped since keeps its old history in the repository (and in this cache) for
    good, which must not make the target stale for ever; a database that fails is paged as a
    failed backup instead.
    """
    times = [db.last_snapshot for db in databases.values()]
    if all_databases:
        return max((t for t in times if t is not None), default=None)
    if not times or any(t is None for t in times):
        return None
    return min(t for t in times if t is not None)


class Registry:
    """Every watched container by id; thread-safe reads through view(), changes by named transitions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, TargetState] = {}

    def view(self) -> tuple[TargetState, ...]:
        """An immutable copy of every entry, sorted by name."""
        with self._lock:
            return tuple(sorted(self._entries.values(), key=lambda e: e.name))

    def get(self, container_id: str) -> TargetState | None:
        """The entry of a container id, if known."""
        with self._lock:
            return self._entries.get(container_id)

    def ids(self) -> set[str]:
        """Every known container id."""
        with self._lock:
            return set(self._entries)

    def _change(self, container_id: str, change: Callable[[TargetState], TargetState]) -> TargetState | None:
        with self._lock:
            entry = self._entries.get(container_id)
            if entry is None:
                return None
            entry = self._entries[container_id] = change(entry)
            return entry

    def register(self, entry: TargetState) -> TargetState:
        """A running container found to be a target (new, changed, restarted): stores it whole."""
        with self._lock:
            self._entries[entry.container_id] = entry
        return entry

    def reject(self, container_id: str, name: str, rejected: Rejected) -> None:
        """A container whose labels are wrong: known, shown, never backed up."""
        with self._lock:
            self._entries[container_id] = TargetState(container_id, name, rejected=rejected)

    def remove(self, container_id: str) -> TargetState | None:
        """Forgets a container; returns what was known about it."""
        with self._lock:
            return self._entries.pop(container_id, None)

    def rename(self, container_id: str, name: str) -> None:
        """The container took a new name; its target follows."""
        self._change(container_id, lambda e: replace(
            e, name=name, target=e.target.renamed(name) if e.target is not None else None))

    def mark_stopped(self, container_id: str) -> TargetState | None:
        """The container stopped: no backups until it runs again. Returns the entry if this changed it."""
        before = self.get(container_id)
        if before is None or before.stopped:
            return None
        return self._change(container_id, lambda e: replace(e, stopped=True))

    def mark_running(self, container_id: str) -> None:
        """A job of this container started (a backup or the move of its history)."""
        self._change(container_id, lambda e: replace(e, running_job=True))

    def mark_idle(self, container_id: str) -> None:
        """A job of this container that records nothing else ended."""
        self._change(container_id, lambda e: replace(e, running_job=False))

    def record_results(self, container_id: str, results: Iterable[BackupResult], *, last_error: str | None,
                       consecutive_failures: int, next_run: datetime) -> None:
        """A backup job ended: each database's result, the target's run of failures and its next run."""
        def change(entry: TargetState) -> TargetState:
            databases = dict(entry.databases)
            for result in results:
                known = databases.get(result.database, DatabaseState())
                databases[result.database] = (
                    replace(known, last_success=result.started_at, last_error=None, note=result.note) if result.ok
                    else replace(known, last_failure=result.started_at, last_error=result.error))
            return replace(entry, databases=databases, running_job=False, last_error=last_error,
                           consecutive_failures=consecutive_failures, next_run=next_run)
        self._change(container_id, change)

    def record_probe(self, container_id: str, *, ready: bool, not_ready_streak: int,
                     next_run: datetime | None = None) -> None:
        """A readiness probe ended: PostgreSQL accepted connections (the backup is due still), or it did
        not, `not_ready_streak` times in a row, and the next attempt is at `next_run`."""
        def change(entry: TargetState) -> TargetState:
            return replace(entry, ready_seen=ready, not_ready_streak=not_ready_streak,
                           next_run=next_run if next_run is not None else entry.next_run)
        self._change(container_id, change)

    def record_snapshot(self, container_id: str, database: str, at: datetime, snapshot_id: str) -> None:
        """The repository holds a newer snapshot of one database of this target."""
        def change(entry: TargetState) -> TargetState:
            known = entry.databases.get(database, DatabaseState())
            databases = {**entry.databases, database: replace(known, last_snapshot=at, last_snapshot_id=snapshot_id)}
            return replace(entry, databases=databases)
        self._change(container_id, change)

    def record_size_anomaly(self, container_id: str, database: str, flagged: bool) -> None:
        """One database's newest dump was judged by its size: flagged as shrunken, or not."""
        def change(entry: TargetState) -> TargetState:
            known = entry.databases.get(database, DatabaseState())
            return replace(entry, databases={**entry.databases, database: replace(known, size_anomaly=flagged)})
        self._change(container_id, change)

    def drop_databases(self, container_id: str, names: Iterable[str]) -> None:
        """Removes databases from an entry (gone from the container)."""
        gone = set(names)
        self._change(container_id, lambda e: replace(
            e, databases={name: db for name, db in e.databases.items() if name not in gone}))

