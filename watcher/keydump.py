"""A dedup-stable dump: pg_dump's custom archive with the data of large keyed tables in key order.

`python -m watcher.keydump --container ID [--env NAME[=VALUE]]... --lock-wait-ms N [--handoff-fd FD] -- pg_dump
ARGS...` writes to stdout (or, started before restic, to the pipe restic's command hands over: watcher.handoff)
a custom-format archive that pg_restore restores exactly as pg_dump's own, and exits 0 only when every part of
it arrived whole (restic's --stdin-from-command then writes the snapshot).

Why: on a table where autovacuum has run, PostgreSQL puts new rows into free space all over the table,
so pg_dump's physical row order changes everywhere after a small change and restic stores the whole
table again. Rows in key order change only where rows changed (issue 19).

How, in one snapshot, without any file and without feeding any exec (a socket proxy older than HAProxy
3.1 cannot carry an exec's input; the SQL goes in through the exec's environment, watcher.keysql):
1. the holder session opens a REPEATABLE READ transaction, exports its snapshot, locks the keyed tables
   one by one as pg_dump does (bounded by the lock wait; a table it cannot lock is named), and lists the
   large ones (at least MIN_TABLE_BYTES, a primary key or unique not-null index, time-ordered keys first);
2. pg_dump runs with `--snapshot` of that transaction and `--exclude-table-data` for those tables: its
   archive has every entry but their data. Its header and table of contents are read here, a TABLE DATA
   entry is added for each table after pg_dump's own (watcher.archive), and the archive is passed on as
   it comes: pg_dump's stream is never held up (a socket proxy, HAProxy 2.6, was seen to drop the tail
   of an exec stream whose reader lagged when the exec ended; the end mark catches that, but it fails);
3. once pg_dump's stream ended whole, the copy session imports the snapshot and copies each table
   `ORDER BY` its key (an index scan: no sort, no temporary file); its rows go out as the tables' data
   blocks, in chunks that end where the server flagged a row (a hash of its key: watcher.keyrows), so
   an unchanged stretch of rows gives the same bytes every day.
The holder ends by itself once pg_dump and the copy session have come and gone (or after a grace when
none comes: a dump that failed), so nothing needs to tell it, and nothing is left behind for long.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from watcher import archive, keysql, stall
from watcher.dockerexec import (
    DEFAULT_DOCKER_HOST,
    EXIT_ENGINE_ERROR,
    SEAL_VARIABLE,
    DockerExecError,
    ExecAbort,
    ExecOutcome,
    SealedOutput,
    exec_env,
    last,
    plain_options,
    random_token,
    sealed_command,
    stall_watchdog,
    stream_exec,
    write_err,
)
from watcher.handoff import (
    Destination,
    HandOffError,
    Piece,
    RestartDump,
    delivered,
    destination_for,
    restarting,
)
from watcher.keyrows import CopyStream, HolderOutput, KeyDumpError, Table, exclude_pattern

READY_TIMEOUT_EXTRA_S = 120.0  # beyond the lock wait, for the holder's next line
SESSION_END_S = 30.0  # for a holder without tables to end (it ends at once)
CANCEL_S = 10.0  # for the query that cancels the sessions of a dump that failed
DIRECT_BYTES = 1 << 16  # smaller pieces are gathered (Output)

Write = Callable[[bytes | bytearray | memoryview], object]
WriteAll = Callable[[Sequence[Piece]], object]
Pieces = Callable[[list[memoryview]], object]

__all__ = ["KeyDumpError", "main", "run"]


class ExecThread:
    """One exec run to its end in a thread of its own: `failure` says why it did not succeed, once `ended`."""

    def __init__(self, what: str, target: Callable[[], ExecOutcome], on_end: Callable[[], object]) -> None:
        self._what = what
        self._target = target
        self._on_end = on_end
        self.failure: str | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            outcome = self._target()
            if not outcome.ok:
                self.failure = outcome.problem or f"{self._what} exited with status {outcome.exit_code}"
        except (DockerExecError, KeyDumpError, OSError) as exc:
            self.failure = str(exc)
        finally:
            self.ended.set()
            self._on_end()

    def succeeded_within(self, timeout: float) -> bool:
        """True when the exec ended within `timeout` seconds (from now) and succeeded."""
        return self.ended.wait(timeout) and self.failure is None


class ErrorTail:
    """A session's stderr passed on, its last ERROR line kept for the message of a failure."""

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        self._sink = sink
        self._tail = b""

    def feed(self, view: memoryview) -> None:
        data = bytes(view)
        self._sink(data)
        self._tail = (self._tail + data)[-4096:]

    def error(self) -> str | None:
        """psql's last `ERROR:` line (without psql's `psql:<stdin>:N:` prefix), None when there is none."""
        lines = [line for line in self._tail.decode("utf-8", errors="replace").splitlines() if "ERROR:" in line]
        return lines[-1][lines[-1].index("ERROR:"):] if lines else None


