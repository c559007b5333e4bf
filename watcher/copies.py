"""The copies' pure plan (SPEC §12): which snapshots a copy lacks, how far it trails, when it runs next.

No I/O and no clock: every function takes what it needs, `now` included (the daemon's injected clock).

A history is one (container, database) of this host. A copy lacks the primary's snapshots of a history
that are newer than the newest it holds of that history: older ones that are missing were forgotten by the
copy's own retention (it may keep weekly ones only) and are not copied again. Snapshots are matched by
time, which `restic copy` keeps as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from watcher.restic import Snapshot
from watcher.schedule import next_run

History = tuple[str, str]  # (container, database): database is commands.GLOBALS_DATABASE for the globals
BEHIND_FACTOR = 1.5
RETRY_BASE_SECONDS = 300.0
RETRY_MAX_SECONDS = 3600.0


def history_of(snapshot: Snapshot) -> History:
    """The history a snapshot belongs to."""
    return snapshot.container, snapshot.database


def taken_at(snapshot: Snapshot) -> datetime:
    """A snapshot's time to the second: what a streamed copy keeps of it (`restic backup --time`)."""
    return snapshot.time.replace(microsecond=0)


def newest_times(snapshots: Iterable[Snapshot]) -> dict[History, datetime]:
    """The time (to the second) of the newest snapshot of each history."""
    newest: dict[History, datetime] = {}
    for snap in snapshots:
        key = history_of(snap)
        if key not in newest or taken_at(snap) > newest[key]:
            newest[key] = taken_at(snap)
    return newest


def missing(primary: Iterable[Snapshot], copy: Iterable[Snapshot]) -> list[Snapshot]:
    """The primary's snapshots the copy lacks, oldest first: per history, those newer (to the second) than the
    newest the copy holds of it (every one when it holds none)."""
    held = newest_times(copy)
    lacking = [snap for snap in primary
               if (newest := held.get(history_of(snap))) is None or taken_at(snap) > newest]
    return sorted(lacking, key=lambda snap: (snap.time, snap.container, snap.database))


@dataclass(frozen=True)
class HistoryProgress:
    """How far a copy has come with one history: the time of the newest snapshot it holds (None: none yet)
    and that of the oldest snapshot it lacks (None: it holds every one)."""

    copied: datetime | None
    oldest_missing: datetime | None

    def lag_s(self, now: datetime) -> float:
        """Seconds the oldest snapshot not yet copied has waited; 0 when the copy holds every snapshot."""
        return 0.0 if self.oldest_missing is None else max(0.0, (now - self.oldest_missing).total_seconds())

    def with_new_snapshot(self, taken: datetime) -> HistoryProgress:
        """The progress once the primary holds one more snapshot, taken at `taken`."""
        if self.oldest_missing is not None or (self.copied is not None and taken <= self.copied):
            return self
        return replace(self, oldest_missing=taken)


def progress(primary: Iterable[Snapshot], copy: Iterable[Snapshot]) -> dict[History, HistoryProgress]:
    """Each history's progress, for every history of either repository."""
    primary, copy = list(primary), list(copy)
    copied = newest_times(copy)
    oldest: dict[History, datetime] = {}
    for snap in missing(primary, copy):
        oldest.setdefault(history_of(snap), taken_at(snap))
    return {key: HistoryProgress(copied.get(key), oldest.get(key))
            for key in sorted({*newest_times(primary), *copied})}


def behind(state: HistoryProgress, interval_s: float, since: datetime, now: datetime) -> tuple[bool, str]:
    """(behind?, why) of one history: it is behind when it lacks a snapshot and its newest copied snapshot (or,
    when it has none, `since`: when copying began) is older than BEHIND_FACTOR x `interval_s`."""
    if state.oldest_missing is None:
        return False, "holds every snapshot"
    reference = state.copied or since
    age = (now - reference).total_seconds()
    limit = BEHIND_FACTOR * interval_s
    what = f"newest copied snapshot {state.copied:%Y-%m-%d %H:%M} UTC" if state.copied else "no snapshot copied yet"
    return age > limit, (f"{what}, {age / 3600:.1f} h old (limit {limit / 3600:.1f} h); oldest snapshot not "
                         f"copied: {state.oldest_missing:%Y-%m-%d %H:%M} UTC")


def retry_delay(failures: int) -> float:
    """Seconds before a failed copy is tried again after `failures` failures in a row: 5 min, doubling, 1 h
    at most."""
    return float(min(RETRY_BASE_SECONDS * 2 ** max(0, failures - 1), RETRY_MAX_SECONDS))


@dataclass(frozen=True)
class CopyTurn:
    """When one copy runs next (None: not until a backup pass ends, or its schedule's slot) and how many of its
    runs failed in a row."""

    next_at: datetime | None = None
    failures: int = 0


def first_turn(now: datetime) -> CopyTurn:
    """A copy's first turn at start: at once (it catches up with what was missed while the watcher was down)."""
    return CopyTurn(next_at=now)


def after_backup(turn: CopyTurn, schedule: str | None, now: datetime) -> CopyTurn:
    """The turn once a backup pass ended: a copy without a schedule runs now (even while it backs off: each pass
    is a try)."""
    if schedule is not None:
        return turn
    return replace(turn, next_at=now if turn.next_at is None else min(turn.next_at, now))


def started(turn: CopyTurn) -> CopyTurn:
    """The turn once a run started: nothing is due until the run ends or another pass does."""
    return replace(turn, next_at=None)


def after_copy(turn: CopyTurn, ok: bool, schedule: str | None, timezone: str, now: datetime) -> CopyTurn:
    """The turn once a run ended: a scheduled copy at its next slot, one after every pass at the next pass (or
    at once, when a pass ended while it ran); a failed one sooner, backing off, or at the next slot/pass."""
    failures = 0 if ok else turn.failures + 1
    slot = next_run(schedule, now, timezone) if schedule is not None else None
    if ok:
        return CopyTurn(turn.next_at if slot is None else slot, 0)
    retry = now + timedelta(seconds=retry_delay(failures))
    candidates = [when for when in (retry, slot, turn.next_at) if when is not None]
    return CopyTurn(min(candidates), failures)


def due_copies(turns: Mapping[str, CopyTurn], running: Iterable[str], now: datetime) -> list[str]:
    """The copies to start now, by name: due and not running."""
    busy = set(running)
    return sorted(name for name, turn in turns.items()
                  if name not in busy and turn.next_at is not None and turn.next_at <= now)
