"""What the key-ordered dump's two psql sessions print, read as it arrives (pure: bytes in, bytes out).

HolderOutput reads the holder session's lines (the snapshot, the lock being taken, the tables, ready).
CopyStream reads the copy session's output: for each table a bounds line, the keys of its boundary rows
(about one row in 1024, chosen by the server by a hash of the key, see watcher.keysql), a start line,
its rows in key order (as COPY prints them, the key's columns first) and an end line. Its Chunker writes
the rows, untouched, as the chunks of the table's data block: a chunk ends after each boundary row (or
at CHUNK_MAX), so where chunks end depends on the keys alone, never on the pieces the output arrives
in. In COPY's text format a newline inside a value is escaped, so a boundary row is found by one search
for "newline, its key's COPY text, TAB" (the same text the bounds printed), with no Python step per row.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from watcher import archive, memsearch

CHUNK_MAX = 8 << 20  # pg_restore allocates a buffer of a chunk's size


class KeyDumpError(Exception):
    """A part of the key-ordered dump failed; the message says which (no secret is ever in it)."""


class Table(NamedTuple):
    """A table the copy session copies in key order (a NamedTuple: see watcher.archive on dataclasses)."""

    oid: int
    schema: str
    name: str
    qualified: str
    columns: str
    order_by: str

    def keyed(self, owner: str = "") -> archive.KeyedTable:
        """What the archive's TABLE DATA entry of this table needs (pg_dump's own COPY statement)."""
        columns = f"({self.columns})" if self.columns else ""
        return archive.KeyedTable(self.oid, self.schema, self.name, owner,
                                  f"COPY {self.qualified} {columns} FROM stdin;\n")


def parse_table(line: str) -> Table:
    """A Table from one `table {json}` line of the holder; raises KeyDumpError on anything else."""
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


class HolderOutput:
    """The holder session's lines so far; `ready` is set once the tables are listed (or the session ended)."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._held = bytearray()
        self.snapshot: str | None = None
        self.tables: list[Table] = []
        self.locking: str | None = None  # the table whose LOCK was sent last, until all are locked
        self.locked = False
        self.listed = False  # the ready line came (`ready` is also set when the session ends)
        self.ready = threading.Event()
        self.lines = 0

    def feed(self, data: bytes | memoryview) -> None:
        """Takes the next piece of the session's output (a view is valid only during the call)."""
        self._held += data
        while (newline := self._held.find(b"\n")) >= 0:
            line = bytes(self._held[:newline]).decode("utf-8", errors="replace")
            del self._held[: newline + 1]
            self.lines += 1
            self._line(line)

    def _line(self, line: str) -> None:
        token = self._token
        if line.startswith("snapshot "):
            self.snapshot = line.split(" ", 1)[1].strip()
        elif line.startswith(f"lock-{token} "):
            self.locking = line.split(" ", 1)[1]
        elif line == f"locked-{token}":
            self.locked = True
        elif line.startswith("table "):
            self.tables.append(parse_table(line))
        elif line == f"ready-{token}":
            self.listed = True
            self.ready.set()


