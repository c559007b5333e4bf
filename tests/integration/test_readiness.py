"""Readiness before a dump (watcher.jobs.backup_target): a settled container is dumped without a
pg_isready exec first; when its PostgreSQL is down after all, the job waits for it once, briefly,
and dumps again, and a PostgreSQL that stays down fails the job within that brief wait.

PostgreSQL is taken "down" for real by moving its socket away inside the container (what a
restarting server looks like to a client: pg_isready says "no response"); the container's start
time is the one input set by hand, so that a container started a second ago counts as settled.

The daemon probes a container whose PostgreSQL is not known to serve outside the concurrency slots and
backs off when it does not answer: a container that never serves (it runs `sleep infinity`)
beside a live one, with one slot, never delays the live one's backup.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from tests.integration.conftest import (
    PG_IMAGES,
    TEST_LABEL,
    PgContainer,
    Repo,
    StartDaemon,
    StartPg,
    docker,
    event_time,
    wait_for,
)
from watcher.cli import build_app, select_targets
from watcher.config import load_config
from watcher.discovery import Target
from watcher.jobs import BackupResult, JobContext, backup_target, check_repository

SOCKET = "/var/run/postgresql/.s.PGSQL.5432"


def _hide_socket(db: PgContainer) -> None:
    docker("exec", db.name, "sh", "-c", f"mkdir -p /tmp/hidden && mv {SOCKET} /tmp/hidden/")


def _restore_socket(db: PgContainer) -> None:
    docker("exec", db.name, "sh", "-c", f"mv /tmp/hidden/.s.PGSQL.5432 {SOCKET}")


@contextmanager
def _context(env: dict[str, str], db: PgContainer, started_ago: float) -> Iterator[tuple[JobContext, Target]]:
    app = build_app(load_config({**env, "WATCHER_CONTAINER_PATTERNS": db.name}))
    try:
        ctx = app.job_context()
        check_repository(ctx, init=True)
        (target,), _ = select_targets(app, [db.name])
        assert target.started_at is not None and abs(target.started_at - time.time()) < 120, \
            "the start time comes from the engine's StartedAt"
        yield ctx, dataclasses.replace(target, started_at=time.time() - started_ago)
    finally:
        app.docker.close()


def _pg_isready_execs(db: PgContainer, since: float, until: float) -> int:
    done = subprocess.run(
        ["docker", "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}", "--filter",
         f"container={db.name}", "--filter", "event=exec_start", "--format", "{{.Action}}"],
        capture_output=True, text=True, check=True, timeout=60, env=os.environ)
    return sum("pg_isready" in line for line in done.stdout.splitlines())


def _backup(ctx: JobContext, target: Target) -> tuple[BackupResult, float]:
    """The pass's result for its one database, and how long the pass took; the globals, which come first,
    went the same way."""
    (globals_, result), seconds = _pass(ctx, target)
    assert globals_.database == "(globals)" and globals_.ok == result.ok, globals_.error
    return result, seconds


def _pass(ctx: JobContext, target: Target) -> tuple[list[BackupResult], float]:
    started = time.monotonic()
    results = backup_target(ctx, target)
    return results, time.monotonic() - started


def test_settled_container_is_dumped_without_a_probe_a_new_one_after_one(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db = start_pg(major="15")
    with _context(watcher_env, db, started_ago=3600) as (ctx, settled):
        since = time.time()
        result, _ = _backup(ctx, settled)
        time.sleep(1.1)  # docker events --until has a resolution of a second
        assert result.ok, result.error
        assert _pg_isready_execs(db, since, time.time()) == 0
        since = time.time()
        result, _ = _backup(ctx, dataclasses.replace(settled, started_at=time.time() - 5))
        time.sleep(1.1)
        assert result.ok, result.error
        assert _pg_isready_execs(db, since, time.time()) == 1
    assert len(repo.snapshots_of(db.name)) == 2


def test_settled_container_whose_postgres_comes_back_is_waited_for_and_dumped_again(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db = start_pg(major="17")
    db.psql("CREATE TABLE kept AS SELECT g FROM generate_series(1, 500) g")
    with _context(watcher_env, db, started_ago=3600) as (ctx, target):
        _hide_socket(db)
        back = threading.Timer(4.0, _restore_socket, args=(db,))
        back.start()
        try:
            with capture_logs() as logged:
                result, seconds = _backup(ctx, target)
        finally:
            back.join()
    assert result.ok, result.error
    events = [entry["event"] for entry in logged]
    assert events.count("postgres_not_ready") == 1
    assert "backup_failed" not in events, "a dump that succeeded on its second attempt is no failure"
    assert 4.0 <= seconds < 30, "waited for PostgreSQL, not for the whole wait"
    (snapshot,) = repo.snapshots_of(db.name)
    assert snapshot["id"] == result.snapshot_id
    dump = subprocess.run(["restic", "dump", str(snapshot["id"]), "/appdb.pgdump"], capture_output=True, check=True,
                          env={**os.environ, "RESTIC_REPOSITORY": str(repo.path), "RESTIC_PASSWORD": repo.password})
    assert dump.stdout.startswith(b"PGDMP") and b"kept" in dump.stdout


def test_settled_container_whose_postgres_stays_down_fails_after_the_wait(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db = start_pg(major="15")
    # The bound is a setting (WATCHER_READY_TIMEOUT, default 2m), carried in the job context.
    with _context({**watcher_env, "WATCHER_READY_TIMEOUT": "15s"}, db, started_ago=3600) as (ctx, target):
        assert ctx.bounds.ready_s == 15.0
        _hide_socket(db)
        with capture_logs() as logged:
            (result, after), seconds = _pass(ctx, target)
    ready_timeout = 15.0
    # The pass's first dump (its globals) meets PostgreSQL down, waits once and fails with the wait's verdict;
    # the database's after it fails at once, without a second wait.
    assert result.database == "(globals)" and not result.ok and not after.ok
    assert [entry["event"] for entry in logged].count("backup_failed") == 2, "one failure per history, logged once"
    assert ready_timeout <= seconds < ready_timeout + 20, "waited once, as after a start"
    assert result.error is not None
    assert "no snapshot was written" in result.error, "the dump's own failure is kept"
    assert f"did not accept connections within {ready_timeout:.0f}s" in result.error
    assert "no response" in result.error, "pg_isready's verdict names the cause"
    assert repo.snapshots_of(db.name) == []


def test_a_container_that_never_serves_backs_off_and_never_delays_a_live_one(
        start_pg: StartPg, start_daemon: StartDaemon, watcher_env: dict[str, str]) -> None:
    # A database container whose PostgreSQL never starts: it runs `sleep infinity` instead.
    dead = f"bwt-f16a-dead{uuid.uuid4().hex[:6]}-db"
    live = f"bwt-f16a-live{uuid.uuid4().hex[:6]}-db"
    docker("run", "-d", "--network", "none", "--name", dead, "--label", TEST_LABEL, "-e", "POSTGRES_USER=app",
           "-e", "POSTGRES_DB=appdb", "-e", "POSTGRES_PASSWORD=db-pw", "--entrypoint", "sleep", PG_IMAGES["17"],
           "infinity")
    try:
        # One slot, and the dead one is due first: a probe that held the slot would keep the live one waiting
        # for the whole WATCHER_READY_TIMEOUT.
        env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": f"{dead},{live}", "WATCHER_CONCURRENCY": "1",
               "WATCHER_READY_TIMEOUT": "30s", "WATCHER_RECONCILE_INTERVAL": "5",
               "WATCHER_SCHEDULE": f"0 {(datetime.now(UTC).hour + 12) % 24} * * *"}
        daemon = start_daemon(env)
        wait_for(lambda: daemon.events("postgres_probe_started", target=dead), 30, "the dead one's probe",
                 interval=0.2)
        db = start_pg(live, "17")
        wait_for(lambda: daemon.events("backup_succeeded", target=live, database=db.database), 60,
                 "the live one's backup", interval=0.2)
        assert not daemon.events("postgres_backing_off", target=dead), \
            "the live one was backed up while the dead one's PostgreSQL was still waited for"
        wait_for(lambda: daemon.events("postgres_backing_off", target=dead), 60, "the dead one's verdict",
                 interval=0.5)
        (verdict,) = daemon.events("postgres_backing_off", target=dead)
        assert verdict["attempt"] == 1 and "did not accept connections within 30s" in str(verdict["error"])
        backing_off_until = datetime.fromisoformat(str(verdict["backing_off_until"]))
        assert backing_off_until - event_time(verdict) == pytest.approx(timedelta(minutes=1), abs=timedelta(seconds=2))
        row = daemon.row(dead)
        assert row is not None and row["state"] == "failing"
        assert row["backing_off_until"] == backing_off_until.isoformat()
        assert str(row["last_error"]).startswith("backing off until ")
        assert daemon.stop() == 0
    finally:
        docker("rm", "-f", "-v", dead, check=False)
