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
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from watcher import commands, dbproperties, engines, readiness, roles
from watcher.clock import SystemClock
from watcher.discovery import Credentials, Target
from watcher.docker_source import DockerSource, DockerUnavailable
from watcher.drill_leftovers import drill_labels, this_process
from watcher.engines.mariadb_drill import MariaDBDriller
from watcher.execute import Completed, ExecError, Masker, run_in_container, run_pipeline
from watcher.jobs import (
    PROBE_TIMEOUT_SECONDS,
    JobContext,
    JobError,
    lock_wait_of,
    lock_wait_problem,
    new_run_id,
    run_on_live,
)
from watcher.progress import first_writer
from watcher.restic import ResticError, Snapshot, restic_error_text

log = structlog.get_logger("watcher.drill")
# The throwaway container runs initdb first; it is no live database, so this is not WATCHER_READY_TIMEOUT.
READY_TIMEOUT_SECONDS = 180.0
DRILL_TIMEOUT_SECONDS = 12 * 3600.0
_COPY = re.compile(r"^COPY (.+?) (?:\(.*\) )?FROM stdin;$")


@dataclass(frozen=True)
class TableCheck:
    """One table: rows in the dump, rows after the restore, and whether the live table has rows."""

    table: str
    in_dump: int
    restored: int | None
    live_nonempty: bool | None

    @property
    def problem(self) -> str | None:
        """Why this table fails the check, or None."""
        if self.restored is None:
            return f"{self.table}: missing after the restore"
        if self.restored != self.in_dump:
            return f"{self.table}: {self.restored} rows restored, the dump holds {self.in_dump}"
        if self.live_nonempty and self.restored == 0:
            return f"{self.table}: empty in the restore but not in the live database"
        return None


@dataclass(frozen=True)
class ExpectedProperties:
    """What a restored database must show of its dump's database-level properties."""

    owner: str
    settings: tuple[str, ...]  # names of the database's own settings (ALTER DATABASE … SET)
    table_owners: dict[str, str] = field(default_factory=dict)  # "schema.table" → owner


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


