"""The repository's upkeep as the daemon follows it: drills and prunes that ended → metrics, alerts, log lines;
the repository's size and snapshot count. Only the daemon's loop thread calls it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from alerting.policy import Concern
from watcher.clock import Clock
from watcher.daemon.messages import DrillsFinished, PruneFinished
from watcher.drill import DrillResult
from watcher.metrics import Metrics

log = structlog.get_logger("watcher.daemon")


class RepositoryUpkeep:
    """Follows drills and prunes; `cancel` set (the daemon aborting its jobs) means: count, do not page."""

    def __init__(self, *, metrics: Metrics, clock: Clock, cancel: threading.Event,
                 alert: Callable[[str, Concern, bool, str], None]) -> None:
        self.metrics, self.clock, self.cancel = metrics, clock, cancel
        self._alert = alert

    def drills_finished(self, finished: DrillsFinished) -> None:
        """Counts every drill; one alert per target whose drills changed state."""
        if finished.error:
            log.error("drill_failed", error=finished.error)
        by_target: dict[str, list[DrillResult]] = {}
        for result in finished.results:
            by_target.setdefault(result.target, []).append(result)
            self.metrics.observe_drill(result.target, result.database, result.ok, result.duration_s,
                                       result.finished_at.timestamp())
        if self.cancel.is_set():
            return
        for target, results in by_target.items():
            failed = [r for r in results if not r.ok]
            detail = "\n".join(f"{r.database}: {r.error}" for r in failed) or ", ".join(
                f"{r.database}: {len(r.tables)} tables, {sum(t.restored or 0 for t in r.tables)} rows" for r in results)
            self._alert(target, Concern.DRILL, not failed, detail)

    def prune_finished(self, finished: PruneFinished) -> None:
        """Counts the prune, alerts on a change of state, publishes the repository's figures."""
        result = finished.result
        ok = result is not None and result.ok
        self.metrics.prunes.labels("success" if ok else "failure").inc()
        if not self.cancel.is_set():
            self._alert("repository", Concern.PRUNE, ok,
                       (result.error if result is not None else finished.error) or "retention applied")
        if result is not None and result.ok:
            self.metrics.prune_last_success.set(self.clock.now().timestamp())
            self.repository_figures(result.repository_size, result.repository_snapshots)
        elif finished.error:
            log.error("prune_failed", error=finished.error)

    def repository_figures(self, size: int | None, count: int | None) -> None:
        """Publishes the repository's size and snapshot count, where restic told them."""
        if size is not None:
            self.metrics.repository_size.set(size)
        if count is not None:
            self.metrics.repository_snapshots.set(count)
