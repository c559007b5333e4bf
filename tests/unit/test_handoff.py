"""The early-started dump's hand-off (watcher.handoff: restic's command, HandOff, Destination), with real sockets
and pipes: restic's pipe reaches the helper, the helper's verdict becomes the exit status restic judges the dump by,
and a helper that gives none fails the dump."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher import commands
from watcher import handoff as handoff_module
from watcher.handoff import (
    EXIT_NO_VERDICT,
    READ_AHEAD_WAIT_S,
    Destination,
    HandOff,
    HandOffError,
    RestartDump,
    destination_for,
    hand_over,
)
from watcher.jobs import early_dump


class Stub(threading.Thread):
    """watcher.handoff's hand_over in a thread, handing over the write end of a pipe as restic's."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.read_fd, self.write_fd = os.pipe()
        self.status: int | None = None

    def run(self) -> None:
        self.status = hand_over(self.path, self.write_fd)
        os.close(self.write_fd)  # /dev/null by now: restic's end of the stream is the helper's close

    def received(self) -> bytes:
        chunks = []
        while chunk := os.read(self.read_fd, 65536):
            chunks.append(chunk)
        os.close(self.read_fd)
        return b"".join(chunks)


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[tuple[str, int, int]]:
    """(socket path, listening fd, a pipe's write end watched for restic's end); the pipe's read end stays open."""
    path = str(tmp_path / "dump.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    watch_read, watch_write = os.pipe()
    yield path, listener.detach(), watch_write
    for fd in (watch_read, watch_write):
        os.close(fd)


def test_the_stream_goes_to_restic_and_the_verdict_is_the_exit_status(listening: tuple[str, int, int]) -> None:
    path, listener_fd, watch_fd = listening
    stub = Stub(path)
    stub.start()
    helper = HandOff(listener_fd, watch_fd)
    os.write(helper.output(), b"PGDMP and the rest")
    helper.deliver(0)
    assert stub.received() == b"PGDMP and the rest"
    stub.join(timeout=10)
    assert stub.status == 0


def test_a_failed_dump_fails_restic_s_command_even_before_its_first_byte(listening: tuple[str, int, int]) -> None:
    path, listener_fd, watch_fd = listening
    stub = Stub(path)
    stub.start()
    HandOff(listener_fd, watch_fd).deliver(1)  # pg_dump failed at once: nothing was written
    assert stub.received() == b""
    stub.join(timeout=10)
    assert stub.status == 1


def test_a_helper_that_ends_without_a_verdict_fails_the_dump(listening: tuple[str, int, int]) -> None:
    path, listener_fd, _watch_fd = listening
    stub = Stub(path)
    stub.start()
    # A helper killed mid-dump: the kernel closes its connection and its copy of restic's pipe, no verdict.
    with socket.socket(fileno=listener_fd) as listener:
        conn, _ = listener.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1, 1)
        os.write(fds[0], b"half a dump")
        os.close(fds[0])
        conn.close()
    assert stub.received() == b"half a dump"
    stub.join(timeout=10)
    assert stub.status == EXIT_NO_VERDICT


def test_no_helper_listening_fails_the_dump(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    assert hand_over(str(tmp_path / "nobody.sock"), write_fd) == EXIT_NO_VERDICT
    for fd in (read_fd, write_fd):
        os.close(fd)


def test_restic_ending_before_its_command_ends_the_helper_s_wait(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "dump.sock"))
    listener.listen(1)
    watch_read, watch_write = os.pipe()
    os.close(watch_read)  # restic, the only reader of the helper's stdout, is gone
    helper = HandOff(listener.detach(), watch_write)
    with pytest.raises(HandOffError, match="restic ended before it started reading the dump"):
        helper.output()
    os.close(watch_write)


def test_handed_off_splits_a_backup_whose_source_is_the_exec_helper() -> None:
    source = commands.exec_helper("abc123", ("pg_dump", "-Fc", "db"), env_names=["PGPASSWORD"], seal=True)
    backup = commands.restic_backup("restic", host="h", container="c", database="db", source=source)
    split = commands.handed_off(backup, 7, "/tmp/x/dump.sock")
    assert split is not None
    helper, restic = split
    marker = backup.index("--stdin-from-command")
    assert restic == (*backup[: marker + 2], sys.executable, "-m", "watcher.handoff", "/tmp/x/dump.sock")
    end = source.index("--")
    assert helper == (*source[:end], "--handoff-fd", "7", "--", "pg_dump", "-Fc", "db")


def test_handed_off_splits_a_key_ordered_dump_too() -> None:
    source = commands.key_ordered_dump("abc123", ("pg_dump", "-Fc", "db"), lock_wait_s=5)
    backup = commands.restic_backup("restic", host="h", container="c", database="db", source=source)
    split = commands.handed_off(backup, 7, "/tmp/x/dump.sock")
    assert split is not None
    end = source.index("--")
    assert split[0] == (*source[:end], "--handoff-fd", "7", "--", "pg_dump", "-Fc", "db")
    assert split[1][-3:] == ("-m", "watcher.handoff", "/tmp/x/dump.sock")


