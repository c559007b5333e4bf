"""The early start of a dump (issue 20): both sides of handing restic's pipe to a dump helper started before restic.

restic's side, `python -m watcher.handoff SOCKET`: the command restic runs (--stdin-from-command) for a dump whose
helper (`watcher.dockerexec` or `watcher.keydump`) was started before restic, so that the dump runs while restic
opens the repository (about a second of key derivation, index and lock before restic starts its command, and as
long again for the helper's and pg_dump's own start, all serial before). It connects to the helper's socket,
hands it its stdout (restic's pipe, by SCM_RIGHTS: the helper then writes the dump straight into restic, no byte
passes through here), and exits with the verdict the helper sends once the stream has ended: 0 only for a whole,
sealed, successful dump, as the helper's own exit status would have been. A helper that ends without a verdict
(killed, crashed, never started) is a failure (125): restic writes no snapshot unless this command exits 0.

The helper's side (HandOff, Destination): until restic's pipe is there, the dump is read ahead into memory, up to
READ_AHEAD_BYTES. A dump that fits ends there whole (nothing of it is held in the database while restic waits) and
is written once restic's pipe comes, however long restic takes (a repository lock: restic's --retry-lock bounds
it). A larger dump that restic has not taken READ_AHEAD_WAIT_S after the read-ahead filled up is abandoned
(RestartDump: its exec and sessions end, so no snapshot or table lock is held for as long as a prune's lock) and
dumped anew from its start once restic's pipe is there. Reading ahead also keeps the engine's stream read while
restic opens: a socket proxy (HAProxy 2.6) was seen to drop the tail of an exec stream whose reader lagged when
it ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import sys
from collections.abc import Sequence

EXIT_NO_VERDICT = 125
READ_AHEAD_BYTES = 4 << 20  # a small dump (globals, a small database) ends in memory; see the docstring
READ_AHEAD_WAIT_S = 10.0
PIPE_BYTES = 1 << 20
IOV_MAX = 1024

Piece = bytes | bytearray | memoryview


def hand_over(path: str, out_fd: int) -> int:
    """Hands `out_fd` to the exec helper listening at `path` and waits for its verdict; returns it (the exit
    status: EXIT_NO_VERDICT when there is none). `out_fd` is replaced by /dev/null once handed over, so that
    the end of the stream is the helper's to make. Never raises: failures are told on stderr."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            socket.send_fds(sock, [b"o"], [out_fd])
            _release(out_fd)
            # As long as the dump: the helper's own bounds (stall, the job's timeout) end it, and with it this wait.
            verdict = sock.recv(1)
    except OSError as exc:
        print(f"backup-watcher: cannot hand restic's pipe to the dump's exec helper: {exc}", file=sys.stderr)
        return EXIT_NO_VERDICT
    if not verdict:
        print("backup-watcher: the dump's exec helper ended without a verdict", file=sys.stderr)
        return EXIT_NO_VERDICT
    return verdict[0]


def _release(fd: int) -> None:
    """Points `fd` at /dev/null: restic sees the end of its pipe when the helper closes its copy, not before."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


class HandOffError(Exception):
    """restic's pipe could not be had from `python -m watcher.handoff`, or the verdict not given to it."""


class RestartDump(Exception):
    """restic did not take the read-ahead of a dump larger than READ_AHEAD_BYTES within its wait: the dump is
    abandoned, to be dumped anew from its start once restic's pipe is there."""


class HandOff:
    """The helper's side of the hand-off: the helper was started before restic, listens on a socket it inherited,
    and gets restic's pipe from the command restic runs once it is ready to read; the exit status it would have
    had goes back as that command's verdict.

    `watch_fd` is a pipe into restic's stdin, which only restic holds: restic ending before it started its
    command (a wrong password, no repository, its lock wait over) ends the wait for the pipe at once.
    """

    def __init__(self, listener_fd: int, watch_fd: int) -> None:
        self._listener = socket.socket(fileno=listener_fd)
        self._watch_fd = watch_fd
        self._conn: socket.socket | None = None
        self._fd: int | None = None
        self.failed: HandOffError | None = None  # the hand-over failed: there is no one to give a verdict to

    def arrived(self, timeout: float | None) -> bool:
        """True once restic's command has connected (waiting up to `timeout` seconds for it, None: for as long
        as restic lives); raises HandOffError when restic ended first."""
        if self._fd is not None or self._conn is not None:
            return True
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._watch_fd, 0)  # POLLERR / POLLHUP: restic, the pipe's only reader, is gone
        while True:
            events = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
            if not events:
                return False
            if any(fd == self._watch_fd for fd, _ in events):
                self.failed = HandOffError("restic ended before it started reading the dump")
                raise self.failed
            conn, _ = self._listener.accept()
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid == os.getuid():
                self._conn = conn
                return True
            conn.close()  # another user's process: not restic's command

    def output(self) -> int:
        """restic's pipe, waited for on first use; raises HandOffError (the same one again once it failed)."""
        if self.failed is not None:
            raise self.failed
        try:
            return self._received()
        except HandOffError as exc:
            self.failed = exc
            raise

    def _received(self) -> int:
        if self._fd is None:
            self.arrived(None)
            assert self._conn is not None
            try:
                _, fds, _, _ = socket.recv_fds(self._conn, 1, 1)
            except OSError as exc:
                raise HandOffError(f"restic's command did not hand over its pipe: {exc}") from exc
            if len(fds) != 1:
                raise HandOffError("restic's command connected but handed over no pipe")
            self._fd = fds[0]
            widen_pipe(self._fd)
        return self._fd

    def deliver(self, status: int) -> None:
        """Ends the stream (closes our copy of restic's pipe) and sends `status` to restic's command, waiting for
        it first if the stream ended before its first byte; raises HandOffError."""
        try:
            fd = self.output()
            os.close(fd)
            assert self._conn is not None
            self._conn.sendall(bytes([status]))
            self._conn.close()
        except OSError as exc:
            raise HandOffError(f"the verdict could not reach restic's command: {exc}") from exc
        finally:
            self._listener.close()


