"""The daemon's loop: one thread that owns the registry and the book of jobs.

Each step handles one message (a container event, the stream's state, a finished job), then, unless
stopping, reconciles when due, starts what the scheduler plans and judges staleness. Other threads
only put messages on the queue. A signal handler only counts signals; the loop then stops starting
work, lets running jobs finish within the grace period and then aborts them (restic writes no
snapshot for an aborted dump); a second signal aborts at once. `run` returns 0.
"""

from __future__ import annotations

import queue
from dataclasses import replace
from typing import assert_never

import structlog

from alerting.policy import AlertPolicy
from watcher.clock import Clock
from watcher.config import Config
from watcher.copies import CopyTurn, after_backup, after_copy, first_turn, started
from watcher.copyjob import CopyTarget
from watcher.daemon.inventory import Inventory
from watcher.daemon.launcher import Launcher
from watcher.daemon.messages import (
    BackupFinished,
    Change,
    CopyFinished,
    DrillsFinished,
    Message,
    ProbeFinished,
    PruneFinished,
    RefreshFinished,
    RefreshRequested,
    RetagFinished,
)
from watcher.daemon.outcomes import Outcomes, Pager
from watcher.daemon.running import BackupJob, Book, CopyJob, Job, RefreshJob, RetagJob
from watcher.daemon.scheduler import View, held, plan
from watcher.discovery import DiscoveryRules
from watcher.docker_source import DockerSource
from watcher.drill_leftovers import remove_leftovers
from watcher.events import ContainerEvent, EventStream, StreamConnected, StreamDisconnected
from watcher.jobs import JobContext
from watcher.metrics import Metrics
from watcher.registry import Registry
from watcher.restic import ResticError
from watcher.retention import clear_stale_locks, repository_figures
from watcher.schedule import next_run
from watcher.status import status_rows

log = structlog.get_logger("watcher.daemon")
LOOP_TICK_SECONDS = 0.2
HEALTHY_HEARTBEAT_SECONDS = 60.0
# Staleness is judged this often, and at least as often as the daemon reconciles.
HEALTH_CHECK_SECONDS = 15.0


