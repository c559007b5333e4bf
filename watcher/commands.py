"""Every command line the watcher runs, built as plain tuples by pure functions.

Nothing here runs anything and nothing here holds a secret: passwords travel in the
environment (RESTIC_PASSWORD for restic, PGPASSWORD passed by name to the exec helper).
"""

from __future__ import annotations

import math
import sys
import urllib.parse
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime

from watcher.config import Retention

Command = tuple[str, ...]
SNAPSHOT_TAG = "backup-watcher"
CONTAINER_TAG = "container="
DATABASE_TAG = "database="
DUMP_SUFFIX = ".pgdump"
# A snapshot of another engine than PostgreSQL says which wrote it (SPEC §13). PostgreSQL's carry no
# engine tag, as before engines: restic forget groups snapshots by their tags, and a new tag on them would
# start a second history beside the old one, whose snapshots retention would then never thin out.
ENGINE_TAG = "engine="
# A container's globals (roles, memberships, role settings) are a snapshot of their own, tagged
# `globals` instead of `database=…`, under one constant file name (SPEC §6, §10).
GLOBALS_TAG = "globals"
GLOBALS_FILENAME = "globals.sql"
# How the globals stand among a target's databases in results, status, metrics (label `database`) and
# listings: a name no restore takes for a database (parentheses), so a database named "globals" stays apart.
GLOBALS_DATABASE = "(globals)"
# Added by `backup-watcher ack` to a snapshot flagged as a shrunken dump: the operator accepts its size as
# the history's new normal (SPEC §11).
ACK_TAG = "size-anomaly-ack"


def encode_name(name: str) -> str:
    """Percent-encodes a database name for tags and file names (no ',', '/', '%' or blanks)."""
    return urllib.parse.quote(name, safe="-_.@+:=")


def decode_name(encoded: str) -> str:
    """Inverse of encode_name."""
    return urllib.parse.unquote(encoded)


def snapshot_tags(container: str, database: str, engine: str = "postgres") -> tuple[str, ...]:
    """The tags that identify a (container, database) pair's snapshots, and the engine that wrote them
    (none for PostgreSQL: see ENGINE_TAG)."""
    return (SNAPSHOT_TAG, CONTAINER_TAG + container, DATABASE_TAG + encode_name(database), *engine_tags(engine))


def globals_tags(container: str, engine: str = "postgres") -> tuple[str, ...]:
    """The tags that identify a container's globals snapshots, and the engine that wrote them."""
    return (SNAPSHOT_TAG, CONTAINER_TAG + container, GLOBALS_TAG, *engine_tags(engine))


def history_tags(container: str, database: str) -> tuple[str, ...]:
    """The tags of one history: a database's (snapshot_tags), or the globals' for GLOBALS_DATABASE."""
    return globals_tags(container) if database == GLOBALS_DATABASE else snapshot_tags(container, database)



def engine_tags(engine: str) -> tuple[str, ...]:
    """The engine tag of a snapshot: none for PostgreSQL (see ENGINE_TAG), else `engine=NAME`."""
    return () if engine == "postgres" else (ENGINE_TAG + engine,)


def dump_filename(database: str, suffix: str = DUMP_SUFFIX) -> str:
    """The constant, flat --stdin-filename of a database (restic 0.18.0 rejects directories); `suffix` is
    the engine's (`.pgdump`, `.sql`, `.dump`)."""
    return encode_name(database) + suffix


def exec_helper(container_id: str, cmd: Sequence[str], *, env_names: Sequence[str] = (),
                env_values: Mapping[str, str] | None = None, stdin: bool = False, seal: bool = False,
                stall_timeout_s: float | None = None) -> Command:
    """The `python -m watcher.dockerexec` command that runs `cmd` in a container.

    `env_names` are passed by name only (their values come from the helper's environment), so
    secrets never reach argv; `env_values` are for values that are not secret. `seal` makes the
    helper fail an output that lacks the end mark of a successful run (dumps; needs `sh`).
    `stall_timeout_s` makes it give up on an output that moves nothing for that long (dumps).
    """
    argv: list[str] = [sys.executable, "-m", "watcher.dockerexec", "--container", container_id]
    if stdin:
        argv.append("--stdin")
    if seal:
        argv.append("--seal")
    if stall_timeout_s is not None:
        argv += ["--stall-timeout", f"{stall_timeout_s:g}"]
    for name, value in (env_values or {}).items():
        argv += ["--env", f"{name}={value}"]
    for name in env_names:
        argv += ["--env", name]
    return (*argv, "--", *cmd)


