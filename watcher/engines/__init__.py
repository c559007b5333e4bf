"""Database engines (SPEC §13): what differs between PostgreSQL, MariaDB/MySQL and `engine=command`.

Discovery decides a target's engine (`engine_from_env`, or the label backup-watcher.engine); jobs,
restore and drills ask the target's `Engine` for the engine-specific parts: the command whose stdout is
a database's dump, the globals, the list of databases and the readiness probe. The scheduler, the
integrity gate (the sealed exec helper under `restic backup --stdin-from-command`), metrics and alerts
do not tell engines apart. One module per engine; this one imports none of them at load time, so that
discovery and the engines may import each other's names without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from watcher.discovery import Target
    from watcher.execute import Command
    from watcher.jobs import JobContext

POSTGRES = "postgres"
MARIADB = "mariadb"
MYSQL = "mysql"
COMMAND = "command"
ENGINES = (POSTGRES, MARIADB, MYSQL, COMMAND)
# An engine=command target has one backup, not databases: the dump command's stdout. It stands under this
# name where a database would (tag database=stdout, file /stdout.dump, metrics, status).
COMMAND_DATABASE = "stdout"


def engine_from_env(env: Mapping[str, str]) -> str:
    """The engine a container's env contract names: POSTGRES_* (the default, as before engines),
    else MARIADB_*, else MYSQL_* (the official images' variables)."""
    names = env.keys()
    if any(name.startswith("POSTGRES_") for name in names):
        return POSTGRES
    if any(name.startswith("MARIADB_") for name in names):
        return MARIADB
    if any(name.startswith("MYSQL_") for name in names):
        return MYSQL
    return POSTGRES


class NotSupported(Exception):
    """The engine has no such step (e.g. globals of engine=command); the message says what to do instead."""


class Engine(Protocol):
    """The engine-specific half of backups: every method runs nothing itself except where it says so."""

    name: str
    dump_suffix: str  # the snapshot's file name ends with it

    def has_globals(self, target: Target) -> bool:
        """Whether the target's backups include a globals snapshot (users, roles, grants)."""

    def dump_source(self, ctx: JobContext, target: Target, database: str) -> tuple[Command, dict[str, str]]:
        """The in-container command (exec helper argv, sealed) whose stdout is `database`'s dump, and the
        environment it needs beyond the repository's (secrets passed by name)."""

    def globals_source(self, ctx: JobContext, target: Target, role_passwords: bool) -> tuple[Command, dict[str, str]]:
        """As dump_source, for the globals snapshot; raises NotSupported when the engine has none."""

    def list_databases(self, ctx: JobContext, target: Target) -> list[str]:
        """Every database of the target's server that a backup of `all` covers; raises JobError."""

    def not_ready_reason(self, ctx: JobContext, target: Target) -> str | None:
        """None when the server accepts connections, else why not; raises JobError when the container
        is gone or stopped."""


def engine_named(name: str) -> Engine:
    """The Engine for a name of ENGINES (mysql shares MariaDB's module); raises ValueError for another."""
    if name == POSTGRES:
        from watcher.engines.postgres import PostgresEngine
        return PostgresEngine()
    if name in (MARIADB, MYSQL):
        from watcher.engines.mariadb import MariaDBEngine
        return MariaDBEngine(name)
    if name == COMMAND:
        from watcher.engines.command import CommandEngine
        return CommandEngine()
    raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})")