class Daemon:
    """The long-running loop of `backup-watcher run`."""

    def __init__(self, *, config: Config, docker: DockerSource, ctx: JobContext, registry: Registry,
                 metrics: Metrics, clock: Clock, policy: AlertPolicy | None = None,
                 notifier: Pager | None = None) -> None:
        self.config, self.docker, self.ctx, self.registry, self.clock = config, docker, ctx, registry, clock
        self._queue: queue.Queue[Message] = queue.Queue()
        rules = DiscoveryRules(config.container_patterns, config.schedule, config.retention)
        self.inventory = Inventory(docker, rules, registry, clock, config.timezone, ctx.masker,
                                   shrink_threshold=config.shrink_threshold)
        self.outcomes = Outcomes(registry=registry, metrics=metrics, clock=clock, timezone=config.timezone,
                                 policy=policy or AlertPolicy(), masker=ctx.masker, host=ctx.host,
                                 docker_host=ctx.docker_host, cancel=ctx.cancel, notifier=notifier,
                                 copies=config.copies)
        copies = {spec.name: CopyTarget.of(spec, ctx.repository, config.restic_env) for spec in config.copies}
        self.launcher = Launcher(ctx, docker, config.concurrency, self._queue.put, copies=copies,
                                 init_copies=config.init_repository)
        self.copy_turns: dict[str, CopyTurn] = {spec.name: first_turn(clock.now()) for spec in config.copies}
        self._events = EventStream(docker.docker_host, self._queue.put)
        self.book = Book()
        self._stop_signals = 0
        self._stopping_since: float | None = None
        self._last_reconcile: float | None = None
        self._last_health_check: float | None = None
        self._held: frozenset[str] = frozenset()
        self._refresh_wanted = False
        self.heartbeat = clock.monotonic()

    def request_stop(self) -> None:
        """Asks the loop to stop (called from a signal handler: it only counts)."""
        self._stop_signals += 1

    def request_refresh(self) -> None:
        """Asks the loop to list the repository again soon (from the HTTP thread: it only queues)."""
        self._queue.put(RefreshRequested())

    def health(self) -> tuple[bool, str]:
        """(healthy, detail) for /healthz (another thread): the loop is alive; the stream is up or reconnecting."""
        age = self.clock.monotonic() - self.heartbeat
        stream = "connected" if self.outcomes.events_connected else "reconnecting"
        if age > HEALTHY_HEARTBEAT_SECONDS:
            return False, f"loop stalled for {age:.0f}s; event stream {stream}\n"
        return True, f"ok; event stream {stream}\n"

    def status(self) -> list[dict[str, object]]:
        """The status rows of every watched container (for /status)."""
        copies = self.outcomes.copies
        return status_rows(self.registry.view(), self.clock.now(), self.ctx.progress.running(),
                           {name: copies.progress(name) for name in copies.specs})

    def run(self) -> int:
        """Runs until stopped by a signal; returns the exit code (0)."""
        log.info("daemon_started", host=self.ctx.host, concurrency=self.config.concurrency,
                 schedule=self.config.schedule, timezone=self.config.timezone)
        # Subscribe first: events that arrive while the repository is read wait in the queue.
        self._events.start()
        remove_leftovers(self.docker, self.ctx.host)
        clear_stale_locks(self.ctx)
        if not self.config.prune:
            log.info("prune_disabled", reason="WATCHER_PRUNE=false: this host never forgets or prunes; retention "
                                              "is left to another host (`backup-watcher prune` there)")
        self._read_repository()
        if self.config.drill_schedule:
            next_drill = next_run(self.config.drill_schedule, self.clock.now(), self.config.timezone)
            self.book = replace(self.book, next_drill=next_drill)
            log.info("drills_scheduled", next_drill=next_drill.isoformat())
        log.info("watching", reconcile_interval_s=self.config.reconcile_interval_s)
        while True:
            self.heartbeat = self.clock.monotonic()
            if self._stop_signals and self._shutdown_step():
                break
            self._step()
        self._events.stop()
        self.launcher.shutdown()
        log.info("daemon_stopped")
        return 0

    def _step(self) -> None:
        try:
            message: Message | None = self._queue.get(timeout=LOOP_TICK_SECONDS)
        except queue.Empty:
            message = None
        if message is not None:
            self._handle(message)
        if self._stopping_since is not None:
            return
        now = self.clock.monotonic()
        if self._last_reconcile is None or now - self._last_reconcile >= self.config.reconcile_interval_s:
            self._reconcile("periodic")
            self._refresh_wanted = True
        if self._refresh_wanted and not self.book.refresh:
            # One listing at a time; a request during one is served by the next, which sees its change.
            self._refresh_wanted = False
            self._start(RefreshJob())
        self._start_planned_jobs()
        if self._last_health_check is None or now - self._last_health_check >= min(
                HEALTH_CHECK_SECONDS, self.config.reconcile_interval_s):
            self._last_health_check = now
            self.outcomes.check_health()

    def _shutdown_step(self) -> bool:
        """Advances the shutdown; returns True when nothing runs any more and the loop may end."""
        now = self.clock.monotonic()
        if self._stopping_since is None:
            self._stopping_since = now
            log.info("shutdown_requested", running_backups=len(self.book.backups),
                     grace_s=self.config.shutdown_grace_s)
        if not self.ctx.cancel.is_set() and not self.book.idle and (
                self._stop_signals >= 2 or now - self._stopping_since >= self.config.shutdown_grace_s):
            log.warning("shutdown_aborting_jobs", running_backups=len(self.book.backups),
                        reason="second signal" if self._stop_signals >= 2 else "grace period over")
            self.ctx.cancel.set()
        return self.book.idle

    def _handle(self, message: Message) -> None:
        match message:
            case ContainerEvent(action=action):
                self.outcomes.event_seen(action)
                self._note(self.inventory.event(message))
            case StreamConnected():
                self.outcomes.stream_changed(True)
                self._reconcile("event stream connected")
            case StreamDisconnected():
                self.outcomes.stream_changed(False)
            case RefreshRequested():
                self._refresh_wanted = True
            case (BackupFinished() | ProbeFinished() | PruneFinished() | DrillsFinished() | RefreshFinished()
                  | RetagFinished() | CopyFinished()):
                self.book = self.book.finished(message)
                self._turn_copies(message)
                snapshots = self.outcomes.job_finished(message)
                self.inventory.take_snapshots(snapshots)
                # A listing is the whole of this host's snapshots (an `ack` shows there); a backup's are new ones.
                self._note(self.inventory.judge_sizes(snapshots, complete=isinstance(message, RefreshFinished)))
            case _:
                assert_never(message)

    def _turn_copies(self, message: Message) -> None:
        """When each copy runs next, after a backup (the pass's snapshots are to reach it) or its own run."""
        now = self.clock.now()
        for spec in self.config.copies:
            turn = self.copy_turns[spec.name]
            if isinstance(message, BackupFinished) and message.snapshots:
                self.copy_turns[spec.name] = after_backup(turn, spec.schedule, now)
            elif isinstance(message, CopyFinished) and message.copy == spec.name:
                ok = message.result is not None and message.result.ok
                self.copy_turns[spec.name] = after_copy(turn, ok, spec.schedule, self.config.timezone, now)

    def _note(self, changes: list[Change]) -> None:
        for change in changes:
            self.book = self.book.noted(change)
            self.outcomes.noted(change)

    def _reconcile(self, reason: str) -> None:
        self._last_reconcile = self.clock.monotonic()
        changes = self.inventory.reconcile(reason)
        if changes is not None:
            self._note(changes)
            self.outcomes.reconciled()

    def _start_planned_jobs(self) -> None:
        view = View(self.registry.view(), self.config.concurrency, self.config.timezone, self.config.drill_schedule,
                    prune=self.config.prune, ready_timeout_s=self.config.ready_timeout_s,
                    copy_turns=dict(self.copy_turns))
        now = self.clock.now()
        for job in plan(view, self.book, now):
            self._start(job)
        waiting = frozenset(entry.name for entry in held(view, self.book, now))
        for name in sorted(waiting - self._held):
            log.info("backup_held", target=name, reason="the history of this name still moves to a renamed container")
        self._held = waiting

    def _start(self, job: Job) -> None:
        self.book = self.book.started(job)
        if isinstance(job, BackupJob | RetagJob):
            self.registry.mark_running(job.container_id)
        if isinstance(job, CopyJob):
            self.copy_turns[job.copy] = started(self.copy_turns[job.copy])
        self.launcher.launch(job)

    def _read_repository(self) -> None:
        """Reads the newest snapshot of every (container, database) of this host, for catch-up and metrics."""
        try:
            snapshots = self.ctx.repository.snapshots(host=self.ctx.host, include_globals=True)
        except ResticError as exc:
            log.error("snapshot_listing_failed", error=str(exc))
            return
        log.info("repository_read", snapshots=len(snapshots), histories=self.inventory.load(snapshots))
        self._note(self.inventory.judge_sizes(snapshots, complete=True, at_start=True))
        self.outcomes.upkeep.repository_figures(*repository_figures(self.ctx))
