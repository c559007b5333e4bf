"""The exec client's stream reading and its abort, over a real socket pair (no Docker needed)."""

from __future__ import annotations

import socket
import threading
import time

from watcher.dockerexec import HEADER, STREAM_STDERR, STREAM_STDOUT, ExecAbort, _read_frames


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def read_all(data: bytes, buffered: bytes = b"") -> tuple[bool, str | None, bytes, bytes]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        out, err = bytearray(), bytearray()
        complete, problem = _read_frames(ours, buffered, out.extend, err.extend)
    return complete, problem, bytes(out), bytes(err)


def test_frames_go_to_their_stream_and_a_clean_end_is_complete() -> None:
    data = frame(STREAM_STDOUT, b"rows") + frame(STREAM_STDERR, b"warning") + frame(STREAM_STDOUT, b" more")
    # Bytes that came with the upgrade response count as the stream's start (docker-py#3332).
    assert read_all(data[5:], buffered=data[:5]) == (True, None, b"rows more", b"warning")


def test_a_stream_cut_inside_a_frame_is_not_complete() -> None:
    complete, problem, out, _ = read_all(frame(STREAM_STDOUT, b"whole") + frame(STREAM_STDOUT, b"cut short")[:-3])
    assert not complete
    assert problem == "exec stream ended inside a frame (14 bytes of a partial frame)"
    assert out == b"whole"


def test_an_unknown_stream_type_is_a_problem() -> None:
    complete, problem, _, _ = read_all(frame(7, b"x"))
    assert (complete, problem) == (False, "unexpected stream type 7 in the exec stream")


def test_abort_ends_a_read_that_waits_for_a_silent_command() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        abort = ExecAbort()
        assert abort.attach(ours)
        threading.Timer(0.5, abort.abort).start()
        started = time.monotonic()
        complete, _problem = _read_frames(ours, b"", lambda _data: None, lambda _data: None)
        assert time.monotonic() - started < 5, "the blocked read returned once the socket was shut"
        assert abort.aborted
        assert complete, "a read that ends on a frame boundary looks complete: stream_exec checks `aborted`"


def test_an_exec_aborted_before_it_started_is_not_attached() -> None:
    abort = ExecAbort()
    abort.abort()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert not abort.attach(ours)
