"""Both ends of a streamed copy (SPEC §12), joined by a FIFO in a private directory.

- `python -m watcher.copyrelay FIFO SIZE`, the source that `restic backup --stdin-from-command` into the copy
  runs (with the copy's environment): reads the FIFO, copies it to stdout and exits 0 only when exactly SIZE
  bytes arrived, so a dump that failed or broke off leaves no snapshot in the copy (restic discards the backup
  of a command that fails).
- `python -m watcher.copyrelay --into FIFO -- restic dump …` (with the primary's environment): opens the FIFO
  for writing, which waits until the reader has opened it, then becomes `restic dump` with its stdout there.
  (`restic dump --target FIFO` would not do: restic opens its target read-write, so it never waits for the
  reader, and what it wrote before the reader came is lost when it exits.)

Neither restic process ever holds the other repository's credentials.
"""

from __future__ import annotations

import os
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


def become_writer(fifo: str, command: list[str]) -> None:
    """Opens `fifo` for writing (waiting for its reader), makes it stdout and executes `command`; returns only
    by raising OSError when the FIFO cannot be opened or the command cannot be executed."""
    descriptor = os.open(fifo, os.O_WRONLY)
    os.dup2(descriptor, sys.stdout.fileno())
    os.close(descriptor)
    os.execvp(command[0], command)  # noqa: S606 - argv built by watcher.commands, no shell


def main(argv: list[str]) -> int:
    """Relays the FIFO `argv[0]` to stdout; returns 0 when `argv[1]` bytes arrived, 1 otherwise (2: usage).
    With `--into FIFO -- COMMAND…` it becomes COMMAND writing into the FIFO instead (1 when it cannot)."""
    if len(argv) >= 4 and argv[0] == "--into" and argv[2] == "--":
        try:
            become_writer(argv[1], argv[3:])
        except OSError as exc:
            print(f"cannot run {argv[3]} into {argv[1]}: {exc.strerror}", file=sys.stderr)
        return 1
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
