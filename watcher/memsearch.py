"""Finding bytes in a large bytearray at the C library's speed (memmem), bytes.find where there is none.

Why: the key-ordered dump looks for each boundary row ("newline, key, TAB") in every byte of a table's rows.
CPython's find switches to its two-way search on such a needle (its last byte, TAB, is in every row), about
2 GB/s here, and was the largest part of the dump process's CPU (perf: 28 %); glibc's memmem finds the same
needle at about 5 GB/s (issue 20).

ctypes is imported at the first large search, not with this module: it costs a dump helper about 2 ms of CPU
at start, which a small dump never needs back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

# Below this many bytes the call's own cost (a buffer export, a foreign call: about 1.5 µs) outweighs the
# faster search.
NATIVE_FROM_BYTES = 1 << 12

_Memmem = Callable[[int, int, bytes, int], "int | None"]


@functools.cache
def _libc_memmem() -> _Memmem | None:
    """The process's memmem (glibc or musl), looked up once; None where the C library has none or cannot be
    loaded."""
    try:
        import ctypes  # noqa: PLC0415 - see the module's docstring

        memmem = ctypes.CDLL(None).memmem
    except (ImportError, OSError, AttributeError):  # a Python built without ctypes, a C library without memmem
        return None
    memmem.restype = ctypes.c_void_p
    memmem.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    found: _Memmem = memmem
    return found


def find(buf: bytearray, needle: bytes, start: int = 0) -> int:
    """Where `needle` first starts in buf[start:], as an offset of `buf`; -1 when it is not there (the same
    answer as buf.find(needle, start) for any start)."""
    size = len(buf) - start
    memmem = _libc_memmem() if start >= 0 and size >= NATIVE_FROM_BYTES and needle else None
    if memmem is None:
        return buf.find(needle, start)
    import ctypes  # noqa: PLC0415 - loaded by _libc_memmem already: a lookup in sys.modules

    # One byte's view gives the address (an array type per size would be a new type, kept, per call). The
    # export pins buf (it cannot be resized) only for the call: released before returning.
    window = ctypes.c_char.from_buffer(buf, start)
    try:
        base = ctypes.addressof(window)
        at = memmem(base, size, needle, len(needle))
    finally:
        del window
    return -1 if at is None else start + at - base


def native() -> bool:
    """True when find uses the C library's memmem on large buffers (the image and any glibc or musl Linux)."""
    return _libc_memmem() is not None
