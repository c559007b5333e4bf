"""MariaDB/MySQL restore drills: the latest snapshot of a database loaded into a throwaway container of
the target's own image (no network, label backup-watcher.role=drill, a random root password), then checked:
- the dump in the snapshot is whole: it ends with mariadb-dump's `-- Dump completed` line;
- the load (restic dump | the container's client) exited 0 at both ends, the client stopping at the first
  error;
- every table with rows in the dump exists after the load with exactly as many rows as the dump holds
  (one INSERT line per row: the dump is written with --skip-extended-insert).
As a restore on a fresh host does, the users with grants on the database are created first from the
globals snapshot of the same pass, and their grants on tables and routines given after the load
(watcher.engines.mariadb_users): a globals snapshot that does not load fails the drill.
The container is always removed, also on failure; one a crash left is removed as the PostgreSQL
drills' are (watcher.drill_leftovers: same labels).
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from watcher import commands, engines
from watcher.discovery import Credentials, Target
from watcher.docker_source import DockerUnavailable
from watcher.drill_leftovers import drill_labels
from watcher.engines.mariadb import MariaDBEngine, client_command
from watcher.engines.mariadb_restore import quote_identifier, quote_string
from watcher.execute import ExecError, Masker, run_in_container

if TYPE_CHECKING:
    from watcher.drill import Driller, DrillResult, TableCheck
    from watcher.engines.mariadb_users import UserPlan
    from watcher.jobs import JobContext
    from watcher.restic import Snapshot

log = structlog.get_logger("watcher.engines.mariadb_drill")
READY_TIMEOUT_SECONDS = 180.0
PROBE_TIMEOUT_SECONDS = 30.0
DRILL_TIMEOUT_SECONDS = 12 * 3600.0
DUMP_COMPLETED = "-- Dump completed"
_INSERT = re.compile(r"^INSERT INTO `((?:[^`]|``)+)` VALUES ")
# The throwaway container's root password lives in this variable of its env (the official images' contract).
DRILL_PASSWORD_VARIABLE = {engines.MARIADB: "MARIADB_ROOT_PASSWORD", engines.MYSQL: "MYSQL_ROOT_PASSWORD"}


class InsertCounter:
    """Counts a dump's rows per table line by line (one INSERT per row), and whether the dump is whole."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.completed = False

    def __call__(self, line: str) -> None:
        match = _INSERT.match(line)
        if match:
            table = match.group(1).replace("``", "`")
            self.counts[table] = self.counts.get(table, 0) + 1
        elif line.startswith(DUMP_COMPLETED):
            self.completed = True


def ready_probe_sql(database: str) -> str:
    """SQL whose answer is `0<TAB>1` once the final server runs (not the entrypoint's temporary one, which
    runs with skip_networking) and `database` exists."""
    return (f"SELECT @@skip_networking, COUNT(*) FROM information_schema.SCHEMATA "  # noqa: S608
            f"WHERE SCHEMA_NAME = {quote_string(database)};\n")


