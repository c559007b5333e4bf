"""The exec client's stream reading and its abort, over a real socket pair (no Docker needed)."""

from __future__ import annotations

import random
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


def test_stdout_frames_between_stderr_frames_arrive_whole_and_in_order() -> None:
    # Each stdout frame's payload is handed on as a view of the read buffer: the bytes and where stderr falls
    # between them stay exactly as sent, over several reads and frames cut by a read's end. The views are read
    # only at on_read, as a consumer may (GatheredWrites and the key-ordered dump's ReadBatch take them then):
    # handing on the rest of the read must not have overwritten them by that time.
    rng = random.Random(7)
    sent: list[tuple[str, bytes]] = []
    data = bytearray()
    for number in range(3000):
        kind = "err" if rng.random() < 0.05 else "out"
        payload = rng.randbytes(rng.choice((0, 1, 7, 4096, 32768, 40000))) if kind == "out" else b"e%d" % number
        sent.append((kind, payload))
        data += frame(STREAM_STDOUT if kind == "out" else STREAM_STDERR, payload)
    expected: list[tuple[str, bytes]] = []
    for kind, payload in sent:
        if kind == "out" and expected and expected[-1][0] == "out":
            expected[-1] = ("out", expected[-1][1] + payload)
        elif payload or kind == "err":
            expected.append((kind, payload))
    held: list[tuple[str, memoryview]] = []
    got: list[tuple[str, bytes]] = []
    stdout_pieces = 0

    def stdout_piece(view: memoryview) -> None:
        nonlocal stdout_pieces
        stdout_pieces += 1
        held.append(("out", view))

    def taken_at_read() -> None:
        for kind, piece in held:
            if kind == "out" and got and got[-1][0] == "out":
                got[-1] = ("out", got[-1][1] + bytes(piece))
            else:
                got.append((kind, bytes(piece)))
        held.clear()

    ours, theirs = socket.socketpair()
    with ours, theirs:
        def send() -> None:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        complete, problem = _read_frames(ours, b"", stdout_piece,
                                         lambda view: held.append(("err", view)), taken_at_read)
        sender.join()
        taken_at_read()
    assert (complete, problem) == (True, None)
    assert got == expected
    # One piece per stdout frame that carries bytes, none for an empty one: no frames moved together.
    assert stdout_pieces == sum(1 for kind, payload in sent if kind == "out" and payload)


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
