"""MariaDB and MySQL behind the Engine interface (SPEC §13).

Every client runs inside the container through the one runner, as the container's own tools: the dump
with `mariadb-dump` (`mysqldump` where the image has no mariadb-dump; engine=mysql tries mysqldump first).
The password never leaves the container: the command is wrapped in a fixed `sh -c` script that reads it
from the container's own environment by the variable's name (MARIADB_ROOT_PASSWORD, or the file its
_FILE variant names, read inside the container) into MYSQL_PWD of the client's process only. That
process's environment is readable only by the container's root, who reads the same password from PID 1's
environment anyway; argv (`ps`, Docker events) and the exec API carry only the variable's name.
(An option file fed on stdin would need the password escaped into the file's syntax and takes the
exec's stdin that restores need for the dump itself.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from watcher import commands, engines
from watcher.execute import Command, ExecError, Masker, run_in_container

if TYPE_CHECKING:
    from watcher.discovery import Target
    from watcher.jobs import JobContext

# Schemas of the server itself, never a user's database (`databases=all` leaves them out).
SYSTEM_SCHEMAS = frozenset({"information_schema", "performance_schema", "mysql", "sys"})
# A restore's scratch copy and the old tables it moves aside are no database of the container's.
SCRATCH_SUFFIXES = ("_bw_restore", "_bw_previous")
PROBE_TIMEOUT_SECONDS = 30.0

# $1: the env variable with the password ("" for none), $2/$3: the program and its alternative, then its
# arguments. The password goes into MYSQL_PWD of the client's process only (see the module docstring).
_CLIENT_WRAPPER = (
    'name=$1 program=$2 alternative=$3; shift 3\n'
    'if [ -n "$name" ]; then\n'
    '  MYSQL_PWD=$(printenv "$name" || true)\n'
    '  if [ -z "$MYSQL_PWD" ]; then\n'
    '    file=$(printenv "${name}_FILE" || true)\n'
    '    [ -n "$file" ] || { echo "neither $name nor ${name}_FILE is set in the container" >&2; exit 1; }\n'
    '    MYSQL_PWD=$(cat -- "$file") || exit 1\n'
    '  fi\n'
    '  export MYSQL_PWD\n'
    'fi\n'
    'command -v "$program" >/dev/null 2>&1 || program=$alternative\n'
    'exec "$program" "$@"\n'
)


# The dump's wrapper: as _CLIENT_WRAPPER (which it begins with, $4-$6 more: the lock wait bound in seconds, the
# client and its alternative, the user), then mariadb-dump runs in the background while the client looks,
# once a second, for one of the dump's own data queries (its signature, its user, a connection newer than the
# wrapper's first) that has waited for a table lock longer than the bound, and interrupts it: mariadb-dump has
# no lock wait option, and reads no init command that could set lock_wait_timeout. It then fails naming the
# table, so the integrity gate keeps no snapshot. The password stays as in _CLIENT_WRAPPER.
_DUMP_WRAPPER = _CLIENT_WRAPPER.replace(
    'name=$1 program=$2 alternative=$3; shift 3\n',
    'name=$1 program=$2 alternative=$3 wait=$4 client=$5 other=$6 user=$7; shift 7\n',
).replace('exec "$program" "$@"\n', (
    'command -v "$client" >/dev/null 2>&1 || client=$other\n'
    'ask() { "$client" --user="$user" --batch --skip-column-names -e "$1" 2>/dev/null; }\n'
    'first=$(ask "SELECT CONNECTION_ID()") || first=0\n'
    '"$program" "$@" &\n'
    'dump=$!\n'
    'while kill -0 "$dump" 2>/dev/null; do\n'
    '  sleep 1\n'
    '  found=$(ask "SELECT ID, INFO FROM information_schema.PROCESSLIST WHERE ID > ${first:-0}'
    ' AND USER = SUBSTRING_INDEX(USER(), \'@\', 1) AND STATE LIKE \'Waiting for %lock%\' AND TIME >= $wait'
    ' AND INFO LIKE \'SELECT /*!40001 SQL_NO_CACHE */ %\' LIMIT 1")\n'
    '  if [ -n "$found" ]; then\n'
    '    ask "KILL QUERY ${found%%	*}" >/dev/null\n'
    '    printf \'%s\\n\' "lock wait: gave up after ${wait}s waiting for a lock: ${found#*	}" >&2\n'
    '  fi\n'
    'done\n'
    'wait "$dump"\n'
))


def client_command(password_env: str | None, programs: tuple[str, str], args: Sequence[str]) -> Command:
    """`programs[0]` (else `programs[1]`) with `args`, its password read in the container from the variable
    `password_env` or its _FILE (none when None): the `sh -c` wrapper, no secret in it."""
    return ("sh", "-c", _CLIENT_WRAPPER, "sh", password_env or "", *programs, *args)


def dump_command(password_env: str | None, programs: tuple[str, str], clients: tuple[str, str], user: str,
                 lock_wait_s: float, args: Sequence[str]) -> Command:
    """As client_command for mariadb-dump, with its data queries interrupted once they have waited longer than
    `lock_wait_s` (whole seconds, at least 1) for a table lock (see _DUMP_WRAPPER)."""
    wait = str(max(1, math.ceil(lock_wait_s)))
    return ("sh", "-c", _DUMP_WRAPPER, "sh", password_env or "", *programs, wait, *clients, user, *args)


def dump_arguments(user: str, database: str) -> Command:
    """mariadb-dump's arguments for one database, consistent (--single-transaction) and whole (routines,
    events, triggers), without a CREATE DATABASE/USE so that a restore chooses the database.

    One INSERT per row (--skip-extended-insert) with a COMMIT per table (--no-autocommit): a drill counts
    a table's rows by its lines, and a changed row changes one line, which restic's chunks deduplicate
    around; no dump date in the trailer, so an unchanged database dumps the same bytes.
    """
    return (f"--user={user}", "--single-transaction", "--routines", "--events", "--triggers", "--hex-blob",
            "--default-character-set=utf8mb4", "--skip-extended-insert", "--no-autocommit", "--skip-dump-date",
            database)


def globals_arguments(user: str) -> Command:
    """mariadb-dump's arguments for the server's users, roles and grants as SQL (MariaDB >= 10.5)."""
    return (f"--user={user}", "--system=users", "--skip-dump-date")


def list_arguments(user: str) -> Command:
    """The mariadb client's arguments that print every schema's name, one a line."""
    return (f"--user={user}", "--batch", "--skip-column-names", "--execute=SHOW DATABASES")


def probe_arguments(user: str) -> Command:
    """The client's arguments for the readiness probe: it prints 0 from the final server, 1 from the official
    entrypoint's temporary one (started with --skip-networking on the same socket while it initialises)."""
    return (f"--user={user}", "--connect-timeout=3", "--batch", "--skip-column-names",
            "--execute=SELECT @@skip_networking")