class MariaDBDriller:
    """Drills one database of a MariaDB/MySQL target, with the Driller's context and Docker."""

    def __init__(self, driller: Driller) -> None:
        self.driller = driller
        self.ctx = driller.ctx

    def drill_database(self, target: Target, database: str, snapshot: Snapshot,
                       globals_snapshot: Snapshot | None = None) -> DrillResult:
        """Loads one snapshot into a throwaway container, the users of `globals_snapshot` (the same pass's)
        created first, and checks it; never raises."""
        from watcher.drill import DrillResult
        from watcher.jobs import JobError, new_run_id

        run_id, started = new_run_id(), time.monotonic()
        engine = MariaDBEngine(target.engine)
        variable = DRILL_PASSWORD_VARIABLE.get(target.engine, "MARIADB_ROOT_PASSWORD")
        password = secrets.token_urlsafe(24)
        masker = self.ctx.masker.with_secrets([password, target.credentials.password])
        name, container_id = f"bw-drill-{run_id}", None
        bound = log.bind(target=target.name, database=database, run_id=run_id, snapshot_id=snapshot.short_id)
        bound.info("drill_started", image=target.image, engine=target.engine)
        try:
            container_id = self.driller.docker.run_throwaway(
                target.image_id or target.image, name,
                env={variable: password, variable.replace("ROOT_PASSWORD", "DATABASE"): database},
                labels=drill_labels(target.name, self.ctx.host, self.driller.owner), init=target.init)
            self._wait_ready(engine, container_id, variable, database, masker)
            restore_started = time.monotonic()
            users = _DrillUsers(self.ctx, target, container_id, Credentials("root", database, password, variable))
            plan = users.create(database, globals_snapshot)
            counter = self._load(engine, container_id, variable, snapshot, database, masker)
            users.grant_on_objects(plan)
            restore_s = time.monotonic() - restore_started
            tables = self._check(engine, container_id, variable, database, counter, masker)
        except (JobError, DockerUnavailable, ExecError) as exc:
            return self.driller.failed(target, database, run_id, started, snapshot, str(exc))
        finally:
            if container_id is not None:
                try:
                    self.driller.docker.remove(container_id)
                except DockerUnavailable as exc:
                    bound.error("drill_cleanup_failed", container=name, error=str(exc))
        problems = [check.problem for check in tables if check.problem]
        if problems:
            return self.driller.failed(target, database, run_id, started, snapshot,
                                       "restored data does not match the dump: " + "; ".join(problems[:10]),
                                       tables, restore_s)
        duration = time.monotonic() - started
        bound.info("drill_succeeded", duration_s=round(duration, 3), restore_duration_s=round(restore_s, 3),
                   tables=len(tables), rows=sum(t.restored or 0 for t in tables),
                   counts={t.table: t.restored for t in tables})
        return DrillResult(target.name, database, True, run_id, datetime.now(UTC), duration, snapshot.id,
                           restore_s, tables)

    def _client(self, engine: MariaDBEngine, variable: str, *args: str) -> commands.Command:
        return client_command(variable, engine.client_programs, ("--user=root", *args))

    def _wait_ready(self, engine: MariaDBEngine, container_id: str, variable: str, database: str,
                    masker: Masker) -> None:
        """Waits until the throwaway container's final server serves `database`; raises JobError."""
        from watcher.jobs import JobError
        deadline, last = time.monotonic() + READY_TIMEOUT_SECONDS, "no answer yet"
        argv = self._client(engine, variable, "--batch", "--skip-column-names")
        while time.monotonic() < deadline and not self.ctx.cancel.is_set():
            try:
                done = run_in_container(self.ctx.docker_host, container_id, argv, env={}, masker=masker,
                                        timeout=PROBE_TIMEOUT_SECONDS, cancel=self.ctx.cancel,
                                        stdin=ready_probe_sql(database).encode())
                if done.ok and done.stdout.decode(errors="replace").strip() == "0\t1":
                    return
                last = done.describe_failure() if not done.ok else f"answer {done.stdout[:40]!r}"
            except ExecError as exc:
                last = str(exc)
                if "is not running" in last:  # its entrypoint failed: waiting longer changes nothing
                    break
            self.ctx.cancel.wait(0.5)
        raise JobError(f"the drill container did not become ready: {last}")

    def _load(self, engine: MariaDBEngine, container_id: str, variable: str, snapshot: Snapshot, database: str,
              masker: Masker) -> InsertCounter:
        """Loads the snapshot into the drill container, then reads it again counting its rows; returns the
        counts. Raises JobError when either pipeline fails or the dump is not whole."""
        from watcher.drill_container import run_pipeline_checked
        from watcher.jobs import JobError
        env = self.ctx.repository.pipeline_env(self.ctx.docker_host)
        dump = commands.restic_dump(self.ctx.repository.binary, snapshot.id, database, engine.dump_suffix)
        loader = commands.exec_helper(container_id, self._client(engine, variable, "--default-character-set=utf8mb4",
                                                                 database), stdin=True)
        failure = run_pipeline_checked(self.ctx, [dump, loader], env, masker)
        if failure is not None:
            raise JobError(f"restore of snapshot {snapshot.short_id} failed: {failure}")
        counter = InsertCounter()
        failure = run_pipeline_checked(self.ctx, [dump], env, masker, on_stdout_line=counter)
        if failure is not None:
            raise JobError(f"reading the dump of snapshot {snapshot.short_id} failed: {failure}")
        if not counter.completed:
            raise JobError(f"the dump in snapshot {snapshot.short_id} is not whole: it lacks the "
                           f"'{DUMP_COMPLETED}' line mariadb-dump writes last")
        return counter

    def _check(self, engine: MariaDBEngine, container_id: str, variable: str, database: str,
               counter: InsertCounter, masker: Masker) -> tuple[TableCheck, ...]:
        """Each table of the dump: its rows there against the rows restored; raises JobError."""
        from watcher.drill import TableCheck
        from watcher.jobs import JobError
        if not counter.counts:
            return ()
        script = "\n".join(f"SELECT {quote_string(table)}, COUNT(*) FROM {quote_identifier(table)};"  # noqa: S608
                           for table in counter.counts)
        done = run_in_container(self.ctx.docker_host, container_id,
                                self._client(engine, variable, "--batch", "--skip-column-names", database),
                                env={}, masker=masker, timeout=DRILL_TIMEOUT_SECONDS, cancel=self.ctx.cancel,
                                stdin=script.encode())
        if not done.ok:
            raise JobError(f"counting restored rows failed: {done.describe_failure()}")
        restored = dict(line.rsplit("\t", 1) for line in done.stdout.decode(errors="replace").splitlines()
                        if "\t" in line)
        return tuple(TableCheck(table, rows, int(restored[table]) if table in restored else None, None)
                     for table, rows in sorted(counter.counts.items()))


class _DrillUsers:
    """The users step of a drill: what `restore` does on a fresh host, in the throwaway container."""

    def __init__(self, ctx: JobContext, target: Target, container_id: str, creds: Credentials) -> None:
        from watcher.engines.mariadb_restore import MariaDBRestorer
        from watcher.engines.mariadb_users import UserMaker

        restorer = MariaDBRestorer(ctx.docker_host, ctx.repository, ctx.masker, target.engine, ctx.bounds, ctx.cancel)
        self.users, self.container_id, self.creds = UserMaker(restorer), container_id, creds
        self.target = target.name

    def create(self, database: str, globals_snapshot: Snapshot | None) -> UserPlan:
        """Creates the users with grants on `database`; returns the plan, raises JobError."""
        from watcher.engines.mariadb_users import UsersError
        from watcher.jobs import JobError
        try:
            plan = self.users.plan(self.container_id, self.creds, {database}, globals_snapshot)
            self.users.create(plan, self.container_id, f"drill of {self.target}", self.creds)
        except UsersError as exc:
            raise JobError(f"the users of the globals snapshot could not be created: {exc}") from exc
        return plan

    def grant_on_objects(self, plan: UserPlan) -> None:
        """The created users' grants on restored tables and routines; raises JobError."""
        from watcher.engines.mariadb_users import UsersError
        from watcher.jobs import JobError
        try:
            self.users.grant_on_objects(plan, self.container_id, self.creds)
        except UsersError as exc:
            raise JobError(str(exc)) from exc