class ReadBatch:
    """The stdout pieces of one read of an exec stream (a frame's payload each), handed to `sink` together once
    the read's frames are out (stream_exec's on_read), after `on_piece` (the stall bound's count of progress):
    the dump's Python (its searches, the count) runs once per read of up to 1 MiB rather than once per frame of
    a few KiB, and the frames are never moved together first. `sink` gets a list it must not keep."""

    def __init__(self, sink: Pieces, on_piece: Callable[[], object]) -> None:
        self._sink = sink
        self._on_piece = on_piece
        self.pieces: list[memoryview] = []

    def flush(self) -> None:
        """Hands the pieces gathered since the last flush on, if any; raises what `sink` raises."""
        if self.pieces:
            self._on_piece()
            self._sink(self.pieces)
            self.pieces.clear()


def each_piece(feed: Callable[[memoryview], object]) -> Pieces:
    """A sink of a read's pieces that feeds them one by one to `feed` (output of a few lines)."""
    def sink(pieces: list[memoryview]) -> None:
        for piece in pieces:
            feed(piece)
    return sink


# Plain classes, not dataclasses: importing dataclasses (with inspect, ast and dis) and generating their methods
# cost this helper about 10 ms of CPU at every start (issue 20).
class Dump:
    """One key-ordered dump of one database: where it runs, and where its archive goes."""

    def __init__(self, docker_host: str, container: str, env: dict[str, str], write: Write, write_all: WriteAll,
                 on_stderr: Callable[[bytes], object], on_piece: Callable[[], object] = lambda: None) -> None:
        self.docker_host = docker_host
        self.container = container
        self.env = env
        self.write = write
        self.write_all = write_all
        self.on_stderr = on_stderr
        self.on_piece = on_piece
        self.token = random_token()
        self.cancelled = False
        self.holder_done = False

    def session_stderr(self, holder: bool = False) -> ErrorTail:
        """Where a session's stderr goes: on to ours, but for the errors of our own cancels."""
        return ErrorTail(lambda data: None if self.cancelled or (holder and self.holder_done)
                         else self.on_stderr(data))

    def stream(self, cmd: Sequence[str], env: dict[str, str], on_stdout: Pieces,
               on_stderr: Callable[[memoryview], object]) -> ExecOutcome:
        """Runs `cmd` in the container (stream_exec), its stdout to `on_stdout` a read at a time (ReadBatch);
        returns its outcome, raises DockerExecError and what `on_stdout` raises."""
        batch = ReadBatch(on_stdout, self.on_piece)
        return stream_exec(self.docker_host, self.container, cmd, env=env, on_stdout=batch.pieces.append,
                           on_read=batch.flush, on_stderr=on_stderr, gather=True)

    def session(self, role: str, script: str, on_stdout: Pieces, stderr: ErrorTail,
                on_end: Callable[[], object]) -> ExecThread:
        """A psql session (not started) running `script`, named by `role` (keysql.app_name)."""
        env = {**self.env, keysql.SCRIPT_VARIABLE: script, "PGAPPNAME": keysql.app_name(self.token, role)}
        return ExecThread(f"the {role} session's psql",
                          lambda: self.stream(keysql.script_command(), env, on_stdout, stderr.feed), on_end)

    def cancel_sessions(self) -> None:
        """Cancels what still runs of this dump in the database (the holder's wait, the copy, pg_dump) once it
        failed, so that its locks go at once; best effort, bounded by CANCEL_S (else the holder ends by itself,
        keysql.HOLDER_GRACE_S after the others)."""
        sql = ("SELECT pg_catalog.pg_cancel_backend(pid) FROM pg_catalog.pg_stat_activity "  # noqa: S608 (hex token)
               f"WHERE application_name LIKE 'bw-keydump-{self.token}-%' AND pid <> pg_catalog.pg_backend_pid()")
        self.cancelled = True
        abort = ExecAbort()
        timer = threading.Timer(CANCEL_S, abort.abort)
        timer.start()
        try:
            stream_exec(self.docker_host, self.container, (*keysql.PSQL, "-c", sql), env=self.env,
                        on_stdout=lambda _view: None, on_stderr=lambda _view: None, abort=abort)
        except (DockerExecError, OSError):
            pass
        finally:
            timer.cancel()


