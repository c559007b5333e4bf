"""restic_error_text (watcher.jobs): restic's stderr, JSON or plain, as readable lines."""

from __future__ import annotations

import json

from watcher.jobs import restic_error_text


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
