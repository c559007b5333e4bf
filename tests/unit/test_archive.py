"""watcher.archive: pg_dump's custom archive header and table of contents, read and written back byte
for byte, and the TABLE DATA entries a key-ordered dump adds. The real pg_dump output of PostgreSQL 15
and 17 is compared in tests/integration/test_key_order.py."""

from __future__ import annotations

import pytest

from watcher import archive
from watcher.archive import Entry, KeyedTable


def _int(value: int, size: int = 4) -> bytes:
    return bytes([1 if value < 0 else 0]) + abs(value).to_bytes(size, "little")


def _str(value: str | None) -> bytes:
    if value is None:
        return _int(-1)
    raw = value.encode()
    return _int(len(raw)) + raw


def head_bytes(minor: int = 14) -> bytes:
    """A header as pg_dump 15 (1.14: compression as an int) or 17 (1.16: a byte) writes it."""
    compression = bytes([0]) if minor >= 15 else _int(0)
    clock = b"".join(_int(v) for v in (5, 4, 3, 2, 1, 124, 0))
    return (b"PGDMP" + bytes([1, minor, 0, 4, 8, 1]) + compression + clock
            + _str("app") + _str("15.18") + _str("15.18"))


def entry(dump_id: int, desc: str, oid: int, *, section: int = 2, had_dumper: bool = False,
          deps: tuple[int, ...] = (), tableoid: str = "1259", relkind: int = 0) -> Entry:
    return Entry(dump_id, had_dumper, tableoid, str(oid), f"t{oid}", desc, section, "CREATE …;\n", "DROP …;\n",
                 None, "public", "", "heap", relkind, "owner", "false", deps,
                 archive.OFFSET_POS_NOT_SET if had_dumper else archive.OFFSET_NO_DATA, 0)


SCHEMA = [
    entry(1, "ENCODING", 0, section=2, tableoid="0"),
    entry(10, "TABLE", 500),
    entry(11, "TABLE", 600),
    entry(20, "TABLE DATA", 600, section=3, had_dumper=True, deps=(11,), tableoid="0"),
    entry(30, "CONSTRAINT", 700, section=4, tableoid="2606", deps=(10,)),
    entry(31, "FK CONSTRAINT", 701, section=4, tableoid="2606", deps=(11,)),
]


@pytest.mark.parametrize("minor", [14, 15, 16])
def test_header_and_toc_read_back_as_written(minor: int) -> None:
    raw_head = head_bytes(minor)
    entries = [entry(e.dump_id, e.desc or "", int(e.oid), section=e.section, had_dumper=e.had_dumper, deps=e.deps,
                     tableoid=e.tableoid, relkind=114 if minor >= 16 else 0) for e in SCHEMA]
    probe = archive.Head(raw_head, (1, minor), 4, 8)
    data = raw_head + archive.write_toc(probe, entries) + b"\x01rest"
    head, read, end = archive.read_head(data)
    assert (head.version, head.raw, read) == ((1, minor), raw_head, entries)
    assert data[end:] == b"\x01rest"


def test_a_cut_short_toc_asks_for_more_bytes() -> None:
    head = archive.Head(head_bytes(), (1, 14), 4, 8)
    data = head.raw + archive.write_toc(head, SCHEMA)
    for cut in (3, len(head.raw) - 1, len(data) - 1):
        with pytest.raises(archive.Incomplete):
            archive.read_head(data[:cut])


@pytest.mark.parametrize(("data", "says"), [
    (b"-- PostgreSQL database dump\n" + b"x" * 40, "not a custom-format archive"),
    (b"PGDMP" + bytes([1, 12, 0, 4, 8, 1]) + b"\0" * 60, "1.12"),
    (b"PGDMP" + bytes([1, 14, 0, 4, 8, 3]) + b"\0" * 60, "format 3"),
])
def test_anything_but_a_supported_custom_archive_is_refused_by_name(data: bytes, says: str) -> None:
    with pytest.raises(archive.ArchiveError, match=says):
        archive.read_head(data)


def test_keyed_tables_get_their_entries_after_the_last_block_and_nothing_else_changes() -> None:
    head = archive.Head(head_bytes(), (1, 14), 4, 8)
    keyed = KeyedTable(500, "public", "t500", "", "COPY public.t500 (id) FROM stdin;\n")
    plan = archive.insert_keyed(head, list(SCHEMA), [keyed])
    again, entries, end = archive.read_head(plan.head_and_toc)
    assert end == len(plan.head_and_toc) and again.raw == head.raw
    assert plan.dump_ids == (32,)
    assert [e.dump_id for e in entries] == [1, 10, 11, 20, 32, 30, 31]
    added = entries[4]
    assert (added.desc, added.tableoid, added.oid, added.tag, added.namespace, added.owner, added.deps,
            added.copy_stmt, added.defn, added.had_dumper, added.section) == (
        "TABLE DATA", "0", "500", "t500", "public", "owner", (10,), keyed.copy_stmt, None, True, archive.SECTION_DATA)
    assert [e for e in entries if e.dump_id != 32] == SCHEMA


def test_without_other_data_the_entries_go_before_the_post_data_section() -> None:
    head = archive.Head(head_bytes(), (1, 14), 4, 8)
    schema = [e for e in SCHEMA if e.desc != "TABLE DATA"]
    plan = archive.insert_keyed(head, schema, [KeyedTable(600, "public", "t600", "", "COPY …;\n")])
    _, entries, _ = archive.read_head(plan.head_and_toc)
    assert [e.desc for e in entries] == ["ENCODING", "TABLE", "TABLE", "TABLE DATA", "CONSTRAINT", "FK CONSTRAINT"]


def test_a_keyed_table_pg_dump_did_not_list_fails_the_dump() -> None:
    head = archive.Head(head_bytes(), (1, 14), 4, 8)
    with pytest.raises(archive.ArchiveError, match=r"no TABLE entry for public\.gone"):
        archive.insert_keyed(head, list(SCHEMA), [KeyedTable(999, "public", "gone", "", "COPY …;\n")])


def test_data_blocks_are_framed_as_pg_dump_frames_them() -> None:
    head = archive.Head(head_bytes(), (1, 14), 4, 8)
    block = (archive.block_start(head, 32) + archive.chunk_header(head, 3) + b"a\tb"
             + archive.chunk_header(head, 0))
    assert block == b"\x01" + _int(32) + _int(3) + b"a\tb" + _int(0)
    assert list(archive.data_blocks(block, head, 0)) == [(32, 6, len(block))]
