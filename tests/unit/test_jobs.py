"""Pure parts of jobs: restic_error_text (restic's stderr as readable lines), readiness_plan and the
sentence that names a lock wait."""

from __future__ import annotations

import json

from watcher.config import Bounds
from watcher.jobs import (
    MIN_READY_WAIT_SECONDS,
    SETTLED_AFTER_SECONDS,
    ReadinessPlan,
    lock_wait_problem,
    program_missing,
    readiness_plan,
)
from watcher.restic import restic_error_text

READY_TIMEOUT_SECONDS = Bounds().ready_s


def test_json_exit_error_and_plain_lines() -> None:
    lines = [
        json.dumps({"message_type": "exit_error", "code": 1,
                    "message": "Fatal: unable to open config file: Stat: stat /srv/restic/config: "
                               "no such file"}),
        "subprocess /opt/watcher/bin/python3: pg_dump: error: connection to server failed",
        json.dumps({"message_type": "error", "error": {"message": "read /app.pgdump: input/output error"},
                    "during": "archival", "item": "/app.pgdump"}),
    ]
    assert restic_error_text(lines) == (
        "Fatal: unable to open config file: Stat: stat /srv/restic/config: no such file\n"
        "pg_dump: error: connection to server failed\n"
        "read /app.pgdump: input/output error"
    ), "restic's 'subprocess <argv0>: ' prefix is noise to the reader"


def test_status_lines_without_a_message_are_dropped() -> None:
    lines = [
        json.dumps({"message_type": "status", "percent_done": 0.5, "total_files": 1}),
        json.dumps({"message_type": "verbose_status", "action": "new", "item": "/app.pgdump"}),
        "Fatal: repository is already locked",
    ]
    assert restic_error_text(lines) == "Fatal: repository is already locked"


def test_duplicates_collapse_keeping_order() -> None:
    lines = ["first", "second", "first", json.dumps({"message_type": "exit_error", "message": "second"})]
    assert restic_error_text(lines) == "first\nsecond"


def test_plain_line_that_looks_like_json_text_survives() -> None:
    assert restic_error_text(["{not json", "[broken"]) == "{not json\n[broken"


def test_empty() -> None:
    assert restic_error_text([]) == ""


# --- readiness_plan ------------------------------------------------------------------------------


def test_unknown_start_time_waits_the_whole_timeout() -> None:
    assert readiness_plan(None, READY_TIMEOUT_SECONDS) == ReadinessPlan(probe_first=True, wait_s=READY_TIMEOUT_SECONDS)


def test_a_container_that_just_started_waits_for_what_is_left_of_the_timeout() -> None:
    assert readiness_plan(0.0, READY_TIMEOUT_SECONDS) == ReadinessPlan(True, 120.0)
    assert readiness_plan(45.0, READY_TIMEOUT_SECONDS) == ReadinessPlan(True, 75.0)
    # Never less than the minimum wait, even just before it counts as settled.
    assert readiness_plan(110.0, READY_TIMEOUT_SECONDS) == ReadinessPlan(True, MIN_READY_WAIT_SECONDS)


def test_a_settled_container_dumps_at_once_and_waits_only_after_a_failure() -> None:
    assert readiness_plan(SETTLED_AFTER_SECONDS, READY_TIMEOUT_SECONDS) == ReadinessPlan(False, READY_TIMEOUT_SECONDS)
    # After a failed dump, as long as after a start: crash recovery of a big cluster takes a while.
    assert readiness_plan(30 * 86400.0, READY_TIMEOUT_SECONDS) == ReadinessPlan(False, 120.0)


def test_a_start_time_in_the_future_counts_as_just_started() -> None:
    """Clock skew between the engine and the watcher must not skip the wait of a starting container."""
    assert readiness_plan(-5.0, READY_TIMEOUT_SECONDS) == ReadinessPlan(True, 120.0)