def delivered(handoff: HandOff, status: int) -> int:
    """Gives `status` to restic's command as its verdict; returns 0 once it has it (restic learns the outcome
    from that command's exit, and a failure of ours would only end restic before it could tell it), else
    `status` (EXIT_NO_VERDICT for a success that could not be told: restic's command fails by itself)."""
    if handoff.failed is not None:
        return status or EXIT_NO_VERDICT  # said already
    try:
        handoff.deliver(status)
    except HandOffError as exc:
        print(f"backup-watcher: {exc}", file=sys.stderr)
        return status or EXIT_NO_VERDICT
    return 0


class Destination:
    """Where a helper writes its dump: a descriptor it has (restic's pipe or stdout), or restic's pipe from a
    HandOff, read ahead into memory until it comes (see the module's docstring). `wait_s` is how long a full
    read-ahead waits for restic before the dump is abandoned (RestartDump)."""

    def __init__(self, fd: int | None = None, handoff: HandOff | None = None,
                 wait_s: float = READ_AHEAD_WAIT_S) -> None:
        if (fd is None) == (handoff is None):
            raise ValueError("a descriptor or a hand-off, one of the two")
        self._fd = fd
        self._handoff = handoff
        self.wait_s = wait_s
        self._ahead = bytearray()
        if fd is not None:
            widen_pipe(fd)

    def write(self, pieces: Sequence[Piece]) -> None:
        """Writes `pieces` in order, whole (views may be reused once this returns: what waits is copied); raises
        RestartDump (see the class), HandOffError, OSError (BrokenPipeError: restic went away)."""
        if self._fd is None:
            assert self._handoff is not None
            if not self._handoff.arrived(0):
                for piece in pieces:
                    self._ahead += piece
                if len(self._ahead) < READ_AHEAD_BYTES:
                    return
                if not self._handoff.arrived(self.wait_s):
                    raise RestartDump
                pieces = ()
            self._fd = self._handoff.output()
            pieces = [self._ahead, *pieces]
        writev_all(self._fd, pieces)
        if self._ahead:
            self._ahead = bytearray()

    def finish(self) -> None:
        """Writes what was read ahead once restic's pipe is there, waiting for it for as long as restic lives
        (a dump that ended before restic took it); raises HandOffError, OSError."""
        if self._fd is None:
            assert self._handoff is not None
            self._fd = self._handoff.output()
        writev_all(self._fd, [self._ahead])
        self._ahead = bytearray()

    def restart(self) -> None:
        """Forgets what was read ahead of an abandoned dump and waits for restic's pipe (for as long as restic
        lives: its lock wait is bounded by --retry-lock); raises HandOffError."""
        self._ahead = bytearray()
        if self._handoff is not None:
            self._fd = self._handoff.output()


def destination_for(handoff_fd: int | None, out_fd: int, stall_timeout_s: float | None
                    ) -> tuple[Destination, HandOff | None]:
    """A helper's destination: `out_fd` itself, or (`handoff_fd`: started before restic) restic's pipe from a
    HandOff that watches `out_fd` for restic's end, with a read-ahead wait well within the stall bound (a write
    blocked that long would otherwise be taken for restic's stall); returns it and the HandOff, if any."""
    if handoff_fd is None:
        return Destination(fd=out_fd), None
    handoff = HandOff(handoff_fd, out_fd)
    wait_s = READ_AHEAD_WAIT_S if stall_timeout_s is None else min(READ_AHEAD_WAIT_S, stall_timeout_s / 2)
    return Destination(handoff=handoff, wait_s=wait_s), handoff


def restarting(destination: Destination, program: str) -> bool:
    """After RestartDump: says on stderr that `program` was stopped because restic did not read within the
    destination's wait and runs again, then waits for restic's pipe (Destination.restart); returns True to run
    it again, False (said on stderr) when restic ended first."""
    print(f"backup-watcher: restic did not start reading within {destination.wait_s:g} s (a repository lock?): "
          f"{program} was stopped and runs again once restic reads", file=sys.stderr, flush=True)
    try:
        destination.restart()
    except HandOffError as exc:
        print(f"backup-watcher: {exc}", file=sys.stderr)
        return False
    return True


def writev_all(fd: int, pieces: Sequence[Piece]) -> None:
    """Writes every piece to `fd`, in order, in as few system calls as the kernel allows; raises OSError."""
    todo = [p for p in pieces if len(p)]
    while todo:
        batch = todo[:IOV_MAX]
        written = os.writev(fd, batch)
        todo = _after_written(batch, written) + todo[len(batch):]


def _after_written(batch: list[Piece], written: int) -> list[Piece]:
    """What of `batch` is left after a (possibly partial) write of its first `written` bytes."""
    for index, piece in enumerate(batch):
        if written < len(piece):
            return [memoryview(piece)[written:], *batch[index + 1:]]
        written -= len(piece)
    return []


def widen_pipe(fd: int) -> None:
    """Makes the pipe on `fd` (if it is one) hold PIPE_BYTES: a gathered write of a few hundred KiB then goes
    in at once instead of waking its reader and waiting for it four times. Left as it is where refused."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def main(argv: list[str] | None = None) -> int:
    """Entry of `python -m watcher.handoff SOCKET`; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m watcher.handoff SOCKET", file=sys.stderr)
        return 2
    return hand_over(args[0], sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