class Chunker:
    """Writes one table's rows, as the copy session prints them, as the chunks of its data block, until the
    table's end line (see the module's docstring). `bounds` are the COPY texts of the boundary rows' keys,
    in key order; `key_only` says that the key's columns are all the table's columns."""

    def __init__(self, head: archive.Head, write: Callable[[bytes | bytearray | memoryview], object],
                 end_line: bytes, bounds: list[bytes], key_only: bool = False) -> None:
        self._head = head
        self._write = write
        self._end = b"\n" + end_line  # after the table's last row
        self._empty = end_line  # a table without rows: the end line at once
        self._bounds = bounds
        self._after_key = b"\n" if key_only else b"\t"
        self._next = 0  # the boundary row looked for
        self._buf = bytearray()
        self._end_from = 0  # no end line before this offset of _buf
        self._bound_from = 0  # the boundary row does not start before this offset of _buf
        self._bound_at: int | None = None  # where it starts, once found (negative: in what was written)
        self._row_start = True  # _buf starts at the start of a row
        self._started = False
        self.bytes = 0

    def hold(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Takes pieces of the session's output that the next `feed` looks at with its own (a read's frames:
        the searches then run once per read)."""
        for piece in pieces:
            self._buf += piece

    def feed(self, data: bytes | memoryview) -> bytes | None:
        """Takes the next piece of the session's output (after those held); returns None while the table goes
        on, and at its end line what came after that line (written: every chunk and the block's end)."""
        buf = self._buf
        buf += data
        if not self._started:
            if buf.startswith(self._empty):
                rest = bytes(buf[len(self._empty):])
                self._finish()
                return rest
            if len(buf) < len(self._empty) and self._empty.startswith(buf):
                return None
            self._started = True
        if self._next < len(self._bounds):
            self._cuts()
            if self._next < len(self._bounds):
                return None  # the end line comes after the last boundary row: no need to look for it yet
        at = self._find_end()
        if at is None:
            self._end_from = max(0, len(buf) - len(self._end) + 1)
            self._cuts()
            return None
        rest = bytes(buf[at + len(self._end):])
        del buf[at + 1:]
        self._cuts()
        self._emit(len(buf))
        self._finish()
        return rest

    def _find_end(self) -> int | None:
        """Where in _buf the newline before the end line is (-1: _buf starts with the end line, the last row's
        newline written with it); None while the end line has not come."""
        if self._row_start and self._end_from == 0 and self._buf.startswith(self._end[1:]):
            return -1
        at = memsearch.find(self._buf, self._end, self._end_from)
        return None if at < 0 else at

    def _finish(self) -> None:
        self._write(archive.chunk_header(self._head, 0))

    def missing_boundary(self) -> str | None:
        """Why a table whose output ended before its end line came is garbled, when a boundary row it should
        have had was not among its rows (its end line is not looked for before its last boundary row)."""
        if self._next >= len(self._bounds):
            return None
        return (f"boundary row {self._next + 1} of {len(self._bounds)} was not among the table's rows (the copy "
                "session's output is garbled)")

    def _cuts(self) -> None:
        """Writes a chunk for every boundary row that ended in _buf; past CHUNK_MAX without one, the largest
        chunk."""
        buf = self._buf
        while self._next < len(self._bounds):
            key = self._bounds[self._next] + self._after_key
            if self._bound_at is None:
                self._bound_at = self._find(key)
                if self._bound_at is None:
                    break
            # The row's end: the newline after its key (a key-only row: the one its key ends with).
            row_end = buf.find(b"\n", max(0, self._bound_at + len(key) - 1))
            if row_end < 0:
                break
            self._bound_at = None
            self._next += 1
            self._emit(row_end + 1)
        while len(buf) >= CHUNK_MAX:
            self._emit(CHUNK_MAX)

    def _find(self, key: bytes) -> int | None:
        """Where in _buf the row that starts with `key` starts; None while it has not come."""
        buf = self._buf
        if self._row_start and self._bound_from == 0 and buf.startswith(key):
            return 0
        found = memsearch.find(buf, b"\n" + key, self._bound_from)
        if found < 0:
            self._bound_from = max(0, len(buf) - len(key))
            return None
        return found + 1

    def _emit(self, end: int) -> None:
        """Writes _buf[:end] as chunks of at most CHUNK_MAX and drops it from _buf."""
        start = 0
        while start < end:
            stop = min(end, start + CHUNK_MAX)
            self._write(archive.chunk_header(self._head, stop - start))
            self._write(memoryview(self._buf)[start:stop])
            start = stop
        if end:
            self._row_start = self._buf[end - 1] == 0x0A
            del self._buf[:end]
            self.bytes += end
            self._end_from = max(0, self._end_from - end)
            self._bound_from = max(0, self._bound_from - end)
            if self._bound_at is not None:
                self._bound_at -= end  # the boundary row started in what was written


class CopyStream:
    """The copy session's output: each table's boundary keys kept, its start line checked against the
    holder's list, its data block written (block start, chunks, end), and `done` set after the last one."""

    def __init__(self, token: str, head: archive.Head, tables: list[Table], dump_ids: tuple[int, ...],
                 write: Callable[[bytes | bytearray | memoryview], object]) -> None:
        self._token = token
        self._head = head
        self._tables = tables
        self._dump_ids = dump_ids
        self._write = write
        self._held = bytearray()
        self._chunker: Chunker | None = None
        self._bounds: list[bytes] | None = None  # the boundary keys of the table being listed
        self.copied = 0
        self.done = threading.Event()
        if not tables:
            self.done.set()

    def feed_all(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Takes the next pieces of the session's output, in order (a read's frames; views valid only during
        the call), the rows of a table looked at once for them all; raises as `feed`."""
        pieces = [piece for piece in pieces if piece]  # an empty last piece would leave the held ones unread
        if self._chunker is not None and len(pieces) > 1:
            self._chunker.hold(pieces[:-1])
            self.feed(pieces[-1])
            return
        for piece in pieces:
            self.feed(piece)

    def feed(self, data: bytes | memoryview) -> None:
        """Takes the next piece of the session's output; raises KeyDumpError on a table out of order or a
        garbled row."""
        piece: bytes | memoryview | None = data
        while piece:
            if self._chunker is not None:
                piece = self._chunker.feed(piece)
                if piece is None:
                    return
                self._chunker = None
                self.copied += 1
                if self.copied == len(self._tables):
                    self.done.set()
                continue
            self._held += piece
            piece = self._next_table()

    def missing_boundary(self) -> str | None:
        """Chunker.missing_boundary of the table being copied, None when there is none."""
        return self._chunker.missing_boundary() if self._chunker is not None else None

    def _next_table(self) -> bytes | None:
        """Reads lines (a table's bounds line, then its boundary keys) until a table's start line; returns what
        follows it (its rows), None for more input."""
        start = f"copy-{self._token} ".encode()
        bounds_line = f"bounds-{self._token}".encode()
        while (newline := self._held.find(b"\n")) >= 0:
            line = bytes(self._held[:newline])
            del self._held[: newline + 1]
            if line == bounds_line:
                self._bounds = []
            elif line.startswith(start) and self._bounds is not None:
                self._start_table(line[len(start):].decode("utf-8", errors="replace"), self._bounds)
                self._bounds = None
                rest = bytes(self._held)
                self._held.clear()
                return rest if rest else None
            elif self._bounds is not None:
                self._bounds.append(line)
        return None

    def _start_table(self, listed: str, bounds: list[bytes]) -> None:
        """Checks a start line against the holder's next table; writes its block start, sets its Chunker."""
        if self.copied >= len(self._tables):
            raise KeyDumpError("the copy session copied more tables than the key session listed")
        table = self._tables[self.copied]
        try:
            seen = json.loads(listed)
            seen["oid"] = int(seen["oid"])  # json_build_object writes an oid as a string
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyDumpError(f"unreadable start line from the copy session: {listed[:200]!r}") from exc
        if (seen.get("oid"), seen.get("columns") or "", seen.get("order_by")) != (
                table.oid, table.columns, table.order_by):
            raise KeyDumpError(f"the copy session's table {listed[:200]!r} is not the listed {table.qualified}")
        self._write(archive.block_start(self._head, self._dump_ids[self.copied]))
        self._chunker = Chunker(self._head, self._write, f"copied-{self._token}\n".encode(), bounds,
                                key_only=table.columns == table.order_by)
