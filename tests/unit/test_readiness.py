"""The readiness wait shared by restores and drills: final server only, bounded, cancellable."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from watcher.clock import FakeClock
from watcher.readiness import Answer, NotServing, parse_probe, wait_until_serving


def scripted(clock: FakeClock, answers: list[Answer | str], step_s: float = 1.0) -> Callable[[], Answer | str]:
    """A probe that gives `answers` in turn (the last one forever), each taking `step_s` of the clock."""
    def probe() -> Answer | str:
        clock.advance(step_s)
        return answers.pop(0) if len(answers) > 1 else answers[0]
    return probe


def test_parse_probe_reads_psql_output_and_nothing_else() -> None:
    assert parse_probe("t|f\n") == Answer(listening=True, database_exists=False)
    assert parse_probe("f|t") == Answer(listening=False, database_exists=True)
    assert parse_probe("") is None
    assert parse_probe("ERROR: x") is None


def test_the_temporary_initdb_server_and_the_gap_after_it_are_waited_out() -> None:
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
    answers: list[Answer | str] = ["connection refused", Answer(False, True), Answer(False, True),
                                   "connection refused", Answer(True, True)]
    probe = scripted(clock, answers)
    assert wait_until_serving(probe, bound_s=60, clock=clock, interval_s=0) == Answer(True, True)
    assert answers == [Answer(True, True)]


def test_a_server_that_never_listens_on_tcp_is_taken_as_socket_only_at_the_bound() -> None:
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
    answer = wait_until_serving(scripted(clock, [Answer(False, False)]), bound_s=10, clock=clock, interval_s=0)
    assert answer == Answer(False, False)
    assert clock.monotonic() >= 1010


def test_nothing_answering_fails_at_the_bound_with_the_last_reason() -> None:
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(NotServing, match="within 10s: connection refused"):
        wait_until_serving(scripted(clock, ["connection refused"]), bound_s=10, clock=clock, interval_s=0)


def test_cancel_ends_the_wait() -> None:
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(NotServing, match="cancelled"):
        wait_until_serving(scripted(clock, [Answer(False, True)]), bound_s=60, clock=clock, cancel=cancel)


def test_probe_sql_quotes_the_database_name_as_a_literal() -> None:
    from watcher.readiness import probe_sql

    assert probe_sql("appdb").endswith("WHERE datname = 'appdb');")
    assert "datname = 'o''brien'" in probe_sql("o'brien")
    assert ":'db'" not in probe_sql("x")