def test_handed_off_leaves_other_sources_alone() -> None:
    backup = commands.restic_backup("restic", host="h", container="c", database="db",
                                    source=("sh", "-c", "cat dump", "--", "x"))
    assert commands.handed_off(backup, 7, "/tmp/x/dump.sock") is None


def _physical_backup() -> commands.Command:
    source = commands.exec_helper("abc123", ("pg_dump", "-Fc", "db"), seal=True)
    return commands.restic_backup("restic", host="h", container="c", database="db", source=source)


def test_early_dump_gives_the_helper_a_listening_socket_in_a_private_directory() -> None:
    backup = _physical_backup()
    with early_dump(backup) as (members, fds):
        assert len(members) == 2 and len(fds) == 1
        path = members[1][-1]
        assert Path(path).is_socket() and Path(path).parent.stat().st_mode & 0o077 == 0
        assert members[0][members[0].index("--handoff-fd") + 1] == str(fds[0])
        os.close(fds[0])  # run_pipeline's part
    assert not Path(path).parent.exists()


def test_early_dump_leaves_the_helper_to_restic_where_no_socket_can_be_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 110)  # longer than a socket's path may be
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    backup = _physical_backup()
    with early_dump(backup) as (members, fds):
        assert members == [backup] and fds == ()


def _destination(listening: tuple[str, int, int], wait_s: float = 5.0) -> tuple[Destination, HandOff]:
    _path, listener_fd, watch_fd = listening
    handoff = HandOff(listener_fd, watch_fd)
    return Destination(handoff=handoff, wait_s=wait_s), handoff


def test_a_dump_that_ends_before_restic_reads_is_read_ahead_and_written_whole_once_it_does(
        listening: tuple[str, int, int]) -> None:
    destination, handoff = _destination(listening)
    view = memoryview(bytearray(b"PGDMP head"))
    destination.write([view, b" rows"])
    view[:5] = b"XXXXX"  # the read buffer is reused: what waits was copied
    destination.write([b" end"])
    stub = Stub(listening[0])
    stub.start()  # restic's command comes only now (restic waited for a lock)
    destination.finish()
    handoff.deliver(0)
    assert stub.received() == b"PGDMP head rows end"
    stub.join(timeout=10)
    assert stub.status == 0


def test_once_restic_reads_the_read_ahead_goes_first_then_the_rest_straight(
        listening: tuple[str, int, int]) -> None:
    destination, handoff = _destination(listening)
    destination.write([b"first "])
    stub = Stub(listening[0])
    stub.start()
    assert handoff.arrived(10)
    destination.write([b"second ", b"third"])
    destination.finish()
    handoff.deliver(0)
    assert stub.received() == b"first second third"
    stub.join(timeout=10)


def test_a_full_read_ahead_that_restic_does_not_take_abandons_the_dump_and_the_next_run_starts_clean(
        listening: tuple[str, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handoff_module, "READ_AHEAD_BYTES", 100)
    destination, handoff = _destination(listening, wait_s=0.2)
    destination.write([b"a" * 60])
    with pytest.raises(RestartDump):
        destination.write([b"b" * 60])  # over the read-ahead, and no restic within wait_s (its lock wait)
    stub = Stub(listening[0])
    stub.start()
    destination.restart()  # waits for restic's pipe; the abandoned dump's bytes are gone
    destination.write([b"PGDMP anew"])
    destination.finish()
    handoff.deliver(0)
    assert stub.received() == b"PGDMP anew"
    stub.join(timeout=10)
    assert stub.status == 0


def test_restic_ending_while_the_dump_is_read_ahead_ends_the_wait(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "dump.sock"))
    listener.listen(1)
    watch_read, watch_write = os.pipe()
    destination = Destination(handoff=HandOff(listener.detach(), watch_write))
    destination.write([b"PGDMP"])
    os.close(watch_read)  # restic gave up (its lock wait ended) before it ran its command
    with pytest.raises(HandOffError, match="restic ended before it started reading the dump"):
        destination.finish()
    os.close(watch_write)


def test_a_full_read_ahead_waits_well_within_the_stall_bound(listening: tuple[str, int, int]) -> None:
    _path, listener_fd, watch_fd = listening
    plain, none = destination_for(None, watch_fd, 4.0)
    assert none is None and plain.wait_s == READ_AHEAD_WAIT_S  # no hand-off: nothing is read ahead
    early, handoff = destination_for(listener_fd, watch_fd, 4.0)
    assert handoff is not None and early.wait_s == 2.0  # half the stall bound: a longer block would be a stall
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        unbounded, _ = destination_for(other.detach(), watch_fd, None)
    assert unbounded.wait_s == READ_AHEAD_WAIT_S