def copy_settings(entries: list[archive.Entry]) -> str:
    """The settings pg_dump's own COPY ran with (setup_connection), and the archive's encoding."""
    encoding = next((e.defn for e in entries if e.desc == "ENCODING" and e.defn), "")
    return ("SET DateStyle = ISO;\nSET IntervalStyle = postgres;\nSET extra_float_digits = 3;\n"
            "SET row_security = off;\n" + encoding)


class ArchiveFilter:
    """pg_dump's stdout on its way out: the header and TOC rewritten (a TABLE DATA entry per keyed table,
    after pg_dump's own), the rest passed on as it comes. pg_dump's stream is never held up here: a socket
    proxy (HAProxy 2.6) was seen to drop the tail of an exec stream whose reader lagged when it ended."""

    def __init__(self, dump: Dump, tables: list[Table]) -> None:
        self.dump = dump
        self.tables = tables
        self.head: archive.Head | None = None
        self.dump_ids: tuple[int, ...] = ()
        self.settings = ""
        self._buf = bytearray()

    def feed_all(self, pieces: Sequence[Piece]) -> None:
        """Takes the next pieces of pg_dump's output, in order; raises KeyDumpError on an archive it cannot read."""
        for at, piece in enumerate(pieces):
            if self.head is not None:
                self.dump.write_all(pieces[at:])
                return
            self.feed(piece)

    def feed(self, data: Piece) -> None:
        """Takes the next piece of pg_dump's output; raises KeyDumpError on an archive it cannot read."""
        if self.head is not None:
            self.dump.write(data)
            return
        self._buf += data
        try:
            head, entries, end = archive.read_head(self._buf)
        except archive.Incomplete:
            return
        except archive.ArchiveError as exc:
            raise KeyDumpError(str(exc)) from exc
        keyed = {t.oid: t for t in self.tables}
        doubled = [keyed[int(e.oid)].qualified for e in entries if e.desc == "TABLE DATA" and int(e.oid) in keyed]
        if doubled:
            raise KeyDumpError(f"pg_dump did not leave out the data of {', '.join(doubled)} (--exclude-table-data)")
        owners = {int(e.oid): e.owner or "" for e in entries if e.desc == "TABLE" and e.tableoid == "1259"}
        try:
            plan = archive.insert_keyed(head, entries, [t.keyed(owners.get(t.oid, "")) for t in self.tables])
        except archive.ArchiveError as exc:
            raise KeyDumpError(str(exc)) from exc
        self.head, self.dump_ids, self.settings = head, plan.dump_ids, copy_settings(entries)
        self.dump.write(plan.head_and_toc)
        rest = bytes(self._buf[end:])
        self._buf = bytearray()
        self.dump.write(rest)


