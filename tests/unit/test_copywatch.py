"""The daemon's view of its copies (SPEC §12) on a fake clock: progress, metrics and the once-only alerts."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import CollectorRegistry, generate_latest

from alerting.policy import Concern
from tests.unit.daemon_kit import T0, make_entry
from watcher.clock import FakeClock
from watcher.copies import HistoryProgress
from watcher.copyconfig import CopySpec
from watcher.copyjob import CopyResult
from watcher.daemon.copywatch import CopyWatch
from watcher.daemon.messages import CopyFinished
from watcher.metrics import Metrics
from watcher.registry import Registry
from watcher.restic import Snapshot

HOURLY = 3600.0
SPEC = CopySpec("offsite", "rest:http://h/r", (7, 4, 6), password="copy-pw-123456")


def _watch() -> tuple[CopyWatch, FakeClock, list[tuple[str, bool, str]], Metrics]:
    clock = FakeClock(T0)
    registry = Registry()
    registry.register(make_entry(snapshots={"app": T0}, interval_s=HOURLY, schedule="0 * * * *"))
    metrics = Metrics(CollectorRegistry(), registry, version="t", clock=lambda: clock.now().timestamp())
    observed: list[tuple[str, bool, str]] = []

    def alert(subject: str, concern: Concern, ok: bool, detail: str) -> None:
        assert concern is Concern.COPY
        observed.append((subject, ok, detail))

    return CopyWatch((SPEC,), registry=registry, metrics=metrics, clock=clock, timezone="UTC",
                     alert=alert), clock, observed, metrics


def _snapshot(at_hours: float) -> Snapshot:
    return Snapshot("id", "id", T0 + timedelta(hours=at_hours), "h", "scalr-app-db", "app", 1)


def test_a_copy_that_stops_getting_snapshots_is_judged_behind_after_1_5_intervals_and_caught_up_after() -> None:
    watch, clock, observed, metrics = _watch()
    watch.finished(CopyFinished("offsite", CopyResult("offsite", True, "r", 1.0,
                                                      progress={("scalr-app-db", "app"): HistoryProgress(T0, None)})))
    watch.snapshots_taken([_snapshot(1)])  # the copy's backend is down from here on
    clock.set(T0 + timedelta(hours=1, minutes=29))
    watch.check()
    clock.set(T0 + timedelta(hours=1, minutes=31))
    watch.check()
    assert [ok for _, ok, _ in observed] == [True, False]
    assert "oldest snapshot not copied" in observed[-1][2]
    text = generate_latest(metrics.registry).decode()
    assert 'backup_watcher_copy_lag_seconds{copy="offsite",database="app",target="scalr-app-db"} 1860.0' in text
    assert 'backup_watcher_copies_total{copy="offsite",result="success"} 1.0' in text
    assert "copy-pw-123456" not in text

    watch.finished(CopyFinished("offsite", CopyResult("offsite", False, "r", 5.0, error="down")))
    assert watch.progress("offsite")[("scalr-app-db", "app")].oldest_missing == T0 + timedelta(hours=1)
    caught_up = {("scalr-app-db", "app"): HistoryProgress(T0 + timedelta(hours=1), None)}
    watch.finished(CopyFinished("offsite", CopyResult("offsite", True, "r", 1.0, progress=caught_up)))
    watch.check()
    assert observed[-1][1] is True
    assert 'copy_lag_seconds{copy="offsite",database="app",target="scalr-app-db"} 0.0' in \
        generate_latest(metrics.registry).decode()
