"""Pure parts of jobs: restic_error_text (restic's stderr as readable lines) and readiness_plan."""

from __future__ import annotations

import json

from watcher.jobs import (
    MIN_READY_WAIT_SECONDS,
    READY_TIMEOUT_SECONDS,
    SETTLED_AFTER_SECONDS,
    ReadinessPlan,
    readiness_plan,
)
from watcher.restic import restic_error_text


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
    assert readiness_plan(None) == ReadinessPlan(probe_first=True, wait_s=READY_TIMEOUT_SECONDS)


def test_a_container_that_just_started_waits_for_what_is_left_of_the_timeout() -> None:
    assert readiness_plan(0.0) == ReadinessPlan(True, 120.0)
    assert readiness_plan(45.0) == ReadinessPlan(True, 75.0)
    # Never less than the minimum wait, even just before it counts as settled.
    assert readiness_plan(110.0) == ReadinessPlan(True, MIN_READY_WAIT_SECONDS)


def test_a_settled_container_dumps_at_once_and_waits_only_after_a_failure() -> None:
    assert readiness_plan(SETTLED_AFTER_SECONDS) == ReadinessPlan(False, READY_TIMEOUT_SECONDS)
    # After a failed dump, as long as after a start: crash recovery of a big cluster takes a while.
    assert readiness_plan(30 * 86400.0) == ReadinessPlan(False, 120.0)


def test_a_start_time_in_the_future_counts_as_just_started() -> None:
    """Clock skew between the engine and the watcher must not skip the wait of a starting container."""
    assert readiness_plan(-5.0) == ReadinessPlan(True, 120.0)
