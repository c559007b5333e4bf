"""pg_dump's custom archive format, as much of it as a key-ordered dump needs to read and write.

A custom archive written to a pipe (`pg_dump --format=custom` into restic) is a header, a table of
contents (TOC) and then one data block per entry that has data, in TOC order. The TOC holds no data
offsets (the output cannot be sought), so blocks can be added, and entries inserted, as long as the
blocks follow the order of their entries: that is how pg_restore reads such a stream (pg_backup_custom.c,
pg_backup_archiver.c: WriteHead, WriteToc, WriteInt, WriteStr, _StartData/_EndData).

Integers are a sign byte and `int_size` bytes, least significant first; strings an integer length
(-1 for NULL) and the bytes; a data block is BLK_DATA, the entry's dump id, chunks of (length, bytes)
and a zero length. Everything here is pure: bytes in, bytes out.

Its records are NamedTuples, not dataclasses: the key-ordered dump's helper process imports this module, and
dataclasses (with inspect, ast and dis) and the code each @dataclass generates cost it several ms of CPU at
every start (issue 20).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

MAGIC = b"PGDMP"
FORMAT_CUSTOM = 1
BLK_DATA = 1
SECTION_DATA = 3
SECTION_POST_DATA = 4
OFFSET_POS_NOT_SET = 1
OFFSET_NO_DATA = 3
# Archive versions (major, minor): 1.14 added the table access method (PostgreSQL 12), 1.15 the
# compression algorithm byte (16), 1.16 relkind (17). Older ones are not written by any supported pg_dump.
OLDEST = (1, 14)
NEWEST = (1, 16)


class ArchiveError(Exception):
    """The stream is not a custom archive this module can read (the message says what was found)."""


class Incomplete(Exception):
    """More bytes are needed before the header and TOC can be read."""


class Head(NamedTuple):
    """The archive's header, kept as its bytes, with what reading the rest needs."""

    raw: bytes
    version: tuple[int, int]
    int_size: int
    off_size: int


class Entry(NamedTuple):
    """One TOC entry, every field as pg_dump writes it."""

    dump_id: int
    had_dumper: bool
    tableoid: str
    oid: str
    tag: str | None
    desc: str | None
    section: int
    defn: str | None
    drop_stmt: str | None
    copy_stmt: str | None
    namespace: str | None
    tablespace: str | None
    tableam: str | None
    relkind: int
    owner: str | None
    with_oids: str | None
    deps: tuple[int, ...]
    data_state: int
    data_offset: int


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview, int_size: int = 4) -> None:
        self.data = data
        self.pos = 0
        self.int_size = int_size

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise Incomplete
        piece = bytes(self.data[self.pos:self.pos + count])
        self.pos += count
        return piece

    def byte(self) -> int:
        return self.take(1)[0]

    def int(self) -> int:
        sign = self.byte()
        value = int.from_bytes(self.take(self.int_size), "little")
        return -value if sign else value

    def str(self) -> str | None:
        length = self.int()
        if length < 0:
            return None
        return self.take(length).decode("utf-8", errors="surrogateescape")


class _Writer:
    def __init__(self, int_size: int, off_size: int) -> None:
        self.parts: list[bytes] = []
        self.int_size = int_size
        self.off_size = off_size

    def int(self, value: int) -> None:
        self.parts.append(bytes([1 if value < 0 else 0]) + abs(value).to_bytes(self.int_size, "little"))

    def str(self, value: str | None) -> None:
        if value is None:
            self.int(-1)
            return
        raw = value.encode("utf-8", errors="surrogateescape")
        self.int(len(raw))
        self.parts.append(raw)

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def read_head(data: bytes | bytearray | memoryview) -> tuple[Head, list[Entry], int]:
    """Reads the header and TOC at the start of `data`; returns them and the offset of the first data
    block. Raises Incomplete when `data` ends before the TOC does, ArchiveError when it is no custom
    archive of a supported version."""
    reader = _Reader(data)
    if reader.take(5) != MAGIC:
        raise ArchiveError("the dump does not start with PGDMP: not a custom-format archive")
    major, minor, _rev, int_size, off_size, fmt = reader.take(6)
    version = (major, minor)
    if fmt != FORMAT_CUSTOM:
        raise ArchiveError(f"archive format {fmt} is not the custom format (1)")
    if not OLDEST <= version <= NEWEST or not 1 <= int_size <= 8 or not 1 <= off_size <= 8:
        raise ArchiveError(f"archive version {major}.{minor} (int size {int_size}, offset size {off_size}) "
                           f"is not one this watcher can reorder (1.14 to 1.16, pg_dump 12 to 17)")
    reader.int_size = int_size
    if version >= (1, 15):
        reader.byte()  # compression algorithm
    else:
        reader.int()  # compression level
    for _ in range(7):  # creation time: sec, min, hour, mday, mon, year, isdst
        reader.int()
    for _ in range(3):  # database name, server version, pg_dump version
        reader.str()
    head = Head(bytes(data[:reader.pos]), version, int_size, off_size)
    count = reader.int()
    entries = [_read_entry(reader, head) for _ in range(count)]
    return head, entries, reader.pos


def _read_entry(reader: _Reader, head: Head) -> Entry:
    dump_id, had_dumper = reader.int(), reader.int()
    tableoid, oid, tag, desc = reader.str(), reader.str(), reader.str(), reader.str()
    section = reader.int()
    defn, drop_stmt, copy_stmt, namespace, tablespace, tableam = (reader.str() for _ in range(6))
    relkind = reader.int() if head.version >= (1, 16) else 0
    owner, with_oids = reader.str(), reader.str()
    deps: list[int] = []
    while (dep := reader.str()) is not None:
        deps.append(int(dep))
    data_state = reader.byte()
    data_offset = int.from_bytes(reader.take(head.off_size), "little")
    return Entry(dump_id, bool(had_dumper), tableoid or "0", oid or "0", tag, desc, section, defn, drop_stmt,
                 copy_stmt, namespace, tablespace, tableam, relkind, owner, with_oids, tuple(deps), data_state,
                 data_offset)


