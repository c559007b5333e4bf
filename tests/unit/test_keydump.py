"""The key-ordered dump's pure parts: where table rows are cut into chunks (after the boundary rows the
server picked; the same rows give the same bytes, whatever pieces they arrive in), the sessions' output
protocol, the names it passes on, and the SQL scripts that reach psql without any exec input."""

from __future__ import annotations

import functools
import itertools
import json
import random
import zlib
from collections.abc import Callable, Sequence

import pytest

from tests.unit.test_archive import SCHEMA, head_bytes
from watcher import archive, keysql
from watcher.dockerexec import SealedOutput
from watcher.keydump import ArchiveFilter, Dump, ReadBatch
from watcher.keyrows import (
    CHUNK_MAX,
    Chunker,
    CopyStream,
    HolderOutput,
    KeyDumpError,
    Table,
    exclude_pattern,
    parse_table,
)

HEAD = archive.Head(b"", (1, 14), 4, 8)
TOKEN = "0123abcd"
END = f"copied-{TOKEN}\n".encode()
BOUNDS = f"bounds-{TOKEN}\n".encode()


def rows(count: int, seed: int = 1, width: int = 60, first: int = 0) -> list[bytes]:
    """Rows as the copy session prints them: the key, then a value."""
    rng = random.Random(seed)
    return [f"{n}\t{rng.getrandbits(width * 4):0{width}x}\n".encode() for n in range(first, first + count)]


def keep(out: list[bytes], data: bytes | bytearray | memoryview) -> None:
    """A Chunker's write that keeps a copy of what it writes in `out`."""
    out.append(bytes(data))


def bounds_of(data: bytes) -> list[bytes]:
    """The boundary rows' keys as the server picks them: about one row in 1024, by a hash of the key."""
    keys = [line.split(b"\t", 1)[0] for line in data.splitlines()]
    return [key for key in keys if zlib.crc32(key) & 1023 == 0]


def block_chunks(body: bytes) -> list[bytes]:
    """The chunks of a data block's body (chunk headers of HEAD's int size), checking it ends with 0."""
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


def chunked(data: bytes, piece: int, after: bytes = b"", bounds: list[bytes] | None = None) -> list[bytes]:
    """The chunks Chunker writes for the rows `data` fed in pieces of `piece` bytes, then the end line."""
    out: list[bytes] = []
    chunker = Chunker(HEAD, lambda b: out.append(bytes(b)), END, bounds_of(data) if bounds is None else bounds)
    stream = data + END + after
    rest = None
    for start in range(0, len(stream), piece):
        rest = chunker.feed(stream[start:start + piece])
        if rest is not None:
            rest += stream[start + piece:]
            break
    assert rest == after, "the table ended at its end line"
    return block_chunks(b"".join(out))


def test_chunks_end_after_the_boundary_rows_whatever_pieces_they_arrive_in() -> None:
    data = b"".join(rows(20_000))
    expected = chunked(data, 1 << 20)
    assert b"".join(expected) == data
    assert len(expected) == len(bounds_of(data)) + 1 and len(expected) > 5
    assert [chunk.rsplit(b"\n", 2)[-2].split(b"\t")[0] for chunk in expected[:-1]] == bounds_of(data)
    for piece in (1, 777, 65536, len(data) + len(END)):
        assert chunked(data, piece, after=b"next line\n") == expected


def test_a_read_of_many_frames_held_then_fed_gives_the_same_chunks() -> None:
    # The key-ordered dump hands a read's frames on together (ReadBatch): all but the last held, the last fed.
    data = b"".join(rows(60_000))
    expected = chunked(data, 1 << 20)
    stream = data + END + b"next line\n"
    rng = random.Random(3)
    for frame_bytes, frames_per_read in ((4096, 50), (32768, 40), (777, 3), (1 << 20, 6), (50, 1)):
        out: list[bytes] = []
        chunker = Chunker(HEAD, functools.partial(keep, out), END, bounds_of(data))
        at, rest = 0, None
        while rest is None:
            count = rng.randrange(1, frames_per_read + 1)
            pieces = [memoryview(stream)[at + n * frame_bytes : at + (n + 1) * frame_bytes] for n in range(count)]
            at += count * frame_bytes
            chunker.hold(pieces[:-1])
            rest = chunker.feed(pieces[-1])
        assert rest + stream[at:] == b"next line\n", (frame_bytes, frames_per_read)
        assert block_chunks(b"".join(out)) == expected, (frame_bytes, frames_per_read)


