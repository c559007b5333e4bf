"""No secret reaches the watcher's output, any process's argv, or the Docker events it causes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import PgContainer, Repo, StartPg, docker, process_command_lines
from tests.kit import RestServer

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


def _restic_environments() -> list[tuple[str, dict[str, str]]]:
    """(command line, environment) of every restic process on the machine right now."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            if not argv or not argv[0].endswith(b"restic"):
                continue
            raw = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
        found.append((b" ".join(argv).decode(errors="replace"), {key: value for key, _, value in pairs}))
    return found


class EnvironmentSampler(ArgvSampler):
    """Also samples the environment of every restic process (ours: the same user may read it)."""

    def __init__(self) -> None:
        super().__init__()
        self.restic: dict[str, tuple[str, dict[str, str]]] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            self.seen.update(process_command_lines())
            for line, environ in _restic_environments():
                self.restic.setdefault(f"{line}|{environ.get('RESTIC_REPOSITORY')}", (line, environ))
            time.sleep(0.005)


def test_copy_secrets_stay_out_of_argv_output_and_the_primarys_restic_and_the_other_way_round(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str], tmp_path: Path) -> None:
    db: PgContainer = start_pg(f"bwt-c17-secret{uuid.uuid4().hex[:6]}-db", "15", password=DB_PASSWORD)
    db.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) AS g;")
    copy_password = f"copy-s3cret-{uuid.uuid4().hex[:12]} 'q' $(id)"
    rest = RestServer(tmp_path / "offsite", "offsite-user", f"rest-s3cret-{uuid.uuid4().hex[:12]}")
    secret_file = tmp_path / "offsite.password"
    secret_file.write_text(copy_password + "\n")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_COPY_TO": "offsite",
           "WATCHER_COPY_OFFSITE_REPOSITORY": rest.url, "WATCHER_COPY_OFFSITE_PASSWORD_FILE": str(secret_file),
           "WATCHER_COPY_OFFSITE_ENV_FILE": str(rest.env_file(tmp_path / "offsite.env"))}
    copy_secrets = [copy_password, rest.password]
    sampler = EnvironmentSampler()
    sampler.start()
    outputs = []
    try:
        for args in (["backup"], ["copy"], ["snapshots", "--from", "offsite"],
                     ["restore", db.name, "latest", "--from", "offsite", "--yes"], ["check-config"]):
            done = subprocess.run([sys.executable, "-m", "watcher", *args], env=env, capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, timeout=300)
            assert done.returncode == 0, [*args, done.stdout + done.stderr]
            outputs.append(done.stdout + done.stderr)
    finally:
        sampler.stop.set()
        sampler.join()
    assert "WATCHER_COPY_OFFSITE_PASSWORD=***" in outputs[-1] and "RESTIC_REST_PASSWORD=***" in outputs[-1]
    for secret in [*copy_secrets, repo.password, DB_PASSWORD]:
        assert not [line for line in sampler.seen if secret in line], "secret in argv"
        assert not [output for output in outputs if secret in output], "secret in output"
    primary = [environ for _, environ in sampler.restic.values()
               if environ.get("RESTIC_REPOSITORY") == str(repo.path)]
    copy_alone = [environ for _, environ in sampler.restic.values()
                  if environ.get("RESTIC_REPOSITORY") == rest.url and "RESTIC_FROM_REPOSITORY" not in environ]
    transfer = [environ for _, environ in sampler.restic.values() if "RESTIC_FROM_REPOSITORY" in environ]
    # The sampler saw restic working on each: the primary alone, the copy alone, and copying between them.
    assert primary and copy_alone and transfer, sorted(sampler.restic)
    for environ in primary:
        assert not set(copy_secrets) & set(environ.values()) and "RESTIC_REST_USERNAME" not in environ
    for environ in copy_alone:
        assert repo.password not in environ.values() and environ["RESTIC_REST_PASSWORD"] == rest.password
