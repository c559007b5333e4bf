"""Backup jobs: one snapshot per (container, database), streamed from pg_dump into restic.

A job never raises into its caller: every outcome, good or bad, comes back as a BackupResult.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog

from watcher import commands, engines, readiness
from watcher.clock import SystemClock
from watcher.config import Bounds
from watcher.discovery import Target
from watcher.durations import format_duration
from watcher.execute import Command, Completed, ExecError, Masker, run_in_container, run_pipeline
from watcher.progress import STATUS_READ_SECONDS, ProgressBoard, Tracker, restic_status_bytes
from watcher.restic import (
    EXIT_NO_REPOSITORY,
    EXIT_WRONG_PASSWORD,
    Repository,
    refused_retry,
    refused_retry_problem,
    repository_lock_problem,
    restic_error_text,
)
from watcher.stall import STALL_BOUND_NAMES

log = structlog.get_logger("watcher.jobs")
ALL_DATABASES_PLACEHOLDER = "*"
# A query's command inside the container may run this much longer than its statement_timeout, so that
# PostgreSQL's own error (naming the timeout) arrives before the runner gives up on the command.
QUERY_MARGIN_SECONDS = 30.0
# pg_isready gives up connecting after 3 s by itself; the exec around it gets this bound.
PROBE_TIMEOUT_SECONDS = 30.0
# A container up this long has finished its start-up (initdb, init scripts): its dump goes ahead
# without a pg_isready exec first, which costs the engine about 50 ms of CPU per target and pass.
SETTLED_AFTER_SECONDS = 120.0
# The least a container that started recently is waited for, however long ago it started.
MIN_READY_WAIT_SECONDS = 30.0


class JobError(Exception):
    """A step of a job failed; the message is masked and says which step."""


class NotReady(JobError):
    """PostgreSQL in the container did not accept connections within the wait."""


@dataclass(frozen=True)
class BackupResult:
    """What one (container, database) backup did."""

    target: str
    database: str
    ok: bool
    run_id: str
    started_at: datetime
    duration_s: float
    snapshot_id: str | None = None
    bytes_processed: int = 0
    bytes_added: int = 0
    error: str | None = None
    # restic could not open the repository (none there, or a wrong password) while it was still being
    # checked: nothing was attempted, the caller runs it again once the check has passed.
    repository_unverified: bool = False
    snapshot_time: datetime | None = None  # the time restic gave the snapshot (whole seconds, UTC)
    note: str | None = None  # what a user should know about a snapshot that was written (globals without passwords)
    # It failed because PostgreSQL did not accept connections within the wait: the daemon backs off.
    not_ready: bool = False


@dataclass
class JobContext:
    """What every job needs, built once by the CLI entry."""

    docker_host: str
    repository: Repository
    host: str
    masker: Masker
    cancel: threading.Event = field(default_factory=threading.Event)
    bounds: Bounds = field(default_factory=Bounds)
    # False while the repository check runs beside the first backups (one-shot `backup`): then a
    # repository restic cannot open is the check's to report, not each backup's.
    repository_verified: bool = True
    # Containers whose dump role may not read password hashes: their globals are dumped without them.
    globals_without_passwords: set[str] = field(default_factory=set)
    # The running jobs' progress, read by the terminal, the log, the metrics and `status`.
    progress: ProgressBoard = field(default_factory=ProgressBoard)
    # WATCHER_SHRINK_THRESHOLD: retention spares a history whose newest dump fell below this share (SPEC §11).
    shrink_threshold: float = 0.5
    # WATCHER_DUMP_ORDER: "physical" (pg_dump alone) or "key" (watcher.keydump).
    dump_order: str = "key"


def new_run_id() -> str:
    """A short random id that ties together every log line of one job."""
    return uuid.uuid4().hex[:12]


def lock_wait_of(ctx: JobContext, target: Target) -> float:
    """The bound on lock waits for a target: its label, else WATCHER_LOCK_WAIT_TIMEOUT."""
    return target.lock_wait_timeout_s if target.lock_wait_timeout_s is not None else ctx.bounds.lock_wait_s


def stall_timeout_of(ctx: JobContext, target: Target) -> float:
    """The stall bound of a target's dumps: its label, else WATCHER_STALL_TIMEOUT."""
    return target.stall_timeout_s if target.stall_timeout_s is not None else ctx.bounds.stall_s


