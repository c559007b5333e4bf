"""No unbounded wait on a live database (issue 13, must-show 1): a table another session holds locked
makes a backup and a drill fail within their bound, naming the lock wait, while the daemon goes on
pruning, retagging and shuts down on SIGTERM. Also the runner's own promise for commands inside a
container: its wait ends on timeout and on cancel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

import pytest

from tests.integration.conftest import (
    DaemonProcess,
    PgContainer,
    Repo,
    docker,
    process_command_lines,
    run_watcher,
    wait_for,
)
from watcher.execute import Masker, run_in_container

LOCK_WAIT = "3s"
GRACE_S = 5


def _ts(line: dict[str, object]) -> datetime:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))


def _first(lines: object) -> dict[str, object]:
    assert isinstance(lines, list) and lines
    first = lines[0]
    assert isinstance(first, dict)
    return first


@contextmanager
def _table_locked(db: PgContainer, table: str) -> Iterator[None]:
    """Holds ACCESS EXCLUSIVE on `table` in a psql session kept open (a migration in the middle)."""
    holder = subprocess.Popen(["docker", "exec", "-i", db.name, "psql", "-X", "-q", "-U", db.user, "-d", db.database],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert holder.stdin is not None
        holder.stdin.write(f"BEGIN;\nLOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\n".encode())
        holder.stdin.flush()
        wait_for(lambda: _lock_held(db, table), 30, f"the lock on {table}")
        yield
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=30)


def _lock_held(db: PgContainer, table: str) -> bool:
    return db.psql(f"SELECT count(*) FROM pg_locks WHERE relation = '{table}'::regclass "
                   "AND mode = 'AccessExclusiveLock' AND granted", check=False) == "1"


@pytest.mark.engine
def test_the_wait_for_a_command_in_a_container_ends_on_timeout_and_on_cancel(
        start_pg: Callable[..., PgContainer]) -> None:
    db: PgContainer = start_pg(major="15")
    host = os.environ["DOCKER_HOST"]
    masker = Masker(["the-Secret-value"])

    done = run_in_container(host, db.name, ("sh", "-c", 'echo out; echo "pw=$PW" >&2; exit 3'),
                            env={"PW": "the-Secret-value"}, masker=masker, timeout=30)
    assert (done.returncodes, done.stdout, done.stderr_tail) == ((3,), b"out\n", "pw=***")
    assert not done.ok and not done.timed_out and done.problem is None

    started = time.monotonic()
    done = run_in_container(host, db.name, ("sleep", "600"), env={}, masker=masker, timeout=2)
    assert done.timed_out and not done.ok
    assert time.monotonic() - started < 10, "the wait ended soon after its bound, not with the command"
    assert done.describe_failure().startswith("sleep timed out after 2s")

    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    started = time.monotonic()
    done = run_in_container(host, db.name, ("sleep", "600"), env={}, masker=masker, timeout=600, cancel=cancel)
    assert done.cancelled and not done.timed_out and not done.ok
    assert time.monotonic() - started < 10, "cancel ended the wait"


@pytest.mark.engine
@pytest.mark.slow
def test_a_locked_table_fails_backup_and_drill_in_their_bound_while_the_daemon_goes_on(
        start_pg: Callable[..., PgContainer], start_daemon: Callable[[dict[str, str]], DaemonProcess], repo: Repo,
        watcher_env: dict[str, str]) -> None:
    locked: PgContainer = start_pg("bwt-hang-db", "15")
    locked.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) AS g;")
    other: PgContainer = start_pg("bwt-hang-other-db", "15")
    renamed = "bwt-hang-renamed-db"
    docker("rm", "-f", "-v", renamed, check=False)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "bwt-hang-*", "WATCHER_LOCK_WAIT_TIMEOUT": LOCK_WAIT,
           "WATCHER_QUERY_TIMEOUT": "20s", "WATCHER_SCHEDULE": "* * * * *", "WATCHER_DRILL_SCHEDULE": "* * * * *",
           "WATCHER_CONCURRENCY": "3", "WATCHER_SHUTDOWN_GRACE": str(GRACE_S)}
    # Named: the engine is shared, another session's containers may opt in by label.
    first = run_watcher(["backup", locked.name, other.name], env)
    assert first.returncode == 0, first.stderr
    # restic tag rewrites a snapshot under a new id; its time stays.
    before = {snap["time"] for snap in repo.snapshots_of(other.name)}
    assert len(repo.snapshots_of(locked.name)) == 1, first.stderr
    assert len(before) == 1, first.stderr

    try:
        with _table_locked(locked, "t"):
            daemon: DaemonProcess = start_daemon(env)
            # Renamed while the drill (which holds back every retag and prune) runs into the lock.
            wait_for(lambda: daemon.events("drill_started", target=locked.name), 150, "the drill", interval=0.5)
            docker("rename", other.name, renamed)

            backup = _first(wait_for(lambda: daemon.events("backup_failed", target=locked.name), 150,
                                     "the backup of the locked table to fail", interval=0.5))
            assert "no snapshot was written" in str(backup["error"])
            assert f"pg_dump gave up waiting for a lock on table public.t after {LOCK_WAIT}" in str(backup["error"])
            assert float(str(backup["duration_s"])) < 30, "the dump ended at the lock wait, not at the dump timeout"

            drill = _first(wait_for(lambda: daemon.events("drill_failed", target=locked.name), 150,
                                    "the drill of the locked table to fail", interval=0.5))
            assert f"waiting for a lock on table public.t after {LOCK_WAIT}" in str(drill["error"])
            assert float(str(drill["duration_s"])) < 120, "the drill's live check ended at the lock wait"

            wait_for(lambda: daemon.events("history_renamed", target=renamed), 120, "the retag", interval=0.5)
            assert repo.snapshots_of(other.name) == []
            assert before <= {snap["time"] for snap in repo.snapshots_of(renamed)}, "tags moved to the new name"
            wait_for(lambda: [p for p in daemon.events("prune_succeeded") if _ts(p) > _ts(drill)], 150,
                     "a prune after the failures", interval=0.5)

            assert _lock_held(locked, "t"), "all of it happened while the table stayed locked"
            started = time.monotonic()
            assert daemon.stop(signal.SIGTERM, timeout=60) == 0
            assert time.monotonic() - started < GRACE_S + 10, "SIGTERM ended the daemon within its grace"
        assert len(repo.snapshots_of(locked.name)) == 1, "no snapshot of any failed backup"
        assert daemon.events("daemon_stopped")
        # Nothing left running or locked, a sound repository, and once the migration is over the next run
        # heals (fault 6 of the matrix, SPEC §11).
        locked_id = locked.id
        assert not [line for line in process_command_lines() if "watcher.dockerexec" in line and locked_id in line]
        assert repo.restic("list", "locks", "--no-lock").stdout.strip() == ""
        assert "no errors were found" in repo.restic("check").stdout
        healed = run_watcher(["backup", locked.name], env)
        assert healed.returncode == 0, healed.stdout + healed.stderr
        assert len(repo.snapshots_of(locked.name)) == 2
    finally:
        docker("rm", "-f", "-v", renamed, check=False)
