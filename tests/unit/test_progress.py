"""Progress of running jobs: the board, what is said about a job, and where it is read (metrics, status)."""

from __future__ import annotations

import io
import os
import threading
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from tests.unit.daemon_kit import make_entry
from watcher.execute import run_pipeline
from watcher.metrics import Metrics
from watcher.progress import (
    CopyOutput,
    JobProgress,
    ProgressBoard,
    first_writer,
    human_bytes,
    progress_text,
    restic_status_bytes,
    written_bytes,
)
from watcher.progress_lines import TerminalLines
from watcher.registry import Registry
from watcher.status import render_table, status_rows


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_job_is_on_the_board_while_it_runs_with_its_bytes_rate_and_time_left() -> None:
    ticks = Ticks()
    board = ProgressBoard(clock=ticks)
    with board.track("restore", "app-db", "appdb", total=1000) as tracker:
        ticks.now += 10
        tracker.set_bytes(250)
        tracker.set_bytes(200)  # never goes back
        (job,) = board.running()
        assert (job.kind, job.target, job.database, job.bytes_done) == ("restore", "app-db", "appdb", 250)
        assert job.rate(ticks.now) == 25.0 and job.fraction() == 0.25 and job.left_s(ticks.now) == 30.0
        fields = job.fields(ticks.now)
        assert {"bytes_done": 250, "bytes_total": 1000, "bytes_per_s": 25, "percent": 25.0, "left_s": 30,
                "elapsed_s": 10.0}.items() <= fields.items()
        assert progress_text(fields) == "restore app-db/appdb 250 B at 25 B/s, 10s (25 %, ~30s left)"
    assert board.running() == []


def test_a_backup_is_estimated_from_its_last_snapshot_and_never_claims_done_before_the_end() -> None:
    ticks = Ticks()
    board = ProgressBoard(clock=ticks)
    board.expect("app-db", "appdb", 1000)
    board.expect("app-db", "other", None)
    with board.track("backup", "app-db", "appdb") as tracker, board.track("backup", "app-db", "other"):
        tracker.set_bytes(1500)  # grew since: 99 %, not 150 %
        first, second = board.running()
        assert first.total == 1000 and first.fraction() == 0.99 and second.total is None
        assert second.fraction() is None and second.left_s(ticks.now) is None and second.rate(ticks.now) is None
        assert progress_text(second.fields(ticks.now)) == "backup app-db/other 0 B, 0s"


def test_restic_status_lines_give_bytes_done_and_nothing_else_does() -> None:
    assert restic_status_bytes('{"message_type":"status","percent_done":0,"bytes_done":1048576}') == 1048576
    assert restic_status_bytes('{"message_type":"summary","bytes_done":5}') is None
    assert restic_status_bytes('{"message_type":"status"') is None
    assert restic_status_bytes("Fatal: status") is None


# What restic 0.18's `restic copy` printed off a terminal with RESTIC_PROGRESS_FPS set, for two snapshots.
COPY_OUTPUT = """
snapshot 812a7618 of [/d1] at 2026-11-26 19:40:02.796637065 +0000 UTC by root@vm
  copy started, this may take a while...
[0:00] 60.00%  3 / 5 packs copied
[0:01] 100.00%  5 / 5 packs copied

snapshot 37bd9d0f saved

snapshot 03959302 of [/d2] at 2026-11-26 19:40:04.071329534 +0000 UTC by root@vm
  copy started, this may take a while...
[0:00] 25.00%  1 / 4 packs copied
"""


def test_a_copy_counts_the_snapshots_restic_saved_and_the_current_ones_packs() -> None:
    board = ProgressBoard()
    with board.track("copy", "offsite", "2 snapshot(s)", total=3000) as tracker:
        output = CopyOutput({"812a7618" + "0" * 56: 1000, "03959302" + "1" * 56: 2000}, tracker)
        seen = []
        for line in COPY_OUTPUT.splitlines():
            output.line(line)
            seen.append(board.running()[0].bytes_done)
        assert seen[3] == 600  # 60 % of the first snapshot's packs
        assert seen[6] == 1000  # the first saved
        assert seen[-1] == 1500 and board.running()[0].fraction() == 0.5  # and a quarter of the second