def run_on_live(ctx: JobContext, target: Target, argv: Command, database: str, *, stdin: bytes | None = None,
                timeout: float | None = None) -> Completed:
    """Runs psql or pg_isready in a target's container against its live PostgreSQL, bounded.

    The session has lock_timeout and statement_timeout set (PGOPTIONS), and the command itself the
    query bound plus a margin (or `timeout`), and ends on cancel. Returns the runner's Completed
    (masked); raises ExecError when the engine cannot run the command.
    """
    creds = target.credentials
    env = commands.live_query_env(creds.user, database, lock_wait_s=lock_wait_of(ctx, target),
                                  statement_s=ctx.bounds.query_s)
    if creds.password:
        env["PGPASSWORD"] = creds.password
    return run_in_container(
        ctx.docker_host, target.container_id, argv, env=env, masker=ctx.masker.with_secrets([creds.password]),
        timeout=timeout if timeout is not None else ctx.bounds.query_s + QUERY_MARGIN_SECONDS,
        cancel=ctx.cancel, stdin=stdin)


_DUMP_LOCK = re.compile(r"Query was: LOCK TABLE (.+?) IN ACCESS SHARE MODE")
_LABELLED_QUERY = re.compile(r"^LINE \d+: SELECT '((?:[^']|'')*)',", re.MULTILINE)
# What watcher.engines.mariadb's dump wrapper says when it interrupted a data query that waited too long.
_MARIADB_LOCK = re.compile(r"^lock wait: gave up after \S+ waiting for a lock: SELECT .*? FROM (`(?:[^`]|``)+`)",
                           re.MULTILINE)


def lock_wait_problem(stderr: str, lock_wait_s: float) -> str | None:
    """A sentence naming the lock wait when `stderr` shows that pg_dump or a query gave up waiting for
    a lock another session holds (a migration's ACCESS EXCLUSIVE lock); None when it does not."""
    bound = format_duration(lock_wait_s)
    why = ("another session holds a conflicting lock (a migration?); the bound is WATCHER_LOCK_WAIT_TIMEOUT "
           "or the label backup-watcher.lock-wait-timeout")
    dump_lock = _DUMP_LOCK.search(stderr)
    if dump_lock is not None and "statement timeout" in stderr:
        return f"pg_dump gave up waiting for a lock on table {dump_lock.group(1)} after {bound}: {why}"
    if (mariadb_lock := _MARIADB_LOCK.search(stderr)) is not None:
        return f"mariadb-dump gave up waiting for a lock on table {mariadb_lock.group(1)} after {bound}: {why}"
    if "due to lock timeout" in stderr:
        labelled = _LABELLED_QUERY.search(stderr)
        table = f" on table {labelled.group(1).replace(chr(39) * 2, chr(39))}" if labelled else ""
        return f"a query gave up waiting for a lock{table} after {bound}: {why}"
    return None


def stall_problem(detail: str) -> tuple[str | None, str]:
    """The exec helper's stall sentence (watcher.stall) out of a failed backup's error text, and the text
    without it: (None, detail) when the dump did not stall."""
    lines = detail.splitlines()
    for index, line in enumerate(lines):
        if STALL_BOUND_NAMES in line:
            rest = lines[:index] + lines[index + 1:]
            return line.removeprefix("backup-watcher: "), "\n".join(rest)
    return None, detail


def server_name(target: Target) -> str:
    """The name of the target's server in messages: PostgreSQL, MariaDB, MySQL, or the container's own."""
    names = {engines.POSTGRES: "PostgreSQL", engines.MARIADB: "MariaDB", engines.MYSQL: "MySQL"}
    return names.get(target.engine, f"the server in {target.name}")


def list_databases(ctx: JobContext, target: Target) -> list[str]:
    """Asks the target's engine for every database a backup of `all` covers; raises JobError."""
    return engines.engine_named(target.engine).list_databases(ctx, target)


