"""`backup-watcher run` on the real engine: discovery by events, schedules, passes, catch-up, shutdown.

One real end-to-end test per behaviour; tests that each waited for cron minutes share them where
every assertion is kept. The rules themselves (slots, concurrency, prune after a pass, catch-up,
retry back-off, the rename hold, drills, staleness) are tested second by second on a fake clock in
tests/unit (test_scheduler, test_daemon_passes, test_outcomes, test_inventory).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
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
    event_time,
    process_command_lines,
    wait_for,
    wait_for_copy,
    wait_ready,
)

pytestmark = [pytest.mark.engine, pytest.mark.slow]
# Names of this run's containers: sessions beside this one on a shared engine use their own.
RUN = uuid.uuid4().hex[:6]

def _assert_one_per_slot(daemon: DaemonProcess, names: list[str], slots: list[datetime],
                         started: dict[tuple[object, object], datetime]) -> None:
    """Each target's database and globals have exactly one successful backup in the pass each slot started
    (a pass starts with its globals; its database's dump may start in the next minute)."""
    pass_started: dict[object, datetime] = {}
    for (run_id, _), at in started.items():
        pass_started[run_id] = min(at, pass_started.get(run_id, at))
    for slot in slots:
        for name in names:
            for database in ("appdb", "(globals)"):
                lines = daemon.events("backup_succeeded", target=name, database=database)
                in_slot = [t for t in (pass_started[line["run_id"]] for line in lines)
                           if slot <= t < slot + timedelta(minutes=1)]
                assert len(in_slot) == 1, (name, database, slot, in_slot)


def _snapshot_count(repo: Repo, container: str) -> int:
    return len(repo.snapshots_of(container))


def _wait_past_next_minute(extra: float = 0.0) -> datetime:
    """Sleeps until just past the next minute boundary (plus `extra` seconds); returns that boundary."""
    now = datetime.now(UTC)
    boundary = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    time.sleep((boundary - now).total_seconds() + extra)
    return boundary


def _databases_in_repo(repo: Repo, container: str) -> set[str]:
    return {str(tag).split("=", 1)[1] for snap in repo.snapshots_of(container) for tag in snap["tags"]
            if str(tag).startswith("database=")}


def _series(daemon: DaemonProcess, target: str, database: str) -> bool:
    """Whether the daemon exports any series of that target's database."""
    return any(f'target="{target}"' in line and f'database="{database}"' in line
               for line in daemon.metrics().splitlines())


def _run_pg(name: str, *extra: str) -> None:
    docker("run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL,
           "-e", "POSTGRES_PASSWORD=test-only", *extra, PG_IMAGES["15"])


def _hold_a_lock(name: str) -> subprocess.Popen[bytes]:
    """A session in `name` that holds an ACCESS EXCLUSIVE lock (a dump waits for it) until its stdin closes."""
    holder = subprocess.Popen(["docker", "exec", "-i", name, "psql", "-X", "-q", "-U", "postgres"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert holder.stdin is not None
    holder.stdin.write(b"CREATE TABLE lockme (x int);\nBEGIN;\nLOCK TABLE lockme IN ACCESS EXCLUSIVE MODE;\n")
    holder.stdin.flush()
    return holder


def _dump_waits_for_a_lock(name: str) -> bool:
    # pg_dump's session, or under key order the session that locks the keyed tables before pg_dump starts.
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE (application_name = 'backup-watcher' "
               "OR application_name LIKE 'bw-keydump-%') AND wait_event_type = 'Lock'")
    counted = docker("exec", name, "psql", "-X", "-At", "-U", "postgres", "-c", waiting, check=False).stdout.strip()
    return counted.isdigit() and int(counted) >= 1


def _first_passes(daemon: DaemonProcess, repo: Repo, plain: str, alldb: PgContainer) -> None:
    """A new target is registered within a second by the event stream and backed up at once."""
    _run_pg(plain)
    started = time.monotonic()
    wait_for(lambda: daemon.row(plain), 1.0, f"{plain} to be registered")
    assert time.monotonic() - started < 1.0
    wait_ready(plain)
    wait_for(lambda: _snapshot_count(repo, plain) >= 1, 150, "the first backup")
    wait_for(lambda: {"appdb", "extra"} <= _databases_in_repo(repo, alldb.name), 150,
             "the first pass over both databases")
    wait_for(lambda: _series(daemon, alldb.name, "extra"), 10, "the dropped-to-be database's series")


def _rename_while_the_slot_waits(daemon: DaemonProcess, repo: Repo, name: str, renamed: str) -> None:
    """Renamed while the slot's backup waits for a lock, so the retag of the old name must wait; a new
    container takes the old name (a swap), with a database of another name to tell its snapshots apart.
    It is held back: a backup before the retag would move its snapshots into the renamed history."""
    docker("rename", name, renamed)
    wait_for(lambda: daemon.row(renamed) and daemon.row(name) is None, 5, "the rename")
    _run_pg(name, "-e", "POSTGRES_DB=newcomer")
    wait_for(lambda: daemon.row(name), 5, "the newcomer's registration")
    wait_ready(name)
    wait_for(lambda: daemon.events("backup_held", target=name), 30, "the newcomer to be held for the retag")
    # (The old name's snapshots are still the renamed container's: the retag has not run.)
    assert _databases_in_repo(repo, name) == {"postgres"}, "no backup of the newcomer before the retag"
    assert not daemon.events("history_renamed")


def _restarted_after_a_missed_slot(daemon: DaemonProcess, repo: Repo, alldb: PgContainer, slot: datetime) -> None:
    """Stopped over a slot: not backed up then; started again: caught up at once, and its database
    dropped meanwhile leaves the target (no series to read stale for ever; its snapshots stay)."""
    assert not [e for e in daemon.events("backup_started", target=alldb.name) if event_time(e) >= slot]
    row = daemon.row(alldb.name)
    assert row is not None and row["state"] == "stopped" and row["next_run"] is None
    docker("start", alldb.name)
    wait_for(lambda: (daemon.row(alldb.name) or {}).get("state") not in (None, "stopped"), 5, "the restart")
    wait_for(lambda: daemon.events("databases_gone", target=alldb.name), 150, "the catch-up backup after the restart")
    wait_for(lambda: (daemon.row(alldb.name) or {}).get("state") == "ok", 10, "the target to be ok")
    assert not _series(daemon, alldb.name, "extra") and _series(daemon, alldb.name, "appdb")
    assert "extra" in _databases_in_repo(repo, alldb.name), "its snapshots are kept"


def _destroyed(daemon: DaemonProcess, repo: Repo, name: str, renamed: str) -> None:
    """Destroyed: gone, and its series with it; its snapshots stay."""
    docker("rm", "-f", name)
    wait_for(lambda: f'target="{renamed}"' in daemon.metrics(), 60, "series of the renamed target")
    docker("rm", "-f", renamed)
    wait_for(lambda: daemon.row(renamed) is None, 5, "the destroyed target to go")
    wait_for(lambda: f'target="{renamed}"' not in daemon.metrics(), 5, "its series to go")
    assert _snapshot_count(repo, renamed) >= 1, "destroying a container keeps its snapshots"


def test_lifecycle_register_stop_restart_rename_destroy_and_dropped_database(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    prefix = f"bwt-life{RUN}"
    name, renamed = f"{prefix}-db", f"{prefix}-renamed"
    alldb: PgContainer = start_pg(f"{prefix}-all", "17", labels={"backup-watcher.databases": "all"})
    alldb.psql("CREATE DATABASE extra;", database="postgres")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": f"{prefix}-*", "WATCHER_SCHEDULE": "* * * * *"}
    daemon: DaemonProcess = start_daemon(env)
    try:
        _first_passes(daemon, repo, name, alldb)
        # (FORCE: a backup of the next slot may be reading it right now.)
        alldb.psql("DROP DATABASE extra WITH (FORCE);", database="postgres")
        docker("stop", "-t", "2", alldb.name)
        wait_for(lambda: (daemon.row(alldb.name) or {}).get("state") == "stopped", 5, "the stopped state")
        holder = _hold_a_lock(name)
        try:
            slot = _wait_past_next_minute()
            wait_for(lambda: _dump_waits_for_a_lock(name), 60, "the slot's dump to wait for the lock")
            _rename_while_the_slot_waits(daemon, repo, name, renamed)
            _restarted_after_a_missed_slot(daemon, repo, alldb, slot)
        finally:
            if holder.stdin is not None:
                holder.stdin.close()
            holder.wait(timeout=30)
        wait_for(lambda: daemon.events("history_renamed", target=renamed), 120, "the history to follow the new name")
        wait_for(lambda: "newcomer" in _databases_in_repo(repo, name), 150, "the newcomer's first backup")
        assert _databases_in_repo(repo, name) == {"newcomer"}
        # (How many: retention keeps one a day of each history, so counts here would only test it.)
        assert _databases_in_repo(repo, renamed) == {"postgres"}
        _destroyed(daemon, repo, name, renamed)
    finally:
        docker("rm", "-f", name, renamed, check=False)
    assert daemon.stop() == 0
    assert daemon.events("target_registered", target=name)

    # After a restart the old history of the dropped database is not taken for one of the target's.
    again: DaemonProcess = start_daemon(env)
    wait_for(lambda: again.row(alldb.name), 30, "the registration after the restart")
    wait_for(lambda: _series(again, alldb.name, "appdb"), 10, "the series of the existing database")
    assert not _series(again, alldb.name, "extra")
    assert again.stop() == 0


@pytest.mark.alone  # restarts the shared engine
def test_engine_restart_reconnects_and_registers_new_containers(start_pg: StartPg, start_daemon: StartDaemon,
                                                                repo: Repo, watcher_env: dict[str, str]) -> None:
    # A dump is streaming when the engine goes (fault 4 of the matrix, SPEC §11): it must fail without a
    # snapshot and leave nothing running, and a next run must heal.
    streaming: PgContainer = start_pg(f"bwt-restart{RUN}-big", "15")
    streaming.psql(BIG_TABLE)
    streaming_id = streaming.id
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": f"bwt-restart{RUN}-*", "WATCHER_DRILL_SCHEDULE": ""}
    daemon: DaemonProcess = start_daemon(env)
    wait_for_copy(streaming)
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
    name = f"bwt-restart{RUN}-db"
    try:
        docker("run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL,
               "-e", "POSTGRES_PASSWORD=test-only", PG_IMAGES["17"])
        wait_for(lambda: daemon.row(name), 45, "registration after the engine restart")
        wait_for(lambda: _snapshot_count(repo, name) == 1, 150, "its backup")
    finally:
        docker("rm", "-f", name, check=False)
    # (After the failed dump the job waits for PostgreSQL up to WATCHER_READY_TIMEOUT; the container is
    # found stopped once the engine is back.)
    failed = wait_for(lambda: daemon.events("backup_failed", target=streaming.name, database=streaming.database),
                      150, "the streaming dump to fail")
    assert isinstance(failed, list) and "no snapshot was written" in str(failed[0]["error"]), failed
    assert _no_leftover_helpers(streaming_id), [line for line in process_command_lines() if streaming_id in line]
    assert daemon.stop() == 0
    assert len(daemon.events("event_stream_connected")) >= 2
    assert daemon.events("event_stream_ended") or daemon.events("event_stream_error")
    assert repo.snapshots_of(streaming.name) == []
    assert repo.restic("list", "locks", "--no-lock").stdout.strip() == "", "no lock left"
    assert "no errors were found" in repo.restic("check").stdout
    # The engine stopped the container with it; started again, its next run heals.
    docker("start", streaming.name)
    wait_ready(streaming.name, 90)
    healed = subprocess.run([sys.executable, "-m", "watcher", "backup", streaming.name], env=env, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert len(repo.snapshots_of(streaming.name)) == 1


def test_passes_one_snapshot_per_slot_concurrency_and_prune_between(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    names = [f"bwt-pass{RUN}-{i}-db" for i in range(1, 5)]
    for index, name in enumerate(names):
        db: PgContainer = start_pg(name, "15" if index % 2 else "17")
        db.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100000) AS g;")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": f"bwt-pass{RUN}-*", "WATCHER_SCHEDULE": "* * * * *",
           "WATCHER_CONCURRENCY": "2", "WATCHER_KEEP_DAILY": "1", "WATCHER_KEEP_WEEKLY": "0",
           "WATCHER_KEEP_MONTHLY": "0"}
    daemon: DaemonProcess = start_daemon(env)
    # The pass at the start (nothing is backed up yet), then two slots; their starts and ends are read
    # from the log afterwards. (Slot math, catch-up, concurrency and the prune after a pass are also
    # covered second by second in tests/unit/test_daemon_passes.py.) The slots counted begin after the start's
    # pass: a target's next run is its first slot after its backup ends, so a slot that passes while the start's
    # backup of it still runs is rightly not a run of its own (CI, session 8: the start at hh:mm:54 under load).
    wait_for(lambda: len(daemon.events("backup_succeeded", database="appdb")) >= len(names), 180, "the start's pass")
    slots = [_wait_past_next_minute() for _ in range(2)]
    # Let the last pass and its prune finish.
    wait_for(lambda: [p for p in daemon.events("prune_succeeded") if event_time(p) > slots[-1]], 90, "the last prune")
    assert daemon.stop() == 0

    started = {(line["run_id"], line["database"]): event_time(line) for line in daemon.events("backup_started")}
    intervals = []
    for line in daemon.events("backup_succeeded"):
        intervals.append((line["target"], started[(line["run_id"], line["database"])], event_time(line)))
    assert not daemon.events("backup_failed")

    # Exactly one snapshot per target and history (its database, its globals) in every slot.
    _assert_one_per_slot(daemon, names, slots, started)
    # Never two at once for one target; never more than the concurrency overall.
    for name in names:
        own = sorted((s, e) for t, s, e in intervals if t == name)
        assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(own))
    for _, start, _ in intervals:
        running = [1 for _, s, e in intervals if s <= start < e]
        assert len(running) <= 2
    # Prune after each pass, never during a backup.
    prunes = [(event_time(a), event_time(b))
              for a, b in zip(daemon.events("prune_started"), daemon.events("prune_succeeded"), strict=False)]
    assert len(prunes) >= len(slots)  # (the pass at the start may share the first slot's prune)
    for prune_start, prune_end in prunes:
        assert not [1 for _, s, e in intervals if s < prune_end and prune_start < e], "prune overlapped a backup"
    for slot in slots:
        last_backup_of_pass = max(e for _, s, e in intervals if slot <= s < slot + timedelta(minutes=1))
        assert any(last_backup_of_pass <= p_start < slot + timedelta(minutes=1) for p_start, _ in prunes)
    # Retention keeps what the keeps say: one snapshot per day and history.
    for name in names:
        days = {str(s["time"])[:10] for s in repo.snapshots_of(name)}
        assert _snapshot_count(repo, name) == len(days) == 1
        assert len(repo.globals_of(name)) == 1, "the globals are kept like a database's history"


def _no_leftover_helpers(container_id: str) -> bool:
    return not [line for line in process_command_lines() if "watcher.dockerexec" in line and container_id in line]


def test_sigterm_during_a_large_dump_exits_0_without_partial_snapshot(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg(f"bwt-sigterm{RUN}-db", "17")
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
    db: PgContainer = start_pg(f"bwt-ctrlc{RUN}-db", "15")
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


def test_grace_lets_a_backup_finish_catch_up_after_downtime_and_second_signal_aborts(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg(f"bwt-grace{RUN}-db", "15")
    db.psql(BIG_TABLE)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_SHUTDOWN_GRACE": "120"}

    # One signal, long grace: the running backup finishes and is kept.
    daemon: DaemonProcess = start_daemon(env)
    wait_for_copy(db)
    assert daemon.stop(signal.SIGTERM, timeout=120) == 0
    assert len(repo.snapshots_of(db.name)) == 1

    # A slot passes while no daemon runs: the restarted daemon runs the missed backup at once, not at
    # its next slot (a minute away here; an hour or a day away in life).
    db.psql("INSERT INTO a_big SELECT g, 'x' FROM generate_series(300001, 300010) AS g;")
    env["WATCHER_SCHEDULE"] = "* * * * *"
    _wait_past_next_minute(extra=1)
    second: DaemonProcess = start_daemon(env)
    wait_for(lambda: second.events("backup_started", target=db.name), 20, "the missed backup to start")
    registered = second.events("target_registered", target=db.name)[0]
    assert registered["catch_up"] is True
    started = event_time(second.events("backup_started", target=db.name)[0])
    assert started - event_time(registered) < timedelta(seconds=15)

    # Two signals: abort now, still no partial snapshot.
    wait_for_copy(db)
    second.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: second.events("shutdown_requested"), 10, "the first signal to be taken")
    aborted_at = time.monotonic()
    assert second.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - aborted_at < 15
    assert second.events("shutdown_aborting_jobs", reason="second signal")
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

    db: PgContainer = start_pg(f"bwt-lock{RUN}-db", "17")
    daemon: DaemonProcess = start_daemon({**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name})
    wait_for(lambda: daemon.events("prune_succeeded") or daemon.events("prune_failed"), 120, "the prune")
    assert daemon.events("prune_succeeded"), daemon.events("prune_failed")
    assert daemon.events("backup_succeeded", target=db.name)
    assert daemon.stop() == 0
    assert repo.restic("list", "locks", "--no-lock").stdout.strip() == ""
