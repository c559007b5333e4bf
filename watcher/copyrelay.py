"""The source of a streamed copy (SPEC §12): `python -m watcher.copyrelay FIFO SIZE`.

`restic backup --stdin-from-command` into the copy runs it with the copy's environment; it reads the snapshot
that a separate `restic dump --target FIFO` (with the primary's environment) writes into the FIFO, copies it to
stdout and exits 0 only when exactly SIZE bytes arrived: a dump that failed or broke off midway leaves no
snapshot in the copy (restic discards the backup of a command that fails). Neither restic process ever holds
the other repository's credentials.
"""

from __future__ import annotations

import sys
from typing import BinaryIO

CHUNK_BYTES = 1 << 20


def relay(source: BinaryIO, sink: BinaryIO, expected: int) -> str | None:
    """Copies `source` to `sink` until its end; returns None when exactly `expected` bytes came, else why not."""
    count = 0
    while chunk := source.read(CHUNK_BYTES):
        count += len(chunk)
        sink.write(chunk)
    sink.flush()
    if count != expected:
        return f"the snapshot's stream ended after {count} of {expected} bytes: restic dump from the primary failed"
    return None


def main(argv: list[str]) -> int:
    """Relays the FIFO `argv[0]` to stdout; returns 0 when `argv[1]` bytes arrived, 1 otherwise (2: usage)."""
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m watcher.copyrelay FIFO SIZE", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as source:
        problem = relay(source, sys.stdout.buffer, int(argv[1]))
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
