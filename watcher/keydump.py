"""A dedup-stable dump: pg_dump's custom archive with the data of large keyed tables in key order.

`python -m watcher.keydump --container ID [--env NAME[=VALUE]]... --lock-wait-ms N -- pg_dump ARGS...`
writes to stdout a custom-format archive that pg_restore restores exactly as pg_dump's own, and exits 0
only when every part of it arrived whole (restic's --stdin-from-command then writes the snapshot).

Why: on a table where autovacuum has run, PostgreSQL puts new rows into free space all over the table,
so pg_dump's physical row order changes everywhere after a small change and restic stores the whole
table again. Rows in key order change only where rows changed (issue 19).

How, in one snapshot and without any file:
1. a psql session (the "key session") opens a REPEATABLE READ transaction, exports its snapshot, picks
   the tables (ordinary tables of at least MIN_TABLE_BYTES with a primary key or unique not-null index,
   time-ordered keys first) and locks them (ACCESS SHARE, bounded by the lock wait);
2. pg_dump runs with `--snapshot` of that session and `--exclude-table-data` for those tables: its
   archive has every entry but their data. Its header and table of contents are read here, a TABLE
   DATA entry is added for each table (watcher.archive), and written out;
3. the key session copies each table `ORDER BY` its key (an index scan: no sort, no temporary file),
   and its rows go out as the table's data block, in chunks whose boundaries depend on the rows alone
   (content-defined, so an unchanged stretch of rows gives the same bytes every day);
4. the rest of pg_dump's archive (the other tables' data, in pg_dump's order) is passed on.
The bytes pass through in large pieces; no row is parsed here (one CRC per candidate chunk end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import secrets
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from watcher import archive, stall
from watcher.dockerexec import (
    DEFAULT_DOCKER_HOST,
    EXIT_ENGINE_ERROR,
    SEAL_VARIABLE,
    DockerExecError,
    ExecOutcome,
    SealedOutput,
    sealed_command,
    stall_watchdog,
    stream_exec,
)

MIN_TABLE_BYTES = 1 << 20  # smaller tables keep pg_dump's own order: their order costs little storage
CHUNK_MAX = 8 << 20  # pg_restore allocates a buffer of a chunk's size
CHUNK_MASK = 1023  # a row ends a chunk when the CRC of its bytes has these bits clear: chunks of ~1024 rows
READY_TIMEOUT_EXTRA_S = 120.0

# The tables to put in key order, one JSON object per line. A key is a primary key or a valid unique
# index on plain not-null columns with default btree operator classes and the columns' collations, so
# `ORDER BY` those columns is a total order an index scan delivers. Time-ordered keys come first
# (identity, serial, date/time, or values that grow with the table: pg_stats correlation ≥ 0.9), then
# primary keys, then fewer columns. The column list is pg_dump's (no dropped or generated columns).
SELECT_TABLES = r"""
WITH keys AS (
  SELECT i.indrelid, i.indexrelid, i.indisprimary, i.indnkeyatts,
         (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.n)
            FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) AS order_by,
         (SELECT a.attidentity <> '' OR a.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype)
                 OR coalesce(pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%', false)
                 OR coalesce((SELECT s.correlation >= 0.9 FROM pg_stats s WHERE s.schemaname = n.nspname
                              AND s.tablename = c.relname AND s.attname = a.attname), false)
            FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
           WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0]) AS time_ordered
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
     AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                     WHERE k.attnum = 0 OR NOT a.attnotnull
                        OR i.indcollation[k.n - 1] <> a.attcollation
                        OR NOT (SELECT o.opcdefault FROM pg_opclass o WHERE o.oid = i.indclass[k.n - 1]))
), best AS (
  SELECT DISTINCT ON (indrelid) indrelid, order_by FROM keys
   ORDER BY indrelid, time_ordered DESC, indisprimary DESC, indnkeyatts, indexrelid
)
SELECT 'table ' || json_build_object(
         'oid', c.oid, 'schema', n.nspname, 'name', c.relname,
         'qualified', quote_ident(n.nspname) || '.' || quote_ident(c.relname),
         'columns', (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''),
         'order_by', b.order_by)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN best b ON b.indrelid = c.oid
 WHERE c.relkind = 'r' AND c.relpersistence IN ('p', 'u')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'
   AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_class'::regclass AND e.objid = c.oid
                   AND e.deptype = 'e')
   AND pg_relation_size(c.oid) >= {min_bytes}
 ORDER BY n.nspname, c.relname;
