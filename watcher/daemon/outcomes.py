"""The outcomes: what happened (a job's result, an inventory change, time passing) → the registry's
transitions, metrics, alerts and log lines.

The decisions are pure functions of their inputs (`backup_results`, `next_attempt`, `staleness`);
`Outcomes` applies them, on the loop's thread only, with the clock it is given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Protocol, assert_never

import structlog

from alerting.policy import Alert, AlertPolicy, Concern, Observation, startup_summary
from watcher.clock import Clock
from watcher.copyconfig import CopySpec
from watcher.daemon.copywatch import CopyWatch
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
    Renamed,
    RetagFinished,
    SizeJudged,
)
from watcher.daemon.scheduler import not_ready_delay
from watcher.daemon.shrinkage import ShrunkenDumps
from watcher.daemon.upkeep import RepositoryUpkeep
from watcher.execute import Masker
from watcher.jobs import ALL_DATABASES_PLACEHOLDER, BackupResult
from watcher.metrics import Metrics
from watcher.registry import Registry, TargetState
from watcher.restic import Snapshot
from watcher.schedule import next_run

log = structlog.get_logger("watcher.daemon")
RETRY_BASE_SECONDS = 300
RETRY_MAX_SECONDS = 3600
STALE_FACTOR = 1.5
EVENTS_DOWN_ALERT_SECONDS = 300.0


def retry_delay(failures: int) -> float:
    """Seconds to wait before retrying after `failures` failed backups in a row: 5 min, doubling, 1 h at most."""
    return float(min(RETRY_BASE_SECONDS * 2 ** (failures - 1), RETRY_MAX_SECONDS))


def next_attempt(schedule: str, timezone: str, now: datetime, failures: int, retry: bool) -> datetime:
    """When a target is backed up next: its next slot, or sooner after a failure (a failed daily
    backup should not wait a day for its next attempt) unless `retry` is off (an aborted backup)."""
    when = next_run(schedule, now, timezone)
    if failures and retry:
        when = min(when, now + timedelta(seconds=retry_delay(failures)))
    return when


def staleness(entry: TargetState, now: datetime) -> tuple[bool | None, str]:
    """(stale?, why) of one target; stale is None when it cannot be judged (no schedule yet).

    Stale: its judged snapshot (or, without one, its registration) is older than 1.5 x its interval.
    """
    if entry.target is None or entry.interval_s is None:
        return None, ""
    newest = entry.judged_snapshot
    reference = newest or entry.registered_at
    if reference is None:
        return None, ""
    limit = STALE_FACTOR * entry.interval_s
    age = (now - reference).total_seconds()
    what = f"newest snapshot {newest:%Y-%m-%d %H:%M} UTC" if newest else "no snapshot yet"
    state = "; the container is stopped" if entry.stopped else ""
    return age > limit, f"{what}, {age / 3600:.1f} h old (limit {limit / 3600:.1f} h){state}"


def gone_databases(entry: TargetState, results: tuple[BackupResult, ...]) -> list[str]:
    """Databases of a `databases=all` target that the job's listing no longer had (dropped since)."""
    if (entry.target is None or not entry.target.all_databases or not results
            or any(r.database == ALL_DATABASES_PLACEHOLDER for r in results)):
        return []
    return sorted(set(entry.databases) - {r.database for r in results})


def backup_results(entry: TargetState, finished: BackupFinished, now: datetime) -> tuple[BackupResult, ...]:
    """One result per database: a crashed job fails every database, and a failure before the
    databases were known counts for every database known so far ("*" when none is)."""
    results = finished.results
    if finished.error:
        results = (BackupResult(entry.name, ALL_DATABASES_PLACEHOLDER, False, "-", now, 0.0, error=finished.error),)
    known = sorted(entry.databases) or [ALL_DATABASES_PLACEHOLDER]
    return tuple(replace(result, database=database) for result in results
                 for database in (known if result.database == ALL_DATABASES_PLACEHOLDER else [result.database]))


class Pager(Protocol):
    """Where alerts go (alerting.notify.Notifier: Apprise, in the background)."""

    def send(self, alert: Alert) -> None:
        """Queues one alert for delivery."""
        ...