def key_ordered_dump(container_id: str, pg_dump: Command, *, env_names: Sequence[str] = (),
                     env_values: Mapping[str, str] | None = None, lock_wait_s: float,
                     stall_timeout_s: float | None = None) -> Command:
    """The `python -m watcher.keydump` command that runs `pg_dump` in a container with the rows of its large
    keyed tables in key order (WATCHER_DUMP_ORDER=key); environment as for exec_helper (secrets by name).
    `lock_wait_s` bounds the key session's wait for its tables' locks, as pg_dump's own; `stall_timeout_s`
    ends the dump when its archive moves nothing for that long (WATCHER_STALL_TIMEOUT)."""
    argv: list[str] = [sys.executable, "-m", "watcher.keydump", "--container", container_id,
                       "--lock-wait-ms", str(milliseconds(lock_wait_s))]
    if stall_timeout_s is not None:
        argv += ["--stall-timeout", f"{stall_timeout_s:g}"]
    for name, value in (env_values or {}).items():
        argv += ["--env", f"{name}={value}"]
    for name in env_names:
        argv += ["--env", name]
    return (*argv, "--", *pg_dump)


def pg_dump_command(lock_wait_s: float) -> Command:
    """pg_dump in custom format without its own compression (restic compresses and deduplicates).

    The role and database come from PGUSER/PGDATABASE, never from argv, so that a database name
    containing '=' is not read as a connection string. `lock_wait_s` bounds the wait for each
    table's lock (a migration holding one): pg_dump then fails naming the table instead of waiting.
    """
    return ("pg_dump", "--format=custom", "--compress=0", "--no-password",
            f"--lock-wait-timeout={milliseconds(lock_wait_s)}")


def pg_dumpall_globals_command(*, role_passwords: bool = True) -> Command:
    """pg_dumpall of the cluster's globals (roles, memberships, role settings, tablespaces) as SQL.

    The role comes from PGUSER; it connects to postgres, else template1 (not `-l DB`: pg_dumpall then
    hides libpq's reason, such as a role that does not exist, behind "could not connect"). Without
    `role_passwords` the roles are read from pg_roles instead of pg_authid, which a dump role that is no
    superuser may not read: no password hashes then.
    """
    argv = ("pg_dumpall", "--globals-only", "--no-password")
    return (*argv, "--no-role-passwords") if not role_passwords else argv


def milliseconds(seconds: float) -> int:
    """A bound in whole milliseconds for PostgreSQL's settings, at least 1 (0 would mean no bound)."""
    return max(1, round(seconds * 1000))


def pg_env(user: str, database: str) -> dict[str, str]:
    """The non-secret libpq environment for a role and database."""
    return {"PGUSER": user, "PGDATABASE": database, "PGAPPNAME": "backup-watcher"}


def live_query_env(user: str, database: str, *, lock_wait_s: float, statement_s: float) -> dict[str, str]:
    """pg_env for a session on a live database that may never wait without bound.

    PGOPTIONS sets lock_timeout (a table another session locked) and statement_timeout (anything
    else) for the session, so a query gives up with PostgreSQL's own error naming the timeout.
    """
    options = f"-c lock_timeout={milliseconds(lock_wait_s)} -c statement_timeout={milliseconds(statement_s)}"
    return {**pg_env(user, database), "PGOPTIONS": options}


def pg_isready_command() -> Command:
    """pg_isready: exit 0 once the server accepts connections (PGUSER/PGDATABASE from the environment)."""
    return ("pg_isready", "--quiet")


def list_databases_command() -> Command:
    """psql that prints every database that is not a template and accepts connections, NUL-separated.

    A restore's scratch copy (`*_bw_restore`, half restored while it runs) and the old database it
    moves aside (`*_bw_previous`) are not the container's databases: they are left out.
    """
    return (
        "psql", "--no-psqlrc", "--no-password", "--tuples-only", "--no-align", "--record-separator-zero",
        "-v", "ON_ERROR_STOP=1", "--command",
        "SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn"
        " AND datname NOT LIKE '%\\_bw\\_restore' AND datname NOT LIKE '%\\_bw\\_previous' ORDER BY datname",
    )


