"""The launcher: runs the daemon's jobs on a bounded pool and hands each one's end back as a message.

A job never raises into the loop: whatever it returns or raises becomes its own finished-message
(a crash fails the job with the exception's text), put on the loop's queue through `deliver`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import assert_never

import structlog

from watcher import commands
from watcher.copyjob import CopyTarget, run_copy
from watcher.daemon.messages import (
    BackupFinished,
    CopyFinished,
    DrillsFinished,
    JobFinished,
    ProbeFinished,
    PruneFinished,
    RefreshFinished,
    RetagFinished,
)
from watcher.daemon.running import BackupJob, CopyJob, DrillJob, Job, ProbeJob, PruneJob, RefreshJob, RetagJob
from watcher.docker_source import DockerSource
from watcher.drill import Driller, DrillResult
from watcher.drill_leftovers import remove_leftovers
from watcher.jobs import JobContext, JobError, backup_target, wait_until_serving
from watcher.restic import ResticError, Snapshot, repository_lock_problem, restic_error_text
from watcher.retention import apply_retention

log = structlog.get_logger("watcher.daemon")
# How long a retag may run once it holds the lock (its wait for the lock, WATCHER_LOCK_RETRY, comes on top).
RETAG_TIMEOUT_SECONDS = 3600
# Probes of PostgreSQL run on a pool of their own, beside the backups' slots: this many wait at once (a
# probe mostly sleeps between pg_isready execs); more queue there without delaying any backup.
PROBE_WORKERS = 4


class Launcher:
    """Starts jobs; `deliver` receives each job's finished-message, on the job's thread."""

    def __init__(self, ctx: JobContext, docker: DockerSource, concurrency: int,
                 deliver: Callable[[JobFinished], None], *, copies: Mapping[str, CopyTarget] | None = None,
                 init_copies: bool = False) -> None:
        self.ctx = ctx
        self.driller = Driller(ctx, docker)
        self._deliver = deliver
        self._pool = ThreadPoolExecutor(max_workers=concurrency + 1, thread_name_prefix="job")
        self._probes = ThreadPoolExecutor(max_workers=PROBE_WORKERS, thread_name_prefix="probe")
        self.copies = dict(copies or {})
        self._init_copies = init_copies
        # Copies run on threads of their own: one waiting on an unreachable backend holds no backup's thread.
        self._copy_pool = ThreadPoolExecutor(max_workers=max(1, len(self.copies)), thread_name_prefix="copy")

    def launch(self, job: Job) -> None:
        """Starts one job on the pool (a drill slot with no target to drill starts nothing)."""
        match job:
            case BackupJob(container_id=container_id):
                self._submit("backup", lambda: self._backup(job), lambda error: BackupFinished(container_id,
                                                                                                 error=error))
            case ProbeJob(container_id=container_id):
                self._submit("probe", lambda: self._probe(job), lambda error: ProbeFinished(container_id, False, error),
                             pool=self._probes)
            case RetagJob(container_id=container_id, renames=renames):
                self._submit("retag", lambda: self._retag(job), lambda error: RetagFinished(container_id, renames,
                                                                                              error=error))
            case DrillJob(targets=targets):
                if targets:
                    self._submit("drill", lambda: self._drill(job), lambda error: DrillsFinished(error=error))
            case PruneJob(targets=targets):
                self._submit("prune", lambda: PruneFinished(apply_retention(self.ctx, targets)),
                             lambda error: PruneFinished(error=error))
            case RefreshJob():
                self._submit("refresh", self._refresh, lambda error: RefreshFinished(error=error))
            case CopyJob(copy=copy):
                self._submit("copy", lambda: CopyFinished(copy, run_copy(self.ctx, self.copies[copy],
                                                                         init=self._init_copies)),
                             lambda error: CopyFinished(copy, error=error), pool=self._copy_pool)
            case _:
                assert_never(job)

    def shutdown(self) -> None:
        """Waits for every running job to end."""
        self._pool.shutdown(wait=True)
        self._probes.shutdown(wait=True)
        self._copy_pool.shutdown(wait=True)

    def _submit(self, kind: str, work: Callable[[], JobFinished], crashed: Callable[[str], JobFinished],
                pool: ThreadPoolExecutor | None = None) -> None:
        def guarded() -> JobFinished:
            try:
                return work()
            except Exception as exc:
                log.exception("job_crashed", kind=kind)
                return crashed(self.ctx.masker(f"{type(exc).__name__}: {exc}"))

        future: Future[JobFinished] = (pool or self._pool).submit(guarded)
        future.add_done_callback(lambda done: self._deliver(done.result()))

    def _probe(self, job: ProbeJob) -> ProbeFinished:
        """Waits for the target's PostgreSQL (a probe each second) up to the job's bound."""
        log.info("postgres_probe_started", target=job.target.name, wait_s=round(job.wait_s, 1))
        try:
            wait_until_serving(self.ctx, job.target, job.wait_s)
        except JobError as exc:
            return ProbeFinished(job.container_id, False, str(exc))
        return ProbeFinished(job.container_id, True)

    def _backup(self, job: BackupJob) -> BackupFinished:
        results = backup_target(self.ctx, job.target, ready=job.ready)
        # What the repository now holds follows from the results (the watcher sets each snapshot's
        # time): no listing, which would open the repository a second time per backup.
        snapshots = tuple(
            Snapshot(id=r.snapshot_id, short_id=r.snapshot_id[:8], time=r.snapshot_time, host=self.ctx.host,
                     container=job.target.name, database=r.database, bytes=r.bytes_processed,
                     globals=r.database == commands.GLOBALS_DATABASE)
            for r in results if r.ok and r.snapshot_id is not None and r.snapshot_time is not None)
        return BackupFinished(job.container_id, tuple(results), snapshots)

    def _retag(self, job: RetagJob) -> RetagFinished:
        repository = self.ctx.repository
        for old_name, new_name in job.renames:
            argv = commands.with_lock_wait(commands.restic_retag(
                repository.binary, host=self.ctx.host, old_name=old_name, new_name=new_name),
                self.ctx.bounds.lock_retry_s)
            done = repository.run(argv, timeout=RETAG_TIMEOUT_SECONDS + self.ctx.bounds.lock_retry_s,
                                  cancel=self.ctx.cancel)
            if not done.ok:
                error = restic_error_text(done.stderr_tail.splitlines()) or done.describe_failure()
                if hint := repository_lock_problem(done.returncode, error, self.ctx.bounds.lock_retry_s):
                    error = f"{hint}\n{error}"
                return RetagFinished(job.container_id, job.renames,
                                     error=f"moving history of {old_name} to {new_name} failed: {error}")
            log.info("history_renamed", target=new_name, old_name=old_name)
        return RetagFinished(job.container_id, job.renames)

    def _drill(self, job: DrillJob) -> DrillsFinished:
        """One job drills every eligible target in turn: drills never run two at a time. It first removes the
        drill containers of this identity whose makers are gone (one a one-shot `drill` elsewhere left)."""
        remove_leftovers(self.driller.docker, self.ctx.host)
        results: list[DrillResult] = []
        for target in job.targets:
            if self.ctx.cancel.is_set():
                break
            results.extend(self.driller.drill_target(target))
        return DrillsFinished(tuple(results))

    def _refresh(self) -> RefreshFinished:
        """One listing of every host's snapshots: this host's for the registry, the count for the metric."""
        try:
            everything = self.ctx.repository.snapshots(include_globals=True)
        except ResticError as exc:
            return RefreshFinished(error=str(exc))
        mine = tuple(snap for snap in everything if snap.host == self.ctx.host)
        for snapshot in mine:  # oldest first: the newest of each history stays
            self.ctx.progress.expect(snapshot.container, snapshot.database, snapshot.bytes)
        return RefreshFinished(snapshots=mine, repository_snapshots=len(everything))