def _copy_tables(dump: Dump, snapshot: str, tables: list[Table], filt: ArchiveFilter) -> None:
    """Step 3: the copy session's blocks, after pg_dump's; raises KeyDumpError unless every table came whole."""
    assert filt.head is not None
    dump.holder_done = True  # from here on the holder's errors are no news (the copy session cancels it)
    stream = CopyStream(dump.token, filt.head, tables, filt.dump_ids, dump.write)
    script = keysql.copy_script(dump.token, snapshot, [t.oid for t in tables], filt.settings)
    stderr = dump.session_stderr()
    env = {**dump.env, keysql.SCRIPT_VARIABLE: script, "PGAPPNAME": keysql.app_name(dump.token, "copy")}
    outcome = dump.stream(keysql.script_command(), env, stream.feed_all, stderr.feed)
    if stream.copied < len(tables):
        # The session's own failure first: a session cut short lacks its boundary rows as a matter of course.
        failure = (stderr.error() or outcome.problem
                   or (None if outcome.ok else f"the copy session's psql exited with status {outcome.exit_code}")
                   or stream.missing_boundary() or "its output ended inside the table")
        raise KeyDumpError(f"copying {tables[stream.copied].qualified} in key order failed: {failure}")
    if not outcome.ok:
        raise KeyDumpError(f"the copy session failed after the last table: {outcome.problem or outcome.exit_code}")


def _await_holder(holder: ExecThread, out: HolderOutput, errors: ErrorTail, lock_wait_ms: int) -> None:
    """Returns once the holder listed its tables; raises KeyDumpError when it ended before (naming the table
    it could not lock) or printed nothing for the lock wait plus READY_TIMEOUT_EXTRA_S."""
    bound = lock_wait_ms / 1000 + READY_TIMEOUT_EXTRA_S
    seen, deadline = -1, 0.0
    while not out.ready.wait(0.5):
        if out.lines != seen:
            seen, deadline = out.lines, time.monotonic() + bound
        elif time.monotonic() > deadline:
            raise KeyDumpError(f"the key session printed nothing for {bound:g} s while it locked and listed "
                               "the tables")
    if out.listed and out.snapshot is not None:
        return
    error = errors.error() or holder.failure or "it ended"
    if out.locking is not None and not out.locked:
        # Worded as pg_dump words its own lock wait, which the watcher's messages name (jobs.lock_wait_problem).
        raise KeyDumpError(f"the key session could not lock table {out.locking}: {error}\n"
                           f"Query was: LOCK TABLE {out.locking} IN ACCESS SHARE MODE")
    raise KeyDumpError(f"the key session did not list the tables: {error}")


def run(docker_host: str, container: str, env: dict[str, str], pg_dump: Sequence[str], lock_wait_ms: int,
        write: Write, write_all: WriteAll, on_stderr: Callable[[bytes], object],
        on_piece: Callable[[], object] | None = None) -> None:
    """The whole key-ordered dump to `write` (several pieces at once to `write_all`; `on_piece` called as each
    read of any exec's output arrives); raises KeyDumpError naming the part that failed."""
    dump = Dump(docker_host, container, env, write, write_all, on_stderr)
    if on_piece is not None:
        dump.on_piece = on_piece
    try:
        _run(dump, pg_dump, lock_wait_ms)
    except Exception:
        # Whatever ended it (a failure, restic gone, RestartDump): its sessions end now, not after the grace.
        dump.cancel_sessions()
        raise