class RowCounter:
    """Counts the rows of each COPY block of `pg_restore --data-only` text, line by line, so a large
    dump never sits in memory (COPY text escapes newlines: one line is one row)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._current: str | None = None

    def __call__(self, line: str) -> None:
        if self._current is None:
            match = _COPY.match(line)
            if match:
                self._current = match.group(1)
                self.counts.setdefault(self._current, 0)
        elif line == "\\.":
            self._current = None
        else:
            self.counts[self._current] += 1


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Driller:
    """Runs restore drills; built once, used by the `drill` command and the daemon."""

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
            return [self._failed(target, "*", new_run_id(), time.monotonic(), None, str(exc))]
        latest: dict[str, Snapshot] = {}
        for snap in found:
            wanted = not snap.globals and (target.all_databases or snap.database in target.databases)
            if wanted and (snap.database not in latest or snap.time > latest[snap.database].time):
                latest[snap.database] = snap
        if not latest:
            return [self._failed(target, "*", new_run_id(), time.monotonic(), None,
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

    def _failed(self, target: Target, database: str, run_id: str, started: float, snapshot: Snapshot | None,
                error: str, tables: tuple[TableCheck, ...] = (), restore_s: float | None = None) -> DrillResult:
        # The runner's messages are masked already; Docker's own (starting the throwaway container) are not.
        error = self.ctx.masker(error)
        duration = time.monotonic() - started
        log.error("drill_failed", target=target.name, database=database, run_id=run_id, error=error,
                  snapshot_id=snapshot.short_id if snapshot else None, duration_s=round(duration, 3))
        return DrillResult(target.name, database, False, run_id, datetime.now(UTC), duration,
                           snapshot.id if snapshot else None, restore_s, tables, error)

    def drill_database(self, target: Target, database: str, snapshot: Snapshot,
                       globals_snapshot: Snapshot | None = None) -> DrillResult:
        """Restores one snapshot into a throwaway container, with the roles of `globals_snapshot` (the
        same pass's) created first as a recovery on a fresh host would, and checks it; never raises."""
        if target.engine in (engines.MARIADB, engines.MYSQL):
            return MariaDBDriller(self).drill_database(target, database, snapshot, globals_snapshot)
        run_id = new_run_id()
        started = time.monotonic()
        bound = log.bind(target=target.name, database=database, run_id=run_id, snapshot_id=snapshot.short_id)
        password = secrets.token_urlsafe(24)
        masker = self.ctx.masker.with_secrets([password, target.credentials.password])
        creds = Credentials(user=target.credentials.user, database=database, password=None)
        name = f"bw-drill-{run_id}"
        container_id: str | None = None
        bound.info("drill_started", image=target.image)
        try:
            container_id = self.docker.run_throwaway(
                target.image_id or target.image, name,
                env={"POSTGRES_USER": creds.user, "POSTGRES_PASSWORD": password, "POSTGRES_DB": database},
                labels=drill_labels(target.name, self.ctx.host, self.owner),
                init=target.init,
            )
            self._wait_ready(container_id, creds)
            restore_started = time.monotonic()
            expected = self._restore(container_id, creds, snapshot, globals_snapshot, masker)
            restore_s = time.monotonic() - restore_started
            tables = self._check(container_id, creds, target, snapshot, database, masker)
            property_problems = self._check_properties(container_id, creds, expected)
        except (JobError, DockerUnavailable, ExecError) as exc:
            return self._failed(target, database, run_id, started, snapshot, str(exc))
        finally:
            if container_id is not None:
                try:
                    self.docker.remove(container_id)
                except DockerUnavailable as exc:
                    bound.error("drill_cleanup_failed", container=name, error=str(exc))
        problems = [check.problem for check in tables if check.problem] + property_problems
        if problems:
            return self._failed(target, database, run_id, started, snapshot,
                                "restored data does not match the dump: " + "; ".join(problems[:10]),
                                tables, restore_s)
        duration = time.monotonic() - started
        bound.info("drill_succeeded", duration_s=round(duration, 3), restore_duration_s=round(restore_s, 3),
                   tables=len(tables), rows=sum(t.restored or 0 for t in tables),
                   database_owner=expected.owner, database_settings=list(expected.settings),
                   table_owners=sorted(set(expected.table_owners.values())),
                   counts={t.table: t.restored for t in tables})
        return DrillResult(target.name, database, True, run_id, datetime.now(UTC), duration, snapshot.id,
                           restore_s, tables)

    def _wait_ready(self, container_id: str, creds: Credentials) -> None:
        """Waits until the drill container's final server serves (not PID 1's name: see watcher.readiness);
        raises JobError when it does not within READY_TIMEOUT_SECONDS or the drill is cancelled."""
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

    def _restore(self, container_id: str, creds: Credentials, snapshot: Snapshot,
                 globals_snapshot: Snapshot | None, masker: Masker) -> ExpectedProperties:
        """Restores the snapshot into the drill container as a recovery on a fresh host does: the roles
        its objects and grants name are created from the globals snapshot of the same pass, the dump is
        restored with owners and grants, then the database's owner, settings, ACL and comment are set.
        A role that neither the container nor the globals have (globals pruned, or taken before the
        role existed) makes the drill restore without owners and grants (`drill_without_owners`).

        Returns what the restored database must then show; raises JobError.
        """
        database = snapshot.database
        env = {**self.ctx.repository.env, "DOCKER_HOST": self.ctx.docker_host}
        try:
            props = dbproperties.read_properties(
                restic=self.ctx.repository.binary, snapshot_id=snapshot.id, database=database,
                container_id=container_id, user=creds.user, env=env, masker=masker,
                timeout=DRILL_TIMEOUT_SECONDS, cancel=self.ctx.cancel)
        except dbproperties.PropertiesUnreadable as exc:
            raise JobError(f"restore of snapshot {snapshot.short_id} failed: {exc}") from exc
        have = self._roles_from_globals(container_id, creds, props.roles, globals_snapshot, masker)
        missing = sorted(props.roles - have)
        if missing:
            log.info("drill_without_owners", snapshot_id=snapshot.short_id, database=database,
                     missing_roles=missing[:20],
                     globals_snapshot=globals_snapshot.short_id if globals_snapshot else None)
        restorer = commands.exec_helper(container_id, commands.pg_restore_command(database, keep_owners=not missing),
                                        stdin=True, env_values=commands.pg_env(creds.user, database))
        dump = commands.restic_dump(self.ctx.repository.binary, snapshot.id, database)
        with self.ctx.progress.track("drill", snapshot.container, database, total=snapshot.bytes) as tracker:
            done = run_pipeline_checked(self.ctx, [dump, restorer], env, masker, on_tick=first_writer(tracker))
        if done is not None:
            raise JobError(f"restore of snapshot {snapshot.short_id} failed: {done}")
        try:
            script = props.script(database, existing_roles=have)
        except ValueError as exc:
            raise JobError(str(exc)) from exc
        if script:
            self._drill_query(container_id, creds, "BEGIN;\n" + script + "COMMIT;\n")
        owner = props.owner if props.owner in have else creds.user
        table_owners = {table: (owner_ if not missing else creds.user) for table, owner_ in props.table_owners.items()}
        return ExpectedProperties(owner, tuple(props.setting_names()), table_owners)

    def _roles_from_globals(self, container_id: str, creds: Credentials, needed: set[str],
                            globals_snapshot: Snapshot | None, masker: Masker) -> set[str]:
        """Creates the `needed` roles that the drill container lacks and the globals snapshot has (with
        their attributes, passwords, memberships and settings, as `restore --host` does); returns the
        roles the container then has. Raises JobError when the globals cannot be read or applied: a
        fresh-host recovery from this pass would fail the same way."""
        have = set(self._drill_query(container_id, creds, "SELECT rolname FROM pg_roles;\n").split("\n")) - {""}
        if globals_snapshot is None or needed <= have:
            return have
        maker = roles.RoleMaker(self.ctx.docker_host, self.ctx.repository, masker, self.ctx.bounds, self.ctx.cancel)
        try:
            globals_ = maker.read_globals(globals_snapshot)
            plan = roles.plan_roles(needed & (have | set(globals_.roles)), have, globals_,
                                    source=f"globals snapshot {globals_snapshot.short_id}")
            maker.create(plan, container_id, f"drill of {globals_snapshot.container}", creds)
        except roles.RoleError as exc:
            raise JobError(f"creating the roles from globals snapshot {globals_snapshot.short_id} failed: "
                           f"{exc}") from exc
        return have | set(plan.create)

    def _drill_query(self, container_id: str, creds: Credentials, script: str,
                     variables: dict[str, str] | None = None, database: str = "postgres") -> str:
        """Runs a script in the drill container (no other session there); returns its output, raises JobError."""
        done = run_in_container(self.ctx.docker_host, container_id, commands.psql_script_command(variables or {}),
                                env=commands.pg_env(creds.user, database), masker=self.ctx.masker,
                                timeout=DRILL_TIMEOUT_SECONDS, cancel=self.ctx.cancel, stdin=script.encode())
        if not done.ok:
            raise JobError(f"psql in the drill container failed: {done.describe_failure()}")
        return done.stdout.decode(errors="replace")

    def _check_properties(self, container_id: str, creds: Credentials, expected: ExpectedProperties) -> list[str]:
        """Why the restored database's owner, settings or tables' owners differ from the dump's, or
        nothing; raises JobError."""
        found = _pairs_of(self._drill_query(container_id, creds, (
            "SELECT 'owner', pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = :'db'\n"
            "UNION ALL SELECT 'settings', coalesce(string_agg(split_part(s, '=', 1), ','), '')\n"
            "  FROM pg_db_role_setting, unnest(setconfig) AS s\n"
            "  WHERE setrole = 0 AND setdatabase = (SELECT oid FROM pg_database WHERE datname = :'db');\n"
        ), {"db": creds.database}))
        problems = []
        if found.get("owner") != expected.owner:
            problems.append(f"database owner: {found.get('owner')} after the restore, the dump has {expected.owner}")
        settings = sorted(filter(None, found.get("settings", "").split(",")))
        if settings != sorted(expected.settings):
            problems.append(f"database settings: {', '.join(settings) or 'none'} after the restore, "
                            f"the dump has {', '.join(sorted(expected.settings)) or 'none'}")
        return problems + self._check_table_owners(container_id, creds, expected.table_owners)

    def _check_table_owners(self, container_id: str, creds: Credentials, expected: dict[str, str]) -> list[str]:
        """Why restored tables' owners differ from the dump's, or nothing; raises JobError."""
        if not expected:
            return []
        found = _pairs_of(self._drill_query(container_id, creds, (
            "SELECT n.nspname || '.' || c.relname, pg_get_userbyid(c.relowner)\n"
            "  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p');\n"
        ), database=creds.database))
        return [f"owner of table {table}: {found.get(table, 'no such table')} after the restore, the dump has {owner}"
                for table, owner in sorted(expected.items()) if found.get(table) != owner][:10]

    def _check(self, container_id: str, creds: Credentials, target: Target, snapshot: Snapshot, database: str,
               masker: Masker) -> tuple[TableCheck, ...]:
        env = {**self.ctx.repository.env, "DOCKER_HOST": self.ctx.docker_host}
        counter = RowCounter()
        as_text = commands.exec_helper(container_id, commands.pg_restore_data_as_text_command(), stdin=True,
                                       env_values=commands.pg_env(creds.user, database))
        dump = commands.restic_dump(self.ctx.repository.binary, snapshot.id, database)
        failure = run_pipeline_checked(self.ctx, [dump, as_text], env, masker, on_stdout_line=counter)
        if failure is not None:
            raise JobError(f"reading the dump of snapshot {snapshot.short_id} failed: {failure}")
        in_dump = counter.counts
        if not in_dump:
            return ()
        restored = self._restored_counts(container_id, creds, database, list(in_dump))
        live = self._live_nonempty(target, database, list(in_dump))
        return tuple(
            TableCheck(table, rows, int(restored[table]) if table in restored else None,
                       (live[table] == "t") if table in live else None)
            for table, rows in sorted(in_dump.items())
        )

    def _restored_counts(self, container_id: str, creds: Credentials, database: str,
                         tables: list[str]) -> dict[str, str]:
        """table → rows in the drill container (no other session there: bounded by the drill's timeout)."""
        # Table names are pg_dump's own COPY targets, already quoted identifiers.
        script = "\n".join(f"SELECT {_quote_literal(table)}, count(*) FROM {table};"  # noqa: S608
                            for table in tables)
        done = run_in_container(self.ctx.docker_host, container_id, commands.psql_pairs_command(),
                                env=commands.pg_env(creds.user, database), masker=self.ctx.masker,
                                timeout=DRILL_TIMEOUT_SECONDS, cancel=self.ctx.cancel, stdin=script.encode())
        if not done.ok:
            raise JobError(f"counting restored rows failed: {done.describe_failure()}")
        return _pairs(done)

    def _live_nonempty(self, target: Target, database: str, tables: list[str]) -> dict[str, str]:
        """table → 't'/'f' (has rows) in the live database, for the tables it still has.

        Both queries are bounded (lock_timeout, statement_timeout): a table another session holds
        locked fails the drill naming the lock wait instead of holding it up. A table dropped since
        the backup is left out.
        """
        existing = _pairs(self._live_query(target, database, "\n".join(
            f"SELECT {_quote_literal(table)}, to_regclass({_quote_literal(table)}) IS NOT NULL;" for table in tables)))
        present = [table for table in tables if existing.get(table) == "t"]
        if not present:
            return {}
        return _pairs(self._live_query(target, database, "\n".join(
            f"SELECT {_quote_literal(table)}, EXISTS (SELECT 1 FROM {table});" for table in present)))  # noqa: S608

    def _live_query(self, target: Target, database: str, script: str) -> Completed:
        """Runs `SELECT label, value` statements on the live database; raises JobError naming a lock wait."""
        try:
            done = run_on_live(self.ctx, target, commands.psql_pairs_command(), database, stdin=script.encode())
        except ExecError as exc:
            raise JobError(f"checking the live database {database!r} in {target.name}: {exc}") from exc
        if not done.ok:
            hint = lock_wait_problem(done.stderr_tail, lock_wait_of(self.ctx, target))
            failure = done.describe_failure()
            raise JobError(f"checking the live database {database!r} in {target.name} failed: "
                           + (f"{hint}\n{failure}" if hint else failure))
        return done


def _pairs(done: Completed) -> dict[str, str]:
    """label → value of psql's unaligned `label|value` lines."""
    return _pairs_of(done.stdout.decode(errors="replace"))


def _pairs_of(output: str) -> dict[str, str]:
    """label → value of psql's unaligned `label|value` lines."""
    results: dict[str, str] = {}
    for line in output.splitlines():
        label, sep, value = line.rpartition("|")
        if sep:
            results[label] = value
    return results


def run_pipeline_checked(ctx: JobContext, argv: list[tuple[str, ...]], env: dict[str, str],
                         masker: Masker, on_stdout_line: Callable[[str], None] | None = None,
                         on_tick: Callable[[Sequence[int]], None] | None = None) -> str | None:
    """Runs a restic-dump pipeline; returns None on success or the readable reason of its failure."""
    done = run_pipeline(argv, env=env, masker=masker,
                        timeout=DRILL_TIMEOUT_SECONDS, cancel=ctx.cancel, capture_stdout=False,
                        on_stdout_line=on_stdout_line, on_tick=on_tick)
    if done.ok:
        return None
    detail = restic_error_text(done.stderr_tail.splitlines())
    head = done.describe_failure().split(":", 1)[0]
    return f"{head}: {detail}" if detail else head
