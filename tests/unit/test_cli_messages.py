"""What the command line says to an operator who got something wrong."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from watcher import logs
from watcher.cli import UsageError, build_parser, confirmed_by_typing, main, no_snapshots_message, settings_given
from watcher.restic import Snapshot


def _snap(container: str, host: str) -> Snapshot:
    return Snapshot(id="a" * 64, short_id="aaaaaaaa", time=datetime(2026, 1, 1, tzinfo=UTC), host=host,
                    container=container, database="appdb", bytes=1)


def test_an_unknown_target_gets_close_names_and_the_snapshots_command() -> None:
    message = no_snapshots_message("scalr-naer-db", "vm", [], {"scalr-near-db", "scalr-auth-postgres"})
    assert "no snapshots of a target of that name" in message
    assert "Did you mean scalr-near-db?" in message
    assert "`backup-watcher snapshots`" in message


def test_an_unknown_target_with_nothing_close_still_points_to_snapshots() -> None:
    message = no_snapshots_message("zzz", "vm", [], {"scalr-near-db"})
    assert "Did you mean" not in message
    assert "`backup-watcher snapshots`" in message


def test_a_target_of_another_host_points_to_host() -> None:
    message = no_snapshots_message("scalr-app-db", "new-vm", [_snap("scalr-app-db", "old-vm")], {"scalr-app-db"})
    assert "snapshots of it exist from host(s) old-vm: use --host" in message


@pytest.mark.parametrize("argv", [["--log-level", "debug", "status"], ["status", "--log-level", "debug"],
                                  ["--log-level", "info", "status", "--log-level", "debug"]])
def test_settings_flags_work_before_and_after_the_command_the_later_winning(argv: list[str]) -> None:
    assert settings_given(build_parser().parse_args(argv))["WATCHER_LOG_LEVEL"] == "debug"


def test_a_setting_given_before_the_command_is_not_undone_after_it() -> None:
    assert settings_given(build_parser().parse_args(["--schedule", "0 4 * * *", "backup"]))[
        "WATCHER_SCHEDULE"] == "0 4 * * *"


def test_restore_keeps_its_own_host_option_beside_the_watcher_host_setting() -> None:
    args = build_parser().parse_args(["--host", "this-vm", "restore", "scalr-app-db", "--host", "old-vm"])
    assert args.host == "old-vm"
    assert settings_given(args)["WATCHER_HOST"] == "this-vm"


def test_no_abbreviations_after_the_command_either(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["restore", "x", "--restic-password", "secret"])
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """stdin on a real pty; the fixture's function types a line at it."""
    master, slave = os.openpty()
    with os.fdopen(slave, "r", closefd=True) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)

        def type_line(line: str) -> None:
            os.write(master, line.encode() + b"\n")

        yield type_line
    os.close(master)


def test_a_restore_is_confirmed_only_by_the_expected_word_typed(terminal: Callable[[str], None],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    terminal("  appdb ")
    assert confirmed_by_typing("appdb", "Type the database name (appdb) to confirm: ")
    assert "Type the database name (appdb) to confirm: " in capsys.readouterr().out
    terminal("appdb2")
    assert not confirmed_by_typing("appdb", "Type: ")
    terminal("")
    assert not confirmed_by_typing("appdb", "Type: ")


def test_a_restore_without_a_terminal_to_ask_on_is_refused_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("appdb\n"))
    way_out = r"no terminal to ask on \(under `docker run` or `docker exec`, add -it\); pass --yes"
    with pytest.raises(UsageError, match=way_out):
        confirmed_by_typing("appdb", "Type: ")


def test_a_failed_start_logs_its_page_as_json_like_the_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # The page of a daemon that did not start logs notification_sent/_failed on stdout; before the configuration
    # is read no format was set, and structlog printed that one line in its console style amid the JSON log.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the marker's place (watcher.startup_page)
    for name, value in {"RESTIC_REPOSITORY": str(tmp_path / "repo"), "RESTIC_PASSWORD": "pw",
                        "WATCHER_KEEP_DAILY": "abc",
                        # Nothing listens on port 9 here: the delivery fails at once, and is logged.
                        "WATCHER_APPRISE_URLS": "json://user:Apprise-Secret-123@127.0.0.1:9/hook"}.items():
        monkeypatch.setenv(name, value)
    try:
        assert main(["run"]) == 2
    finally:
        logs.configure("json", "info", stream=io.StringIO())
    captured = capsys.readouterr()
    assert "WATCHER_KEEP_DAILY" in captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert "notification_failed" in [line["event"] for line in lines]
    assert "Apprise-Secret-123" not in captured.out + captured.err