def pg_list_databases(ctx: JobContext, target: Target) -> list[str]:
    """Asks the container's PostgreSQL for every non-template database; raises JobError."""
    try:
        done = run_on_live(ctx, target, commands.list_databases_command(), target.credentials.database)
    except ExecError as exc:
        raise JobError(f"listing databases in {target.name}: {exc}") from exc
    if not done.ok:
        hint = lock_wait_problem(done.stderr_tail, lock_wait_of(ctx, target))
        raise JobError(f"listing databases in {target.name} failed: "
                       + (f"{hint}\n{done.describe_failure()}" if hint else done.describe_failure()))
    names = [name for name in done.stdout.decode().split("\0") if name.strip()]
    if not names:
        # Nothing to back up is not a success: a target that says "all" expects at least one.
        raise JobError(f"no database to back up in {target.name}: every database is a template or refuses "
                       "connections")
    return names


_PG_ISREADY_CODES = {1: "the server rejects connections (starting up?)", 2: "no response from the server",
                     3: "no connection attempt was made"}


def _not_ready_reason(ctx: JobContext, target: Target) -> str | None:
    """The engine's readiness probe, once: None when the server accepts connections, else why not.
    Raises JobError naming the container when it is gone or stopped."""
    return engines.engine_named(target.engine).not_ready_reason(ctx, target)


def raise_if_gone(target: Target, exc: ExecError) -> str:
    """The reason an exec into the target's container failed; raises JobError naming the container when it
    is gone or stopped (no probe can succeed there)."""
    reason = str(exc)
    if "is not running" in reason or "No such container" in reason:
        raise JobError(f"{target.name} is gone or stopped: {reason}") from exc
    return reason


def probe_exec_problem(target: Target, exc: ExecError) -> str:
    """Why a readiness probe's exec failed, as the reason to wait on; raises JobError naming the container
    when it is gone or stopped, NotReady when it is paused (it does not resume by itself: waiting for it
    would only hold the job)."""
    reason = raise_if_gone(target, exc)
    if "is paused" in reason:
        raise NotReady(f"{target.name} is paused: {reason}") from exc
    return reason


def pg_not_ready_reason(ctx: JobContext, target: Target) -> str | None:
    """One pg_isready in the container; returns None when PostgreSQL accepts connections, else why
    not. Raises JobError naming the container when it is gone or stopped."""
    try:
        done = run_on_live(ctx, target, commands.pg_isready_command(), target.credentials.database,
                           timeout=PROBE_TIMEOUT_SECONDS)
    except ExecError as exc:
        return probe_exec_problem(target, exc)
    if done.ok:
        return None
    if done.timed_out or done.cancelled or done.problem:
        return done.describe_failure()
    if done.returncode in NOT_STARTED_CODES:
        said = done.stdout.decode(errors="replace").strip()[-300:]  # the engine writes its reason there
        if program_missing(said):
            # No waiting makes a missing program appear: most likely not a PostgreSQL container at all.
            raise JobError(not_postgres_problem(target, said))
        return said or f"pg_isready could not be started (exit {done.returncode})"
    # pg_isready: 1 = rejecting connections (starting up), 2 = no response, 3 = no attempt made.
    return done.stderr_tail or _PG_ISREADY_CODES.get(done.returncode, f"pg_isready exit {done.returncode}")


# The engine's exit codes of an exec whose program could not be started: also for passing causes (a container
# stopping between the exec's creation and start, a pids limit), so only the engine's words decide.
NOT_STARTED_CODES = (126, 127)


def program_missing(engine_said: str) -> bool:
    """Whether the engine's reason for an exec that did not start says the program does not exist there."""
    return "executable file not found" in engine_said or "no such file or directory" in engine_said


def not_postgres_problem(target: Target, engine_said: str) -> str:
    """Why a container without pg_isready is no PostgreSQL target, and what to do."""
    return (f"pg_isready could not be started in {target.name} ({engine_said}): it does not look like a "
            f"PostgreSQL container (image {target.image}), or its PATH lacks PostgreSQL's programs. If it runs "
            f"MariaDB or MySQL, set the label backup-watcher.engine=mariadb or mysql; another database: "
            f"engine=command with backup-watcher.dump-command; not a database: label it "
            f"backup-watcher.enable=false or narrow WATCHER_CONTAINER_PATTERNS")


