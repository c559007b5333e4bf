"""The stall bound of a dump (WATCHER_STALL_TIMEOUT, watcher.stall): silence for the bound ends the stream, any
piece of data restarts the count, and the sentence names the silent side. The helper doing it for real against
a paused container: tests/integration/test_fault_matrix.py."""

from __future__ import annotations

import threading

from watcher.jobs import stall_problem
from watcher.stall import StallWatch, Watchdog, look_interval


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_stream_silent_for_the_bound_is_stalled_and_any_piece_restarts_the_count() -> None:
    clock = FakeTime()
    watch = StallWatch(60.0, clock)
    passed: list[bytes] = []
    sink = watch.counting(passed.append)
    clock.now += 59.0
    assert not watch.stalled()
    sink(b"piece")
    clock.now += 1.0
    assert not watch.stalled(), "a piece arrived since the last look"
    clock.now += 59.0
    assert not watch.stalled()
    clock.now += 1.0
    assert watch.stalled()
    assert passed == [b"piece"], "every piece is passed on as it was"


def test_a_stderr_line_is_progress_too() -> None:
    clock = FakeTime()
    watch = StallWatch(10.0, clock)
    out, err = watch.counting(lambda _: None), watch.counting(lambda _: None)
    out(b"x")
    for _ in range(5):
        clock.now += 9.0
        err(b"pg_dump: reading tables\n")
        assert not watch.stalled()
    clock.now += 10.0
    assert watch.stalled()


def test_the_sentence_names_the_container_side_or_the_reader() -> None:
    clock = FakeTime()
    watch = StallWatch(900.0, clock)
    assert watch.problem("pg_dump").startswith("no data from pg_dump for 15m: is the container paused")
    seen_while_writing: list[str] = []

    def blocked_reader(_: bytes) -> None:  # a write that restic does not take: the watchdog looks meanwhile
        seen_while_writing.append(watch.problem("pg_dump"))

    watch.counting(blocked_reader)(b"data")
    assert seen_while_writing[0].startswith("restic took no data from pg_dump for 15m")
    for sentence in (*seen_while_writing, watch.problem("pg_dump")):
        assert "WATCHER_STALL_TIMEOUT" in sentence and "backup-watcher.stall-timeout" in sentence


def test_a_watchdog_calls_on_stall_once_for_a_stream_that_never_moves() -> None:
    stalled = threading.Event()
    calls: list[int] = []

    def on_stall() -> None:
        calls.append(1)
        stalled.set()

    with Watchdog(StallWatch(0.0, FakeTime()), on_stall, interval=0.01) as dog:
        assert stalled.wait(10), "the watchdog never fired"
    assert dog.fired and calls == [1]


def test_a_stopped_watchdog_never_fires() -> None:
    clock = FakeTime()
    with Watchdog(StallWatch(5.0, clock), lambda: None, interval=0.01) as dog:
        pass
    clock.now += 100.0
    threading.Event().wait(0.05)
    assert not dog.fired


def test_the_watchdog_looks_often_enough_but_not_busily() -> None:
    assert look_interval(900.0) == 5.0
    assert look_interval(3.0) == 0.3
    assert look_interval(0.1) == 0.1


def test_the_stall_sentence_leads_the_backup_error() -> None:
    detail = ("backup-watcher: no data from pg_dump for 3s: is the container paused, its server hung or its "
              "storage frozen? The dump was aborted (the bound is WATCHER_STALL_TIMEOUT or the label "
              "backup-watcher.stall-timeout)\nFatal: unable to save snapshot: command failed")
    stalled, rest = stall_problem(detail)
    assert stalled is not None and stalled.startswith("no data from pg_dump for 3s: ")
    assert rest == "Fatal: unable to save snapshot: command failed"
    assert stall_problem("Fatal: wrong password") == (None, "Fatal: wrong password")
