"""`python -m watcher.handoff SOCKET`: the command restic runs (--stdin-from-command) for a dump whose exec helper
was started before restic, so that the dump runs while restic opens the repository (issue 20: about a second
of key derivation, index and lock before restic starts its command, and as long again for the helper's and
pg_dump's own start, all serial before).

It connects to the helper's socket, hands it its stdout (restic's pipe, by SCM_RIGHTS: the helper then writes
the dump straight into restic, no byte passes through here), and exits with the verdict the helper sends once
the stream has ended: 0 only for a whole, sealed, successful dump, as the helper's own exit status would have
been. A helper that ends without a verdict (killed, crashed, never started) is a failure (125): restic writes
no snapshot unless this command exits 0.
"""

from __future__ import annotations

import os
import socket
import sys

EXIT_NO_VERDICT = 125


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


def main(argv: list[str] | None = None) -> int:
    """Entry of `python -m watcher.handoff SOCKET`; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m watcher.handoff SOCKET", file=sys.stderr)
        return 2
    return hand_over(args[0], sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