def wait_until_ready(ctx: JobContext, target: Target, timeout: float) -> None:
    """Waits until PostgreSQL in the container accepts connections (a container that just started
    may still be running initdb); raises NotReady naming the container when it does not in time (at
    once when it is paused; with `timeout` 0 after one probe), JobError when it is gone or stopped."""
    deadline = time.monotonic() + timeout
    while (last := _not_ready_reason(ctx, target)) is not None:
        if ctx.cancel.is_set():
            raise JobError(f"aborted by shutdown while waiting for {server_name(target)} in {target.name}")
        if time.monotonic() >= deadline:
            raise NotReady(f"{server_name(target)} in {target.name} did not accept connections within "
                           f"{timeout:.0f}s: {last}")
        ctx.cancel.wait(1.0)


SERVING_ANSWER = readiness.Answer(listening=True, database_exists=True)


def _serving_answer(ctx: JobContext, target: Target) -> readiness.Answer | str:
    """One probe of the container's PostgreSQL (readiness.PROBE_SQL): its Answer, or why none came; a
    server that accepts connections but not this session (a role or database that does not exist) counts as
    serving. Raises JobError when the container is gone or stopped, NotReady when it is paused."""
    database = target.credentials.database
    try:
        done = run_on_live(ctx, target, commands.psql_query_command(readiness.probe_sql(database)), database,
                           timeout=PROBE_TIMEOUT_SECONDS)
    except ExecError as exc:
        return probe_exec_problem(target, exc)
    if not done.ok:
        # A server that refuses this role or database still serves (pg_isready says so): the dump's own
        # error will name the problem, which waiting would not cure.
        why_not = _not_ready_reason(ctx, target)
        return SERVING_ANSWER if why_not is None else why_not
    output = done.stdout.decode(errors="replace")
    return readiness.parse_probe(output) or f"unexpected answer {output[:80]!r}"


def wait_until_serving(ctx: JobContext, target: Target, timeout: float) -> None:
    """Waits until the container's own, final PostgreSQL serves (not the temporary server an entrypoint
    runs for initdb, which answers and then stops: see watcher.readiness); `timeout` 0 probes once.
    Raises NotReady naming the container when it does not in time, JobError when it is gone or stopped."""
    try:
        readiness.wait_until_serving(lambda: _serving_answer(ctx, target), bound_s=timeout, clock=SystemClock(),
                                     cancel=ctx.cancel)
    except readiness.NotServing as exc:
        raise NotReady(f"PostgreSQL in {target.name} did not accept connections within {timeout:.0f}s: "
                       f"{exc}") from exc


@dataclass(frozen=True)
class ReadinessPlan:
    """Whether to wait for PostgreSQL before a target's first dump, and how long waiting may take."""

    probe_first: bool
    wait_s: float


def readiness_plan(uptime_s: float | None, ready_timeout_s: float) -> ReadinessPlan:
    """Returns the plan for a container that has been running `uptime_s` seconds (None: unknown).

    A container that started recently may still run initdb: wait for it first, up to what is left
    of `ready_timeout_s` (WATCHER_READY_TIMEOUT) since its start, MIN_READY_WAIT_SECONDS at least
    (never more than the bound itself). A settled one goes straight to the dump; only if that fails
    is PostgreSQL probed, and then waited for as long as after a start (crash recovery of a big
    cluster takes a while), and the dump run again.
    """
    if uptime_s is None or uptime_s < SETTLED_AFTER_SECONDS:
        left = ready_timeout_s - max(0.0, uptime_s or 0.0)
        return ReadinessPlan(True, max(min(MIN_READY_WAIT_SECONDS, ready_timeout_s), left))
    return ReadinessPlan(False, ready_timeout_s)


def is_ready(ctx: JobContext, target: Target) -> bool:
    """One pg_isready in the container; returns whether PostgreSQL accepts connections (False also
    when the container is gone or the exec itself fails)."""
    try:
        return _not_ready_reason(ctx, target) is None
    except JobError:
        return False


def _summary(lines: list[str]) -> dict[str, object]:
    for line in reversed(lines):
        if '"summary"' in line:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("message_type") == "summary":
                return message
    return {}


