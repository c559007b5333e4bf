"""The daemon: Docker events → discovery → registry → scheduler → jobs → metrics and logs.

One loop thread owns the registry. Each loop step does one unit of work: it handles one message
(a container event, a reconnect, a finished job) and then starts whatever is due. Jobs run on a
bounded pool and never raise into the loop: they return a JobFinished, which comes back through
the same queue. A signal handler only counts signals; the loop notices, stops starting work,
lets running backups finish within the grace period and then aborts them (restic writes no
snapshot for an aborted dump), and returns 0.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog

from alerting.notify import Notifier
from alerting.policy import AlertPolicy, Concern, Observation, startup_summary
from watcher import commands
from watcher.config import Config
from watcher.discovery import ContainerInfo, DiscoveryRules, Rejected, Target, discover
from watcher.docker_source import DockerSource, DockerUnavailable
from watcher.drill import Driller, DrillResult, remove_leftovers
from watcher.events import ContainerEvent, EventStream, StreamConnected
from watcher.jobs import (
    ALL_DATABASES_PLACEHOLDER,
    LOCK_WAIT,
    BackupResult,
    JobContext,
    backup_target,
    restic_error_text,
)
from watcher.metrics import Metrics
from watcher.registry import DatabaseState, Registry, TargetState, due, judged_snapshot_time
from watcher.restic import ResticError, Snapshot
from watcher.retention import PruneResult, apply_retention, clear_stale_locks, repository_figures
from watcher.schedule import first_run, interval_seconds, next_run, previous_run
from watcher.status import status_rows

log = structlog.get_logger("watcher.daemon")
LOOP_TICK_SECONDS = 0.2
HEALTHY_HEARTBEAT_SECONDS = 60.0
RETRY_BASE_SECONDS = 300
RETRY_MAX_SECONDS = 3600
STALE_FACTOR = 1.5
STALE_CHECK_SECONDS = 15.0
EVENTS_DOWN_ALERT_SECONDS = 300.0


@dataclass(frozen=True)
class JobFinished:
    """A job's outcome, handed back to the loop."""

    kind: str  # "backup", "prune" or "retag"
    container_id: str | None = None
    results: tuple[BackupResult, ...] = ()
    snapshots: tuple[Snapshot, ...] | None = None
    prune: PruneResult | None = None
    drills: tuple[DrillResult, ...] = ()
    error: str | None = None


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


def newest_by_database(snapshots: list[Snapshot] | tuple[Snapshot, ...]) -> dict[tuple[str, str], Snapshot]:
    """The newest snapshot of each (container, database)."""
    newest: dict[tuple[str, str], Snapshot] = {}
    for snap in snapshots:
        key = (snap.container, snap.database)
        if key not in newest or snap.time > newest[key].time:
            newest[key] = snap
    return newest


