"""No secret reaches the watcher's output, any process's argv, or the Docker events it causes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import PgContainer, Repo, StartPg, docker, process_command_lines

pytestmark = pytest.mark.engine

DB_PASSWORD = "db-s3cret 'q' \"dq\" $(id) ✓"


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """A repository password of this test alone: the sampler below reads the argv of every process on the
    machine, among them other tests' (other xdist workers, other runs), which share conftest's password."""
    return Repo(tmp_path / "repo", password=f"repo-s3cret-{uuid.uuid4().hex[:12]} 'q' $(id) ✓")


class ArgvSampler(threading.Thread):
    """Samples every process's argv until stopped; remembers each distinct command line seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.seen.update(process_command_lines())
            time.sleep(0.005)


def test_no_secret_in_output_argv_or_docker_events(start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("scalr-secret-db", "17", password=DB_PASSWORD)
    db.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 200000) AS g;")
    db.require_password_locally()
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    secrets = [DB_PASSWORD, repo.password]

    since = docker("info", "--format", "{{.SystemTime}}").stdout.strip()
    sampler = ArgvSampler()
    sampler.start()
    outputs = []
    try:
        for args in (["backup"], ["restore", db.name, "latest", "--yes"], ["snapshots"], ["check-config"]):
            done = subprocess.run([sys.executable, "-m", "watcher", *args], env=env, capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            outputs.append(done.stdout + done.stderr)
    finally:
        sampler.stop.set()
        sampler.join()
    until = docker("info", "--format", "{{.SystemTime}}").stdout.strip()
    events = docker("events", "--since", since, "--until", until, "--format", "{{json .}}").stdout

    # The sampler did see the pipeline, so the checks below look at something real.
    assert any("restic" in line and "backup" in line for line in sampler.seen)
    assert any("pg_dump" in line for line in sampler.seen)
    assert any("pg_restore" in line for line in sampler.seen)
    assert "exec_start" in events and "pg_dump" in events
    for secret in secrets:
        for line in sampler.seen:
            assert secret not in line, f"secret in argv: {line}"
        for output in outputs:
            assert secret not in output
        assert secret not in events
        assert json.dumps(secret)[1:-1] not in events


APP_PASSWORD = "app-login s3cret 'q' $(id) ✓"


def test_no_role_password_or_hash_leaks_from_globals_or_whole_host_recovery(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    name = f"bwt-secret-{uuid.uuid4().hex[:6]}-db"
    db: PgContainer = start_pg(name, "17", password=DB_PASSWORD)
    db.psql(f"CREATE ROLE owner_role NOLOGIN; CREATE ROLE app_login LOGIN PASSWORD "
            f"'{APP_PASSWORD.replace(chr(39), chr(39) * 2)}' IN ROLE owner_role;"
            "CREATE TABLE t (x int); ALTER TABLE t OWNER TO owner_role;")
    app_hash = db.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_login'")
    superuser_hash = db.psql("SELECT rolpassword FROM pg_authid WHERE rolname = current_user")
    assert app_hash.startswith("SCRAM-SHA-256$")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name, "WATCHER_HOST": "old-host"}
    secrets = [DB_PASSWORD, repo.password, APP_PASSWORD, app_hash, superuser_hash]

    since = docker("info", "--format", "{{.SystemTime}}").stdout.strip()
    sampler = ArgvSampler()
    sampler.start()
    outputs = []
    try:
        done = subprocess.run([sys.executable, "-m", "watcher", "backup"], env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, outputs[-1]
        fresh = start_pg(name, "17", password=DB_PASSWORD)  # the old host is gone
        done = subprocess.run([sys.executable, "-m", "watcher", "restore", "--all", "--host", "old-host", "--yes"],
                              env={**env, "WATCHER_HOST": "new-host"}, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, outputs[-1]
    finally:
        sampler.stop.set()
        sampler.join()
    until = docker("info", "--format", "{{.SystemTime}}").stdout.strip()
    events = docker("events", "--since", since, "--until", until, "--format", "{{json .}}").stdout

    # The roles did come back with their hash, so the checks below look at something real.
    assert fresh.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_login'") == app_hash
    assert any("pg_dumpall" in line for line in sampler.seen)
    assert "pg_dumpall" in events
    for secret in secrets:
        for line in sampler.seen:
            assert secret not in line, f"secret in argv: {line}"
        for output in outputs:
            assert secret not in output
        assert secret not in events
        assert json.dumps(secret)[1:-1] not in events
