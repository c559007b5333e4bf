"""The target registry: what the daemon knows about every container it watches.

Only the daemon's loop thread changes it. Readers on other threads (the metrics scrape, the
status endpoint) take `view()`, an immutable copy made under the lock, so a scrape never waits
on Docker or restic.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from watcher.discovery import Rejected, Target

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
    """Every watched container by id; thread-safe reads through view()."""

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

    def by_name(self, name: str) -> TargetState | None:
        """The entry whose container has this name, if any."""
        with self._lock:
            return next((e for e in self._entries.values() if e.name == name), None)

    def ids(self) -> set[str]:
        """Every known container id."""
        with self._lock:
            return set(self._entries)

    def put(self, entry: TargetState) -> TargetState:
        """Stores an entry (replacing the one with the same container id); returns it."""
        with self._lock:
            self._entries[entry.container_id] = entry
        return entry

    def update(self, container_id: str, **changes: object) -> TargetState | None:
        """Replaces fields of an entry; returns the new entry, or None if the id is unknown."""
        with self._lock:
            entry = self._entries.get(container_id)
            if entry is None:
                return None
            entry = replace(entry, **changes)  # type: ignore[arg-type]
            self._entries[container_id] = entry
            return entry

    def remove(self, container_id: str) -> TargetState | None:
        """Forgets a container; returns what was known about it."""
        with self._lock:
            return self._entries.pop(container_id, None)

    def set_database(self, container_id: str, database: str, **changes: object) -> None:
        """Replaces fields of one database's state of an entry (creating it if needed)."""
        with self._lock:
            entry = self._entries.get(container_id)
            if entry is None:
                return
            databases = dict(entry.databases)
            databases[database] = replace(databases.get(database, DatabaseState()), **changes)  # type: ignore[arg-type]
            self._entries[container_id] = replace(entry, databases=databases)

    def drop_databases(self, container_id: str, names: Iterable[str]) -> None:
        """Removes databases from an entry (gone from the container)."""
        with self._lock:
            entry = self._entries.get(container_id)
            if entry is None:
                return
            databases = {name: db for name, db in entry.databases.items() if name not in set(names)}
            self._entries[container_id] = replace(entry, databases=databases)

    def count_by_state(self) -> dict[str, int]:
        """How many entries are in each state (every state present, zero included)."""
        counts = dict.fromkeys(STATES, 0)
        for entry in self.view():
            counts[entry.state] += 1
        return counts


def due(entries: Iterable[TargetState], now: datetime) -> list[TargetState]:
    """The entries whose backup is due now and not already running, most overdue first."""
    ready = [e for e in entries if e.target is not None and not e.stopped and not e.running_job
             and e.next_run is not None and e.next_run <= now]
    return sorted(ready, key=lambda e: e.next_run or now)