"""


class KeyDumpError(Exception):
    """A part of the key-ordered dump failed; the message says which (no secret is ever in it)."""


@dataclass(frozen=True)
class Table:
    """A table the key session copies in key order."""

    oid: int
    schema: str
    name: str
    qualified: str
    columns: str
    order_by: str

    def keyed(self, owner: str = "") -> archive.KeyedTable:
        columns = f"({self.columns})" if self.columns else ""
        return archive.KeyedTable(self.oid, self.schema, self.name, owner,
                                  f"COPY {self.qualified} {columns} FROM stdin;\n")

    def copy_sql(self) -> str:
        # Every name here came quoted from the server (quote_ident): no value of a user is in the text.
        return f"COPY (SELECT {self.columns} FROM {self.qualified} ORDER BY {self.order_by}) TO STDOUT;\n"  # noqa: S608


def parse_table(line: str) -> Table:
    """A Table from one `table {json}` line of SELECT_TABLES; raises KeyDumpError on anything else."""
    try:
        raw = json.loads(line[len("table "):])
        return Table(int(raw["oid"]), str(raw["schema"]), str(raw["name"]), str(raw["qualified"]),
                     str(raw["columns"] or ""), str(raw["order_by"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyDumpError(f"unreadable table line from the key session: {line[:200]!r}") from exc


def exclude_pattern(table: Table) -> str:
    """pg_dump's pattern that matches exactly `table` (each name double-quoted, quotes doubled)."""
    def quoted(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'
    return f"{quoted(table.schema)}.{quoted(table.name)}"


class Chunker:
    """Writes one table's COPY text as the chunks of a data block, cut after every row whose CRC-32 has
    the CHUNK_MASK bits clear (about one row in CHUNK_MASK + 1), or CHUNK_MAX bytes into a chunk without
    such a row. Where the cuts fall depends on the rows alone, never on the pieces they arrive in: the
    rows before and after a change give the same chunks, their headers included. The rows are split,
    hashed and searched by C loops (bytes.split, map, list.index): no Python step per row."""

    def __init__(self, head: archive.Head, write: Callable[[bytes], object]) -> None:
        self._head = head
        self._write = write
        self._buf = bytearray()
        self._scanned = 0  # rows before this offset of _buf have been looked at
        self.bytes = 0

    def feed(self, data: bytes | memoryview) -> None:
        """Takes the next piece of the table's rows; writes every chunk it completes."""
        self._buf += data
        done = self._buf.rfind(b"\n") + 1
        cuts: list[int] = []
        if done > self._scanned:
            rows = bytes(memoryview(self._buf)[self._scanned:done - 1]).split(b"\n")
            flags = list(map(CHUNK_MASK.__and__, map(zlib.crc32, rows)))
            ends = list(accumulate(map(len, rows)))
            at = -1
            with contextlib.suppress(ValueError):
                while True:
                    at = flags.index(0, at + 1)
                    cuts.append(self._scanned + ends[at] + at + 1)
            self._scanned = done
        start = 0
        for cut in cuts:
            start = self._emit_up_to(start, cut)
        while len(self._buf) - start >= CHUNK_MAX:
            start = self._emit(start, start + CHUNK_MAX)
        del self._buf[:start]
        self._scanned -= start

    def finish(self) -> None:
        """Writes the last chunk and the end of the block."""
        start = self._emit_up_to(0, len(self._buf)) if self._buf else 0
        del self._buf[:start]
        self._write(archive.chunk_header(self._head, 0))

    def _emit_up_to(self, start: int, cut: int) -> int:
        while cut - start > CHUNK_MAX:
            start = self._emit(start, start + CHUNK_MAX)
        return self._emit(start, cut) if cut > start else start

    def _emit(self, start: int, end: int) -> int:
        self._write(archive.chunk_header(self._head, end - start))
        self._write(memoryview(self._buf)[start:end].tobytes())
        self.bytes += end - start
        return end


class KeySession:
    """The psql session that holds the snapshot and copies the keyed tables: what it printed so far.

    Its output is lines (`snapshot ID`, `table {json}`, marker lines) and, between a COPY and the marker
    echoed after it, the table's rows, which go to the current Chunker. Marker lines carry a random token
    of this run: no row can be one unless it knows the token."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        # Called as each piece of either exec's output arrives (the stall bound's count of progress).
        self.on_piece: Callable[[], object] = lambda: None
        self.snapshot: str | None = None
        self.tables: list[Table] = []
        self.listed = threading.Event()
        self.ready = threading.Event()
        self.copied = threading.Event()
        self.ended = threading.Event()
        self.outcome: ExecOutcome | None = None
        self.failure: str | None = None
        self.commands: queue.Queue[bytes | None] = queue.Queue()
        self._chunker: Chunker | None = None
        self._held = bytearray()
        self._copy_start = False
        self._stdin_left = b""
        self.last_copy_ok = False

    def marker(self, what: str) -> bytes:
        return f"{what}-{self.token}".encode()

    def send(self, text: str) -> None:
        self.commands.put(text.encode())

    def read_stdin(self, size: int) -> bytes:
        """The exec's input: the queued commands, b'' (end of input) once None is queued."""
        if not self._stdin_left:
            item = self.commands.get()
            if item is None:
                return b""
            self._stdin_left = item
        piece, self._stdin_left = self._stdin_left[:size], self._stdin_left[size:]
        return piece

    def start_copy(self, table: Table, chunker: Chunker) -> None:
        self._chunker = chunker
        self._copy_start = True
        self.last_copy_ok = False
        self.copied.clear()
        self.send(table.copy_sql() + f"\\echo {self.marker('copied').decode()}\n")

    def feed(self, data: bytes | memoryview) -> None:
        """Takes the next piece of the session's output (copied: a view is valid only during the call)."""
        self._held += data
        if self._chunker is not None:
            self._feed_copy()
        if self._chunker is None:
            self._feed_lines()

    def _feed_copy(self) -> None:
        assert self._chunker is not None
        end = self.marker("copied") + b"\n"
        if self._copy_start:
            if len(self._held) < len(end) and end.startswith(bytes(self._held)):
                return
            if self._held.startswith(end):
                self._finish_copy(0, len(end))
                return
            self._copy_start = False
        found = self._held.find(b"\n" + end)
        if found >= 0:
            self._finish_copy(found + 1, found + 1 + len(end))
            return
        keep = len(end)
        if len(self._held) > keep:
            self._chunker.feed(memoryview(self._held)[: len(self._held) - keep])
            del self._held[: len(self._held) - keep]

    def _finish_copy(self, data_end: int, marker_end: int) -> None:
        assert self._chunker is not None
        self._chunker.feed(memoryview(self._held)[:data_end])
        self._chunker.finish()
        del self._held[:marker_end]
        self._chunker = None
        self.last_copy_ok = True
        self.copied.set()

    def _feed_lines(self) -> None:
        while (newline := self._held.find(b"\n")) >= 0:
            line = bytes(self._held[:newline]).decode("utf-8", errors="replace")
            del self._held[: newline + 1]
            if line.startswith("snapshot "):
                self.snapshot = line.split(" ", 1)[1].strip()
            elif line.startswith("table "):
                self.tables.append(parse_table(line))
            elif line == self.marker("tables").decode():
                self.listed.set()
            elif line == self.marker("ready").decode():
                self.ready.set()

    def end(self, outcome: ExecOutcome | None, failure: str | None) -> None:
        self.outcome = outcome
        self.failure = failure
        self.ended.set()
        self.listed.set()
        self.ready.set()
        self.copied.set()


def session_script(lock_wait_ms: int) -> str:
    """The key session's opening: its transaction, snapshot and the tables (then it waits for input)."""
    return ("SET statement_timeout = 0;\nSET idle_in_transaction_session_timeout = 0;\n"
            f"SET lock_timeout = {lock_wait_ms};\n"
            "SELECT pg_catalog.set_config('search_path', '', false);\n"
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;\n"
            "SELECT 'snapshot ' || pg_catalog.pg_export_snapshot();\n"
            + SELECT_TABLES.replace("{min_bytes}", str(MIN_TABLE_BYTES)))


def copy_settings(entries: list[archive.Entry]) -> str:
    """The settings pg_dump's own COPY ran with (setup_connection), and the archive's encoding."""
    encoding = next((e.defn for e in entries if e.desc == "ENCODING" and e.defn), "")
    return ("SET DateStyle = ISO;\nSET IntervalStyle = postgres;\nSET extra_float_digits = 3;\n"
            "SET row_security = off;\nSET enable_sort = off;\n" + encoding)


@dataclass
class ArchiveFilter:
    """pg_dump's stdout on its way out: the header and TOC rewritten, the keyed tables' blocks put in
    after them, the rest passed on as it comes."""

    session: KeySession
    write: Callable[[bytes | memoryview], object]
    _buf: bytearray = field(default_factory=bytearray)
    done_head: bool = False

    def feed(self, data: bytes | memoryview) -> None:
        """Takes the next piece of pg_dump's output; raises KeyDumpError when the key session fails."""
        if self.done_head:
            self.write(data)
            return
        self._buf += data
        try:
            head, entries, end = archive.read_head(self._buf)
        except archive.Incomplete:
            return
        except archive.ArchiveError as exc:
            raise KeyDumpError(str(exc)) from exc
        owners = {int(e.oid): e.owner or "" for e in entries if e.desc == "TABLE" and e.tableoid == "1259"}
        try:
            plan = archive.insert_keyed(head, entries, [t.keyed(owners.get(t.oid, "")) for t in self.session.tables])
        except archive.ArchiveError as exc:
            raise KeyDumpError(str(exc)) from exc
        self.write(plan.head_and_toc)
        self.session.send(copy_settings(entries))
        for table, dump_id in zip(self.session.tables, plan.dump_ids, strict=True):
            self.write(archive.block_start(head, dump_id))
            self.session.start_copy(table, Chunker(head, self.write))
            self.session.copied.wait()
            if not self.session.last_copy_ok:
                raise KeyDumpError(f"copying {table.qualified} in key order failed: "
                                   f"{self.session.failure or 'the key session ended'}")
        self.done_head = True
        rest = memoryview(self._buf)[end:].tobytes()
        self._buf = bytearray()
        self.write(rest)


def _counted(session: KeySession, sink: Callable[[memoryview], object]) -> Callable[[memoryview], None]:
    """`sink`, telling the session's on_piece of each piece first."""
    def each(view: memoryview) -> None:
        session.on_piece()
        sink(view)
    return each


def _run_session(docker_host: str, container: str, env: dict[str, str], session: KeySession,
                 on_stderr: Callable[[bytes], object]) -> None:
    """Runs the key session's psql to its end (in a thread of its own); records how it ended."""
    cmd = ("psql", "--no-psqlrc", "--no-password", "--quiet", "--tuples-only", "--no-align", "-v", "ON_ERROR_STOP=1")
    try:
        outcome = stream_exec(docker_host, container, cmd, env=env, stdin=session.read_stdin,
                              on_stdout=_counted(session, session.feed),
                              on_stderr=lambda view: on_stderr(bytes(view)),
                              on_output_end=lambda: session.commands.put(None))
    except (DockerExecError, KeyDumpError) as exc:
        session.end(None, str(exc))
        return
    failure = None if outcome.ok else (outcome.problem or f"psql exited with status {outcome.exit_code}")
    session.end(outcome, failure)


def run(docker_host: str, container: str, env: dict[str, str], pg_dump: Sequence[str], lock_wait_ms: int,
        write: Callable[[bytes | memoryview], object], on_stderr: Callable[[bytes], object],
        on_piece: Callable[[], object] | None = None) -> None:
    """The whole key-ordered dump to `write` (`on_piece` called as each piece of the session's or pg_dump's
    output arrives); raises KeyDumpError naming the part that failed."""
    session = KeySession()
    if on_piece is not None:
        session.on_piece = on_piece
    session.send(session_script(lock_wait_ms))
    session.send(f"\\echo {session.marker('tables').decode()}\n")
    thread = threading.Thread(target=_run_session, args=(docker_host, container, env, session, on_stderr),
                              daemon=True)
    thread.start()
    try:
        _dump(docker_host, container, env, pg_dump, lock_wait_ms, session, write, on_stderr)
    finally:
        session.commands.put(None)
        thread.join(timeout=60)
    if session.failure is not None or not session.ended.is_set():
        raise KeyDumpError(f"the key session failed: {session.failure or 'it did not end'}")


def _dump(docker_host: str, container: str, env: dict[str, str], pg_dump: Sequence[str], lock_wait_ms: int,
          session: KeySession, write: Callable[[bytes | memoryview], object],
          on_stderr: Callable[[bytes], object]) -> None:
    """Steps 1 to 4 of the module's docstring, once the key session runs."""
    # The tables are known once the marker after them arrives; then they are locked.
    session.listed.wait(lock_wait_ms / 1000 + READY_TIMEOUT_EXTRA_S)
    if session.ended.is_set() or not session.listed.is_set():
        raise KeyDumpError(f"the key session did not list the tables: {session.failure or 'no answer'}")
    if session.tables:
        names = ", ".join(t.qualified for t in session.tables)
        session.send(f"LOCK TABLE {names} IN ACCESS SHARE MODE;\n")
    session.send(f"\\echo {session.marker('ready').decode()}\n")
    session.ready.wait(lock_wait_ms / 1000 + READY_TIMEOUT_EXTRA_S)
    if session.ended.is_set() or not session.ready.is_set() or session.snapshot is None:
        raise KeyDumpError(f"the key session did not get its snapshot and locks: {session.failure or 'no answer'}")
    argv = [*pg_dump, f"--snapshot={session.snapshot}",
            *(f"--exclude-table-data={exclude_pattern(t)}" for t in session.tables)]
    seal = secrets.token_hex(16)
    filt = ArchiveFilter(session, write)
    sealer = SealedOutput(seal.encode(), filt.feed)
    outcome = stream_exec(docker_host, container, sealed_command(argv), env={**env, SEAL_VARIABLE: seal},
                          on_stdout=_counted(session, sealer.feed),
                          on_stderr=lambda view: on_stderr(bytes(view)))
    if not outcome.ok:
        raise KeyDumpError(outcome.problem or f"pg_dump exited with status {outcome.exit_code}")
    if not sealer.sealed() or not filt.done_head:
        raise KeyDumpError("pg_dump's output ended without the end mark of a successful run: the stream was cut short")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m watcher.keydump")
    parser.add_argument("--container", required=True)
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="set NAME in both execs; without =VALUE the value comes from our own environment")
    parser.add_argument("--lock-wait-ms", type=int, required=True)
    parser.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                        help="give up when the archive moves nothing for this long (see watcher.stall)")
    parser.add_argument("pg_dump", nargs="+")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of `python -m watcher.keydump`; returns the exit status (0 only for a whole archive)."""
    args = _parse_args(argv)
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer

    def write_err(data: bytes) -> None:
        stderr.write(data)
        stderr.flush()

    write: Callable[[bytes | memoryview], object] = stdout.write
    on_piece: Callable[[], object] | None = None
    watch = stall.monotonic_watch(args.stall_timeout) if args.stall_timeout else None
    if watch is not None:
        # Each piece that arrives from the container counts (pg_dump's head is held until whole, and the
        # session's rows until a chunk ends), and so does each write on to restic: one blocked there is
        # restic's stall.
        write = watch.counting(stdout.write)
        arrived = watch.counting(lambda _piece: None)
        on_piece = lambda: arrived(None)  # noqa: E731
    try:
        with stall_watchdog(watch, "pg_dump"):
            run(os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST, args.container, env, args.pg_dump,
                args.lock_wait_ms, write, write_err, on_piece)
        stdout.flush()
    except (KeyDumpError, DockerExecError) as exc:
        print(f"backup-watcher: pg_dump in {args.container} (key order): {exc}", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    except BrokenPipeError:
        print("backup-watcher: the reader of the dump went away", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