class Outcomes:
    """Turns what happened into registry transitions, metrics and alerts.

    `cancel` is set when the daemon aborts its jobs at shutdown: what they report then is counted
    but not paged, and a failure so caused is not retried early.
    """

    def __init__(self, *, registry: Registry, metrics: Metrics, clock: Clock, timezone: str, policy: AlertPolicy,
                 masker: Masker, host: str, docker_host: str, cancel: threading.Event,
                 notifier: Pager | None = None, copies: tuple[CopySpec, ...] = ()) -> None:
        self.masker, self.host, self.docker_host, self.cancel = masker, host, docker_host, cancel
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.timezone = timezone
        self.policy = policy
        self.notifier = notifier
        self.events_connected = False
        self._disconnected_since: float | None = clock.monotonic()
        self._startup_stale: list[tuple[str, str]] | None = []  # None once the first reconcile is done
        self.shrunken = ShrunkenDumps(policy, clock, self.alert)
        self.readiness = ReadinessOutcomes(registry=registry, metrics=metrics, clock=clock, timezone=timezone,
                                           cancel=cancel, alert=self.alert)
        self.copies = CopyWatch(copies, registry=registry, metrics=metrics, clock=clock, timezone=timezone,
                                alert=self.alert)
        self.upkeep = RepositoryUpkeep(metrics=metrics, clock=clock, cancel=cancel, alert=self.alert)

    def alert(self, subject: str, concern: Concern, ok: bool, detail: str = "") -> None:
        """Observes one outcome; a page goes out when the policy says so."""
        alert = self.policy.observe(Observation(subject, concern, ok, self.clock.now(), self.masker(detail)))
        if alert is not None and self.notifier is not None:
            self.notifier.send(alert)

    # --- the event stream and the inventory ---------------------------------------------------
    def stream_changed(self, connected: bool) -> None:
        """The event stream connected or dropped."""
        self.events_connected = connected
        self.metrics.events_connected.set(1 if connected else 0)
        if connected:
            self._disconnected_since = None
        elif self._disconnected_since is None:
            self._disconnected_since = self.clock.monotonic()

    def event_seen(self, action: str) -> None:
        """Counts one container event."""
        self.metrics.events.labels(action).inc()

    def noted(self, change: Change) -> None:
        """Follows one change the inventory made."""
        match change:
            case LabelsJudged(name=name, problem=problem):
                self.alert(name, Concern.LABEL, problem is None, problem or "its labels are valid now")
            case Renamed(old_name=old_name, new_name=new_name):
                self.metrics.forget_target(old_name)
                self.policy.rename(old_name, new_name)
                self.shrunken.renamed(old_name, new_name)
            case Removed(name=name, destroyed=destroyed):
                if name is not None:
                    self.metrics.forget_target(name)
                    if destroyed:
                        self.policy.forget(name)
                        self.shrunken.forget(name)
            case SizeJudged():
                self.shrunken.judged(change)
            case Registered(entry=entry, at=at):
                self._judge_at_startup(entry, at)
            case _:
                assert_never(change)

    def _judge_at_startup(self, entry: TargetState, at: datetime) -> None:
        stale, detail = staleness(entry, at)
        if self._startup_stale is not None and stale:
            # Derived after a restart: probably already paged before it; one summary instead.
            self.policy.assume_failing(entry.name, Concern.STALE, at)
            self.policy.assume_failing(entry.name, Concern.BACKUP, at)
            self._startup_stale.append((entry.name, detail))

    def reconciled(self) -> None:
        """A reconcile ended: after the first one, the targets already stale at start are paged at once."""
        if self._startup_stale is None:
            return
        if self._startup_stale and self.notifier is not None:
            self.notifier.send(startup_summary(self.host, self._startup_stale, self.clock.now()))
        self._startup_stale = None

    def check_health(self) -> None:
        """Stale snapshots and a lost event stream, judged from cached state only."""
        down = self._disconnected_since
        if down is None:
            self.alert("docker", Concern.EVENTS, True, "the event stream is connected again")
        elif (elapsed := self.clock.monotonic() - down) > EVENTS_DOWN_ALERT_SECONDS:
            self.alert("docker", Concern.EVENTS, False,
                       f"disconnected from {self.docker_host} for {elapsed:.0f}s; reconnecting")
        now = self.clock.now()
        stale_count = 0
        for entry in self.registry.view():
            stale, detail = staleness(entry, now)
            if stale is not None:
                stale_count += stale
                self.alert(entry.name, Concern.STALE, not stale, detail)
        self.copies.check()
        log.debug("health_checked", stale=stale_count, events_connected=down is None)

    # --- finished jobs ------------------------------------------------------------------------
    def job_finished(self, finished: JobFinished) -> tuple[Snapshot, ...]:
        """Follows one finished job; returns the snapshots it shows the repository now holds."""
        match finished:
            case BackupFinished(snapshots=snapshots):
                self.backup_finished(finished)
                self.copies.snapshots_taken(snapshots)
                return snapshots
            case CopyFinished():
                self.copies.finished(finished)
            case RefreshFinished(snapshots=None, error=error):
                log.warning("snapshot_listing_failed", error=error)
            case RefreshFinished(snapshots=snapshots, repository_snapshots=count):
                self.upkeep.repository_figures(None, count)
                return snapshots or ()
            case ProbeFinished():
                self.readiness.probe_finished(finished)
            case RetagFinished():
                self.retag_finished(finished)
            case DrillsFinished():
                self.upkeep.drills_finished(finished)
            case PruneFinished():
                self.upkeep.prune_finished(finished)
            case _:
                assert_never(finished)
        return ()

    def backup_finished(self, finished: BackupFinished) -> None:
        """Records a backup job's results; schedules the next attempt; alerts on a change of state."""
        entry = self.registry.get(finished.container_id)
        if entry is None or entry.target is None:
            return
        self._drop_gone_databases(entry, finished.results)
        now = self.clock.now()
        results = backup_results(entry, finished, now)
        for result in results:
            self.metrics.observe_backup(entry.name, result.database, result.ok, result.duration_s,
                                        result.bytes_processed, result.bytes_added)
        ok = bool(results) and all(r.ok for r in results)
        failures = 0 if ok else entry.consecutive_failures + 1
        cancelled = self.cancel.is_set()
        error = next((r.error for r in results if not r.ok), None)
        self.registry.record_results(
            entry.container_id, [r for r in results if r.database != ALL_DATABASES_PLACEHOLDER],
            last_error=error, consecutive_failures=failures,
            next_run=next_attempt(entry.target.schedule, self.timezone, now, failures, retry=not cancelled))
        if not cancelled:
            self.readiness.follow(entry, results, now)
            # A backup we aborted ourselves at shutdown is not an incident to page about.
            done = next((r for r in results if r.ok and r.snapshot_id), None)
            self.alert(entry.name, Concern.BACKUP, ok,
                       error or (f"snapshot {done.snapshot_id[:8]} of {done.database}" if done and done.snapshot_id
                                 else ""))

    def _drop_gone_databases(self, entry: TargetState, results: tuple[BackupResult, ...]) -> None:
        # The job listed the container's databases: one dropped since is no longer this target's
        # (its snapshots stay in the repository), and its series would read stale for ever.
        gone = gone_databases(entry, results)
        if gone:
            self.registry.drop_databases(entry.container_id, gone)
            for database in gone:
                self.metrics.forget_database(entry.name, database)
            log.info("databases_gone", target=entry.name, databases=",".join(gone))

    def retag_finished(self, finished: RetagFinished) -> None:
        """The move of a renamed container's history ended."""
        self.registry.mark_idle(finished.container_id)
        if finished.error:
            log.error("history_rename_failed", error=finished.error)