def psql_script_command(variables: Mapping[str, str]) -> Command:
    """psql that runs the script on its stdin, with `variables` available as :"name" / :'name'."""
    argv = ["psql", "--no-psqlrc", "--no-password", "--quiet", "--tuples-only", "--no-align",
            "-v", "ON_ERROR_STOP=1"]
    for name, value in variables.items():
        argv += ["--set", f"{name}={value}"]
    return tuple(argv)


def psql_query_command(sql: str) -> Command:
    """psql that runs one statement given on its command line (no stdin), printing unaligned tuples."""
    return ("psql", "--no-psqlrc", "--no-password", "--tuples-only", "--no-align", "-v", "ON_ERROR_STOP=1",
            "--command", sql)


def psql_pairs_command() -> Command:
    """psql that runs the `SELECT label, value;` statements on its stdin, printing `label|value` lines,
    and stops at the first error."""
    return ("psql", "--no-psqlrc", "--no-password", "--tuples-only", "--no-align", "-v", "ON_ERROR_STOP=1")


def conninfo_quote(value: str) -> str:
    """Quotes a value for a libpq connection string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def pg_restore_command(database: str, *, keep_owners: bool = True) -> Command:
    """pg_restore reading a custom-format dump from stdin into `database`, all or nothing.

    Without `keep_owners` (restore drills into a fresh cluster) ownership and grants are skipped:
    the roles they name do not exist there, and a drill checks the data, not the ACLs.
    """
    argv = ["pg_restore", "--no-password", "--single-transaction", "--exit-on-error"]
    if not keep_owners:
        argv += ["--no-owner", "--no-privileges"]
    return (*argv, f"--dbname=dbname={conninfo_quote(database)}")


def pg_restore_data_as_text_command() -> Command:
    """pg_restore printing the dump's table data as SQL text (COPY blocks) to stdout, for counting rows."""
    return ("pg_restore", "--data-only", "--file=-")


RESTIC_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def restic_backup(restic: str, *, host: str, container: str, database: str, source: Command,
                  snapshot_time: datetime | None = None, engine: str = "postgres",
                  suffix: str = DUMP_SUFFIX) -> Command:
    """restic backup that runs `source` and stores its stdout as one snapshot.

    restic writes no snapshot unless `source` exits 0 (--stdin-from-command, restic >= 0.17).
    With `snapshot_time` (whole seconds are kept) the snapshot carries that time, written in UTC:
    restic reads --time in its local zone, so it must run with TZ=UTC (RESTIC_TIME_ENV).
    """
    return _restic_backup(restic, host, dump_filename(database, suffix), snapshot_tags(container, database, engine),
                          source, snapshot_time)


def restic_backup_globals(restic: str, *, host: str, container: str, source: Command,
                          snapshot_time: datetime | None = None, engine: str = "postgres") -> Command:
    """restic backup of a container's globals (`source`'s stdout), as restic_backup does a database's."""
    return _restic_backup(restic, host, GLOBALS_FILENAME, globals_tags(container, engine), source, snapshot_time)


def _restic_backup(restic: str, host: str, filename: str, tags: Sequence[str], source: Command,
                   snapshot_time: datetime | None) -> Command:
    argv: list[str] = [restic, "backup", "--json", "--host", host, "--stdin-filename", filename]
    for tag in tags:
        argv += ["--tag", tag]
    if snapshot_time is not None:
        argv += ["--time", snapshot_time.astimezone(UTC).strftime(RESTIC_TIME_FORMAT)]
    return (*argv, "--stdin-from-command", "--", *source)


# The environment restic needs to read --time as UTC.
RESTIC_TIME_ENV = {"TZ": "UTC"}
# restic --json writes a status line 60 times a second unless asked for a rate. The watcher parses one a second
# (STATUS_READ_SECONDS), and each line read cost the CLI or daemon a wake-up: about 5 ms of CPU per second of a
# backup (issue 20). Four a second still ends a restic whose watcher died within a quarter second: its next
# line meets a closed pipe.
RESTIC_BACKUP_PROGRESS_ENV = {"RESTIC_PROGRESS_FPS": "4"}
# `restic copy` off a terminal reports its packs only once a snapshot is done, unless asked for a rate: once a
# second is enough for a person and makes a `restic copy` whose watcher died end at its next line (broken pipe).
RESTIC_COPY_PROGRESS_ENV = {"RESTIC_PROGRESS_FPS": "1"}


