"""Restore drills: prove that the latest snapshot of a database restores, in a throwaway container.

For each target and database: start a container from the source container's own image (same
PostgreSQL major, same extensions) with no network and the label backup-watcher.role=drill (never
a target), restore the latest snapshot into it, and check it:
- pg_restore finished without an error;
- every table of the dump exists after the restore, with exactly as many rows as the dump holds;
- a table that is non-empty in the live database is not empty in the restore;
- the database and its tables have the dump's owners, and the database its settings (ALTER DATABASE
  … SET). As a recovery on a fresh host does (`restore --host`), the roles the dump names that the
  drill container lacks (its entrypoint creates only POSTGRES_USER) are created first from the
  globals snapshot of the same pass, then the dump is restored with owners and grants. A role the
  globals lack too (pruned, or taken before it existed) makes the drill restore without owners and
  grants (`drill_without_owners` names the roles).
The container is always removed, also on failure or cancellation; one left by a crash is removed
by the next drill or start of a watcher of the same identity once its maker is gone
(watcher.drill_leftovers).

Here: the drill's course (Driller, PostgresDrill) and its result. The restore: watcher.drill_restore;
the checks: watcher.drill_checks; psql and the dump's pipelines in the container: watcher.drill_container.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from watcher import commands, engines, readiness, roles
from watcher.clock import SystemClock
from watcher.discovery import Credentials, Target
from watcher.docker_source import DockerSource, DockerUnavailable
from watcher.drill_checks import DrillChecks, ExpectedProperties, RowCounter, TableCheck
from watcher.drill_container import DrillContainer
from watcher.drill_leftovers import drill_labels, this_process
from watcher.drill_restore import DrillRestore
from watcher.engines.mariadb_drill import MariaDBDriller
from watcher.execute import ExecError, run_in_container
from watcher.jobs import PROBE_TIMEOUT_SECONDS, JobContext, JobError, new_run_id
from watcher.restic import ResticError, Snapshot

# RowCounter and TableCheck live in watcher.drill_checks; callers import them from here too.
__all__ = ["READY_TIMEOUT_SECONDS", "DrillResult", "Driller", "PostgresDrill", "RowCounter", "TableCheck"]

log = structlog.get_logger("watcher.drill")
# The throwaway container runs initdb first; it is no live database, so this is not WATCHER_READY_TIMEOUT.
READY_TIMEOUT_SECONDS = 180.0


@dataclass(frozen=True)
class DrillResult:
    """What one drill of one database found."""

    target: str
    database: str
    ok: bool
    run_id: str
    finished_at: datetime
    duration_s: float
    snapshot_id: str | None = None
    restore_duration_s: float | None = None
    tables: tuple[TableCheck, ...] = field(default_factory=tuple)
    error: str | None = None


class Driller:
    """Runs restore drills; built once, used by the `drill` command and the daemon. The drill of one
    database is a PostgresDrill, or a MariaDBDriller (watcher.engines.mariadb_drill), which use its
    `ctx`, `docker`, `owner` and `failed`."""

    def __init__(self, ctx: JobContext, docker: DockerSource) -> None:
        self.ctx = ctx
        self.docker = docker
        self.owner = this_process()  # named on each drill container: see watcher.drill_leftovers

    def drill_target(self, target: Target,
                     on_result: Callable[[DrillResult], None] | None = None) -> list[DrillResult]:
        """Drills the latest snapshot of every database of a target (none for engine=command, which has no
        drill: its backup is opaque to the watcher); never raises."""
        if target.engine == engines.COMMAND:
            log.info("drill_not_available", target=target.name, engine=target.engine)
            return []
        try:
            found = self.ctx.repository.snapshots(host=self.ctx.host, container=target.name, include_globals=True)
        except ResticError as exc:
            return [self.failed(target, "*", new_run_id(), time.monotonic(), None, str(exc))]
        latest: dict[str, Snapshot] = {}
        for snap in found:
            wanted = not snap.globals and (target.all_databases or snap.database in target.databases)
            if wanted and (snap.database not in latest or snap.time > latest[snap.database].time):
                latest[snap.database] = snap
        if not latest:
            return [self.failed(target, "*", new_run_id(), time.monotonic(), None,
                                f"no snapshot of {target.name} to drill")]
        results = []
        for database, snap in sorted(latest.items()):
            if self.ctx.cancel.is_set():
                break
            result = self.drill_database(target, database, snap, roles.globals_for(found, snap))
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results

    def drill_database(self, target: Target, database: str, snapshot: Snapshot,
                       globals_snapshot: Snapshot | None = None) -> DrillResult:
        """Restores one snapshot into a throwaway container, with the roles of `globals_snapshot` (the
        same pass's) created first as a recovery on a fresh host would, and checks it; returns its
        result, never raises."""
        if target.engine in (engines.MARIADB, engines.MYSQL):
            return MariaDBDriller(self).drill_database(target, database, snapshot, globals_snapshot)
        return PostgresDrill(self, target, database, snapshot).run(globals_snapshot)

    def failed(self, target: Target, database: str, run_id: str, started: float, snapshot: Snapshot | None,
               error: str, tables: tuple[TableCheck, ...] = (), restore_s: float | None = None) -> DrillResult:
        """Logs `drill_failed` and returns the failed result of the drill of `database` (`*`: of the whole
        target) that started at `started` (time.monotonic()), with `error` masked; never raises."""
        # The runner's messages are masked already; Docker's own (starting the throwaway container) are not.
        error = self.ctx.masker(error)
        duration = time.monotonic() - started
        log.error("drill_failed", target=target.name, database=database, run_id=run_id, error=error,
                  snapshot_id=snapshot.short_id if snapshot else None, duration_s=round(duration, 3))
        return DrillResult(target.name, database, False, run_id, datetime.now(UTC), duration,
                           snapshot.id if snapshot else None, restore_s, tables, error)


@dataclass(frozen=True)
class _Restored:
    """What a drill found in its container after the restore."""

    expected: ExpectedProperties
    restore_s: float
    tables: tuple[TableCheck, ...]
    property_problems: list[str]


class PostgresDrill:
    """One drill of one PostgreSQL database: a throwaway container of the target's own image started,
    waited for, restored into (watcher.drill_restore), checked (watcher.drill_checks), and always removed."""

    def __init__(self, driller: Driller, target: Target, database: str, snapshot: Snapshot) -> None:
        self.driller, self.ctx = driller, driller.ctx
        self.target, self.database, self.snapshot = target, database, snapshot
        self.run_id = new_run_id()
        self.started = time.monotonic()
        self.log = log.bind(target=target.name, database=database, run_id=self.run_id, snapshot_id=snapshot.short_id)
        self._password = secrets.token_urlsafe(24)
        self.masker = self.ctx.masker.with_secrets([self._password, target.credentials.password])
        self.creds = Credentials(user=target.credentials.user, database=database, password=None)
        self.name = f"bw-drill-{self.run_id}"

    def run(self, globals_snapshot: Snapshot | None) -> DrillResult:
        """Restores the snapshot into a throwaway container, with the roles of `globals_snapshot` created
        first, and checks it; returns the drill's result. Never raises for a failure of the drill (a
        JobError, DockerUnavailable or ExecError fails it); the container is removed in any case."""
        container_id: str | None = None
        self.log.info("drill_started", image=self.target.image)
        try:
            container_id = self.driller.docker.run_throwaway(
                self.target.image_id or self.target.image, self.name,
                env={"POSTGRES_USER": self.creds.user, "POSTGRES_PASSWORD": self._password,
                     "POSTGRES_DB": self.database},
                labels=drill_labels(self.target.name, self.ctx.host, self.driller.owner),
                init=self.target.init,
            )
            restored = self._restore_and_check(container_id, globals_snapshot)
        except (JobError, DockerUnavailable, ExecError) as exc:
            return self._failed(str(exc))
        finally:
            if container_id is not None:
                self._remove(container_id)
        return self._verdict(restored)

    def _restore_and_check(self, container_id: str, globals_snapshot: Snapshot | None) -> _Restored:
        """Waits for the container, restores into it and checks it; returns what the checks found, raises
        JobError, DockerUnavailable or ExecError."""
        self._wait_ready(container_id)
        container = DrillContainer(self.ctx, container_id, self.creds, self.masker)
        restore_started = time.monotonic()
        expected = DrillRestore(container).restore(self.snapshot, globals_snapshot)
        restore_s = time.monotonic() - restore_started
        checks = DrillChecks(container)
        tables = checks.table_checks(self.target, self.snapshot, self.database)
        return _Restored(expected, restore_s, tables, checks.property_problems(expected))

    def _verdict(self, restored: _Restored) -> DrillResult:
        """Returns the drill's result from what its checks found, and logs it."""
        tables = restored.tables
        problems = [check.problem for check in tables if check.problem] + restored.property_problems
        if problems:
            return self._failed("restored data does not match the dump: " + "; ".join(problems[:10]),
                                tables, restored.restore_s)
        expected, restore_s = restored.expected, restored.restore_s
        duration = time.monotonic() - self.started
        self.log.info("drill_succeeded", duration_s=round(duration, 3), restore_duration_s=round(restore_s, 3),
                      tables=len(tables), rows=sum(t.restored or 0 for t in tables),
                      database_owner=expected.owner, database_settings=list(expected.settings),
                      table_owners=sorted(set(expected.table_owners.values())),
                      counts={t.table: t.restored for t in tables})
        return DrillResult(self.target.name, self.database, True, self.run_id, datetime.now(UTC), duration,
                           self.snapshot.id, restore_s, tables)

    def _failed(self, error: str, tables: tuple[TableCheck, ...] = (), restore_s: float | None = None) -> DrillResult:
        """Logs `drill_failed` and returns this drill's failed result."""
        return self.driller.failed(self.target, self.database, self.run_id, self.started, self.snapshot, error,
                                   tables, restore_s)

    def _remove(self, container_id: str) -> None:
        """Removes the drill container; logs `drill_cleanup_failed` instead of raising (watcher.drill_leftovers
        removes it later)."""
        try:
            self.driller.docker.remove(container_id)
        except DockerUnavailable as exc:
            self.log.error("drill_cleanup_failed", container=self.name, error=str(exc))

    def _wait_ready(self, container_id: str) -> None:
        """Waits until the drill container's final server serves (not PID 1's name: see watcher.readiness);
        raises JobError when it does not within READY_TIMEOUT_SECONDS or the drill is cancelled."""
        creds = self.creds

        def probe() -> readiness.Answer | str:
            try:
                # No stdin: a proxy that cannot carry an exec's input (HAProxy 2.4 to 3.0) must fail
                # the drill at its restore, at once, not hold it in this wait for the whole bound.
                done = run_in_container(self.ctx.docker_host, container_id,
                                        commands.psql_query_command(readiness.probe_sql(creds.database)),
                                        env=commands.pg_env(creds.user, "postgres"), masker=self.ctx.masker,
                                        timeout=PROBE_TIMEOUT_SECONDS, cancel=self.ctx.cancel)
            except ExecError as exc:
                return str(exc)
            if not done.ok:
                return done.describe_failure()
            output = done.stdout.decode(errors="replace")
            return readiness.parse_probe(output) or f"unexpected answer {output[:80]!r}"

        try:
            readiness.wait_until_serving(probe, bound_s=READY_TIMEOUT_SECONDS, clock=SystemClock(),
                                         cancel=self.ctx.cancel, interval_s=0.5)
        except readiness.NotServing as exc:
            raise JobError(f"the drill container did not become ready: {exc}") from exc
