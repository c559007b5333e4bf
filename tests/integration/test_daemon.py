"""`backup-watcher run` on the real engine: discovery by events, schedules, passes, catch-up, shutdown."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.conftest import (
    BIG_TABLE,
    PG_IMAGES,
    TEST_LABEL,
    DaemonProcess,
    PgContainer,
    Repo,
    StartDaemon,
    StartPg,
    docker,
    process_command_lines,
    wait_for,
    wait_for_copy,
    wait_ready,
)

pytestmark = [pytest.mark.engine, pytest.mark.slow]

def _ts(line: dict[str, object]) -> datetime:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))


def _snapshot_count(repo: Repo, container: str) -> int:
    return len(repo.snapshots_of(container))


def _wait_past_next_minute(extra: float = 0.0) -> datetime:
    """Sleeps until just past the next minute boundary (plus `extra` seconds); returns that boundary."""
    now = datetime.now(UTC)
    boundary = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    time.sleep((boundary - now).total_seconds() + extra)
    return boundary


def test_lifecycle_register_schedule_stop_rename_destroy(start_daemon: StartDaemon, repo: Repo,
                                                         watcher_env: dict[str, str]) -> None:
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "bwt-life-*", "WATCHER_SCHEDULE": "* * * * *"}
    daemon: DaemonProcess = start_daemon(env)
    name, renamed = "bwt-life-db", "bwt-life-renamed"
    try:
        # Registered within a second of starting, by the event stream.
        docker("run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL,
               "-e", "POSTGRES_PASSWORD=test-only", PG_IMAGES["15"])
        started = time.monotonic()
        wait_for(lambda: daemon.row(name), 1.0, f"{name} to be registered")
        latency = time.monotonic() - started
        assert latency < 1.0

        # A new target with no snapshot is backed up at once, then at every slot.
        wait_ready(name)
        wait_for(lambda: _snapshot_count(repo, name) >= 1, 150, "the first backup")
        first = _snapshot_count(repo, name)
        _wait_past_next_minute()
        wait_for(lambda: _snapshot_count(repo, name) > first, 60, "the backup of the next slot")

        # Stopped: no longer backed up.
        docker("stop", "-t", "2", name)
        wait_for(lambda: (daemon.row(name) or {}).get("state") == "stopped", 5, "the stopped state")
        stopped_count = _snapshot_count(repo, name)
        _wait_past_next_minute(extra=8)
        assert _snapshot_count(repo, name) == stopped_count
        assert daemon.row(name)["next_run"] is None  # type: ignore[index]

        # Renamed: the history moves with the container.
        docker("start", name)
        wait_for(lambda: (daemon.row(name) or {}).get("state") not in (None, "stopped"), 5, "the restart")
        wait_for(lambda: _snapshot_count(repo, name) > stopped_count, 150, "the catch-up backup after the restart")

        def databases_of(container: str) -> set[str]:
            return {str(tag) for snap in repo.snapshots_of(container) for tag in snap["tags"]
                    if str(tag).startswith("database=")}

        # Renamed while the backup of a slot waits for a lock, so that the retag of the old name must
        # wait; meanwhile a new container takes the old name (a swap), with a database of another name
        # to tell its snapshots apart. It must not be backed up before the retag, which would move its
        # snapshots into the renamed container's history.
        holder = subprocess.Popen(["docker", "exec", "-i", name, "psql", "-X", "-q", "-U", "postgres"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert holder.stdin is not None
            holder.stdin.write(b"CREATE TABLE lockme (x int);\nBEGIN;\nLOCK TABLE lockme IN ACCESS EXCLUSIVE MODE;\n")
            holder.stdin.flush()
            _wait_past_next_minute()
            waiting = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backup-watcher' "
                       "AND wait_event_type = 'Lock'")
            wait_for(lambda: docker("exec", name, "psql", "-X", "-At", "-U", "postgres", "-c", waiting,
                                    check=False).stdout.strip() == "1", 60, "the slot's dump to wait for the lock")
            docker("rename", name, renamed)
            wait_for(lambda: daemon.row(renamed) and daemon.row(name) is None, 5, "the rename")
            docker("run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL,
                   "-e", "POSTGRES_PASSWORD=test-only", "-e", "POSTGRES_DB=newcomer", PG_IMAGES["15"])
            wait_for(lambda: daemon.row(name), 5, "the newcomer's registration")
            wait_ready(name)
            time.sleep(5)  # time enough for a backup of the newcomer, were it not held back
            # (The old name's snapshots are still the renamed container's: the retag has not run.)
            assert databases_of(name) == {"database=postgres"}, "no backup of the newcomer before the retag"
        finally:
            if holder.stdin is not None:
                holder.stdin.close()
            holder.wait(timeout=30)
        wait_for(lambda: daemon.events("history_renamed", target=renamed), 120, "the history to follow the new name")
        wait_for(lambda: "database=newcomer" in databases_of(name), 150, "the newcomer's first backup")

        assert databases_of(name) == {"database=newcomer"}
        # (How many: retention keeps one a day of each history, so counts here would only test it.)
        assert databases_of(renamed) == {"database=postgres"}
        docker("rm", "-f", name)

        # Destroyed: gone, and its series with it.
        wait_for(lambda: f'target="{renamed}"' in daemon.metrics(), 60, "series of the renamed target")
        docker("rm", "-f", renamed)
        wait_for(lambda: daemon.row(renamed) is None, 5, "the destroyed target to go")
        wait_for(lambda: f'target="{renamed}"' not in daemon.metrics(), 5, "its series to go")
        assert _snapshot_count(repo, renamed) >= 1, "destroying a container keeps its snapshots"
    finally:
        docker("rm", "-f", name, renamed, check=False)
    assert daemon.stop() == 0
    assert daemon.events("target_registered", target=name)


@pytest.mark.alone  # restarts the shared engine
def test_engine_restart_reconnects_and_registers_new_containers(start_daemon: StartDaemon, repo: Repo,
                                                                watcher_env: dict[str, str]) -> None:
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "bwt-restart-*"}
    daemon: DaemonProcess = start_daemon(env)
    pidfile = Path(os.environ["BW_TEST_DOCKERD_PIDFILE"])
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, "dockerd to exit")
    wait_for(lambda: "backup_watcher_docker_events_connected 0.0" in daemon.metrics(), 10,
             "the daemon to notice the lost stream")
    assert daemon.get("/healthz")[0] == 200, "reconnecting is healthy"

    root = Path(__file__).resolve().parents[2]
    subprocess.run(["bash", str(root / "testground" / "up.sh")], check=True, capture_output=True,
                   env={**os.environ, "BW_TESTGROUND_PARTS": "engine"})
    name = "bwt-restart-db"
    try:
        docker("run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL,
               "-e", "POSTGRES_PASSWORD=test-only", PG_IMAGES["17"])
        wait_for(lambda: daemon.row(name), 45, "registration after the engine restart")
        wait_for(lambda: _snapshot_count(repo, name) == 1, 150, "its backup")
    finally:
        docker("rm", "-f", name, check=False)
    assert daemon.stop() == 0
    assert len(daemon.events("event_stream_connected")) >= 2
    assert daemon.events("event_stream_ended") or daemon.events("event_stream_error")


def test_passes_one_snapshot_per_slot_concurrency_and_prune_between(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    names = [f"bwt-pass-{i}-db" for i in range(1, 5)]
    for index, name in enumerate(names):
        db: PgContainer = start_pg(name, "15" if index % 2 else "17")
        db.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100000) AS g;")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "bwt-pass-*", "WATCHER_SCHEDULE": "* * * * *",
           "WATCHER_CONCURRENCY": "2", "WATCHER_KEEP_DAILY": "1", "WATCHER_KEEP_WEEKLY": "0",
           "WATCHER_KEEP_MONTHLY": "0"}
    daemon: DaemonProcess = start_daemon(env)
    slots = [_wait_past_next_minute() for _ in range(3)]
    # Let the last pass and its prune finish.
    wait_for(lambda: [p for p in daemon.events("prune_succeeded") if _ts(p) > slots[-1]], 90, "the last prune")
    assert daemon.stop() == 0

    started = {(line["run_id"], line["database"]): _ts(line) for line in daemon.events("backup_started")}
    intervals = []
    for line in daemon.events("backup_succeeded"):
        intervals.append((line["target"], started[(line["run_id"], line["database"])], _ts(line)))
    assert not daemon.events("backup_failed")

    # Exactly one snapshot per target in every slot.
    for slot in slots:
        for name in names:
            in_slot = [s for t, s, _ in intervals if t == name and slot <= s < slot + timedelta(minutes=1)]
            assert len(in_slot) == 1, (name, slot, in_slot)
    # Never two at once for one target; never more than the concurrency overall.
    for name in names:
        own = sorted((s, e) for t, s, e in intervals if t == name)
        assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(own))
    for _, start, _ in intervals:
        running = [1 for _, s, e in intervals if s <= start < e]
        assert len(running) <= 2
    # Prune after each pass, never during a backup.
    prunes = [(_ts(a), _ts(b)) for a, b in zip(daemon.events("prune_started"), daemon.events("prune_succeeded"),
                                               strict=False)]
    assert len(prunes) >= 3
    for prune_start, prune_end in prunes:
        assert not [1 for _, s, e in intervals if s < prune_end and prune_start < e], "prune overlapped a backup"
    for slot in slots:
        last_backup_of_pass = max(e for _, s, e in intervals if slot <= s < slot + timedelta(minutes=1))
        assert any(last_backup_of_pass <= p_start < slot + timedelta(minutes=1) for p_start, _ in prunes)
    # Retention keeps what the keeps say: one snapshot per day and history.
    for name in names:
        days = {str(s["time"])[:10] for s in repo.snapshots_of(name)}
        assert _snapshot_count(repo, name) == len(days) == 1


def test_catch_up_after_downtime_runs_the_missed_backup(start_pg: StartPg, start_daemon: StartDaemon, repo: Repo,
                                                        watcher_env: dict[str, str]) -> None:
    if datetime.now(UTC).second > 35:
        _wait_past_next_minute()
    # Hourly at the next minute: without catch-up, a missed slot would wait an hour.
    slot_minute = (datetime.now(UTC).minute + 1) % 60
    db: PgContainer = start_pg("bwt-catchup-db", "15")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_SCHEDULE": f"{slot_minute} * * * *"}
    daemon: DaemonProcess = start_daemon(env)
    wait_for(lambda: _snapshot_count(repo, db.name) == 1, 60, "the first backup")
    assert daemon.stop() == 0

    _wait_past_next_minute(extra=2)  # the slot passes while the daemon is down
    restarted: DaemonProcess = start_daemon(env)
    started = time.monotonic()
    wait_for(lambda: _snapshot_count(repo, db.name) == 2, 60, "the missed backup")
    assert time.monotonic() - started < 60
    registered = restarted.events("target_registered", target=db.name)
    assert registered and registered[0]["catch_up"] is True
    assert restarted.stop() == 0


def _no_leftover_helpers(container_id: str) -> bool:
    return not [line for line in process_command_lines() if "watcher.dockerexec" in line and container_id in line]


def test_sigterm_during_a_large_dump_exits_0_without_partial_snapshot(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("bwt-sigterm-db", "17")
    db.psql(BIG_TABLE)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_SHUTDOWN_GRACE": "0"}
    daemon: DaemonProcess = start_daemon(env)
    wait_for_copy(db)
    assert daemon.stop(signal.SIGTERM, timeout=30) == 0
    assert repo.snapshots_of(db.name) == []
    assert "no errors were found" in repo.restic("check").stdout
    assert _no_leftover_helpers(db.id)
    failed = daemon.events("backup_failed", target=db.name)
    assert failed and "aborted by shutdown" in str(failed[0]["error"])


def test_ctrl_c_of_a_one_shot_backup_ends_its_processes_without_a_snapshot(start_pg: StartPg, repo: Repo,
                                                                          watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("bwt-ctrlc-db", "15")
    db.psql(BIG_TABLE)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    backup = subprocess.Popen([sys.executable, "-m", "watcher", "backup"], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_copy(db)
        backup.send_signal(signal.SIGINT)
        _, stderr = backup.communicate(timeout=30)
    finally:
        if backup.poll() is None:
            backup.kill()
    assert backup.returncode == 1, stderr
    assert "interrupted" in stderr
    # restic and the exec helper (restic's argv names the container too) ended with the command, so
    # no snapshot can appear afterwards; the repository is sound.
    assert _no_leftover_helpers(db.id), [line for line in process_command_lines() if db.id in line]
    time.sleep(1)
    assert repo.snapshots_of(db.name) == []
    assert "no errors were found" in repo.restic("check").stdout


def test_second_signal_aborts_at_once_and_grace_lets_a_backup_finish(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("bwt-grace-db", "15")
    db.psql(BIG_TABLE)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_SHUTDOWN_GRACE": "120"}

    # One signal, long grace: the running backup finishes and is kept.
    daemon: DaemonProcess = start_daemon(env)
    wait_for_copy(db)
    assert daemon.stop(signal.SIGTERM, timeout=120) == 0
    assert len(repo.snapshots_of(db.name)) == 1

    # Two signals: abort now, still no partial snapshot.
    db.psql("INSERT INTO a_big SELECT g, 'x' FROM generate_series(300001, 300010) AS g;")
    env["WATCHER_SCHEDULE"] = "* * * * *"
    second: DaemonProcess = start_daemon(env)
    wait_for(lambda: second.events("backup_started", target=db.name), 75, "the next backup to start")
    wait_for_copy(db)
    second.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    aborted_at = time.monotonic()
    assert second.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - aborted_at < 15
    assert len(repo.snapshots_of(db.name)) == 1
    assert "no errors were found" in repo.restic("check").stdout


def test_stale_lock_of_a_killed_restic_is_cleared_and_the_next_run_succeeds(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    repo.restic("init")
    env = {**os.environ, "RESTIC_REPOSITORY": str(repo.path), "RESTIC_PASSWORD": repo.password}
    # A backup that waits for input holds a lock; SIGKILL leaves that lock behind.
    holder = subprocess.Popen(["restic", "backup", "--stdin", "--stdin-filename", "x"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: repo.restic("list", "locks", "--no-lock").stdout.strip(), 30, "restic to take its lock")
    holder.kill()
    holder.wait()
    assert repo.restic("list", "locks", "--no-lock").stdout.strip(), "the stale lock is there"

    db: PgContainer = start_pg("bwt-lock-db", "17")
    daemon: DaemonProcess = start_daemon({**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name})
    wait_for(lambda: daemon.events("prune_succeeded") or daemon.events("prune_failed"), 120, "the prune")
    assert daemon.events("prune_succeeded"), daemon.events("prune_failed")
    assert daemon.events("backup_succeeded", target=db.name)
    assert daemon.stop() == 0
    assert repo.restic("list", "locks", "--no-lock").stdout.strip() == ""


def test_a_database_dropped_from_an_all_databases_target_leaves_it(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("bwt-alldb-db", "17", labels={"backup-watcher.databases": "all"})
    db.psql("CREATE DATABASE extra;", database="postgres")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_SCHEDULE": "* * * * *"}
    daemon: DaemonProcess = start_daemon(env)

    def databases_in_repo() -> set[str]:
        return {str(tag).split("=", 1)[1] for snap in repo.snapshots_of(db.name)
                for tag in snap["tags"] if str(tag).startswith("database=")}

    wait_for(lambda: {"appdb", "extra"} <= databases_in_repo(), 150, "the first pass over both databases")
    wait_for(lambda: 'database="extra"' in daemon.metrics(), 10, "the dropped-to-be database's series")
    db.psql("DROP DATABASE extra;", database="postgres")
    wait_for(lambda: daemon.events("databases_gone", target=db.name), 150, "the next pass")
    # Gone from the target: no series of it to read stale for ever, the target is fresh and ok.
    metrics = daemon.metrics()
    assert 'database="extra"' not in metrics and 'database="appdb"' in metrics
    row = daemon.row(db.name)
    assert row is not None and row["state"] == "ok", row
    assert "extra" in databases_in_repo(), "its snapshots are kept"
    assert daemon.stop() == 0

    # After a restart the old history of the dropped database is not taken for one of the target's.
    again: DaemonProcess = start_daemon(env)
    wait_for(lambda: again.row(db.name), 30, "the registration after the restart")
    wait_for(lambda: 'database="appdb"' in again.metrics(), 10, "the series of the existing database")
    assert 'database="extra"' not in again.metrics()
    assert again.stop() == 0