def _run(dump: Dump, pg_dump: Sequence[str], lock_wait_ms: int) -> None:
    """Steps 1 to 4 of the module's docstring; raises KeyDumpError or DockerExecError."""
    env, on_stderr = dump.env, dump.on_stderr
    out = HolderOutput(dump.token)
    errors = dump.session_stderr(holder=True)
    holder = dump.session("hold", keysql.holder_script(dump.token, lock_wait_ms), each_piece(out.feed), errors,
                          on_end=out.ready.set)
    holder.start()
    _await_holder(holder, out, errors, lock_wait_ms)
    tables = out.tables
    argv = [*pg_dump]
    if tables:
        argv += [f"--snapshot={out.snapshot}", *(f"--exclude-table-data={exclude_pattern(t)}" for t in tables)]
    seal = random_token()
    filt = ArchiveFilter(dump, tables)
    sealer = SealedOutput(seal.encode(), lambda _piece: None)  # only its pass_on is used
    outcome = dump.stream(sealed_command(argv),
                          {**env, SEAL_VARIABLE: seal, "PGAPPNAME": keysql.app_name(dump.token, "dump")},
                          lambda pieces: filt.feed_all(sealer.pass_on(list(pieces))),
                          lambda view: on_stderr(bytes(view)))
    if not outcome.ok:
        raise KeyDumpError(outcome.problem or f"pg_dump exited with status {outcome.exit_code}")
    if not sealer.sealed() or filt.head is None:
        raise KeyDumpError("pg_dump's output ended without the end mark of a successful run: the stream was cut short")
    if tables and out.snapshot is not None:
        # The copy session imported the snapshot while the holder held it (else its import failed): the
        # holder's work is done, and it ends by itself within a second (keysql.POLL_S), unwaited for.
        _copy_tables(dump, out.snapshot, tables, filt)
    elif not holder.succeeded_within(SESSION_END_S):
        raise KeyDumpError(f"the key session did not end well: {holder.failure or 'it is still running'}")


class Output:
    """The archive on its way to restic: pieces smaller than DIRECT_BYTES (chunk headers, pg_dump's frames) are
    gathered and go with the next large one (a chunk of rows, a view of the Chunker's buffer) in one writev; no
    piece is copied on its way but the small ones."""

    def __init__(self, destination: Destination) -> None:
        self._destination = destination
        self._small = bytearray()

    def write_all(self, pieces: Sequence[Piece]) -> None:
        """Writes `pieces` in order after what was gathered, in one writev (or gathers them when they are small
        together); raises as Destination.write."""
        if sum(len(piece) for piece in pieces) < DIRECT_BYTES:
            for piece in pieces:
                self._small += piece
            if len(self._small) >= DIRECT_BYTES:
                self.flush()
            return
        small, self._small = self._small, bytearray()
        self._destination.write((small, *pieces))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Writes `data` (or gathers it): write_all of one piece; raises as Destination.write."""
        self.write_all((data,))

    def flush(self) -> None:
        """Writes what was gathered; raises as Destination.write."""
        if self._small:
            small, self._small = self._small, bytearray()
            self._destination.write((small,))


class KeyDumpArgs(NamedTuple):
    """The program's arguments (`python -m watcher.keydump --help` says what each is)."""

    container: str
    env: list[str]
    lock_wait_ms: int
    stall_timeout: float | None
    handoff_fd: int | None
    pg_dump: list[str]


def _parse_args(argv: Sequence[str] | None) -> KeyDumpArgs:
    """The program's arguments, as argparse reads them (see dockerexec.plain_options); exits 2 with argparse's
    usage and message on arguments it refuses, 0 after --help."""
    given = list(sys.argv[1:] if argv is None else argv)
    plain = plain_options(given, flags=(),
                          valued=("--container", "--env", "--lock-wait-ms", "--stall-timeout", "--handoff-fd"))
    if plain is not None:
        options, pg_dump = plain
        container, lock_wait_ms, stall_timeout, handoff_fd = (
            last(options, name) for name in ("--container", "--lock-wait-ms", "--stall-timeout", "--handoff-fd"))
        # Without a required option, or with a number float() or int() refuses, argparse says what is wrong.
        if container is not None and lock_wait_ms is not None:
            with contextlib.suppress(ValueError):
                return KeyDumpArgs(container, options.get("--env", []), int(lock_wait_ms),
                                   None if stall_timeout is None else float(stall_timeout),
                                   None if handoff_fd is None else int(handoff_fd), pg_dump)
    return _parsed_by_argparse(given)