@pytest.mark.parametrize("rest_bytes", [180, None])
def test_a_boundary_row_cut_by_a_read_ends_its_chunk_where_its_end_comes(rest_bytes: int | None) -> None:
    # Row 7, a boundary row, is found before its end came; its chunk ends once the end came (in pieces of 180
    # bytes, or all at once), after the chunk before it was written and dropped from the rows held.
    data = b"".join(rows(40, width=10))
    cut = data.index(b"\n7\t") + 4
    stream = data + END
    out: list[bytes] = []
    chunker = Chunker(HEAD, lambda b: out.append(bytes(b)), END, [b"3", b"7"])
    assert chunker.feed(stream[:cut]) is None
    step = rest_bytes or len(stream)
    results = [chunker.feed(stream[at : at + step]) for at in range(cut, len(stream), step)]
    assert results[-1] == b"" and all(result is None for result in results[:-1])
    chunks = block_chunks(b"".join(out))
    assert b"".join(chunks) == data
    assert [chunk.split(b"\n")[-2].split(b"\t")[0] for chunk in chunks[:2]] == [b"3", b"7"]


def test_a_change_leaves_the_chunks_before_and_after_it_alone() -> None:
    before = rows(30_000)
    changed = rows(1, seed=7, first=15_000)
    after = [*before[:10], *before[20:15_000], *changed, *before[15_001:], *rows(100, seed=9, first=30_000)]
    old, new = chunked(b"".join(before), 65536), chunked(b"".join(after), 65536)
    kept = set(old) & set(new)
    assert len(kept) >= len(old) - 4  # the first chunk, the changed one, the last (and one more at most)


def test_a_row_longer_than_a_chunk_is_cut_at_the_largest_chunk() -> None:
    data = b"1\t" + b"x" * (CHUNK_MAX * 2 + 10) + b"\n" + b"".join(rows(10, first=2))
    chunks = chunked(data, 1 << 20, bounds=[b"1", b"5"])
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks[:2]] == [CHUNK_MAX, CHUNK_MAX]
    # The long row is a boundary row: its end ends a chunk; so does the next boundary row's.
    assert chunks[2].endswith(b"x\n") and chunks[3].startswith(b"2\t") and chunks[4].startswith(b"6\t")


def test_a_key_only_table_and_an_empty_table() -> None:
    data = b"".join(f"{n}\n".encode() for n in range(5000))
    keys = [str(n).encode() for n in range(5000) if n % 700 == 3]
    out: list[bytes] = []
    chunker = Chunker(HEAD, lambda b: out.append(bytes(b)), END, keys, key_only=True)
    assert chunker.feed(data + END) == b""
    chunks = block_chunks(b"".join(out))
    assert b"".join(chunks) == data and [c.split(b"\n")[-2] for c in chunks[:-1]] == keys
    assert chunked(b"", 1) == []
    assert chunked(b"", 100, after=b"x\n") == []


def test_a_boundary_row_missing_from_the_rows_never_ends_the_table_and_says_why() -> None:
    data = b"".join(rows(5000))
    chunker = Chunker(HEAD, lambda _b: None, END, [b"12", b"999999"])
    stream = data + END + b"next table\n"
    assert all(chunker.feed(stream[at:at + 4096]) is None for at in range(0, len(stream), 4096))
    # The copy session's output ends inside the table: the dump fails (keydump) with this reason.
    assert chunker.missing_boundary() == ("boundary row 2 of 2 was not among the table's rows (the copy session's "
                                          "output is garbled)")


TABLE = {"oid": 16386, "schema": 'we"ird', "name": "Orders 1", "qualified": '"we""ird"."Orders 1"',
         "columns": 'id, "Note"', "order_by": "id"}
TABLE_LINE = "table " + json.dumps(TABLE)


def test_a_table_line_becomes_its_copy_statement_and_pg_dump_pattern() -> None:
    table = parse_table(TABLE_LINE)
    assert table == Table(16386, 'we"ird', "Orders 1", '"we""ird"."Orders 1"', 'id, "Note"', "id")
    assert table.keyed("app").copy_stmt == 'COPY "we""ird"."Orders 1" (id, "Note") FROM stdin;\n'
    assert exclude_pattern(table) == '"we""ird"."Orders 1"'


def test_an_unreadable_table_line_fails_by_name() -> None:
    with pytest.raises(KeyDumpError, match="unreadable table line"):
        parse_table('table {"oid": 1}')


def feed_in_pieces(feed: object, data: bytes, piece: int) -> None:
    assert callable(feed)
    for start in range(0, len(data), piece):
        feed(data[start:start + piece])