def write_toc(head: Head, entries: list[Entry]) -> bytes:
    """The TOC of `entries` as pg_dump writes it after `head` (its count first)."""
    writer = _Writer(head.int_size, head.off_size)
    writer.int(len(entries))
    for entry in entries:
        writer.int(entry.dump_id)
        writer.int(1 if entry.had_dumper else 0)
        for text in (entry.tableoid, entry.oid, entry.tag, entry.desc):
            writer.str(text)
        writer.int(entry.section)
        for text in (entry.defn, entry.drop_stmt, entry.copy_stmt, entry.namespace, entry.tablespace,
                     entry.tableam):
            writer.str(text)
        if head.version >= (1, 16):
            writer.int(entry.relkind)
        writer.str(entry.owner)
        writer.str(entry.with_oids)
        for dep in entry.deps:
            writer.str(str(dep))
        writer.str(None)
        writer.parts.append(bytes([entry.data_state]) + entry.data_offset.to_bytes(head.off_size, "little"))
    return writer.bytes()


class KeyedTable(NamedTuple):
    """A table whose data the watcher writes itself, in key order: what its TOC entry needs."""

    oid: int
    schema: str
    name: str
    owner: str
    copy_stmt: str  # pg_dump's own: COPY schema.name (columns) FROM stdin;\n


def table_data_entry(head: Head, dump_id: int, table: KeyedTable, table_entry: Entry) -> Entry:
    """The TABLE DATA entry pg_dump would have written for `table`, with dump id `dump_id`, depending
    on the table's own entry `table_entry`."""
    return Entry(dump_id=dump_id, had_dumper=True, tableoid="0", oid=str(table.oid), tag=table.name,
                 desc="TABLE DATA", section=SECTION_DATA, defn=None, drop_stmt=None, copy_stmt=table.copy_stmt,
                 namespace=table.schema, tablespace=None, tableam=None, relkind=0, owner=table_entry.owner,
                 with_oids="false", deps=(table_entry.dump_id,), data_state=OFFSET_POS_NOT_SET, data_offset=0)


class Plan(NamedTuple):
    """What to write in place of pg_dump's header and TOC, and the dump ids of the blocks the watcher
    writes, in the order their blocks must come (after pg_dump's own blocks)."""

    head_and_toc: bytes
    dump_ids: tuple[int, ...]


def insert_keyed(head: Head, entries: list[Entry], tables: list[KeyedTable]) -> Plan:
    """pg_dump's TOC (dumped with --exclude-table-data for `tables`) with a TABLE DATA entry for each of
    `tables`, placed after the last entry whose data pg_dump writes (so their blocks come after all of
    pg_dump's: pg_dump's stream is passed on as it comes and never waits). Nothing else depends on a
    TABLE DATA entry in a dump with schema (pg_dump's getTableDataFKConstraints adds FK constraints'
    dependencies on it only to data-only dumps). Raises ArchiveError when a table's own entry is missing."""
    by_table = {int(e.oid): e for e in entries if e.desc == "TABLE" and e.tableoid == "1259"}
    next_id = max((e.dump_id for e in entries), default=0) + 1
    added: list[Entry] = []
    for table in tables:
        table_entry = by_table.get(table.oid)
        if table_entry is None:
            raise ArchiveError(f"pg_dump's table of contents has no TABLE entry for {table.schema}.{table.name}")
        added.append(table_data_entry(head, next_id, table, table_entry))
        next_id += 1
    at = _insert_position(entries)
    merged = [*entries[:at], *added, *entries[at:]]
    return Plan(head.raw + write_toc(head, merged), tuple(e.dump_id for e in added))


def _insert_position(entries: list[Entry]) -> int:
    """After the last entry with a data block; else before the first post-data entry; else at the end."""
    for index in range(len(entries) - 1, -1, -1):
        if entries[index].had_dumper:
            return index + 1
    for index, entry in enumerate(entries):
        if entry.section == SECTION_POST_DATA:
            return index
    return len(entries)


def block_start(head: Head, dump_id: int) -> bytes:
    """The start of a data block of entry `dump_id`."""
    writer = _Writer(head.int_size, head.off_size)
    writer.parts.append(bytes([BLK_DATA]))
    writer.int(dump_id)
    return writer.bytes()


def chunk_header(head: Head, length: int) -> bytes:
    """The length that precedes a chunk of a data block (0 ends the block)."""
    writer = _Writer(head.int_size, head.off_size)
    writer.int(length)
    return writer.bytes()


def data_blocks(data: bytes, head: Head, start: int) -> Iterator[tuple[int, int, int]]:
    """(dump id, offset of its first chunk, end offset) of every data block from `start` to the end of
    `data` (a whole archive in memory: for tests). Raises ArchiveError on a malformed block."""
    reader = _Reader(data, head.int_size)
    reader.pos = start
    while reader.pos < len(data):
        kind = reader.byte()
        if kind != BLK_DATA:
            raise ArchiveError(f"block type {kind} at offset {reader.pos - 1}")
        dump_id = reader.int()
        first = reader.pos
        while (length := reader.int()) != 0:
            reader.take(length)
        yield dump_id, first, reader.pos
