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


def test_needles_with_any_byte_and_starts_inside_large_buffers() -> None:
    # memmem compares bytes, not C strings: a NUL in the needle or the buffer is an ordinary byte.
    rng = random.Random(3)
    buf = bytearray(rng.randbytes(200_000))
    for _ in range(300):
        at = rng.randrange(0, len(buf))
        needle = bytes(buf[at:at + rng.randrange(1, 4)]) if rng.random() < 0.7 else rng.randbytes(2)
        start = rng.randrange(0, len(buf) - memsearch.NATIVE_FROM_BYTES)
        assert memsearch.find(buf, needle, start) == buf.find(needle, start), (at, start)
    nul = bytearray(b"a" * 9_000 + b"\x00\x00b" + b"a" * 9_000)
    assert memsearch.find(nul, b"\x00b") == 9_001


def test_without_the_c_library_search_the_answers_are_bytes_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Python without ctypes or a C library without memmem: the same answers, at CPython's speed.
    monkeypatch.setattr(memsearch, "_libc_memmem", lambda: None)
    buf = bytearray(b"1\trow\n" * 5_000 + b"4242\tboundary\n")
    assert not memsearch.native()
    assert memsearch.find(buf, b"\n4242\t") == buf.find(b"\n4242\t") > 0