@pytest.mark.parametrize("piece", [1, 3, 64, 4096])
def test_the_holder_output_is_read_whatever_pieces_it_arrives_in(piece: int) -> None:
    out = HolderOutput(TOKEN)
    feed_in_pieces(out.feed, f"\nsnapshot 00000003-0000001B-1\nlock-{TOKEN} public.a\n".encode(), piece)
    assert out.snapshot == "00000003-0000001B-1" and out.locking == "public.a" and not out.locked
    feed_in_pieces(out.feed, f"locked-{TOKEN}\n{TABLE_LINE}\nready-{TOKEN}\n".encode(), piece)
    assert out.locked and out.listed and out.ready.is_set()
    assert [t.oid for t in out.tables] == [16386]


def start_line(table: dict[str, object]) -> bytes:
    # As json_build_object writes it: the oid as a string.
    seen = {"oid": str(table["oid"]), "columns": table["columns"], "order_by": table["order_by"]}
    return f"copy-{TOKEN} {json.dumps(seen)}\n".encode()


@pytest.mark.parametrize("piece", [1, 5, 4096, 1 << 20])
def test_the_copy_session_output_becomes_the_tables_data_blocks(piece: int) -> None:
    second = {**TABLE, "oid": 16400, "name": "empty", "qualified": '"we""ird".empty'}
    tables = [parse_table("table " + json.dumps(t)) for t in (TABLE, second)]
    body = b"".join(rows(3000))
    bounds = b"".join(key + b"\n" for key in bounds_of(body))
    output = (b"\n" + BOUNDS + bounds + start_line(TABLE) + body + END + BOUNDS + start_line(second) + END)
    out: list[bytes] = []
    stream = CopyStream(TOKEN, HEAD, tables, (41, 42), lambda b: out.append(bytes(b)))
    feed_in_pieces(stream.feed, output, piece)
    assert stream.done.is_set() and stream.copied == 2
    written = b"".join(out)
    first = archive.block_start(HEAD, 41)
    assert written.startswith(first)
    end_of_first = len(written) - len(archive.block_start(HEAD, 42)) - 5
    chunks = block_chunks(written[len(first):end_of_first])
    assert b"".join(chunks) == body and len(chunks) == len(bounds_of(body)) + 1
    assert written[end_of_first:] == archive.block_start(HEAD, 42) + archive.chunk_header(HEAD, 0)


def fed_a_read_at_a_time(data: bytes, feed_all: Callable[[list[memoryview]], object], seed: int) -> None:
    """Feeds `data` as the exec stream's reader hands it on: reads of random sizes into one reused buffer, each
    read's frames as views of it, all of a read in one call; the buffer is overwritten after each call, so a
    piece kept past its call, or lost, shows in what was written."""
    rng = random.Random(seed)
    buffer = bytearray(1 << 16)
    at = 0
    while at < len(data):
        size = min(rng.randrange(1, len(buffer)), len(data) - at)
        buffer[:size] = data[at : at + size]
        cuts = sorted(rng.sample(range(1, size), min(size - 1, rng.randrange(0, 40)))) if size > 1 else []
        edges = [0, *cuts, size]
        with memoryview(buffer) as view:
            feed_all([view[start:end] for start, end in itertools.pairwise(edges)])
        buffer[:size] = b"\xee" * size
        at += size


def test_a_read_batch_hands_a_reads_pieces_on_once_and_counts_the_read() -> None:
    got: list[list[bytes]] = []
    reads = []
    batch = ReadBatch(lambda pieces: got.append([bytes(piece) for piece in pieces]), lambda: reads.append(1))
    batch.flush()  # nothing read: nothing handed on, no progress
    batch.pieces.append(memoryview(b"ab"))
    batch.pieces.append(memoryview(b"c"))
    batch.flush()
    batch.flush()
    batch.pieces.append(memoryview(b"d"))
    batch.flush()
    assert got == [[b"ab", b"c"], [b"d"]] and len(reads) == 2


