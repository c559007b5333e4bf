"""The copies as the daemon watches them (SPEC §12): each history's progress, its metrics and the `behind` alert.

On the loop's thread: a finished copy run replaces that copy's progress with what it found; a snapshot
the primary gained marks the history as lacking one; the health check judges each copy (`watcher.copies.
behind`) and pages once per copy that is behind, once when it caught up. The metrics server reads `rows`
from its own thread: it sees whole dictionaries only (replaced, never changed in place).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import structlog

from alerting.policy import Concern
from watcher.clock import Clock
from watcher.copies import History, HistoryProgress, behind
from watcher.copyconfig import CopySpec
from watcher.daemon.messages import CopyFinished
from watcher.metrics import CopyRow, Metrics
from watcher.registry import Registry, TargetState
from watcher.restic import Snapshot
from watcher.schedule import interval_seconds

log = structlog.get_logger("watcher.daemon")
Alerter = Callable[[str, Concern, bool, str], None]


class CopyWatch:
    """Progress, metrics and alerts of every copy."""

    def __init__(self, specs: Sequence[CopySpec], *, registry: Registry, metrics: Metrics, clock: Clock,
                 timezone: str, alert: Alerter) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.registry, self.metrics, self.clock, self.timezone, self._alert = registry, metrics, clock, timezone, alert
        self._since = clock.now()
        self._progress: dict[str, dict[History, HistoryProgress]] = {name: {} for name in self.specs}
        if self.specs:
            metrics.watch_copies(self.specs, self.rows)

    def progress(self, copy: str) -> dict[History, HistoryProgress]:
        """The progress of one copy's histories as last known."""
        return self._progress.get(copy, {})

    def snapshots_taken(self, snapshots: Iterable[Snapshot]) -> None:
        """The primary holds these new snapshots: every copy lacks them until its next run."""
        taken = list(snapshots)
        for name, known in self._progress.items():
            updated = dict(known)
            for snap in taken:
                key = (snap.container, snap.database)
                updated[key] = updated.get(key, HistoryProgress(None, None)).with_new_snapshot(snap.time)
            self._progress[name] = updated

    def finished(self, message: CopyFinished) -> None:
        """Counts one run of a copy and takes the progress it found."""
        result = message.result
        ok = result is not None and result.ok
        self.metrics.copies.labels(message.copy, "success" if ok else "failure").inc()
        if message.error:
            log.error("copy_failed", copy=message.copy, error=message.error)
        if result is not None and result.progress is not None:
            self._progress[message.copy] = dict(result.progress)

    def _interval(self, spec: CopySpec, entry: TargetState) -> float | None:
        if entry.interval_s is None:
            return None
        if spec.schedule is None:
            return entry.interval_s
        return max(entry.interval_s, interval_seconds(spec.schedule, self.timezone, self.clock.now()))

    def lagging(self, name: str) -> list[str]:
        """The histories of watched targets that copy `name` is behind on, each with why."""
        spec, known, now = self.specs[name], self._progress.get(name, {}), self.clock.now()
        found = []
        for entry in self.registry.view():
            interval = self._interval(spec, entry)
            for database in sorted(entry.databases) if interval is not None else ():
                state = known.get((entry.name, database))
                if state is None or interval is None:
                    continue
                late, why = behind(state, interval, self._since, now)
                if late:
                    found.append(f"{entry.name}/{database}: {why}")
        return found

    def check(self) -> None:
        """Judges every copy; pages once when one falls behind and once when it caught up."""
        for name in self.specs:
            late = self.lagging(name)
            detail = "\n".join(late) if late else "the copy holds every snapshot of the watched targets"
            self._alert(name, Concern.COPY, not late, detail)

    def rows(self) -> Iterator[CopyRow]:
        """The gauges' rows (from the metrics server's thread): every history of a watched target."""
        watched = {entry.name for entry in self.registry.view() if entry.target is not None}
        now = self.clock.now()
        for name, known in list(self._progress.items()):
            for (target, database), state in sorted(known.items()):
                if target in watched:
                    yield (name, target, database, state.copied.timestamp() if state.copied else None,
                           state.lag_s(now))