def probe_verdict(ok: bool, stdout: str, failure: str) -> str | None:
    """None when the probe's answer shows the final server, else why not. A server that refuses the user
    serves: the dump then fails at once naming the credentials, rather than after the whole ready bound."""
    if ok:
        return None if stdout.strip() == "0" else "the entrypoint's temporary server is still initialising"
    return None if "Access denied" in failure else failure


def user_databases(listing: str) -> list[str]:
    """The databases of a SHOW DATABASES listing that a backup of `all` covers: no system schema, no
    restore's scratch copy."""
    return [name for name in listing.splitlines()
            if name and name not in SYSTEM_SCHEMAS and not name.endswith(SCRATCH_SUFFIXES)]


class MariaDBEngine:
    """mariadb-dump / mysqldump for databases, `--system=users` for the globals (MariaDB only)."""

    dump_suffix = ".sql"

    def __init__(self, name: str = engines.MARIADB) -> None:
        self.name = name
        mysql_first = name == engines.MYSQL
        self.dump_programs = ("mysqldump", "mariadb-dump") if mysql_first else ("mariadb-dump", "mysqldump")
        self.client_programs = ("mysql", "mariadb") if mysql_first else ("mariadb", "mysql")

    def has_globals(self, target: Target) -> bool:
        """Users and grants when the dump user is root of a MariaDB (MySQL's mysqldump cannot dump them)."""
        return self.name == engines.MARIADB and target.credentials.user == "root"

    def client(self, target: Target, programs: tuple[str, str], args: Sequence[str]) -> Command:
        """A client command in the target's container with its password from the container's env."""
        return client_command(target.credentials.password_env, programs, args)

    def dump_source(self, ctx: JobContext, target: Target, database: str) -> tuple[Command, dict[str, str]]:
        """mariadb-dump of `database` through the sealed exec helper; no secret in the pipeline's env."""
        from watcher.jobs import lock_wait_of, stall_timeout_of
        user = target.credentials.user
        argv = dump_command(target.credentials.password_env, self.dump_programs, self.client_programs, user,
                            lock_wait_of(ctx, target), dump_arguments(user, database))
        return commands.exec_helper(target.container_id, argv, seal=True,
                                    stall_timeout_s=stall_timeout_of(ctx, target)), {}

    def globals_source(self, ctx: JobContext, target: Target, role_passwords: bool) -> tuple[Command, dict[str, str]]:
        """mariadb-dump --system=users through the sealed exec helper."""
        argv = self.client(target, self.dump_programs, globals_arguments(target.credentials.user))
        return commands.exec_helper(target.container_id, argv, seal=True), {}

    def list_databases(self, ctx: JobContext, target: Target) -> list[str]:
        """SHOW DATABASES without the system schemas; raises JobError (also when there is none)."""
        from watcher.jobs import JobError
        argv = self.client(target, self.client_programs, list_arguments(target.credentials.user))
        try:
            done = run_in_container(ctx.docker_host, target.container_id, argv, masker=_masker(ctx, target),
                                    env={}, timeout=ctx.bounds.query_s, cancel=ctx.cancel)
        except ExecError as exc:
            raise JobError(f"listing databases in {target.name}: {exc}") from exc
        if not done.ok:
            raise JobError(f"listing databases in {target.name} failed: {done.describe_failure()}")
        names = user_databases(done.stdout.decode(errors="replace"))
        if not names:
            raise JobError(f"no database to back up in {target.name}: it has only the system schemas")
        return names

    def not_ready_reason(self, ctx: JobContext, target: Target) -> str | None:
        """One readiness probe (probe_arguments, probe_verdict); raises JobError when the container is gone
        or stopped."""
        from watcher.jobs import raise_if_gone
        argv = self.client(target, self.client_programs, probe_arguments(target.credentials.user))
        try:
            done = run_in_container(ctx.docker_host, target.container_id, argv, masker=_masker(ctx, target),
                                    env={}, timeout=PROBE_TIMEOUT_SECONDS, cancel=ctx.cancel)
        except ExecError as exc:
            return raise_if_gone(target, exc)
        return probe_verdict(done.ok, done.stdout.decode(errors="replace"), "" if done.ok else done.describe_failure())


def _masker(ctx: JobContext, target: Target) -> Masker:
    """The context's masker with the target's password (when its value is known) added."""
    return ctx.masker.with_secrets([target.credentials.password])
