"""memsearch.find gives bytes.find's answers, through memmem on large buffers."""

from __future__ import annotations

import random

import pytest

from watcher import memsearch


def test_the_c_library_search_is_there_on_linux() -> None:
    # The image and the test machines are glibc Linux: a fallback here would be the slow path unnoticed.
    assert memsearch.native()


@pytest.mark.parametrize("seed", range(20))
def test_answers_as_bytes_find_does(seed: int) -> None:
    rng = random.Random(seed)
    rows = b"".join(b"%d\t%s\tnote %d\n" % (key, rng.randbytes(8).hex().encode(), key % 7)
                    for key in range(rng.randrange(1, 3000)))
    buf = bytearray(rows)
    keys = [rng.randrange(0, 3100) for _ in range(20)]
    for key in keys:
        needle = b"\n%d\t" % key
        for start in (0, 1, rng.randrange(0, len(buf) + 10), len(buf) - len(needle), len(buf), len(buf) + 5):
            assert memsearch.find(buf, needle, start) == buf.find(needle, start), (key, start)


def test_a_needle_at_the_very_end_and_one_cut_by_the_end() -> None:
    buf = bytearray(b"x" * 10_000 + b"\n42\t")
    assert memsearch.find(buf, b"\n42\t") == 10_000
    assert memsearch.find(buf, b"\n42\t\n") == -1
    assert memsearch.find(buf, b"\n42\t", 10_001) == -1


def test_the_buffer_can_grow_and_shrink_after_a_search() -> None:
    # The search pins the bytearray only for its call: a pin left behind would make the next += fail.
    buf = bytearray(b"a" * 100_000)
    assert memsearch.find(buf, b"needle") == -1
    buf += b"needle"
    assert memsearch.find(buf, b"needle", 50_000) == 100_000
    del buf[:50_000]
    assert memsearch.find(buf, b"needle") == 50_000