class ReadinessOutcomes:
    """Probes of PostgreSQL and backups that found it not answering → the target's back-off (SPEC §11):
    registry transitions, metrics, pages and log lines. Only the daemon's loop thread calls it."""

    def __init__(self, *, registry: Registry, metrics: Metrics, clock: Clock, timezone: str,
                 cancel: threading.Event, alert: Callable[[str, Concern, bool, str], None]) -> None:
        self.registry, self.metrics, self.clock, self.timezone, self.cancel = registry, metrics, clock, timezone, cancel
        self._alert = alert

    def follow(self, entry: TargetState, results: tuple[BackupResult, ...], now: datetime) -> None:
        """A backup that found PostgreSQL not answering (after its one wait) backs the target off like a
        failed probe; one that reached it clears the back-off."""
        if any(r.not_ready for r in results):
            self.back_off(entry, now, next((r.error for r in results if r.not_ready), None))
        elif any(r.ok for r in results):
            self.registry.record_probe(entry.container_id, ready=True, not_ready_streak=0)

    def back_off(self, entry: TargetState, now: datetime, reason: str | None) -> datetime:
        """Counts one more failed probe of the target and returns when it is attempted next: a minute,
        doubling, at most its schedule interval (and never after its next slot)."""
        assert entry.target is not None
        streak = entry.not_ready_streak + 1
        until = min(next_run(entry.target.schedule, now, self.timezone),
                    now + not_ready_delay(streak, entry.interval_s))
        self.registry.record_probe(entry.container_id, ready=False, not_ready_streak=streak, next_run=until)
        log.warning("postgres_backing_off", target=entry.name, error=reason, attempt=streak,
                    backing_off_until=until.isoformat())
        return until

    def probe_finished(self, finished: ProbeFinished) -> None:
        """A probe found PostgreSQL serving (the backup follows when a slot is free), or not: that counts as a
        failed backup of every database (paged once) and the target backs off."""
        entry = self.registry.get(finished.container_id)
        if entry is None or entry.target is None:
            return
        if finished.ready:
            self.registry.record_probe(entry.container_id, ready=True, not_ready_streak=0)
            log.info("postgres_ready", target=entry.name)
            return
        if self.cancel.is_set():
            return
        now = self.clock.now()
        until = self.back_off(entry, now, finished.reason)
        # The back-off first: `status` shows an error's first line.
        error = (f"backing off until {until:%Y-%m-%d %H:%M:%S} UTC: "
                 f"{finished.reason or 'PostgreSQL does not accept connections'}")
        placeholder = BackupResult(entry.name, ALL_DATABASES_PLACEHOLDER, False, "-", now, 0.0, error=error,
                                   not_ready=True)
        results = backup_results(entry, BackupFinished(entry.container_id, (placeholder,)), now)
        for result in results:
            self.metrics.observe_backup(entry.name, result.database, False, 0.0, 0, 0)
        known = [r for r in results if r.database != ALL_DATABASES_PLACEHOLDER]
        self.registry.record_results(entry.container_id, known, last_error=error,
                                     consecutive_failures=entry.consecutive_failures + 1, next_run=until)
        self._alert(entry.name, Concern.BACKUP, False, error)
