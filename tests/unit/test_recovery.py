"""Whole-host recovery's choice of snapshots, and what `restore --all` says to a wrong command line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from watcher.cli import build_parser, main
from watcher.commands import GLOBALS_DATABASE
from watcher.engines.restoring import by_hand, database_fate
from watcher.recovery import latest_by_container
from watcher.restic import Snapshot

T0 = datetime(2026, 11, 1, 3, tzinfo=UTC)


def snap(container: str, database: str, hours: int, host: str = "old") -> Snapshot:
    is_globals = database == GLOBALS_DATABASE
    return Snapshot(f"{container}{database}{hours}{host}", f"{hours:08d}", T0 + timedelta(hours=hours), host,
                    container, database, 1, globals=is_globals)


def test_every_database_of_the_old_host_by_its_latest_snapshot_from_that_host() -> None:
    history = [snap("a", "app", 0), snap("a", "app", 24), snap("a", "app", 48, host="new"),
               snap("a", "billing", 0), snap("a", GLOBALS_DATABASE, 24), snap("b", "auth", 10),
               snap("c", "other", 30, host="new")]
    grouped = latest_by_container(history, "old")
    assert sorted(grouped) == ["a", "b"]
    assert [(s.database, s.time) for s in grouped["a"]] == [("app", T0 + timedelta(hours=24)), ("billing", T0)]
    assert [s.database for s in grouped["b"]] == ["auth"]


def test_restore_all_parses_without_a_target() -> None:
    args = build_parser().parse_args(["restore", "--all", "--host", "old-vm", "--yes"])
    assert (args.all, args.host, args.target, args.yes) == (True, "old-vm", None, True)


@pytest.mark.parametrize(("argv", "said"), [
    (["restore", "--all"], "name the old host with --host OLD"),
    (["restore", "--all", "--host", "old", "scalr-app-db"], "takes no TARGET"),
    (["restore", "--all", "--host", "old", "--database", "app"], "takes no TARGET"),
    (["restore"], "name the TARGET to restore, or use --all --host OLD"),
])
def test_a_wrong_restore_command_line_is_a_usage_error_that_says_what_to_do(
        argv: list[str], said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RESTIC_REPOSITORY", str(tmp_path / "repo"))
    monkeypatch.setenv("RESTIC_PASSWORD", "pw")
    # No engine is asked: the command line is judged first (an address nobody listens on).
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nobody.sock")
    assert main(argv) == 2
    assert said in capsys.readouterr().err


def test_what_a_restore_says_it_does_to_each_database_and_how_to_restore_a_command_target_by_hand() -> None:
    assert database_fate("shop", True) == "The database 'shop' there will be DROPPED and replaced."
    assert database_fate("shop", False) == "The database 'shop' does not exist there yet: it will be created."
    redis = Snapshot("abcdef1234", "abcdef12", T0, "old", "cache", "stdout", 1, engine="command")
    assert by_hand("cache", redis) == ("restic dump abcdef12 /stdout.dump | docker exec -i cache <the command that "
                                      "reads the backup on stdin>")