@pytest.mark.parametrize("seed", range(6))
def test_the_copy_session_output_fed_a_read_at_a_time_gives_the_same_blocks(seed: int) -> None:
    # Three tables, the middle one empty: tables end and start inside a read's frames.
    second = {**TABLE, "oid": 16400, "name": "empty", "qualified": '"we""ird".empty'}
    third = {**TABLE, "oid": 16500, "name": "more", "qualified": '"we""ird".more'}
    tables = [parse_table("table " + json.dumps(t)) for t in (TABLE, second, third)]
    first_rows, third_rows = b"".join(rows(3000)), b"".join(rows(2000, seed=5, first=7000))
    output = (b"\n" + BOUNDS + b"".join(key + b"\n" for key in bounds_of(first_rows)) + start_line(TABLE)
              + first_rows + END + BOUNDS + start_line(second) + END
              + BOUNDS + b"".join(key + b"\n" for key in bounds_of(third_rows)) + start_line(third) + third_rows + END)
    whole: list[bytes] = []
    CopyStream(TOKEN, HEAD, tables, (41, 42, 43), functools.partial(keep, whole)).feed(output)
    out: list[bytes] = []
    stream = CopyStream(TOKEN, HEAD, tables, (41, 42, 43), functools.partial(keep, out))
    fed_a_read_at_a_time(output, stream.feed_all, seed)
    assert stream.done.is_set() and stream.copied == 3
    assert b"".join(out) == b"".join(whole) and len(b"".join(whole)) > len(first_rows) + len(third_rows)


@pytest.mark.parametrize("seed", range(6))
def test_pg_dumps_output_fed_a_read_at_a_time_is_rewritten_once_and_passed_on_whole(seed: int) -> None:
    # The archive's head and TOC end inside a read; the end mark is held back across reads (SealedOutput).
    raw_head = head_bytes()
    toc = raw_head + archive.write_toc(archive.Head(raw_head, (1, 14), 4, 8), list(SCHEMA))
    blocks = bytes(range(256)) * 600
    seal = b"0123456789abcdef0123456789abcdef"
    tables = [Table(500, "public", "t500", "public.t500", "id", "id")]

    def written_by(feed: Callable[[ArchiveFilter], object]) -> bytes:
        out: list[bytes] = []

        def keep_all(pieces: Sequence[bytes | bytearray | memoryview]) -> None:
            for piece in pieces:
                keep(out, piece)

        dump = Dump("unix:///nowhere.sock", "c", {}, functools.partial(keep, out), keep_all, lambda _data: None)
        filt = ArchiveFilter(dump, tables)
        feed(filt)
        assert filt.dump_ids == (32,)
        return b"".join(out)

    expected = written_by(lambda filt: filt.feed(toc + blocks))
    sealer = SealedOutput(seal, lambda _piece: None)
    got = written_by(lambda filt: fed_a_read_at_a_time(
        toc + blocks + seal, lambda pieces: filt.feed_all(sealer.pass_on(list(pieces))), seed))
    assert sealer.sealed()
    assert got == expected and got.endswith(blocks) and len(got) > len(toc) + len(blocks)


def test_a_table_the_holder_did_not_list_fails_the_dump() -> None:
    stream = CopyStream(TOKEN, HEAD, [parse_table(TABLE_LINE)], (41,), lambda b: None)
    with pytest.raises(KeyDumpError, match="is not the listed"):
        stream.feed(BOUNDS + start_line({**TABLE, "columns": "id"}))


def test_the_scripts_name_the_run_and_take_no_value_that_is_not_checked() -> None:
    holder = keysql.holder_script(TOKEN, 2500)
    assert "SET statement_timeout = 2500;" in holder and f"\\echo ready-{TOKEN}" in holder
    assert holder.index("LOCK TABLE") < holder.index("pg_relation_size"), "sizes are read only once locked"
    assert keysql.app_name(TOKEN, "copy") in holder and keysql.app_name(TOKEN, "dump") in holder
    copy = keysql.copy_script(TOKEN, "00000003-0000001B-1", [16386, 16400], "SET client_encoding = 'UTF8';\n")
    assert "SET TRANSACTION SNAPSHOT '00000003-0000001B-1';" in copy and "'{16386,16400}'::oid[]" in copy
    assert "& 1023) = 0" in copy and copy.index(f"bounds-{TOKEN}") < copy.index(f"copy-{TOKEN}")
    assert copy.index("COMMIT;") < copy.index(f"application_name = '{keysql.app_name(TOKEN, 'hold')}'"), \
        "the copy session ends the holder's wait once it is done"
    with pytest.raises(ValueError, match="alphanumeric"):
        keysql.holder_script("x'; DROP", 1)
    with pytest.raises(ValueError, match="alphanumeric"):
        keysql.copy_script(TOKEN, "1'; DROP", [], "")
    # The script goes in through the environment: the command is the same for every run.
    assert keysql.script_command() == ("sh", "-c", 'printf %s "$BW_KEYDUMP_SQL" | "$@"', "sh", *keysql.PSQL)
