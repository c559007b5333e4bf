"""Fixtures on the real test ground: the private Docker engine, PostgreSQL containers, restic.

Run through `scripts/test`, which brings the test ground up and exports DOCKER_HOST and PATH.
Every container started here has `--network none` and a name starting with `bwt-` or the name
the test asks for, and is removed when its test ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

# The plain helpers live in tests/kit.py (the benchmark uses them too); re-exported here for the test
# modules that import them from this file (__all__: an explicit re-export, as mypy --strict wants).
from tests.kit import (
    PG_IMAGES,
    REPO_PASSWORD,
    DaemonProcess,
    PgContainer,
    Repo,
    docker,
    free_port,
    run_watcher,
    wait_for,
    wait_ready,
)

__all__ = [
    "BIG_TABLE",
    "PG_IMAGES",
    "REPO_PASSWORD",
    "TEST_LABEL",
    "DaemonProcess",
    "PgContainer",
    "Repo",
    "docker",
    "free_port",
    "process_command_lines",
    "run_watcher",
    "wait_for",
    "wait_for_copy",
    "wait_ready",
]

TEST_LABEL = "backup-watcher-test.owner=pytest"


@pytest.fixture(scope="session", autouse=True)
def engine() -> str:
    """The test engine's DOCKER_HOST; fails (never skips) when the test ground is not up."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host or shutil.which("restic") is None:
        pytest.fail("the test ground is not up: run the tests through scripts/test")
    info = docker("info", "--format", "{{.Name}}", check=False, timeout=20)
    if info.returncode != 0:
        pytest.fail(f"the test engine at {host} does not answer: {info.stderr}")
    # Leftovers of an interrupted earlier run; recent ones may belong to a session running beside this
    # one on a shared engine (a name a test needs is freed by start_pg itself).
    rows = docker("ps", "-a", "--filter", f"label={TEST_LABEL}", "--format", "{{.ID}} {{.CreatedAt}}").stdout
    cutoff = datetime.now(UTC) - timedelta(hours=2)
    stale = [row.split()[0] for row in rows.splitlines()
             if datetime.strptime(" ".join(row.split()[1:3]), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC) < cutoff]
    if stale:
        docker("rm", "-f", *stale, check=False)
    return host


@pytest.fixture
def start_pg(engine: str) -> Iterator[Callable[..., PgContainer]]:
    """Factory: starts a PostgreSQL container (--network none), waits until it is ready, removes it after."""
    started: list[str] = []

    def start(name: str | None = None, major: str = "17", *, user: str = "app", database: str = "appdb",
              password: str = "db-pw", labels: dict[str, str] | None = None,
              extra_env: dict[str, str] | None = None) -> PgContainer:
        name = name or f"bwt-{uuid.uuid4().hex[:8]}-db"
        argv = ["run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL,
                "-e", f"POSTGRES_USER={user}", "-e", f"POSTGRES_DB={database}"]
        env = {"POSTGRES_PASSWORD": password, **(extra_env or {})}
        for key in env:
            # By name only: the value reaches the container without being in our argv.
            argv += ["-e", key]
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        started.append(name)
        docker("rm", "-f", "-v", name, check=False)  # a leftover of an interrupted run
        subprocess.run(["docker", *argv, PG_IMAGES[major]], check=True, capture_output=True,
                       env={**os.environ, **env})
        wait_ready(name)
        return PgContainer(name, major, user, database, password)

    yield start
    if started:
        docker("rm", "-f", "-v", *started, check=False)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo")


@pytest.fixture
def watcher_env(repo: Repo, engine: str) -> dict[str, str]:
    """The environment of a watcher pointed at the test engine and the test's repository.

    The container patterns default to a name no other container has, so each test chooses its
    own targets.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHER_", "RESTIC_"))}
    env.update({
        "DOCKER_HOST": engine,
        "RESTIC_REPOSITORY": str(repo.path),
        "RESTIC_PASSWORD": repo.password,
        "WATCHER_INIT_REPOSITORY": "true",
        "WATCHER_CONTAINER_PATTERNS": "bwt-nothing-matches-this",
        "WATCHER_HOST": "test-host",
    })
    return env


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], DaemonProcess]]:
    """Factory: starts `backup-watcher run`; any daemon still running at the end is killed."""
    daemons: list[DaemonProcess] = []

    def start(env: dict[str, str]) -> DaemonProcess:
        daemon = DaemonProcess(env, tmp_path / f"daemon-{len(daemons)}.log")
        daemons.append(daemon)
        # Healthy already while reconnecting; a test needs the event stream itself.
        wait_for(lambda: daemon.proc.poll() is not None or (
            _listening(daemon) and "backup_watcher_docker_events_connected 1.0" in daemon.metrics()
            and daemon.events("watching")), 60, "the daemon to watch the event stream")
        assert daemon.proc.poll() is None, daemon.log_path.read_text()
        return daemon

    yield start
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def _listening(daemon: DaemonProcess) -> bool:
    try:
        return daemon.get("/healthz")[0] == 200
    except OSError:
        return False


# About 120 MB of table data: pg_dump needs a couple of seconds to stream it, so a test can interrupt
# it in the middle.
BIG_TABLE = """
CREATE TABLE a_big (id int PRIMARY KEY, payload text);
INSERT INTO a_big SELECT g, repeat(md5(g::text), 12) FROM generate_series(1, 300000) AS g;
"""


def wait_for_copy(db: PgContainer, table: str = "a_big", timeout: float = 120) -> None:
    """Waits until pg_dump is streaming `table`'s rows (its COPY is running)."""
    wait_for(lambda: db.psql(f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY public.{table} %'",
                             database="postgres", check=False) == "1", timeout, f"pg_dump to stream {table}",
             interval=0.02)


def process_command_lines() -> list[str]:
    """The command line of every process on the machine right now (those inside containers too)."""
    lines = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                raw = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                lines.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return lines
