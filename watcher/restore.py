"""Restore: a snapshot back into a container's database, without losing the old one on failure.

The dump is restored into a fresh scratch database first (pg_restore --single-transaction); only
when that succeeded does the swap start: the old database is renamed aside, the scratch one renamed
into its place, and the old one dropped last. A failed restore leaves the live database exactly as it
was; a failed swap puts the old database back under its name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from watcher import commands, dbproperties, readiness
from watcher.clock import SystemClock
from watcher.config import Bounds
from watcher.discovery import Credentials
from watcher.execute import ExecError, Masker, run_in_container, run_pipeline
from watcher.jobs import QUERY_MARGIN_SECONDS, lock_wait_problem
from watcher.progress import ProgressBoard, first_writer
from watcher.restic import Repository, Snapshot

log = structlog.get_logger("watcher.restore")
RESTORE_TIMEOUT_SECONDS = 12 * 3600.0
# Reading a dump's database entries reads only the archive's start (its table of contents).
PROPERTIES_TIMEOUT_SECONDS = 600.0
SCRATCH_SUFFIX = "_bw_restore"
PREVIOUS_SUFFIX = "_bw_previous"
PG_IDENTIFIER_BYTES = 63


class RestoreError(Exception):
    """The restore could not be planned or failed; the message says which step and why."""


def choose_snapshot(snapshots: Sequence[Snapshot], selector: str, database: str | None) -> Snapshot:
    """Picks the snapshot to restore: `latest` or an id prefix, of `database` if given.

    Raises RestoreError naming the choices when the pick is ambiguous or matches nothing.
    """
    if not snapshots:
        raise RestoreError("no snapshots found for this target")
    candidates = list(snapshots)
    if database is not None:
        candidates = [snap for snap in candidates if snap.database == database]
        if not candidates:
            held = ", ".join(sorted({snap.database for snap in snapshots}))
            raise RestoreError(f"no snapshot of database {database!r}; snapshots hold: {held}")
    if selector == "latest":
        databases = sorted({snap.database for snap in candidates})
        if len(databases) > 1:
            raise RestoreError(
                f"snapshots hold several databases ({', '.join(databases)}): choose one with --database"
            )
        return max(candidates, key=lambda snap: snap.time)
    matches = [snap for snap in candidates if snap.id.startswith(selector)]
    if not matches:
        raise RestoreError(f"no snapshot {selector!r} for this target (see `backup-watcher snapshots`)")
    if len(matches) > 1:
        raise RestoreError(f"snapshot id {selector!r} is ambiguous: give more characters")
    return matches[0]


def _suffixed(database: str, suffix: str) -> str:
    room = PG_IDENTIFIER_BYTES - len(suffix)
    head = database.encode()[:room].decode(errors="ignore")
    return head + suffix


def scratch_name(database: str) -> str:
    """The scratch database a restore goes into before it replaces `database` (<= 63 bytes)."""
    return _suffixed(database, SCRATCH_SUFFIX)


def previous_name(database: str) -> str:
    """The name `database` is moved to during the swap, until the restored copy has its name."""
    return _suffixed(database, PREVIOUS_SUFFIX)


@dataclass(frozen=True)
class RestoreResult:
    """What a finished restore did."""

    container: str
    database: str
    snapshot_id: str
    duration_s: float


class Restorer:
    """Restores snapshots into databases of running containers."""

    def __init__(self, docker_host: str, repository: Repository, masker: Masker, bounds: Bounds | None = None,
                 cancel: threading.Event | None = None, progress: ProgressBoard | None = None,
                 known: dbproperties.KnownProperties | None = None) -> None:
        self.docker_host = docker_host
        self.repository = repository
        self.masker = masker
        self.bounds = bounds or Bounds()
        self.cancel = cancel
        self.progress = progress or ProgressBoard()
        # The database properties the role plan read already (roles.RoleMaker), taken instead of reading again.
        self.known = known

    def _psql(self, container: str, creds: Credentials, script: str, variables: dict[str, str]) -> str:
        """Runs one step's script on the live server, bounded (lock_timeout, statement_timeout); returns
        its output, raises RestoreError naming a lock wait when a session held it up."""
        maintenance = "postgres" if variables.get("db") != "postgres" else "template1"
        env = commands.live_query_env(creds.user, maintenance, lock_wait_s=self.bounds.lock_wait_s,
                                      statement_s=self.bounds.query_s)
        if creds.password:
            env["PGPASSWORD"] = creds.password
        try:
            done = run_in_container(self.docker_host, container, commands.psql_script_command(variables),
                                    env=env, masker=self.masker.with_secrets([creds.password]),
                                    timeout=self.bounds.query_s + QUERY_MARGIN_SECONDS, cancel=self.cancel,
                                    stdin=script.encode())
        except ExecError as exc:
            raise RestoreError(str(exc)) from exc
        if not done.ok:
            hint = lock_wait_problem(done.stderr_tail, self.bounds.lock_wait_s)
            failure = done.describe_failure()
            raise RestoreError(f"psql in {container} failed: " + (f"{hint}\n{failure}" if hint else failure))
        return done.stdout.decode()

    def prepare(self, container_id: str, container_name: str, creds: Credentials, database: str) -> bool:
        """Waits until the container's own PostgreSQL serves (up to the ready bound); returns whether
        `database` exists there. Raises RestoreError naming the container when it does not serve in time.

        A container that just started may be running its entrypoint's first initialisation, whose
        temporary server would cut a restore off when it stops (see watcher.readiness).
        """
        def probe() -> readiness.Answer | str:
            try:
                output = self._psql(container_id, creds, readiness.PROBE_SQL, {"db": database})
            except RestoreError as exc:
                return str(exc)
            return readiness.parse_probe(output) or f"unexpected answer {output[:80]!r}"

        try:
            answer = readiness.wait_until_serving(probe, bound_s=self.bounds.ready_s, clock=SystemClock(),
                                                  cancel=self.cancel)
        except readiness.NotServing as exc:
            raise RestoreError(f"PostgreSQL in {container_name} did not accept connections within "
                               f"{self.bounds.ready_s:.0f}s (WATCHER_READY_TIMEOUT): {exc}") from exc
        return answer.database_exists

    def restore(self, snapshot: Snapshot, container_id: str, container_name: str, creds: Credentials,
                database: str) -> RestoreResult:
        """Replaces `database` in the container with the snapshot's dump; raises RestoreError.

        The old database is dropped only after the dump restored completely into a scratch database
        and the restored copy has taken its name.
        """
        started = time.monotonic()
        masker = self.masker.with_secrets([creds.password])
        scratch = scratch_name(database)
        bound = log.bind(target=container_name, database=database, snapshot_id=snapshot.short_id)
        swap = DatabaseSwap(lambda script, variables: self._psql(container_id, creds, script, variables), database,
                            bound)
        swap.heal_interrupted()
        facts = self._psql(container_id, creds, (
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :'db';\n"
        ), {"db": database}).strip()
        owner = facts or creds.user
        self._psql(container_id, creds, (
            'DROP DATABASE IF EXISTS :"scratch";\n'
            'CREATE DATABASE :"scratch" TEMPLATE template0 OWNER :"owner";\n'
        ), {"scratch": scratch, "owner": owner, "db": database})
        bound.info("restore_started", scratch_database=scratch)

        env = self._pipeline_env(creds)
        restorer = commands.exec_helper(
            container_id, commands.pg_restore_command(scratch), stdin=True,
            env_values=commands.pg_env(creds.user, scratch),
            env_names=["PGPASSWORD"] if creds.password else [],
        )
        dump = commands.restic_dump(self.repository.binary, snapshot.id, database)
        with self.progress.track("restore", container_name, database, total=snapshot.bytes) as tracker:
            done = run_pipeline([dump, restorer], env=env, masker=masker, timeout=RESTORE_TIMEOUT_SECONDS,
                                cancel=self.cancel, capture_stdout=False, on_tick=first_writer(tracker))
        try:
            if not done.ok:
                raise RestoreError(done.describe_failure())
            self._apply_properties(snapshot, container_id, creds, database, bound)
        except RestoreError as exc:
            self._abandon_scratch(container_id, creds, database, bound)
            bound.error("restore_failed", error=str(exc))
            raise RestoreError(f"restore failed; {database!r} was left untouched. {exc}") from exc

        try:
            swap.swap(scratch)
        except RestoreError as exc:
            bound.error("restore_failed", error=str(exc))
            raise
        duration = time.monotonic() - started
        bound.info("restore_succeeded", duration_s=round(duration, 3))
        return RestoreResult(container_name, database, snapshot.id, duration)

    def _pipeline_env(self, creds: Credentials) -> dict[str, str]:
        return self.repository.pipeline_env(self.docker_host, {"PGPASSWORD": creds.password} if creds.password else {})

    def _abandon_scratch(self, container_id: str, creds: Credentials, database: str,
                         bound: structlog.typing.FilteringBoundLogger) -> None:
        try:
            self._psql(container_id, creds, 'DROP DATABASE IF EXISTS :"scratch";\n',
                       {"scratch": scratch_name(database), "db": database})
        except RestoreError as exc:
            bound.warning("restore_cleanup_failed", error=str(exc))

    def _apply_properties(self, snapshot: Snapshot, container_id: str, creds: Credentials, database: str,
                          bound: structlog.typing.FilteringBoundLogger) -> None:
        """Gives the restored scratch copy the owner, settings, ACL and comment the dump's database had,
        all or nothing, before it takes the name (they belong to the database, not its name).

        Raises RestoreError naming what failed (e.g. a role the properties name that does not exist).
        """
        try:
            kept = self.known.take(snapshot.id) if self.known is not None else None
            props = dbproperties.checked(kept, snapshot.id) if kept is not None else dbproperties.read_properties(
                restic=self.repository.binary, snapshot_id=snapshot.id, database=database,
                container_id=container_id, user=creds.user, env=self._pipeline_env(creds),
                masker=self.masker.with_secrets([creds.password]), timeout=PROPERTIES_TIMEOUT_SECONDS,
                cancel=self.cancel)
            script = props.script(scratch_name(database))
        except (dbproperties.PropertiesUnreadable, ValueError) as exc:
            raise RestoreError(str(exc)) from exc
        if script:
            try:
                self._psql(container_id, creds, "BEGIN;\n" + script + "COMMIT;\n", {"db": database})
            except RestoreError as exc:
                raise RestoreError(f"applying the database's owner, settings, ACL and comment failed: {exc}") from exc
        bound.info("restore_database_properties_applied", owner=props.owner, settings=props.setting_names(),
                   statements=len(props.statements))


class DatabaseSwap:
    """The swap of a restore, and the healing of one interrupted: `database` replaced by its restored copy so
    that no failure leaves the name without a database behind it. `psql(script, variables)` runs one step on
    the live server (Restorer._psql, bound to its container) and raises RestoreError."""

    def __init__(self, psql: Callable[[str, dict[str, str]], str], database: str,
                 bound: structlog.typing.FilteringBoundLogger) -> None:
        self._psql = psql
        self.database = database
        self.log = bound

    def heal_interrupted(self) -> None:
        """Puts a database that an interrupted swap left renamed aside back under its name.

        Between the swap's first and second rename the old database is the only copy under neither
        name; a restore killed there must not have its next run drop it as a leftover.
        """
        database = self.database
        names = {"db": database, "previous": previous_name(database)}
        present = set(self._psql((
            "SELECT datname FROM pg_database WHERE datname IN (:'db', :'previous');\n"
        ), names).split("\n")) - {""}
        if names["previous"] in present and database not in present:
            self._psql((
                'ALTER DATABASE :"previous" RENAME TO :"db";\n'
                'ALTER DATABASE :"db" ALLOW_CONNECTIONS true;\n'
            ), names)
            self.log.warning("restore_interrupted_swap_healed", previous_database=names["previous"])

    def swap(self, scratch: str) -> None:
        """Puts the restored `scratch` database in the place of `database`; raises RestoreError.

        Each step is one statement that either happens or not, so that no failure leaves the name
        `database` without a database behind it: the old one is renamed aside (refused, not forced,
        while sessions stay in it), the restored one takes the name, and only then is the old one
        dropped. A failed middle step renames the old database back.
        """
        database = self.database
        previous = previous_name(database)
        names = {"db": database, "scratch": scratch, "previous": previous}
        # Nobody may connect to the restored copy while it changes name (a backup of every
        # database, a monitoring agent): a session in it would make the rename fail.
        self._psql((
            'ALTER DATABASE :"scratch" ALLOW_CONNECTIONS false;\n'
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity\n"
            "  WHERE datname = :'scratch' AND pid <> pg_backend_pid();\n"
            'DROP DATABASE IF EXISTS :"previous";\n'
        ), names)
        exists = self._psql((
            "SELECT count(*) FROM pg_database WHERE datname = :'db';\n"
        ), names).strip() == "1"
        if exists:
            try:
                self._psql((
                    'ALTER DATABASE :"db" ALLOW_CONNECTIONS false;\n'
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity\n"
                    "  WHERE datname = :'db' AND pid <> pg_backend_pid();\n"
                    'ALTER DATABASE :"db" RENAME TO :"previous";\n'
                ), names)
            except RestoreError as exc:
                self._undo((
                    'ALTER DATABASE :"db" ALLOW_CONNECTIONS true;\n'
                    'ALTER DATABASE :"scratch" ALLOW_CONNECTIONS true;\n'
                ), names)
                raise RestoreError(f"could not move {database!r} aside to swap in the restored copy; {database!r} "
                                   f"was left as it was and the restored copy is in {scratch!r}. {exc}") from exc
        try:
            self._psql('ALTER DATABASE :"scratch" RENAME TO :"db";\n', names)
        except RestoreError as exc:
            if exists:
                self._undo((
                    'ALTER DATABASE :"previous" RENAME TO :"db";\n'
                    'ALTER DATABASE :"db" ALLOW_CONNECTIONS true;\n'
                ), names)
            self._undo('ALTER DATABASE :"scratch" ALLOW_CONNECTIONS true;\n', names)
            raise RestoreError(f"could not give the restored copy the name {database!r}; the old database was "
                               f"put back and the restored copy is in {scratch!r}. {exc}") from exc
        self._psql('ALTER DATABASE :"db" ALLOW_CONNECTIONS true;\n', names)
        if exists:
            try:
                self._psql('DROP DATABASE :"previous";\n', names)
            except RestoreError as exc:
                # The restore itself is done; only the old copy's space is not given back yet.
                self.log.warning("restore_previous_not_dropped", previous_database=previous, error=str(exc))

    def _undo(self, script: str, names: dict[str, str]) -> None:
        """Runs one step that puts something back; logs `restore_undo_failed` instead of raising."""
        try:
            self._psql(script, names)
        except RestoreError as exc:
            self.log.error("restore_undo_failed", error=str(exc))