def _parsed_by_argparse(argv: list[str]) -> KeyDumpArgs:
    """_parse_args for what plain_options leaves to argparse (imported here only: see plain_options)."""
    import argparse  # noqa: PLC0415 - see dockerexec.plain_options

    parser = argparse.ArgumentParser(prog="python -m watcher.keydump")
    parser.add_argument("--container", required=True)
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="set NAME in every exec; without =VALUE the value comes from our own environment")
    parser.add_argument("--lock-wait-ms", type=int, required=True)
    parser.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                        help="give up when the archive moves nothing for this long (see watcher.stall)")
    parser.add_argument("--handoff-fd", type=int, metavar="FD",
                        help="write to the pipe handed over on this inherited listening socket by "
                             "`python -m watcher.handoff` (restic's command), and send it the exit status")
    parser.add_argument("pg_dump", nargs="+")
    args = parser.parse_args(argv)
    return KeyDumpArgs(args.container, args.env, args.lock_wait_ms, args.stall_timeout, args.handoff_fd,
                       args.pg_dump)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of `python -m watcher.keydump`; returns the exit status (0 only for a whole archive)."""
    args = _parse_args(argv)
    destination, handoff = destination_for(args.handoff_fd, sys.stdout.fileno(), args.stall_timeout)
    status = _dumped(args, exec_env(args.env), destination)
    return status if handoff is None else delivered(handoff, status)


def _dumped(args: KeyDumpArgs, env: dict[str, str], destination: Destination) -> int:
    """The dump to `destination`, anew from its start when an early start had to abandon it (RestartDump);
    returns the exit status."""
    while True:
        try:
            _attempt(args, env, destination)
            destination.finish()
        except RestartDump:
            if not restarting(destination, "pg_dump"):
                return EXIT_ENGINE_ERROR
            continue
        except (KeyDumpError, DockerExecError) as exc:
            print(f"backup-watcher: pg_dump in {args.container} (key order): {exc}", file=sys.stderr)
            return EXIT_ENGINE_ERROR
        except HandOffError as exc:
            print(f"backup-watcher: {exc}", file=sys.stderr)
            return EXIT_ENGINE_ERROR
        except BrokenPipeError:
            print("backup-watcher: the reader of the dump went away", file=sys.stderr)
            return EXIT_ENGINE_ERROR
        return 0


def _attempt(args: KeyDumpArgs, env: dict[str, str], destination: Destination) -> None:
    """One whole key-ordered dump to `destination`, under the stall bound; raises KeyDumpError, DockerExecError,
    RestartDump, HandOffError, OSError."""
    out = Output(destination)
    write: Write = out.write
    write_all: WriteAll = out.write_all
    on_piece: Callable[[], object] | None = None
    watch = stall.monotonic_watch(args.stall_timeout) if args.stall_timeout else None
    if watch is not None:
        # Each read of the container's output counts (pg_dump's head is held until whole, and the session's
        # rows until a chunk ends), and so does each write on to restic: one blocked there is restic's stall.
        write, write_all = watch.counting(out.write), watch.counting(out.write_all)
        arrived = watch.counting(lambda _piece: None)
        on_piece = lambda: arrived(None)  # noqa: E731
    with stall_watchdog(watch, "pg_dump"):
        run(os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST, args.container, env, args.pg_dump,
            args.lock_wait_ms, write, write_all, write_err, on_piece)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
