"""What the key-ordered dump's two psql sessions print, read as it arrives (pure: bytes in, bytes out).

HolderOutput reads the holder session's lines (the snapshot, the lock being taken, the tables, ready).
CopyStream reads the copy session's output: for each table a start line, its rows in key order, each
ending in a TAB and the cut flag (`t` or `f`, see watcher.keysql), and an end line. Its Chunker writes
the rows, flags taken out, as the chunks of the table's data block: a chunk ends after each row flagged
`t` (or at CHUNK_MAX), so where chunks end depends on the keys alone, never on the pieces the output
arrives in. In COPY's text format a TAB or a newline inside a value is escaped, so "TAB t/f newline"
ends a row and nothing else: the rows are searched and cleaned by C loops (find, replace, count), with
no Python step per row.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

from watcher import archive

CHUNK_MAX = 8 << 20  # pg_restore allocates a buffer of a chunk's size
CUT = b"\tt\n"
KEEP = b"\tf\n"


class KeyDumpError(Exception):
    """A part of the key-ordered dump failed; the message says which (no secret is ever in it)."""


@dataclass(frozen=True)
class Table:
    """A table the copy session copies in key order."""

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
    table's end line (see the module's docstring)."""

    def __init__(self, head: archive.Head, write: Callable[[bytes | bytearray], object], end_line: bytes) -> None:
        self._head = head
        self._write = write
        self._end = b"\n" + end_line  # after the table's last row
        self._empty = end_line  # a table without rows: the end line at once
        self._buf = bytearray()
        self._carry = bytearray()  # rows of a chunk that did not end yet (only past CHUNK_MAX)
        self._cut_from = 0  # no cut flag before this offset of _buf
        self._end_from = 0  # no end line before this offset of _buf
        self._started = False
        self.bytes = 0

    def feed(self, data: bytes | memoryview) -> bytes | None:
        """Takes the next piece of the session's output; returns None while the table goes on, and at its
        end line what came after that line (written: every chunk and the block's end). Raises KeyDumpError
        when a row lacks its cut flag."""
        buf = self._buf
        buf += data
        if not self._started:
            if buf.startswith(self._empty):
                rest = bytes(buf[len(self._empty):])
                buf.clear()
                self._write(archive.chunk_header(self._head, 0))
                return rest
            if len(buf) < len(self._empty) and self._empty.startswith(buf):
                return None
            self._started = True
        at = buf.find(self._end, self._end_from)
        if at < 0:
            self._end_from = max(0, len(buf) - len(self._end) + 1)
            self._cuts()
            return None
        rest = bytes(buf[at + len(self._end):])
        del buf[at + 1:]
        self._cuts()
        self._rows(len(buf), cut=False)
        self._flush(complete=True)
        self._write(archive.chunk_header(self._head, 0))
        return rest

    def _cuts(self) -> None:
        """Writes the chunk of every cut flag in _buf; past CHUNK_MAX without one, the largest chunk."""
        buf = self._buf
        while (at := buf.find(CUT, self._cut_from)) >= 0:
            self._rows(at, cut=True)
            self._flush(complete=True)
        self._cut_from = max(0, len(buf) - len(CUT) + 1)
        if len(buf) + len(self._carry) > CHUNK_MAX:
            self._rows(buf.rfind(b"\n") + 1, cut=False)
            self._flush(complete=False)

    def _rows(self, end: int, cut: bool) -> None:
        """Moves the rows of _buf[:end] (with cut: and the cut row whose flag starts at `end`) to _carry,
        flags taken out; raises KeyDumpError when a row lacks its flag."""
        raw = self._buf[:end]
        rows = raw.count(b"\n")
        clean = raw.replace(KEEP, b"\n")
        # Each KEEP holds one newline: equal counts mean that every row but a cut one ended with its flag.
        if len(clean) != len(raw) - 2 * rows:
            raise KeyDumpError("a row of the copy session came without its cut flag (the stream is garbled)")
        if cut:
            clean += b"\n"
            end += len(CUT)
        del self._buf[:end]
        self._cut_from = max(0, self._cut_from - end)
        self._end_from = max(0, self._end_from - end)
        if self._carry:
            self._carry += clean
        else:
            self._carry = clean

    def _flush(self, complete: bool) -> None:
        """Writes _carry as chunks of at most CHUNK_MAX; without `complete` keeps a last part below it."""
        carry = self._carry
        start = 0
        while len(carry) - start >= CHUNK_MAX or (complete and start < len(carry)):
            piece = carry[start:start + CHUNK_MAX] if start or len(carry) > CHUNK_MAX else carry
            self._write(archive.chunk_header(self._head, len(piece)))
            self._write(piece)
            self.bytes += len(piece)
            start += len(piece)
        self._carry = carry[start:] if start < len(carry) else bytearray()


class CopyStream:
    """The copy session's output: each table's start line checked against the holder's list, its data
    block written (block start, chunks, end), and `done` set after the last table's block."""

    def __init__(self, token: str, head: archive.Head, tables: list[Table], dump_ids: tuple[int, ...],
                 write: Callable[[bytes | bytearray], object]) -> None:
        self._token = token
        self._head = head
        self._tables = tables
        self._dump_ids = dump_ids
        self._write = write
        self._held = bytearray()
        self._chunker: Chunker | None = None
        self.copied = 0
        self.done = threading.Event()
        if not tables:
            self.done.set()

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

    def _next_table(self) -> bytes | None:
        """Reads lines until a table's start line; returns what follows it (its rows), None for more input."""
        start = f"copy-{self._token} "
        while (newline := self._held.find(b"\n")) >= 0:
            line = bytes(self._held[:newline]).decode("utf-8", errors="replace")
            del self._held[: newline + 1]
            if not line.startswith(start):
                continue
            if self.copied >= len(self._tables):
                raise KeyDumpError("the copy session copied more tables than the key session listed")
            table = self._tables[self.copied]
            try:
                seen = json.loads(line[len(start):])
                seen["oid"] = int(seen["oid"])  # json_build_object writes an oid as a string
            except (ValueError, KeyError, TypeError) as exc:
                raise KeyDumpError(f"unreadable start line from the copy session: {line[:200]!r}") from exc
            if (seen.get("oid"), seen.get("columns") or "", seen.get("order_by")) != (
                    table.oid, table.columns, table.order_by):
                raise KeyDumpError(f"the copy session's table {line[:200]!r} is not the listed {table.qualified}")
            self._write(archive.block_start(self._head, self._dump_ids[self.copied]))
            self._chunker = Chunker(self._head, self._write, f"copied-{self._token}\n".encode())
            rest = bytes(self._held)
            self._held.clear()
            return rest if rest else None
        return None