def restic_snapshots(restic: str, *, host: str | None = None, container: str | None = None,
                     database: str | None = None) -> Command:
    """restic snapshots as JSON, filtered to the watcher's snapshots (and a container/database)."""
    tags = [SNAPSHOT_TAG]
    if container is not None:
        tags.append(CONTAINER_TAG + container)
    if database is not None:
        tags.append(DATABASE_TAG + encode_name(database))
    argv = [restic, "--no-lock", "snapshots", "--json", "--tag", ",".join(tags)]
    if host is not None:
        argv += ["--host", host]
    return tuple(argv)


def restic_dump(restic: str, snapshot_id: str, database: str, suffix: str = DUMP_SUFFIX) -> Command:
    """restic dump of one database's dump file (named with its engine's `suffix`) from a snapshot, to stdout."""
    return (restic, "dump", snapshot_id, "/" + dump_filename(database, suffix))


def restic_dump_globals(restic: str, snapshot_id: str) -> Command:
    """restic dump of a globals snapshot's SQL, to stdout."""
    return (restic, "dump", snapshot_id, "/" + GLOBALS_FILENAME)


# restic forget's groups: by host and tags, each (container, database) history on its own; by host alone for
# a call whose filter names one history (its snapshots' tags may differ: an acknowledged one's, ACK_TAG).
GROUP_BY_HISTORY = "host,tags"
GROUP_BY_HOST = "host"


def restic_forget(restic: str, *, host: str, containers: Sequence[str], retention: Retention,
                  histories: Mapping[str, Collection[str]] | None = None, group_by: str = GROUP_BY_HISTORY) -> Command:
    """restic forget of the watcher's snapshots of `containers` on `host`, all with one retention.

    Grouped by host and tags (`group_by`), so each (container, database) history keeps its own snapshots.
    `histories` narrows a container to those of its histories named there (databases, GLOBALS_DATABASE for
    its globals), leaving its others alone (a flagged shrunken dump's, SPEC §11); a container mapped to
    none is left out. Raises ValueError when nothing is left to forget: without a tag filter restic would
    forget among every snapshot of the host.
    """
    argv = [restic, "forget", "--json", "--host", host]
    for container in sorted(containers):
        if histories is None or container not in histories:
            argv += ["--tag", f"{SNAPSHOT_TAG},{CONTAINER_TAG}{container}"]
            continue
        for database in sorted(histories[container]):
            argv += ["--tag", ",".join(history_tags(container, database))]
    if "--tag" not in argv:
        raise ValueError("restic forget without a tag filter would forget among every snapshot of the host")
    argv += ["--group-by", group_by,
             "--keep-daily", str(retention.daily), "--keep-weekly", str(retention.weekly),
             "--keep-monthly", str(retention.monthly)]
    return tuple(argv)


def restic_prune(restic: str) -> Command:
    """restic prune: removes the data no snapshot references any more."""
    return (restic, "prune")


def restic_unlock(restic: str) -> Command:
    """restic unlock: removes stale locks only (a dead process on this host, or older than 30 min)."""
    return (restic, "unlock")


def restic_retag(restic: str, *, host: str, old_name: str, new_name: str) -> Command:
    """restic tag that moves a renamed container's history to its new name."""
    return (restic, "tag", "--host", host, "--tag", f"{SNAPSHOT_TAG},{CONTAINER_TAG}{old_name}",
            "--add", CONTAINER_TAG + new_name, "--remove", CONTAINER_TAG + old_name)


def restic_add_tag(restic: str, snapshot_id: str, tag: str) -> Command:
    """restic tag that adds `tag` to one snapshot (restic writes it anew, under a new id, same time)."""
    return (restic, "tag", "--add", tag, snapshot_id)


def restic_stats(restic: str) -> Command:
    """restic stats of the packed data actually stored (the repository's size)."""
    return (restic, "--no-lock", "stats", "--json", "--mode", "raw-data")


def with_lock_wait(argv: Command, wait_s: float) -> Command:
    """The same restic command, waiting up to `wait_s` seconds (whole seconds, rounded up) for a repository
    lock another live process holds (WATCHER_LOCK_RETRY)."""
    return (argv[0], "--retry-lock", f"{math.ceil(wait_s)}s", *argv[1:])


