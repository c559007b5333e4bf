"""watcher.keydump's pure parts: where table rows are cut into chunks (the same rows give the same
bytes, whatever pieces they arrive in), the key session's output protocol, and the names it passes on."""

from __future__ import annotations

import json
import random

import pytest

from watcher import archive, keydump
from watcher.keydump import Chunker, KeySession, Table

HEAD = archive.Head(b"", (1, 14), 4, 8)


def rows(count: int, seed: int = 1, width: int = 60) -> list[bytes]:
    rng = random.Random(seed)
    return [f"{n}\t{rng.getrandbits(width * 4):0{width}x}\n".encode() for n in range(count)]


def chunked(data: bytes, piece: int) -> list[bytes]:
    """The block body Chunker writes for `data` fed in pieces of `piece` bytes, split into its chunks."""
    out: list[bytes] = []
    chunker = Chunker(HEAD, lambda b: out.append(bytes(b)))
    for start in range(0, len(data), piece):
        chunker.feed(data[start:start + piece])
    chunker.finish()
    body = b"".join(out)
    chunks, at = [], 0
    while True:
        length = int.from_bytes(body[at + 1:at + 5], "little")
        at += 5
        if length == 0:
            break
        chunks.append(body[at:at + length])
        at += length
    assert at == len(body)
    return chunks


def test_the_same_rows_give_the_same_chunks_whatever_pieces_they_arrive_in() -> None:
    data = b"".join(rows(20_000))
    expected = chunked(data, 1 << 20)
    assert b"".join(expected) == data
    assert 5 <= len(expected) <= 60  # about one cut per 1024 rows
    for piece in (1, 777, 65536, len(data)):
        assert chunked(data, piece) == expected
    assert all(chunk.endswith(b"\n") for chunk in expected)


def test_a_change_leaves_the_chunks_before_and_after_it_alone() -> None:
    before = rows(30_000)
    after = [*before[:10], *before[20:15_000], b"15000\tchanged\n", *before[15_001:], *rows(100, seed=9)]
    old, new = chunked(b"".join(before), 65536), chunked(b"".join(after), 65536)
    kept = set(old) & set(new)
    assert len(kept) >= len(old) - 4  # the first chunk, the changed one, the last (and one more at most)


def test_a_row_longer_than_a_chunk_is_cut_at_the_largest_chunk() -> None:
    data = b"1\t" + b"x" * (keydump.CHUNK_MAX * 2 + 10) + b"\n" + b"".join(rows(10))
    chunks = chunked(data, 1 << 20)
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks[:2]] == [keydump.CHUNK_MAX, keydump.CHUNK_MAX]


def test_an_empty_table_is_a_block_with_no_chunk() -> None:
    assert chunked(b"", 10) == []


TABLE_LINE = "table " + json.dumps({"oid": 16386, "schema": 'we"ird', "name": "Orders 1",
                                     "qualified": '"we""ird"."Orders 1"', "columns": 'id, "Note"',
                                     "order_by": "id"})


def test_a_table_line_becomes_its_copy_statements_and_pg_dump_pattern() -> None:
    table = keydump.parse_table(TABLE_LINE)
    assert table == Table(16386, 'we"ird', "Orders 1", '"we""ird"."Orders 1"', 'id, "Note"', "id")
    assert table.keyed("app").copy_stmt == 'COPY "we""ird"."Orders 1" (id, "Note") FROM stdin;\n'
    assert table.copy_sql() == 'COPY (SELECT id, "Note" FROM "we""ird"."Orders 1" ORDER BY id) TO STDOUT;\n'
    assert keydump.exclude_pattern(table) == '"we""ird"."Orders 1"'


def test_an_unreadable_table_line_fails_by_name() -> None:
    with pytest.raises(keydump.KeyDumpError, match="unreadable table line"):
        keydump.parse_table('table {"oid": 1}')


def feed_in_pieces(session: KeySession, data: bytes, piece: int) -> None:
    for start in range(0, len(data), piece):
        session.feed(data[start:start + piece])


@pytest.mark.parametrize("piece", [1, 3, 64, 4096])
def test_the_key_session_output_is_read_whatever_pieces_it_arrives_in(piece: int) -> None:
    session = KeySession()
    opening = (f"snapshot 00000003-0000001B-1\n{TABLE_LINE}\n".encode() + session.marker("tables") + b"\n"
               + session.marker("ready") + b"\n")
    feed_in_pieces(session, opening, piece)
    assert session.snapshot == "00000003-0000001B-1"
    assert [t.oid for t in session.tables] == [16386]
    assert session.listed.is_set() and session.ready.is_set()
    for body in (b"".join(rows(3000)), b""):  # a table, then an empty one
        out: list[bytes] = []
        session.start_copy(session.tables[0], Chunker(HEAD, out.append))
        feed_in_pieces(session, body + session.marker("copied") + b"\n", piece)
        assert session.copied.is_set() and session.last_copy_ok
        expected: list[bytes] = []
        reference = Chunker(HEAD, expected.append)
        reference.feed(body)
        reference.finish()
        assert b"".join(out) == b"".join(expected)


def test_a_session_that_ends_mid_copy_fails_the_copy() -> None:
    session = KeySession()
    table = keydump.parse_table(TABLE_LINE)
    session.start_copy(table, Chunker(HEAD, lambda b: None))
    session.feed(b"1\tx\n")
    session.end(None, "psql exited with status 3")
    assert session.copied.is_set() and not session.last_copy_ok