def backup_database(ctx: JobContext, target: Target, database: str, run_id: str,
                    log_failure: bool = True) -> BackupResult:
    """Streams one database's dump into one snapshot; returns the result, never raises.

    The snapshot is written only when pg_dump exited 0 and its stream arrived whole: restic runs
    the exec helper with --stdin-from-command and discards everything if the helper fails.
    With log_failure=False a failure is returned without its `backup_failed` line: the caller may
    still try again, and logs the failure that stands (log_failed_backup).
    """
    return _back_up(ctx, target, database, run_id, lambda at: _backup_command(ctx, target, database, at),
                    log_failure)


def backup_globals(ctx: JobContext, target: Target, run_id: str, log_failure: bool = True) -> BackupResult:
    """Streams the container's globals (pg_dumpall --globals-only) into one snapshot, through the same
    sealed exec helper and integrity gate as a dump; returns the result (database GLOBALS_DATABASE),
    never raises.

    A dump role that may not read password hashes (pg_authid) still gets the roles: the dump runs
    again with --no-role-passwords, said once per container and process (`globals_without_passwords`),
    and later passes go straight to that form. The result's `note` says so.
    """
    label = commands.GLOBALS_DATABASE
    if target.name not in ctx.globals_without_passwords:
        result = _back_up(ctx, target, label, run_id, lambda at: _globals_command(ctx, target, at, True),
                          log_failure=False)
        if result.ok or result.repository_unverified or "pg_authid" not in (result.error or ""):
            if not result.ok and not result.repository_unverified and log_failure:
                log_failed_backup(result)
            return result
        ctx.globals_without_passwords.add(target.name)
        log.warning("globals_without_passwords", target=target.name, run_id=run_id, role=target.credentials.user,
                    reason=NO_ROLE_PASSWORDS_NOTE)
    result = _back_up(ctx, target, label, run_id, lambda at: _globals_command(ctx, target, at, False), log_failure)
    return replace(result, note=NO_ROLE_PASSWORDS_NOTE) if result.ok else result


def backup_one(ctx: JobContext, target: Target, database: str, run_id: str, log_failure: bool = True) -> BackupResult:
    """backup_globals for the database GLOBALS_DATABASE, else backup_database; never raises."""
    if database == commands.GLOBALS_DATABASE:
        return backup_globals(ctx, target, run_id, log_failure)
    return backup_database(ctx, target, database, run_id, log_failure)


NO_ROLE_PASSWORDS_NOTE = ("roles without password hashes: the dump role may not read pg_authid (make it a "
                          "superuser, or set backup-watcher.user to one, to keep the passwords)")


def _back_up(ctx: JobContext, target: Target, database: str, run_id: str,
             command: Callable[[datetime], tuple[Command, dict[str, str]]], log_failure: bool) -> BackupResult:
    """Runs one restic backup of `command(snapshot_time)`; returns its result, never raises."""
    bound = log.bind(target=target.name, database=database, run_id=run_id)
    started_at = datetime.now(UTC)
    started = time.monotonic()
    # The watcher sets the snapshot's time itself, so that it knows it without listing the repository
    # afterwards (one more repository open per backup, as costly as the backup's own on a small database).
    snapshot_time = started_at.replace(microsecond=0)
    argv, env = command(snapshot_time)
    bound.info("backup_started")
    stdout_lines: list[str] = []
    try:
        with ctx.progress.track("backup", target.name, database) as tracker, early_dump(argv) as (members, fds):
            done = run_pipeline(
                members, env=env,
                masker=ctx.masker.with_secrets([target.credentials.password]),
                timeout=ctx.bounds.dump_s, cancel=ctx.cancel,
                capture_stdout=False, on_stdout_line=_keep_summary_lines(stdout_lines, tracker),
                # restic retries a backend that fails (a full disk, a server gone) for up to 15 minutes, even
                # after its source gave up: once the exec helper says the stream stalled, restic ends too.
                end_on_stderr=lambda line: STALL_BOUND_NAMES in line, first_fds=fds,
            )
        # restic's exit is the backup's (the helper's verdict is its command's exit); the helper's words stay.
        done = replace(done, argv=done.argv[-1:], returncodes=done.returncodes[-1:])
    except OSError as exc:
        failed = BackupResult(target.name, database, False, run_id, started_at, time.monotonic() - started,
                              error=f"cannot start restic ({ctx.repository.binary!r}): {exc}")
        if log_failure:
            log_failed_backup(failed)
        return failed
    result = _backup_result(ctx, target, database, run_id, started_at, time.monotonic() - started, done,
                            stdout_lines, snapshot_time)
    if result.ok:
        ctx.progress.expect(target.name, database, result.bytes_processed)
        bound.info("backup_succeeded", snapshot_id=(result.snapshot_id or "")[:8],
                   duration_s=round(result.duration_s, 3), bytes=result.bytes_processed,
                   bytes_added=result.bytes_added)
    elif result.repository_unverified:
        bound.info("backup_waits_for_repository_check", restic_exit=done.returncode,
                   duration_s=round(result.duration_s, 3))
    elif log_failure:
        log_failed_backup(result)
    return result