class Daemon:
    """The long-running loop of `backup-watcher run`."""

    def __init__(self, *, config: Config, docker: DockerSource, ctx: JobContext, registry: Registry,
                 metrics: Metrics, policy: AlertPolicy | None = None, notifier: Notifier | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.config = config
        self.policy = policy or AlertPolicy()
        self.notifier = notifier
        self.docker = docker
        self.ctx = ctx
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.rules = DiscoveryRules(config.container_patterns, config.schedule, config.retention)
        self._queue: queue.Queue[object] = queue.Queue()
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency + 1, thread_name_prefix="job")
        self._events = EventStream(docker.docker_host, self._queue.put, self._set_connected)
        self._stop_signals = 0
        self._stopping_since: float | None = None
        self._running_backups = 0
        self._running_other = 0
        self._prune_running = False
        self._refresh_running = False
        self._drill_running = False
        self._next_drill: datetime | None = None
        self.driller = Driller(ctx, docker)
        self._backed_up_since_prune: set[str] = set()
        self._pending_retags: dict[str, list[tuple[str, str]]] = {}
        self._running_retags: dict[str, list[tuple[str, str]]] = {}
        self._ignored: dict[str, str] = {}
        self._newest: dict[tuple[str, str], Snapshot] = {}
        self._last_reconcile = 0.0
        self._last_stale_check = 0.0
        self._disconnected_since: float | None = time.monotonic()
        self._startup_stale: list[tuple[str, str]] | None = []
        self.heartbeat = time.monotonic()
        self.events_connected = False

    # --- called from other threads ---------------------------------------------------------
    def request_stop(self) -> None:
        """Asks the loop to stop (signal-handler safe: it only counts)."""
        self._stop_signals += 1

    def health(self) -> tuple[bool, str]:
        """(healthy, detail) for /healthz: the loop is alive; the event stream is connected or reconnecting."""
        age = time.monotonic() - self.heartbeat
        stream = "connected" if self.events_connected else "reconnecting"
        if age > HEALTHY_HEARTBEAT_SECONDS:
            return False, f"loop stalled for {age:.0f}s; event stream {stream}\n"
        return True, f"ok; event stream {stream}\n"

    def status(self) -> object:
        """The status rows of every watched container (for /status)."""
        return status_rows(self.registry.view(), self.clock())

    def _set_connected(self, connected: bool) -> None:
        self.events_connected = connected
        self.metrics.events_connected.set(1 if connected else 0)
        if connected:
            self._disconnected_since = None
        elif self._disconnected_since is None:
            self._disconnected_since = time.monotonic()

    def _alert(self, subject: str, concern: Concern, ok: bool, detail: str = "") -> None:
        alert = self.policy.observe(Observation(subject, concern, ok, self.clock(), self.ctx.masker(detail)))
        if alert is not None and self.notifier is not None:
            self.notifier.send(alert)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Runs until stopped by a signal; returns the exit code (0)."""
        log.info("daemon_started", host=self.ctx.host, concurrency=self.config.concurrency,
                 schedule=self.config.schedule, timezone=self.config.timezone)
        # Subscribe first: events that arrive while the repository is read wait in the queue.
        self._events.start()
        remove_leftovers(self.docker, self.ctx.host)
        clear_stale_locks(self.ctx)
        self._load_repository_state()
        if self.config.drill_schedule:
            self._next_drill = next_run(self.config.drill_schedule, self.clock(), self.config.timezone)
            log.info("drills_scheduled", next_drill=self._next_drill.isoformat())
        log.info("watching", reconcile_interval_s=self.config.reconcile_interval_s)
        while True:
            self.heartbeat = time.monotonic()
            if self._stop_signals and self._shutdown_step():
                break
            try:
                message = self._queue.get(timeout=LOOP_TICK_SECONDS)
            except queue.Empty:
                message = None
            if message is not None:
                self._handle(message)
            if self._stopping_since is None:
                if time.monotonic() - self._last_reconcile >= self.config.reconcile_interval_s:
                    self._reconcile("periodic")
                    self._submit_refresh()
                self._start_due_work()
                self._check_health_alerts()
        self._events.stop()
        self._pool.shutdown(wait=True)
        log.info("daemon_stopped")
        return 0

    def _shutdown_step(self) -> bool:
        """Advances the shutdown; returns True when nothing runs any more and the loop may end."""
        now = time.monotonic()
        if self._stopping_since is None:
            self._stopping_since = now
            log.info("shutdown_requested", running_backups=self._running_backups,
                     grace_s=self.config.shutdown_grace_s)
        if not self.ctx.cancel.is_set() and (
            self._stop_signals >= 2 or now - self._stopping_since >= self.config.shutdown_grace_s
        ) and (self._running_backups or self._running_other):
            log.warning("shutdown_aborting_jobs", running_backups=self._running_backups,
                        reason="second signal" if self._stop_signals >= 2 else "grace period over")
            self.ctx.cancel.set()
        return self._running_backups == 0 and self._running_other == 0

    def _check_health_alerts(self) -> None:
        """Stale snapshots and a lost event stream, checked every few seconds from cached state only."""
        now_mono = time.monotonic()
        if now_mono - self._last_stale_check < STALE_CHECK_SECONDS:
            return
        self._last_stale_check = now_mono
        down = self._disconnected_since
        if down is None:
            self._alert("docker", Concern.EVENTS, True, "the event stream is connected again")
        elif now_mono - down > EVENTS_DOWN_ALERT_SECONDS:
            self._alert("docker", Concern.EVENTS, False,
                        f"disconnected from {self.docker.docker_host} for {now_mono - down:.0f}s; reconnecting")
        now = self.clock()
        for entry in self.registry.view():
            stale, detail = self._staleness(entry, now)
            if stale is not None:
                self._alert(entry.name, Concern.STALE, not stale, detail)

    def _staleness(self, entry: TargetState, now: datetime) -> tuple[bool | None, str]:
        """(stale?, why) of one target; stale is None when it cannot be judged (no schedule yet)."""
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

    def _handle(self, message: object) -> None:
        if isinstance(message, ContainerEvent):
            self.metrics.events.labels(message.action).inc()
            if message.action in ("start", "health_status"):
                self._observe(message.container_id)
            elif message.action == "rename":
                self._observe(message.container_id, old_name=message.old_name)
            elif message.action in ("die", "stop"):
                self._mark_stopped(message.container_id)
            elif message.action == "destroy":
                self._forget(message.container_id)
        elif isinstance(message, StreamConnected):
            self._reconcile("event stream connected")
        elif isinstance(message, JobFinished):
            self._job_finished(message)

    # --- discovery into the registry ---------------------------------------------------------
    def _observe(self, container_id: str, old_name: str | None = None) -> None:
        try:
            info = self.docker.inspect(container_id)
        except DockerUnavailable as exc:
            log.warning("inspect_failed", container_id=container_id[:12], error=str(exc))
            return
        if info is None:
            self._forget(container_id)
        elif not info.running:
            self._mark_stopped(container_id)
        else:
            try:
                self._register(info, old_name)
            except Exception as exc:
                # Whatever one container's attributes trip, it must cost that container, not the
                # loop that backs up all the others (and, under a restart policy, a crash loop).
                log.exception("target_registration_failed", target=info.name, container_id=info.id[:12],
                              error=self.ctx.masker(f"{type(exc).__name__}: {exc}"))

    def _register(self, info: ContainerInfo, old_name: str | None = None) -> None:
        found = discover(info, self.rules)
        existing = self.registry.get(info.id)
        if existing is not None and old_name is None and existing.name != info.name:
            old_name = existing.name
        if found is None:
            self._ignored[info.id] = info.name
            if existing is not None:
                self.registry.remove(info.id)
                self.metrics.forget_target(existing.name)
                log.info("target_removed", target=existing.name, reason="no longer selected")
            return
        self._ignored.pop(info.id, None)
        if isinstance(found, Rejected):
            if existing is None or existing.rejected != found:
                log.error("label_invalid", target=found.name, error=found.reason)
            self.registry.put(TargetState(info.id, info.name, rejected=found))
            self._alert(found.name, Concern.LABEL, False, found.reason)
            return
        self._alert(found.name, Concern.LABEL, True, "its labels are valid now")
        if old_name is not None and old_name != info.name:
            self._rename_history(info.id, old_name, info.name)
        if (existing is not None and existing.target == found and not existing.stopped
                and existing.rejected is None):
            return
        now = self.clock()
        databases = self._known_databases(found)
        newest = judged_snapshot_time(found.all_databases, databases)
        when = first_run(found.schedule, self.config.timezone, newest, now)
        entry = TargetState(
            container_id=info.id, name=info.name, target=found, next_run=when,
            interval_s=interval_seconds(found.schedule, self.config.timezone, now),
            databases={**databases, **(existing.databases if existing else {})},
            consecutive_failures=existing.consecutive_failures if existing else 0,
            running_job=existing.running_job if existing else False,
            last_error=existing.last_error if existing else None,
            registered_at=existing.registered_at if existing and existing.registered_at else now,
        )
        self.registry.put(entry)
        if self._startup_stale is not None:
            stale, detail = self._staleness(entry, now)
            if stale:
                # Derived after a restart: probably already paged before it; one summary instead.
                self.policy.assume_failing(info.name, Concern.STALE, now)
                self.policy.assume_failing(info.name, Concern.BACKUP, now)
                self._startup_stale.append((info.name, detail))
        log.info("target_registered", target=info.name, container_id=info.id[:12], schedule=found.schedule,
                 next_run=when.isoformat(), catch_up=when == now,
                 databases="all" if found.all_databases else ",".join(found.databases))

    def _known_databases(self, target: Target) -> dict[str, DatabaseState]:
        cached = {db: snap for (container, db), snap in self._newest.items() if container == target.name}
        if target.all_databases and cached:
            # Only the databases of the latest pass, which began at or after the slot before its newest
            # snapshot: an older history is of a database dropped since (or missing for two passes),
            # which the next listing would drop again.
            newest = max(snap.time for snap in cached.values())
            cutoff = previous_run(target.schedule, newest, self.config.timezone)
            cached = {db: snap for db, snap in cached.items() if snap.time >= cutoff}
        names = sorted(cached) if target.all_databases else list(target.databases)
        return {db: DatabaseState(last_snapshot=cached[db].time if db in cached else None,
                                  last_snapshot_id=cached[db].id if db in cached else None) for db in names}

    def _rename_history(self, container_id: str, old_name: str, new_name: str) -> None:
        log.info("target_renamed", target=new_name, old_name=old_name)
        for container, database in list(self._newest):
            if container == old_name:
                self._newest[(new_name, database)] = self._newest.pop((container, database))
        self.metrics.forget_target(old_name)
        self.policy.rename(old_name, new_name)
        self._pending_retags.setdefault(container_id, []).append((old_name, new_name))
        entry = self.registry.get(container_id)
        if entry is not None:
            self.registry.update(container_id, name=new_name,
                                 target=entry.target.renamed(new_name) if entry.target else None)

    def _mark_stopped(self, container_id: str) -> None:
        entry = self.registry.get(container_id)
        if entry is not None and not entry.stopped:
            self.registry.update(container_id, stopped=True)
            log.info("target_stopped", target=entry.name)

    def _forget(self, container_id: str) -> None:
        self._ignored.pop(container_id, None)
        self._pending_retags.pop(container_id, None)
        entry = self.registry.remove(container_id)
        if entry is not None:
            self.metrics.forget_target(entry.name)
            self.policy.forget(entry.name)
            log.info("target_removed", target=entry.name, reason="container destroyed")

    def _reconcile(self, reason: str) -> None:
        """Brings the registry in line with a full container list (idempotent by container id)."""
        self._last_reconcile = time.monotonic()
        try:
            listing = self.docker.list_all()
        except DockerUnavailable as exc:
            log.warning("reconcile_failed", reason=reason, error=str(exc))
            return
        seen: set[str] = set()
        for container_id, name, running in listing:
            seen.add(container_id)
            entry = self.registry.get(container_id)
            if entry is None:
                if running and self._ignored.get(container_id) != name:
                    self._observe(container_id)
            elif entry.name != name or (running and entry.stopped):
                self._observe(container_id, old_name=entry.name if entry.name != name else None)
            elif not running and not entry.stopped:
                self._mark_stopped(container_id)
        for container_id in self.registry.ids() - seen:
            self._forget(container_id)
        for container_id in set(self._ignored) - seen:
            del self._ignored[container_id]
        if self._startup_stale is not None:
            if self._startup_stale and self.notifier is not None:
                self.notifier.send(startup_summary(self.ctx.host, self._startup_stale, self.clock()))
            self._startup_stale = None
        log.debug("reconciled", reason=reason, containers=len(listing), targets=len(self.registry.ids()))

    # --- the scheduler ---------------------------------------------------------------------
    def _start_due_work(self) -> None:
        if self._prune_running:
            return
        now = self.clock()
        entries = self.registry.view()
        for container_id, renames in list(self._pending_retags.items()):
            entry = self.registry.get(container_id)
            if entry is None or entry.running_job or self._running_other:
                continue
            del self._pending_retags[container_id]
            self._running_retags[container_id] = renames
            self._submit_retag(entry, renames)
        if (self._next_drill is not None and self._next_drill <= now and not self._drill_running
                and self._slots_in_use() < self.config.concurrency):
            self._submit_drills()
        waiting = due(entries, now)
        # The retag moves every snapshot tagged with the old name: a new container that took that
        # name must not back up before it, or its first snapshots would move into the other history.
        awaiting_retag = {old for renames in (*self._pending_retags.values(), *self._running_retags.values())
                          for old, _ in renames}
        for entry in waiting:
            if self._slots_in_use() >= self.config.concurrency:
                break
            current = self.registry.get(entry.container_id)
            if current is None or current.running_job or current.name in awaiting_retag:
                continue
            self._submit_backup(current)
        if (self._backed_up_since_prune and not self._running_backups and not self._running_other
                and not self._drill_running and not due(self.registry.view(), now)):
            self._submit_prune()

    def _slots_in_use(self) -> int:
        """Backups and a drill share WATCHER_CONCURRENCY."""
        return self._running_backups + (1 if self._drill_running else 0)

    def _submit(self, work: Callable[[], JobFinished], kind: str, container_id: str | None) -> None:
        def guarded() -> JobFinished:
            try:
                return work()
            except Exception as exc:
                log.exception("job_crashed", kind=kind)
                return JobFinished(kind, container_id, error=self.ctx.masker(f"{type(exc).__name__}: {exc}"))

        future: Future[JobFinished] = self._pool.submit(guarded)
        future.add_done_callback(lambda done: self._queue.put(done.result()))

    def _submit_backup(self, entry: TargetState) -> None:
        assert entry.target is not None
        target = entry.target
        self.registry.update(entry.container_id, running_job=True)
        self._running_backups += 1

        def work() -> JobFinished:
            results = backup_target(self.ctx, target)
            # What the repository now holds follows from the results (the watcher sets each snapshot's
            # time): no listing, which would open the repository a second time per backup.
            snapshots = tuple(
                Snapshot(id=r.snapshot_id, short_id=r.snapshot_id[:8], time=r.snapshot_time, host=self.ctx.host,
                         container=target.name, database=r.database, bytes=r.bytes_processed)
                for r in results if r.ok and r.snapshot_id is not None and r.snapshot_time is not None)
            return JobFinished("backup", entry.container_id, tuple(results), snapshots)

        self._submit(work, "backup", entry.container_id)

    def _submit_drills(self) -> None:
        """One job drills every eligible target in turn: drills never run two at a time."""
        assert self.config.drill_schedule is not None
        self._next_drill = next_run(self.config.drill_schedule, self.clock(), self.config.timezone)
        targets = [e.target for e in self.registry.view() if e.target is not None and e.target.drill
                   and not e.stopped]
        if not targets:
            return
        self._drill_running = True
        self._running_other += 1

        def work() -> JobFinished:
            results: list[DrillResult] = []
            for target in targets:
                if self.ctx.cancel.is_set():
                    break
                results.extend(self.driller.drill_target(target))
            return JobFinished("drill", drills=tuple(results))

        self._submit(work, "drill", None)

    def _submit_refresh(self) -> None:
        """Re-reads the repository in the background: snapshots made outside the daemon count too."""
        if self._refresh_running:
            return
        self._refresh_running = True
        self._running_other += 1

        def work() -> JobFinished:
            try:
                return JobFinished("refresh", snapshots=tuple(self.ctx.repository.snapshots(host=self.ctx.host)))
            except ResticError as exc:
                return JobFinished("refresh", error=str(exc))

        self._submit(work, "refresh", None)

    def _submit_prune(self) -> None:
        targets = [e.target for e in self.registry.view() if e.target is not None]
        self._backed_up_since_prune.clear()
        self._prune_running = True
        self._running_other += 1
        self._submit(lambda: JobFinished("prune", prune=apply_retention(self.ctx, targets)), "prune", None)

    def _submit_retag(self, entry: TargetState, renames: list[tuple[str, str]]) -> None:
        self.registry.update(entry.container_id, running_job=True)
        self._running_other += 1

        def work() -> JobFinished:
            for old_name, new_name in renames:
                argv = commands.with_lock_wait(commands.restic_retag(
                    self.ctx.repository.binary, host=self.ctx.host, old_name=old_name, new_name=new_name), LOCK_WAIT)
                done = self.ctx.repository.run(argv, timeout=3600, cancel=self.ctx.cancel)
                if not done.ok:
                    error = restic_error_text(done.stderr_tail.splitlines()) or done.describe_failure()
                    return JobFinished("retag", entry.container_id,
                                       error=f"moving history of {old_name} to {new_name} failed: {error}")
                log.info("history_renamed", target=new_name, old_name=old_name)
            return JobFinished("retag", entry.container_id)

        self._submit(work, "retag", entry.container_id)

    def _job_finished(self, finished: JobFinished) -> None:
        if finished.kind == "backup":
            self._running_backups -= 1
            self._backup_finished(finished)
        elif finished.kind == "prune":
            self._running_other -= 1
            self._prune_running = False
            self._prune_finished(finished)
        elif finished.kind == "drill":
            self._running_other -= 1
            self._drill_running = False
            self._drills_finished(finished)
        elif finished.kind == "refresh":
            self._running_other -= 1
            self._refresh_running = False
            if finished.snapshots is not None:
                self._apply_snapshots(finished.snapshots)
            else:
                log.warning("snapshot_listing_failed", error=finished.error)
        else:
            self._running_other -= 1
            if finished.container_id is not None:
                self._running_retags.pop(finished.container_id, None)
                self.registry.update(finished.container_id, running_job=False)
            if finished.error:
                log.error("history_rename_failed", error=finished.error)

    def _backup_finished(self, finished: JobFinished) -> None:
        assert finished.container_id is not None
        entry = self.registry.get(finished.container_id)
        if entry is None or entry.target is None:
            return
        results = finished.results
        if finished.error:
            results = (BackupResult(entry.name, ALL_DATABASES_PLACEHOLDER, False, "-", self.clock(), 0.0,
                                    error=finished.error),)
        elif entry.target.all_databases and results and all(
                r.database != ALL_DATABASES_PLACEHOLDER for r in results):
            # The job listed the container's databases: one dropped since is no longer this target's
            # (its snapshots stay in the repository), and its series would read stale for ever.
            gone = sorted(set(entry.databases) - {r.database for r in results})
            if gone:
                self.registry.drop_databases(entry.container_id, gone)
                for database in gone:
                    self.metrics.forget_database(entry.name, database)
                log.info("databases_gone", target=entry.name, databases=",".join(gone))
        # A failure before the databases were known counts for every database known so far.
        known = sorted(entry.databases) or [ALL_DATABASES_PLACEHOLDER]
        results = tuple(
            replace(result, database=database) for result in results
            for database in (known if result.database == ALL_DATABASES_PLACEHOLDER else [result.database])
        )
        for result in results:
            self.metrics.observe_backup(entry.name, result.database, result.ok, result.duration_s,
                                        result.bytes_processed, result.bytes_added)
            if result.database == ALL_DATABASES_PLACEHOLDER:
                continue
            if result.ok:
                self.registry.set_database(entry.container_id, result.database,
                                           last_success=result.started_at, last_error=None)
            else:
                self.registry.set_database(entry.container_id, result.database,
                                           last_failure=result.started_at, last_error=result.error)
        if finished.snapshots is not None:
            self._apply_snapshots(finished.snapshots)
        ok = bool(results) and all(r.ok for r in results)
        failures = 0 if ok else entry.consecutive_failures + 1
        now = self.clock()
        when = next_run(entry.target.schedule, now, self.config.timezone)
        if not ok and not self.ctx.cancel.is_set():
            # A failed daily backup should not wait a day for its next attempt.
            retry = min(RETRY_BASE_SECONDS * 2 ** (failures - 1), RETRY_MAX_SECONDS)
            when = min(when, datetime.fromtimestamp(now.timestamp() + retry, UTC))
        error = next((r.error for r in results if not r.ok), None)
        self.registry.update(finished.container_id, running_job=False, consecutive_failures=failures,
                             last_error=error, next_run=when)
        if not self.ctx.cancel.is_set():
            # A backup we aborted ourselves at shutdown is not an incident to page about.
            done = next((r for r in results if r.ok and r.snapshot_id), None)
            self._alert(entry.name, Concern.BACKUP, ok,
                        error or (f"snapshot {done.snapshot_id[:8]} of {done.database}" if done and done.snapshot_id
                                  else ""))
        self._backed_up_since_prune.add(finished.container_id)

    def _apply_snapshots(self, snapshots: tuple[Snapshot, ...]) -> None:
        """Takes newer snapshots from a repository listing into the cache and the registry (never older ones)."""
        by_name = {entry.name: entry for entry in self.registry.view() if entry.target is not None}
        for key, snap in newest_by_database(snapshots).items():
            known = self._newest.get(key)
            if known is not None and known.time >= snap.time:
                continue
            self._newest[key] = snap
            container, database = key
            entry = by_name.get(container)
            if entry is not None and entry.target is not None and (
                    entry.target.all_databases or database in entry.target.databases):
                self.registry.set_database(entry.container_id, database, last_snapshot=snap.time,
                                           last_snapshot_id=snap.id)

    def _drills_finished(self, finished: JobFinished) -> None:
        if finished.error:
            log.error("drill_failed", error=finished.error)
        by_target: dict[str, list[DrillResult]] = {}
        for result in finished.drills:
            by_target.setdefault(result.target, []).append(result)
            self.metrics.observe_drill(result.target, result.database, result.ok, result.duration_s,
                                       result.finished_at.timestamp())
        if self.ctx.cancel.is_set():
            return
        for target, results in by_target.items():
            failed = [r for r in results if not r.ok]
            detail = "\n".join(f"{r.database}: {r.error}" for r in failed) or ", ".join(
                f"{r.database}: {len(r.tables)} tables, {sum(t.restored or 0 for t in r.tables)} rows" for r in results)
            self._alert(target, Concern.DRILL, not failed, detail)

    def _prune_finished(self, finished: JobFinished) -> None:
        result = finished.prune
        ok = result is not None and result.ok
        self.metrics.prunes.labels("success" if ok else "failure").inc()
        if not self.ctx.cancel.is_set():
            self._alert("repository", Concern.PRUNE, ok,
                        (result.error if result is not None else finished.error) or "retention applied")
        if result is not None and result.ok:
            self.metrics.prune_last_success.set(self.clock().timestamp())
            if result.repository_size is not None:
                self.metrics.repository_size.set(result.repository_size)
            if result.repository_snapshots is not None:
                self.metrics.repository_snapshots.set(result.repository_snapshots)
        elif finished.error:
            log.error("prune_failed", error=finished.error)

    def survey(self) -> None:
        """Fills the registry from the repository and a container list, without running anything."""
        self._load_repository_state(with_figures=False)
        self._reconcile("survey")

    def _load_repository_state(self, with_figures: bool = True) -> None:
        """Reads the newest snapshot of every (container, database) of this host, for catch-up and metrics."""
        try:
            snapshots = self.ctx.repository.snapshots(host=self.ctx.host)
        except ResticError as exc:
            log.error("snapshot_listing_failed", error=str(exc))
            return
        self._newest = newest_by_database(snapshots)
        if not with_figures:
            return
        size, count = repository_figures(self.ctx)
        if size is not None:
            self.metrics.repository_size.set(size)
        if count is not None:
            self.metrics.repository_snapshots.set(count)
        log.info("repository_read", snapshots=len(snapshots), histories=len(self._newest))
