"""A watcher whose start fails pages once per cause, not at every start of a restart policy (watcher.startup_page)."""

from __future__ import annotations

import stat
from pathlib import Path

from watcher.startup_page import REPAGE_AFTER_S, StartupPages, digest, marker_path, page_due

DAY = REPAGE_AFTER_S


def test_the_same_cause_pages_again_only_after_a_day_another_cause_at_once() -> None:
    cause = digest("cannot reach the Docker engine")
    marker = f"{cause} 1000\n"
    assert page_due(None, cause, 1000.0)
    assert not page_due(marker, cause, 1000.0 + 60)
    assert not page_due(marker, cause, 1000.0 + DAY - 1)
    assert page_due(marker, cause, 1000.0 + DAY)
    assert page_due(marker, digest("wrong password"), 1000.0 + 60)
    assert page_due("garbled", cause, 1000.0)
    assert page_due(marker, cause, 999.0)  # the clock went back: the marker says nothing trustworthy


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
    clock.now += 70  # the page could not be delivered: the next start tries again
    assert pages.due(wrong)
    pages.paged(wrong)
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
    pages.paged("backup-watcher did not start")
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "marker").is_symlink()


def test_a_marker_that_cannot_be_written_pages_every_time(tmp_path: Path) -> None:
    pages = StartupPages(tmp_path / "missing-directory" / "marker", Clock())
    assert pages.due("backup-watcher did not start")
    pages.paged("backup-watcher did not start")  # raises nothing
    assert pages.due("backup-watcher did not start")


def test_each_watcher_has_its_own_marker_named_without_its_settings(tmp_path: Path) -> None:
    one = marker_path({"RESTIC_REPOSITORY": "rest:https://u:secret@h/one"}, str(tmp_path))
    two = marker_path({"RESTIC_REPOSITORY": "rest:https://u:secret@h/two"}, str(tmp_path))
    assert one != two and one.parent == tmp_path
    assert "secret" not in one.name
    assert one == marker_path({"RESTIC_REPOSITORY": "rest:https://u:secret@h/one", "OTHER": "x"}, str(tmp_path))