@contextlib.contextmanager
def early_dump(backup: Command) -> Iterator[tuple[list[Command], tuple[int, ...]]]:
    """The pipeline that runs the restic backup `backup`, and the descriptors its first member inherits: when
    its source is the exec helper, the helper first (the dump starts at once, while restic opens the
    repository: key derivation, index and lock, a second or more before restic starts its command), with a
    listening socket in a private directory (removed after the `with`), and restic running the hand-off
    command (watcher.handoff) that gives the helper restic's pipe. The integrity gate is the same: restic
    stores a snapshot only when that command exits 0, which it does only with the helper's verdict of a whole,
    sealed, successful dump. Where no socket can be made (a TMPDIR too long for a socket's path), restic runs
    the helper itself, as before, and a debug line says why."""
    with tempfile.TemporaryDirectory(prefix="bw-handoff-") as directory:
        path = os.path.join(directory, "dump.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(1)
            split = commands.handed_off(backup, listener.fileno(), path)
        except OSError as exc:
            log.debug("dump_starts_under_restic", reason=str(exc))
            split = None
        if split is None:
            listener.close()
            yield [backup], ()
            return
        # run_pipeline closes the descriptor once the helper has it.
        yield list(split), (listener.detach(),)


def _globals_command(ctx: JobContext, target: Target, snapshot_time: datetime,
                     role_passwords: bool) -> tuple[Command, dict[str, str]]:
    """restic backup of the container's globals (the engine's sealed source) and its environment."""
    engine = engines.engine_named(target.engine)
    source, source_env = engine.globals_source(ctx, target, role_passwords)
    argv = commands.restic_backup_globals(ctx.repository.binary, host=ctx.host, container=target.name,
                                          source=source, snapshot_time=snapshot_time, engine=engine.name)
    return _restic_backup_job(ctx, argv, source_env)


def pg_globals_source(ctx: JobContext, target: Target, role_passwords: bool) -> tuple[Command, dict[str, str]]:
    """pg_dumpall --globals-only through the exec helper (sealed), and PGPASSWORD for it when known."""
    creds = target.credentials
    source = commands.exec_helper(
        target.container_id, commands.pg_dumpall_globals_command(role_passwords=role_passwords),
        env_values=commands.pg_env(creds.user, creds.database),
        env_names=["PGPASSWORD"] if creds.password else [], seal=True, stall_timeout_s=stall_timeout_of(ctx, target),
    )
    return source, {"PGPASSWORD": creds.password} if creds.password else {}


def _backup_command(ctx: JobContext, target: Target, database: str,
                    snapshot_time: datetime) -> tuple[Command, dict[str, str]]:
    """restic backup of one database's dump (the engine's sealed source) and its environment."""
    engine = engines.engine_named(target.engine)
    source, source_env = engine.dump_source(ctx, target, database)
    argv = commands.restic_backup(
        ctx.repository.binary, host=ctx.host, container=target.name, database=database, source=source,
        snapshot_time=snapshot_time, engine=engine.name, suffix=engine.dump_suffix,
    )
    return _restic_backup_job(ctx, argv, source_env)


def _restic_backup_job(ctx: JobContext, argv: Command, source_env: dict[str, str]) -> tuple[Command, dict[str, str]]:
    """A restic backup's argv with the repository lock wait, and the environment of its pipeline (restic's and the
    dump source's)."""
    env = ctx.repository.pipeline_env(ctx.docker_host, commands.RESTIC_TIME_ENV, commands.RESTIC_BACKUP_PROGRESS_ENV,
                                      source_env)
    return commands.with_lock_wait(argv, ctx.bounds.lock_retry_s), env


def pg_dump_source(ctx: JobContext, target: Target, database: str) -> tuple[Command, dict[str, str]]:
    """pg_dump of `database` through the exec helper (sealed), and PGPASSWORD for it when known."""
    creds = target.credentials
    env_values = commands.pg_env(creds.user, database)
    env_names = ["PGPASSWORD"] if creds.password else []
    dump = commands.pg_dump_command(lock_wait_of(ctx, target))
    if ctx.dump_order == "key":
        source = commands.key_ordered_dump(target.container_id, dump, env_names=env_names, env_values=env_values,
                                           lock_wait_s=lock_wait_of(ctx, target),
                                           stall_timeout_s=stall_timeout_of(ctx, target))
    else:
        source = commands.exec_helper(target.container_id, dump, env_values=env_values, env_names=env_names,
                                      seal=True, stall_timeout_s=stall_timeout_of(ctx, target))
    return source, {"PGPASSWORD": creds.password} if creds.password else {}


def _backup_result(ctx: JobContext, target: Target, database: str, run_id: str, started_at: datetime,
                   duration: float, done: Completed, stdout_lines: list[str],
                   snapshot_time: datetime) -> BackupResult:
    """What a finished restic backup did: the snapshot, or why there is none (messages are the runner's,
    already masked)."""
    summary = _summary(stdout_lines)
    snapshot_id = summary.get("snapshot_id")
    if done.ok and isinstance(snapshot_id, str):
        processed = int(summary.get("total_bytes_processed", 0) or 0)  # type: ignore[call-overload]
        added = int(summary.get("data_added_packed", summary.get("data_added", 0)) or 0)  # type: ignore[call-overload]
        return BackupResult(target.name, database, True, run_id, started_at, duration,
                            snapshot_id=snapshot_id, bytes_processed=processed, bytes_added=added,
                            snapshot_time=snapshot_time)
    detail = restic_error_text(done.stderr_tail.splitlines())
    if not ctx.repository_verified and done.returncode in (EXIT_NO_REPOSITORY, EXIT_WRONG_PASSWORD):
        return BackupResult(target.name, database, False, run_id, started_at, duration,
                            error=detail or f"restic exit {done.returncode}", repository_unverified=True)
    if done.cancelled:
        head = "backup aborted by shutdown; no snapshot was written"
    elif done.timed_out:
        head = (f"backup stopped: it ran longer than WATCHER_DUMP_TIMEOUT ({format_duration(ctx.bounds.dump_s)}); "
                "no snapshot was written")
    elif refused_retry(detail) == "snapshot":
        head = f"backup failed (restic exit {done.returncode}) while it wrote the snapshot"
    else:
        head = f"backup failed (restic exit {done.returncode}); no snapshot was written"
    stalled, detail = stall_problem(detail)
    if stalled is not None and not done.cancelled:
        head = f"backup aborted: {stalled}; no snapshot was written"
    hint = (lock_wait_problem(detail, lock_wait_of(ctx, target))
            or repository_lock_problem(done.returncode, detail, ctx.bounds.lock_retry_s)
            or refused_retry_problem(detail))
    error = "\n".join(part for part in (head, hint, detail) if part)
    return BackupResult(target.name, database, False, run_id, started_at, duration, error=error)


def log_failed_backup(result: BackupResult) -> None:
    """Writes the `backup_failed` line of a failure that stands."""
    log.error("backup_failed", target=result.target, database=result.database, run_id=result.run_id,
              error=result.error, duration_s=round(result.duration_s, 3))


def _keep_summary_lines(sink: list[str], tracker: Tracker) -> Callable[[str], None]:
    # restic --json prints a status line 4 times a second (RESTIC_BACKUP_PROGRESS_ENV): that rate is also what
    # ends a restic whose watcher died (its next line meets a closed pipe), so a killed watcher's backup does
    # not go on to a snapshot by itself. Only one line in STATUS_READ_SECONDS is parsed, for the progress
    # board; every other line is kept for the summary.
    last_read = 0.0

    def keep(line: str) -> None:
        nonlocal last_read
        if '"status"' in line:
            now = time.monotonic()
            if now - last_read >= STATUS_READ_SECONDS and (done := restic_status_bytes(line)) is not None:
                tracker.set_bytes(done)
                last_read = now
            return
        sink.append(line)
    return keep


@dataclass
class _OneWait:
    """Only one wait for PostgreSQL per job: a second failure after it came back is the dump's own."""

    wait_s: float
    may_wait: bool = True


def backup_target(ctx: JobContext, target: Target, *, ready: bool = False) -> list[BackupResult]:
    """Backs up every database of a target, one snapshot each; returns one result per database.

    `ready`: PostgreSQL was just seen accepting connections (the daemon's probe), so the job does not
    probe before its first dump, whatever the container's age. Never raises: a failure to even find the
    databases is returned as a failed result (`not_ready` when PostgreSQL did not answer).
    """
    run_id = new_run_id()
    started_at, started = datetime.now(UTC), time.monotonic()
    uptime = None if target.started_at is None else max(0.0, time.time() - target.started_at)
    plan = ReadinessPlan(False, ctx.bounds.ready_s) if ready else readiness_plan(uptime, ctx.bounds.ready_s)
    wait = _OneWait(plan.wait_s)
    try:
        databases = _databases_of(ctx, target, wait, plan.probe_first)
    except JobError as exc:
        duration = time.monotonic() - started
        # Every database the target is meant to have failed; "*" stands for "all" before they are known.
        failed = [BackupResult(target.name, database, False, run_id, started_at, duration, error=str(exc),
                               not_ready=isinstance(exc, NotReady))
                  for database in target.databases or [ALL_DATABASES_PLACEHOLDER]]
        for result in failed:
            log_failed_backup(result)
        return failed
    # The globals first: a restore on a fresh host takes the globals snapshot at or before a database's.
    results = ([_backup_with_one_wait(ctx, target, commands.GLOBALS_DATABASE, run_id, wait, started)]
               if engines.engine_named(target.engine).has_globals(target) else [])
    for database in databases:
        if ctx.cancel.is_set():
            break
        results.append(_backup_with_one_wait(ctx, target, database, run_id, wait, started))
    return results


def _databases_of(ctx: JobContext, target: Target, wait: _OneWait, probe_first: bool) -> list[str]:
    """The databases to back up (listed for `all`), PostgreSQL waited for first when the plan says so,
    or once when listing fails because it is not up; raises JobError."""
    if probe_first:
        wait_until_ready(ctx, target, wait.wait_s)
        wait.may_wait = False
    if not target.all_databases:
        return list(target.databases)
    try:
        return list_databases(ctx, target)
    except JobError:
        if not wait.may_wait or is_ready(ctx, target):
            raise
        wait.may_wait = False
        wait_until_ready(ctx, target, wait.wait_s)
        return list_databases(ctx, target)


def _backup_with_one_wait(ctx: JobContext, target: Target, database: str, run_id: str, wait: _OneWait,
                          started: float) -> BackupResult:
    """One database's backup; when it failed because PostgreSQL is not up (restarting, recovering) and
    the job may still wait, waits for it once and runs the dump again (no snapshot was written).
    The database GLOBALS_DATABASE stands for the container's globals."""
    def attempt(log_failure: bool) -> BackupResult:
        return backup_one(ctx, target, database, run_id, log_failure)

    result = attempt(not wait.may_wait)
    if result.ok or result.repository_unverified or not wait.may_wait:
        return result
    if ctx.cancel.is_set() or is_ready(ctx, target):
        log_failed_backup(result)
        return result
    wait.may_wait = False
    event = "postgres_not_ready" if target.engine == engines.POSTGRES else "server_not_ready"
    log.warning(event, target=target.name, database=database, run_id=run_id,
                error=result.error, wait_s=wait.wait_s)
    try:
        wait_until_ready(ctx, target, wait.wait_s)
    except JobError as exc:
        result = replace(result, error=f"{result.error}\n{exc}", duration_s=time.monotonic() - started,
                         not_ready=isinstance(exc, NotReady))
        log_failed_backup(result)
        return result
    return attempt(True)


def check_repository(ctx: JobContext, init: bool) -> None:
    """Checks restic's version and the repository; raises ResticError naming the culprit."""
    ctx.repository.version()
    if ctx.repository.ensure(init):
        log.info("repository_initialised", repository=ctx.repository.label)
