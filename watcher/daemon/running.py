"""The book of the daemon's jobs: what runs now, what waits to run, and what a prune waits for.

One immutable value, replaced by the loop each time a job starts or ends (`started`, `finished`),
so the scheduler reads it without side effects and a test builds any situation in one line. It
replaces the counters and flags the loop used to keep by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import assert_never

from watcher.daemon.messages import (
    BackupFinished,
    Change,
    CopyFinished,
    DrillsFinished,
    JobFinished,
    LabelsJudged,
    ProbeFinished,
    PruneFinished,
    RefreshFinished,
    Registered,
    Removed,
    Rename,
    Renamed,
    RetagFinished,
    SizeJudged,
)
from watcher.discovery import Target


@dataclass(frozen=True)
class BackupJob:
    """Back up every database of one target."""

    container_id: str
    target: Target
    ready: bool = False  # its PostgreSQL was just seen serving: no probe before the first dump


@dataclass(frozen=True)
class ProbeJob:
    """Wait up to `wait_s` for a target's PostgreSQL to accept connections (0: one probe); takes no slot."""

    container_id: str
    target: Target
    wait_s: float


@dataclass(frozen=True)
class RetagJob:
    """Move the histories of a renamed container from its old names to its new one."""

    container_id: str
    renames: tuple[Rename, ...]


@dataclass(frozen=True)
class DrillJob:
    """Drill every eligible target in turn (none: the drill slot passes with nothing to do)."""

    targets: tuple[Target, ...]
    next_drill: datetime


@dataclass(frozen=True)
class PruneJob:
    """Apply every target's retention, then prune the repository."""

    targets: tuple[Target, ...]


@dataclass(frozen=True)
class RefreshJob:
    """List the repository again: snapshots made outside the daemon count too."""


@dataclass(frozen=True)
class CopyJob:
    """Bring one copy (a name of WATCHER_COPY_TO) up to date, then apply its retention."""

    copy: str


Job = BackupJob | ProbeJob | RetagJob | DrillJob | PruneJob | RefreshJob | CopyJob


def _without(mapping: Mapping[str, tuple[Rename, ...]], key: str) -> dict[str, tuple[Rename, ...]]:
    return {k: v for k, v in mapping.items() if k != key}


@dataclass(frozen=True)
class Book:
    """What runs (backups by container id, retags, the drill, the prune, the refresh) and what waits."""

    backups: frozenset[str] = frozenset()
    probes: frozenset[str] = frozenset()  # containers whose PostgreSQL is being waited for (no slot)
    retags: Mapping[str, tuple[Rename, ...]] = field(default_factory=dict)
    pending_retags: Mapping[str, tuple[Rename, ...]] = field(default_factory=dict)
    drill: bool = False
    prune: bool = False
    refresh: bool = False
    backed_up_since_prune: bool = False
    next_drill: datetime | None = None
    # Copies running, by name: they take no backup slot (a copy never holds up the primary's backups), and
    # the prune waits for them (it would wait for their lock on the primary anyway).
    copies: frozenset[str] = frozenset()

    @property
    def slots_in_use(self) -> int:
        """Backups and a drill share WATCHER_CONCURRENCY."""
        return len(self.backups) + (1 if self.drill else 0)

    @property
    def others(self) -> int:
        """Running jobs that are not backups: retags, the drill, the prune, the refresh, copies."""
        return len(self.retags) + sum((self.drill, self.prune, self.refresh)) + len(self.copies)

    @property
    def idle(self) -> bool:
        """Nothing runs at all."""
        return not self.backups and not self.others and not self.probes

    def busy(self, container_id: str) -> bool:
        """A backup, a probe or a retag of this container runs."""
        return container_id in self.backups or container_id in self.retags or container_id in self.probes

    def held_names(self) -> frozenset[str]:
        """Old names whose history has still to move: a newcomer under such a name must wait."""
        return frozenset(old for renames in (*self.pending_retags.values(), *self.retags.values())
                         for old, _ in renames)

    def noted(self, change: Change) -> Book:
        """The book once the inventory made `change`.

        A renamed container's history is to move (in its turn); a destroyed container's move that
        has not started never will.
        """
        match change:
            case Renamed(container_id=container_id, old_name=old_name, new_name=new_name):
                renames = (*self.pending_retags.get(container_id, ()), (old_name, new_name))
                return replace(self, pending_retags={**self.pending_retags, container_id: renames})
            case Removed(container_id=container_id, destroyed=True):
                return replace(self, pending_retags=_without(self.pending_retags, container_id))
            case Removed() | Registered() | LabelsJudged() | SizeJudged():
                return self
            case _:
                assert_never(change)

    def started(self, job: Job) -> Book:
        """The book once `job` runs."""
        match job:
            case BackupJob(container_id=container_id):
                return replace(self, backups=self.backups | {container_id})
            case ProbeJob(container_id=container_id):
                return replace(self, probes=self.probes | {container_id})
            case RetagJob(container_id=container_id, renames=renames):
                return replace(self, retags={**self.retags, container_id: renames},
                               pending_retags=_without(self.pending_retags, container_id))
            case DrillJob(targets=targets, next_drill=next_drill):
                return replace(self, drill=bool(targets), next_drill=next_drill)
            case PruneJob():
                return replace(self, prune=True, backed_up_since_prune=False)
            case RefreshJob():
                return replace(self, refresh=True)
            case CopyJob(copy=copy):
                return replace(self, copies=self.copies | {copy})
            case _:
                assert_never(job)

    def finished(self, message: JobFinished) -> Book:
        """The book once the job that sent `message` ended."""
        match message:
            case BackupFinished(container_id=container_id):
                return replace(self, backups=self.backups - {container_id}, backed_up_since_prune=True)
            case ProbeFinished(container_id=container_id):
                return replace(self, probes=self.probes - {container_id})
            case RetagFinished(container_id=container_id):
                return replace(self, retags=_without(self.retags, container_id))
            case DrillsFinished():
                return replace(self, drill=False)
            case PruneFinished():
                return replace(self, prune=False)
            case RefreshFinished():
                return replace(self, refresh=False)
            case CopyFinished(copy=copy):
                return replace(self, copies=self.copies - {copy})
            case _:
                assert_never(message)
