"""A watcher whose start fails pages once per cause, not at every start of a restart policy (watcher.startup_page)."""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import cast

import pytest

import watcher.daemon
import watcher.logs
from alerting.notify import Notifier
from alerting.policy import Alert
from watcher import cli
from watcher.docker_source import DockerSource
from watcher.restic import Repository
from watcher.startup_page import (
    MARKER_PREFIX,
    REPAGE_AFTER_S,
    RETRY_UNDELIVERED_S,
    StartupPages,
    digest,
    marker_path,
    page_due,
)

DAY = REPAGE_AFTER_S


def test_the_same_cause_pages_again_only_after_a_day_another_cause_at_once() -> None:
    cause = digest("cannot reach the Docker engine")
    marker = f"{cause} 1000 delivered\n"
    assert page_due(None, cause, 1000.0)
    assert not page_due(marker, cause, 1000.0 + 60)
    assert not page_due(marker, cause, 1000.0 + DAY - 1)
    assert page_due(marker, cause, 1000.0 + DAY)
    assert page_due(marker, digest("wrong password"), 1000.0 + 60)
    assert page_due("garbled", cause, 1000.0)
    assert page_due(marker, cause, 999.0)  # the clock went back: the marker says nothing trustworthy
    # A page some target did not take is sent again an hour later, not at every restart before.
    undelivered = f"{cause} 1000 undelivered\n"
    assert not page_due(undelivered, cause, 1000.0 + 60)
    assert not page_due(undelivered, cause, 1000.0 + RETRY_UNDELIVERED_S - 1)
    assert page_due(undelivered, cause, 1000.0 + RETRY_UNDELIVERED_S)
    # A marker of an older version, written only once the page was delivered: a day, as before.
    assert not page_due(f"{cause} 1000\n", cause, 1000.0 + RETRY_UNDELIVERED_S)
    assert page_due(f"{cause} 1000\n", cause, 1000.0 + DAY)


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_start_leaves_a_marker_that_a_good_start_removes(tmp_path: Path) -> None:
    clock = Clock()
    pages = StartupPages(tmp_path / "marker", clock)
    wrong = "backup-watcher did not start:\n- wrong password"
    assert pages.due(wrong)
    pages.paged(wrong, delivered=False)  # a target did not take it: tried again an hour later
    clock.now += 70
    assert not pages.due(wrong)
    clock.now += RETRY_UNDELIVERED_S
    assert pages.due(wrong)
    pages.paged(wrong, delivered=True)
    assert stat.S_IMODE((tmp_path / "marker").stat().st_mode) == 0o600
    assert "wrong password" not in (tmp_path / "marker").read_text()  # a digest and a time, nothing of the text
    clock.now += 70  # Docker's restart, a minute later
    assert not pages.due(wrong)
    assert pages.due("backup-watcher did not start:\n- no Docker")
    pages.started()
    assert not (tmp_path / "marker").exists()
    assert pages.due(wrong)
    pages.started()  # no marker: nothing to do, no error


def test_a_link_in_the_markers_place_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "marker").symlink_to(victim)
    pages = StartupPages(tmp_path / "marker", Clock())
    assert pages.due("backup-watcher did not start")  # a marker it cannot read pages
    pages.paged("backup-watcher did not start", delivered=True)
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "marker").is_symlink()


def test_a_marker_that_cannot_be_written_pages_every_time(tmp_path: Path) -> None:
    pages = StartupPages(tmp_path / "missing-directory" / "marker", Clock())
    assert pages.due("backup-watcher did not start")
    pages.paged("backup-watcher did not start", delivered=True)  # raises nothing
    assert pages.due("backup-watcher did not start")


def test_each_watcher_has_its_own_marker_named_without_its_settings(tmp_path: Path) -> None:
    one = marker_path({"RESTIC_REPOSITORY": "rest:https://u:secret@h/one"}, str(tmp_path))
    two = marker_path({"RESTIC_REPOSITORY": "rest:https://u:secret@h/two"}, str(tmp_path))
    assert one != two and one.parent == tmp_path
    assert "secret" not in one.name
    assert one == marker_path({"RESTIC_REPOSITORY": "rest:https://u:secret@h/one", "OTHER": "x"}, str(tmp_path))


def test_a_good_start_clears_the_marker_of_a_configuration_error_whose_settings_came_as_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main() names the marker of a configuration error from the environment with the flags over it; the start
    that succeeds must clear that same marker, or the same error a few hours later is not paged again."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in list(os.environ):
        if name.startswith(("RESTIC_", "WATCHER_", "DOCKER_", "AWS_")):
            monkeypatch.delenv(name)
    for name, value in {"RESTIC_REPOSITORY": "/nonexistent", "RESTIC_PASSWORD": "x", "WATCHER_HOST": "h",
                        "DOCKER_HOST": "unix:///nonexistent.sock", "WATCHER_APPRISE_URLS": "json://127.0.0.1:9/"}.items():
        monkeypatch.setenv(name, value)
    delivered: list[Alert] = []

    def deliver_now(self: Notifier, alert: Alert) -> bool:
        delivered.append(alert)
        return True

    class Started(Exception):
        """The daemon would run now."""

    def daemon(**_kwargs: object) -> None:
        raise Started

    monkeypatch.setattr(Notifier, "deliver_now", deliver_now)
    monkeypatch.setattr(watcher.logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.setattr(DockerSource, "check", lambda self: None)
    monkeypatch.setattr(cli, "check_repository", lambda ctx, init: None)
    monkeypatch.setattr(Repository, "version", lambda self: (0, 18, 0))
    monkeypatch.setattr(watcher.daemon, "Daemon", daemon)
    flags = ["--metrics-address", "127.0.0.1:19810"]  # never bound: the daemon "runs" before

    assert cli.main([*flags, "--schedule", "every night", "run"]) == 2
    assert len(delivered) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(MARKER_PREFIX)]
    with pytest.raises(Started):
        cli.main([*flags, "run"])  # a good start
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(MARKER_PREFIX)]
    assert cli.main([*flags, "--schedule", "every night", "run"]) == 2
    assert len(delivered) == 2, "the same error after a good start pages again"


def test_what_is_no_marker_of_this_users_pages_and_holds_no_start(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # In a shared temporary directory (a watcher outside a container) another user may put anything in the
    # marker's place: a FIFO (whose open would wait for a writer for ever), or a marker of the cause to hide.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    answers: list[bool] = []
    asking = threading.Thread(target=lambda: answers.append(StartupPages(fifo, Clock()).due("x")), daemon=True)
    asking.start()
    asking.join(5)
    assert answers == [True]
    planted = StartupPages(tmp_path / "marker", Clock())
    planted.paged("backup-watcher did not start", delivered=True)
    assert not planted.due("backup-watcher did not start")
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path / "marker").st_uid + 1)
    assert planted.due("backup-watcher did not start"), "another user's marker pages"


def test_without_a_usable_temporary_directory_the_failure_still_pages_and_a_good_start_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk or a read-only file system: tempfile.gettempdir() finds no directory it can write a probe to.
    def no_directory() -> str:
        raise FileNotFoundError(2, "No usable temporary directory found")

    monkeypatch.setattr(tempfile, "gettempdir", no_directory)
    delivered: list[Alert] = []

    class Delivering:
        def deliver_now(self, alert: Alert) -> bool:
            delivered.append(alert)
            return True

    environ = {"TMPDIR": str(tmp_path / "missing")}
    cli._page_startup_failure(cast(Notifier, Delivering()), cli.startup_alert(["disk full"]), environ)
    assert len(delivered) == 1
    cli.startup_pages(environ).started()  # raises nothing: the daemon goes on
