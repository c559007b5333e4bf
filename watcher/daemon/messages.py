"""What reaches the daemon's loop: closed sets of messages, each handled by one arm of a `match`.

On the queue: the event thread puts container events and the stream's state; finished jobs put one
message of their own kind, each with a payload of its own. Nothing else is ever put there.
From the inventory, on the loop's own thread: the changes it made to the registry, which the
book of jobs and the outcomes (metrics, alerts) follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from watcher.anomaly import SizeVerdict
from watcher.copyjob import CopyResult
from watcher.drill import DrillResult
from watcher.events import ContainerEvent, StreamConnected, StreamDisconnected
from watcher.jobs import BackupResult
from watcher.registry import TargetState
from watcher.restic import Snapshot
from watcher.retention import PruneResult

Rename = tuple[str, str]  # (old name, new name) of one container


@dataclass(frozen=True)
class BackupFinished:
    """A backup job of one target ended: one result per database (or a crash's error)."""

    container_id: str
    results: tuple[BackupResult, ...] = ()
    snapshots: tuple[Snapshot, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class ProbeFinished:
    """The wait for a target's PostgreSQL ended: it accepts connections, or not (`reason`, masked)."""

    container_id: str
    ready: bool
    reason: str | None = None


@dataclass(frozen=True)
class PruneFinished:
    """Retention ran (result), or its job crashed (error)."""

    result: PruneResult | None = None
    error: str | None = None


@dataclass(frozen=True)
class DrillsFinished:
    """One drill job over every eligible target ended."""

    results: tuple[DrillResult, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class RefreshFinished:
    """The repository was listed again (this host's snapshots, and how many it holds from every host), or
    listing it failed (error)."""

    snapshots: tuple[Snapshot, ...] | None = None
    error: str | None = None
    repository_snapshots: int | None = None


@dataclass(frozen=True)
class RefreshRequested:
    """Someone else changed the repository (a one-shot `backup` or `prune` that just ended): list it again."""


@dataclass(frozen=True)
class RetagFinished:
    """The histories of a renamed container moved to its new name, or one of the moves failed."""

    container_id: str
    renames: tuple[Rename, ...]
    error: str | None = None


@dataclass(frozen=True)
class CopyFinished:
    """A run of one copy ended (result), or its job crashed (error)."""

    copy: str
    result: CopyResult | None = None
    error: str | None = None


JobFinished = (BackupFinished | ProbeFinished | PruneFinished | DrillsFinished | RefreshFinished | RetagFinished
               | CopyFinished)
Message = ContainerEvent | StreamConnected | StreamDisconnected | RefreshRequested | JobFinished


@dataclass(frozen=True)
class Registered:
    """A target was registered anew (new, changed, restarted or renamed) at `at`."""

    entry: TargetState
    at: datetime


@dataclass(frozen=True)
class Renamed:
    """A watched container took a new name; the history of the old one is to follow it."""

    container_id: str
    old_name: str
    new_name: str


@dataclass(frozen=True)
class Removed:
    """A container left the registry: destroyed, or no longer selected (name None: it was not known)."""

    container_id: str
    name: str | None
    destroyed: bool


@dataclass(frozen=True)
class LabelsJudged:
    """A selected container's labels were read: `problem` says what is wrong, None when they are valid."""

    name: str
    problem: str | None


@dataclass(frozen=True)
class SizeJudged:
    """A history's newest dump was judged by its size (watcher.anomaly) and its verdict changed: a new
    snapshot, or the repository listed anew (an `ack`). `previous` is None for the first verdict of this
    process; `at_start` when it comes from the listing the daemon starts with."""

    name: str
    database: str
    verdict: SizeVerdict
    previous: SizeVerdict | None
    at_start: bool = False


Change = Registered | Renamed | Removed | LabelsJudged | SizeJudged
