"""MariaDB/MySQL restore: a snapshot back into a container's database, the live one untouched when the
dump does not load.

1. The dump is loaded into a fresh scratch database `<db>_bw_restore` (the client stops at the first
   error). A dump that does not load completely leaves the live database exactly as it was.
2. The swap. MariaDB has no RENAME DATABASE, and RENAME TABLE cannot move a table with triggers, nor a
   view, to another database; a view's definition names its database. So the swap is: the scratch copy
   (it proved that the dump loads) is dropped; the live database's tables move aside into
   `<db>_bw_previous` in one atomic RENAME TABLE (its triggers, views, routines and events are dropped
   first: the dump re-creates them); the dump is loaded again into the emptied `<db>`; the tables moved
   aside are dropped last. Should that second load fail (the disk filled up since the first?), what it
   loaded is dropped and the old tables are renamed back: their rows are kept, their triggers, views,
   routines and events are then gone, and the error names them.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from watcher import commands
from watcher.config import Bounds
from watcher.discovery import Credentials
from watcher.engines.mariadb import MariaDBEngine, client_command
from watcher.execute import ExecError, Masker, run_in_container, run_pipeline
from watcher.restic import Repository, Snapshot

log = structlog.get_logger("watcher.engines.mariadb_restore")
RESTORE_TIMEOUT_SECONDS = 12 * 3600.0
SCRATCH_SUFFIX, PREVIOUS_SUFFIX = "_bw_restore", "_bw_previous"
IDENTIFIER_CHARACTERS = 64
# A syntax error quotes up to 80 characters of the statement from where it failed: "... near '<excerpt>' at line
# N". In a users script that excerpt can end inside a password hash, and a part of a hash is no secret the
# masker knows: the excerpt of a script that holds secrets is not shown.
_NEAR_EXCERPT = re.compile(r"near '.*' at line (\d+)")


class MariaDBRestoreError(Exception):
    """A step of the restore failed; the message says which and what became of the live database."""


def quote_identifier(name: str) -> str:
    """A MariaDB identifier in backticks (a backtick in it doubled)."""
    return "`" + name.replace("`", "``") + "`"


def quote_string(text: str) -> str:
    """A MariaDB string literal (backslashes and quotes escaped; the default sql_mode reads backslashes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def suffixed(database: str, suffix: str) -> str:
    """`database` with `suffix`, cut so that the name stays within MariaDB's 64 characters."""
    return database[:IDENTIFIER_CHARACTERS - len(suffix)] + suffix


@dataclass(frozen=True)
class Objects:
    """What a database holds, by kind (names as the server lists them)."""

    tables: tuple[str, ...] = ()  # base tables and sequences: they move with RENAME TABLE
    views: tuple[str, ...] = ()
    triggers: tuple[str, ...] = ()
    routines: tuple[tuple[str, str], ...] = ()  # (PROCEDURE|FUNCTION, name)
    events: tuple[str, ...] = ()

    def code(self) -> list[str]:
        """The names of what is not a table (triggers, views, routines, events), for messages."""
        return [*self.triggers, *self.views, *(name for _, name in self.routines), *self.events]


SCHEMA_EXISTS_SQL = "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {db};\n"
OBJECTS_SQL = """
SELECT 'table', TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = {db} AND TABLE_TYPE <> 'VIEW';
SELECT 'view', TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = {db} AND TABLE_TYPE = 'VIEW';
SELECT 'trigger', TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = {db};
SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {db};
SELECT 'event', EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = {db};
"""


def parse_objects(output: str) -> Objects:
    """The Objects of OBJECTS_SQL's tab-separated output."""
    kinds: dict[str, list[str]] = {}
    routines: list[tuple[str, str]] = []
    for line in output.splitlines():
        kind, sep, name = line.partition("\t")
        if not sep:
            continue
        if kind in ("PROCEDURE", "FUNCTION"):
            routines.append((kind, name))
        else:
            kinds.setdefault(kind, []).append(name)
    return Objects(tuple(kinds.get("table", ())), tuple(kinds.get("view", ())), tuple(kinds.get("trigger", ())),
                   tuple(routines), tuple(kinds.get("event", ())))


def move_aside_script(database: str, previous: str, objects: Objects) -> str:
    """SQL that empties `database` into `previous`: its code dropped, its tables renamed in one statement."""
    db, prev = quote_identifier(database), quote_identifier(previous)
    lines = [f"DROP DATABASE IF EXISTS {prev};", f"CREATE DATABASE {prev};"]
    lines += [f"DROP TRIGGER {db}.{quote_identifier(name)};" for name in objects.triggers]
    lines += [f"DROP VIEW {db}.{quote_identifier(name)};" for name in objects.views]
    lines += [f"DROP {kind} {db}.{quote_identifier(name)};" for kind, name in objects.routines]
    lines += [f"DROP EVENT {db}.{quote_identifier(name)};" for name in objects.events]
    if objects.tables:
        pairs = ", ".join(f"{db}.{quote_identifier(t)} TO {prev}.{quote_identifier(t)}" for t in objects.tables)
        lines.append(f"RENAME TABLE {pairs};")
    return "\n".join(lines) + "\n"


def move_back_script(database: str, previous: str, loaded: Objects, moved: Sequence[str]) -> str:
    """SQL that drops what a failed load put into `database` and renames the `moved` tables back."""
    db, prev = quote_identifier(database), quote_identifier(previous)
    lines = ["SET FOREIGN_KEY_CHECKS = 0;"]
    lines += [f"DROP VIEW IF EXISTS {db}.{quote_identifier(name)};" for name in loaded.views]
    lines += [f"DROP TABLE IF EXISTS {db}.{quote_identifier(name)};" for name in loaded.tables]
    lines += [f"DROP {kind} IF EXISTS {db}.{quote_identifier(name)};" for kind, name in loaded.routines]
    lines += [f"DROP EVENT IF EXISTS {db}.{quote_identifier(name)};" for name in loaded.events]
    if moved:
        pairs = ", ".join(f"{prev}.{quote_identifier(t)} TO {db}.{quote_identifier(t)}" for t in moved)
        lines.append(f"RENAME TABLE {pairs};")
    lines.append(f"DROP DATABASE {prev};")
    return "\n".join(lines) + "\n"


def without_statement_excerpt(message: str) -> str:
    """`message` with the statement excerpt of each syntax error left out (see _NEAR_EXCERPT)."""
    return _NEAR_EXCERPT.sub(r"near (the statement is not shown: it may hold a password hash) at line \1", message)


@dataclass(frozen=True)
class RestoredDatabase:
    """What a finished restore did."""

    container: str
    database: str
    snapshot_id: str
    duration_s: float


class MariaDBRestorer:
    """Restores MariaDB/MySQL snapshots into databases of running containers."""

    def __init__(self, docker_host: str, repository: Repository, masker: Masker, engine: str,
                 bounds: Bounds | None = None, cancel: threading.Event | None = None) -> None:
        self.docker_host = docker_host
        self.repository = repository
        self.masker = masker
        self.engine = MariaDBEngine(engine)
        self.bounds = bounds or Bounds()
        self.cancel = cancel

    def sql(self, container_id: str, creds: Credentials, script: str, secrets: Sequence[str] = ()) -> str:
        """Runs a script with the container's client (`secrets` it holds masked in what the client says);
        returns its output, raises MariaDBRestoreError."""
        argv = client_command(creds.password_env, self.engine.client_programs,
                              (f"--user={creds.user}", "--batch", "--skip-column-names"))
        try:
            done = run_in_container(self.docker_host, container_id, argv, env={},
                                    masker=self.masker.with_secrets([creds.password, *secrets]),
                                    timeout=self.bounds.query_s, cancel=self.cancel, stdin=script.encode())
        except ExecError as exc:
            raise MariaDBRestoreError(str(exc)) from exc
        if not done.ok:
            failure = done.describe_failure()
            if secrets:
                failure = without_statement_excerpt(failure)
            raise MariaDBRestoreError(f"{self.engine.client_programs[0]} failed: {failure}")
        return done.stdout.decode(errors="replace")

    def prepare(self, container_id: str, container_name: str, creds: Credentials, database: str) -> bool:
        """Waits until the server answers (up to the ready bound); returns whether `database` exists.
        Raises MariaDBRestoreError naming the container when it does not answer in time."""
        deadline = time.monotonic() + self.bounds.ready_s
        while True:
            try:
                found = self.sql(container_id, creds, SCHEMA_EXISTS_SQL.format(db=quote_string(database)))
                return found.strip() == "1"
            except MariaDBRestoreError as exc:
                if time.monotonic() >= deadline or (self.cancel is not None and self.cancel.is_set()):
                    raise MariaDBRestoreError(f"{self.engine.name} in {container_name} did not answer within "
                                              f"{self.bounds.ready_s:.0f}s (WATCHER_READY_TIMEOUT): {exc}") from exc
                if self.cancel is not None:
                    self.cancel.wait(1.0)
                else:
                    time.sleep(1.0)

    def objects(self, container_id: str, creds: Credentials, database: str) -> Objects:
        """What `database` holds; raises MariaDBRestoreError."""
        return parse_objects(self.sql(container_id, creds, OBJECTS_SQL.format(db=quote_string(database))))

    def load(self, snapshot: Snapshot, container_id: str, creds: Credentials, database: str) -> None:
        """Streams the snapshot's dump into `database` (restic dump | the container's client); raises
        MariaDBRestoreError when restic or the client fails (the client stops at the first error)."""
        env = self.repository.pipeline_env(self.docker_host)
        loader = commands.exec_helper(container_id, client_command(
            creds.password_env, self.engine.client_programs,
            (f"--user={creds.user}", "--default-character-set=utf8mb4", database)), stdin=True)
        dump = commands.restic_dump(self.repository.binary, snapshot.id, snapshot.database, self.engine.dump_suffix)
        done = run_pipeline([dump, loader], env=env, masker=self.masker.with_secrets([creds.password]),
                            timeout=RESTORE_TIMEOUT_SECONDS, cancel=self.cancel, capture_stdout=False)
        if not done.ok:
            raise MariaDBRestoreError(done.describe_failure())

    def restore(self, snapshot: Snapshot, container_id: str, container_name: str, creds: Credentials,
                database: str) -> RestoredDatabase:
        """Replaces `database` in the container with the snapshot's dump (see the module docstring);
        raises MariaDBRestoreError saying what became of the live database."""
        started = time.monotonic()
        bound = log.bind(target=container_name, database=database, snapshot_id=snapshot.short_id)
        scratch, previous = suffixed(database, SCRATCH_SUFFIX), suffixed(database, PREVIOUS_SUFFIX)
        self.sql(container_id, creds, f"DROP DATABASE IF EXISTS {quote_identifier(scratch)};\n"
                  f"CREATE DATABASE {quote_identifier(scratch)} CHARACTER SET utf8mb4;\n")
        bound.info("restore_started", scratch_database=scratch)
        try:
            self.load(snapshot, container_id, creds, scratch)
        except MariaDBRestoreError as exc:
            bound.error("restore_failed", error=str(exc))
            raise MariaDBRestoreError(f"restore failed; {database!r} was left untouched. {exc}") from exc
        finally:
            self._drop_quietly(container_id, creds, scratch, bound)
        self._swap(snapshot, container_id, creds, database, previous, bound)
        duration = time.monotonic() - started
        bound.info("restore_succeeded", duration_s=round(duration, 3))
        return RestoredDatabase(container_name, database, snapshot.id, duration)

    def _swap(self, snapshot: Snapshot, container_id: str, creds: Credentials, database: str, previous: str,
              bound: structlog.typing.FilteringBoundLogger) -> None:
        """Moves the live tables aside, loads the dump into the emptied database, drops the old tables;
        on a failed load moves them back. Raises MariaDBRestoreError."""
        self.sql(container_id, creds, f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)} "
                  "CHARACTER SET utf8mb4;\n")
        old = self.objects(container_id, creds, database)
        self.sql(container_id, creds, move_aside_script(database, previous, old))
        try:
            self.load(snapshot, container_id, creds, database)
        except MariaDBRestoreError as exc:
            loaded = self.objects(container_id, creds, database)
            self.sql(container_id, creds, move_back_script(database, previous, loaded, old.tables))
            lost = ", ".join(old.code()) or "none"
            bound.error("restore_failed", error=str(exc), old_code_lost=old.code())
            raise MariaDBRestoreError(f"restore failed after the dump had loaded into the scratch copy; the old "
                                      f"tables of {database!r} were put back with their rows, its triggers, views, "
                                      f"routines and events ({lost}) are gone. {exc}") from exc
        self._drop_quietly(container_id, creds, previous, bound)

    def _drop_quietly(self, container_id: str, creds: Credentials, database: str,
                      bound: structlog.typing.FilteringBoundLogger) -> None:
        try:
            self.sql(container_id, creds, f"DROP DATABASE IF EXISTS {quote_identifier(database)};\n")
        except MariaDBRestoreError as exc:
            bound.warning("restore_cleanup_failed", database=database, error=str(exc))