def test_bytes_written_by_a_pipeline_member_are_read_from_the_kernel() -> None:
    assert (written_bytes(os.getpid()) or 0) >= 0
    assert written_bytes(2**22 + 12345) is None  # no such process
    board = ProgressBoard()
    seen: list[int] = []
    with board.track("restore", "t", "d") as tracker:
        tick = first_writer(tracker)

        def sampled(pids: object) -> None:
            tick(pids)  # type: ignore[arg-type]
            seen.append(board.running()[0].bytes_done)

        done = run_pipeline([("sh", "-c", "head -c 3000000 /dev/zero; sleep 1.5"), ("cat",)], env={},
                            masker=lambda text: text, timeout=20, capture_stdout=False,  # type: ignore[arg-type]
                            on_tick=sampled)
    assert done.ok and seen and max(seen) >= 3_000_000


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 1024**3)] == ["0 B", "1023 B", "1.0 KiB", "5.0 GiB"]


def test_metrics_show_a_running_job_and_drop_it_when_it_ends() -> None:
    board = ProgressBoard()
    metrics = Metrics(CollectorRegistry(), Registry(), version="t", progress=board)
    labels = {"target": "app-db", "database": "appdb", "kind": "backup"}
    with board.track("backup", "app-db", "appdb") as tracker:
        tracker.set_bytes(4096)
        assert metrics.registry.get_sample_value("backup_watcher_job_running", labels) == 1
        assert metrics.registry.get_sample_value("backup_watcher_job_bytes_done", labels) == 4096
        started = metrics.registry.get_sample_value("backup_watcher_job_started_timestamp_seconds", labels)
        assert started is not None and abs(started - datetime.now(UTC).timestamp()) < 60
    for name in ("job_running", "job_bytes_done", "job_started_timestamp_seconds"):
        assert metrics.registry.get_sample_value(f"backup_watcher_{name}", labels) is None


def test_status_lists_a_targets_running_jobs_in_json_and_under_the_table() -> None:
    registry = Registry()
    registry.register(make_entry("app-db", databases=("appdb",)))
    board = ProgressBoard()
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    with board.track("backup", "app-db", "appdb") as tracker, board.track("drill", "other-db", "x"):
        tracker.set_bytes(2048)
        rows = status_rows(registry.view(), now, board.running())
    (row,) = rows
    assert [(job["kind"], job["database"], job["bytes_done"]) for job in row["running"]] == [  # type: ignore[attr-defined]
        ("backup", "appdb", 2048)]
    assert "\n\nrunning: backup app-db/appdb 2.0 KiB" in render_table(rows)
    assert "running:" not in render_table(status_rows(registry.view(), now, board.running()))


def test_terminal_lines_follow_the_board_and_are_gone_when_their_jobs_end() -> None:
    board = ProgressBoard()
    screen = io.StringIO()
    lines = TerminalLines(board, screen)
    with board.track("restore", "app-db", "appdb", total=10 * 1024**2) as tracker:
        tracker.set_bytes(5 * 1024**2)
        lines.draw()
        assert "restore app-db/appdb" in screen.getvalue() and "50%" in screen.getvalue()
        assert "5.00M/10.0M" in screen.getvalue()
    lines.draw()
    assert lines.bars == {}
    with board.track("backup", "app-db", "appdb") as tracker:  # no size known
        tracker.set_bytes(3 * 1024**2)
        lines.draw()
        tracker.set_bytes(4 * 1024**2)
        lines.draw()
        assert "backup app-db/appdb: 4.00MB [" in screen.getvalue()
    stop = threading.Event()
    stop.set()
    lines.run(stop)  # returns at once, nothing left drawn


def test_a_job_as_read_is_a_value() -> None:
    job = JobProgress(1, "backup", "t", "d", datetime(2026, 1, 1, tzinfo=UTC), 0.0, bytes_done=5)
    assert job.elapsed_s(-1.0) == 0.0 and job.rate(0.5) is None