def test_the_default_ready_timeout_is_two_minutes() -> None:
    assert READY_TIMEOUT_SECONDS == 120.0


def test_a_short_ready_timeout_is_never_stretched_to_the_minimum_wait() -> None:
    """WATCHER_READY_TIMEOUT=10s must bound the wait, even right after a start."""
    assert readiness_plan(0.0, 10.0) == ReadinessPlan(True, 10.0)
    assert readiness_plan(8.0, 10.0) == ReadinessPlan(True, 10.0)
    assert readiness_plan(SETTLED_AFTER_SECONDS, 10.0) == ReadinessPlan(False, 10.0)


# --- lock_wait_problem ---------------------------------------------------------------------------


def test_pg_dump_that_gave_up_on_a_table_lock_names_the_table_and_the_bound() -> None:
    stderr = ("pg_dump: error: query failed: ERROR:  canceling statement due to statement timeout\n"
              "pg_dump: detail: Query was: LOCK TABLE public.\"Order Lines\" IN ACCESS SHARE MODE")
    assert lock_wait_problem(stderr, 300.0) == (
        'pg_dump gave up waiting for a lock on table public."Order Lines" after 5m: another session holds a '
        "conflicting lock (a migration?); the bound is WATCHER_LOCK_WAIT_TIMEOUT or the label "
        "backup-watcher.lock-wait-timeout")


def test_a_query_that_gave_up_on_a_lock_names_the_table_of_its_label() -> None:
    stderr = ("ERROR:  canceling statement due to lock timeout\n"
              "LINE 1: SELECT 'public.\"it''s\"', EXISTS (SELECT 1 FROM public.\"it's\");")
    problem = lock_wait_problem(stderr, 3.0)
    assert problem is not None
    assert problem.startswith('a query gave up waiting for a lock on table public."it\'s" after 3s: ')


def test_a_lock_timeout_without_a_labelled_query_still_names_the_lock_wait() -> None:
    problem = lock_wait_problem("ERROR:  canceling statement due to lock timeout", 90.0)
    assert problem is not None
    assert problem.startswith("a query gave up waiting for a lock after 90s: ")


def test_a_mariadb_dump_interrupted_on_a_table_lock_names_the_table_and_the_bound() -> None:
    stderr = ("mariadb-dump: Couldn't execute 'SELECT /*!40001 SQL_NO_CACHE */ `x`, `y` FROM `order ``lines```': "
              "Query execution was interrupted (1317)\n"
              "lock wait: gave up after 3s waiting for a lock: SELECT /*!40001 SQL_NO_CACHE */ `x`, `y` FROM "
              "`order ``lines```\n")
    assert lock_wait_problem(stderr, 3.0) == (
        "mariadb-dump gave up waiting for a lock on table `order ``lines``` after 3s: another session holds a "
        "conflicting lock (a migration?); the bound is WATCHER_LOCK_WAIT_TIMEOUT or the label "
        "backup-watcher.lock-wait-timeout")


def test_other_failures_are_not_lock_waits() -> None:
    assert lock_wait_problem("pg_dump: error: connection to server failed", 300.0) is None
    assert lock_wait_problem("ERROR:  canceling statement due to statement timeout", 300.0) is None
    assert lock_wait_problem("", 300.0) is None


def test_only_the_engines_word_that_the_program_is_missing_makes_a_container_no_postgresql() -> None:
    """Exit 126 also comes from passing causes (a container stopping between exec create and start): those
    are waited on like any other answer; only "not found" fails at once (jobs.pg_not_ready_reason)."""
    missing = ('OCI runtime exec failed: exec failed: unable to start container process: exec: "pg_isready": '
               'executable file not found in $PATH: unknown')
    assert program_missing(missing)
    assert program_missing('exec: "/usr/lib/postgresql/15/bin/pg_isready": stat ...: no such file or directory')
    assert not program_missing("OCI runtime exec failed: exec failed: container is stopped: unknown")
    assert not program_missing("")