EARLY_SOURCES = (("-m", "watcher.dockerexec"), ("-m", "watcher.keydump"))  # the helpers that take a hand-off


def handed_off(backup: Command, listener_fd: int, socket_path: str) -> tuple[Command, Command] | None:
    """The restic backup `backup` split so that its dump starts before restic: (the exec helper it would run,
    told to take restic's pipe over the listening socket `listener_fd` it inherits, restic running
    `python -m watcher.handoff socket_path` instead, which hands that pipe over and exits with the helper's
    verdict). None when the source of `backup` is neither the exec helper nor the key-ordered dump."""
    marker = backup.index("--stdin-from-command")
    source = backup[marker + 2:]
    if tuple(source[1:3]) not in EARLY_SOURCES or "--" not in source:
        return None
    end = source.index("--")
    helper = (*source[:end], "--handoff-fd", str(listener_fd), *source[end:])
    return helper, (*backup[:marker + 2], source[0], "-m", "watcher.handoff", socket_path)


def restic_version(restic: str) -> Command:
    """restic version."""
    return (restic, "version")


def restic_cat_config(restic: str) -> Command:
    """restic cat config: exit 0 if the repository exists, 10 if not, 12 on a wrong password."""
    return (restic, "--no-lock", "cat", "config")


def restic_init(restic: str) -> Command:
    """restic init."""
    return (restic, "init")


def pg_restore_database_entries_command() -> Command:
    """pg_restore printing, as SQL text, the schema of a custom-format dump on stdin with its database's
    own entries (owner, settings, ACL, comment), which only `--create` includes. It reads just the
    archive's table of contents (at the start) and exits: the writer before it sees a closed pipe."""
    return ("pg_restore", "--create", "--schema-only", "--file=-")


def database_entries_pipeline(restic: str, snapshot_id: str, database: str, container_id: str,
                              user: str | None = None) -> tuple[Command, Command]:
    """The pipeline that prints a snapshot's dump's database entries as SQL text: `restic dump` of the dump into
    the container's pg_restore_database_entries_command. With `user`, the exec gets that role's libpq
    environment (pg_env: not secret; pg_restore writing text connects to no server, so no password)."""
    lister = exec_helper(container_id, pg_restore_database_entries_command(), stdin=True,
                         env_values=pg_env(user, "postgres") if user is not None else None)
    return restic_dump(restic, snapshot_id, database), lister


def restic_copy(restic: str, snapshot_ids: Sequence[str]) -> Command:
    """restic copy of the snapshots `snapshot_ids` from the source repository (RESTIC_FROM_REPOSITORY and its
    password, from the environment) into the repository (RESTIC_REPOSITORY). Copied snapshots keep their
    time, host, tags and paths, and name their source in `original`."""
    return (restic, "copy", *snapshot_ids)


def restic_init_copy_chunker_params(restic: str) -> Command:
    """restic init of a copy with the chunker parameters of the source repository (RESTIC_FROM_REPOSITORY), so
    that copied data deduplicates against what the copy already holds."""
    return (restic, "init", "--copy-chunker-params")


def restic_dump_into(restic: str, snapshot_id: str, path: str, fifo: str) -> Command:
    """restic dump of the file `path` of a snapshot into `fifo`, started once the FIFO's reader is there
    (watcher.copyrelay --into)."""
    return (sys.executable, "-m", "watcher.copyrelay", "--into", fifo, "--", restic, "dump", snapshot_id, path)


def copy_relay(fifo: str, size: int) -> Command:
    """The streamed copy's source: relays `fifo` to stdout, failing unless exactly `size` bytes arrive."""
    return (sys.executable, "-m", "watcher.copyrelay", fifo, str(size))


def restic_backup_copied(restic: str, *, host: str, path: str, tags: Sequence[str], source: Command,
                         snapshot_time: datetime) -> Command:
    """restic backup into a copy of one snapshot streamed by `source`, with the host, tags, file `path` and time
    (whole seconds, RESTIC_TIME_ENV) of the snapshot it copies: every tag, so that the copy's snapshot says the
    same engine (restore reads it) and the same acknowledgement."""
    return _restic_backup(restic, host, path.lstrip("/"), tags, source, snapshot_time)
