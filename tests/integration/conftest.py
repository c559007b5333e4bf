"""Fixtures on the real test ground: the private Docker engine, PostgreSQL containers, restic.

Run through `scripts/test`, which brings the test ground up and exports DOCKER_HOST and PATH.
Every container started here has `--network none` and a name starting with `bwt-` or the name
the test asks for, and is removed when its test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadGroupScheduling

PG_IMAGES = {"15": "backup-watcher-test/postgres:15", "17": "backup-watcher-test/postgres:17"}
TEST_LABEL = "backup-watcher-test.owner=pytest"
REPO_PASSWORD = "repo-pw 'quoted' $(not-run) ✓"
# The watchers' host identity (WATCHER_HOST): one per pytest-xdist worker, because a watcher removes every
# drill container of its own identity that it finds when it starts, and would take those of a drill
# running on another worker for its own leftovers.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEST_HOST = f"test-host-{WORKER}" if WORKER else "test-host"


# --- running beside each other (pytest-xdist) ------------------------------------------------------------
# scripts/test runs the engine tests in two phases: BW_TEST_PHASE=parallel, on several xdist workers with
# `--dist loadgroup`, runs every test not marked `alone`; BW_TEST_PHASE=alone then runs those one at a
# time. Without BW_TEST_PHASE every selected test runs (a plain `pytest tests/integration`, serially).
PHASES = ("parallel", "alone")
# Modules whose tests would disturb each other's when run at the same time: all of a group runs on one
# worker, one test after the other.
XDIST_GROUPS = {
    # A one-shot `backup` with the pattern scalr-*-db (test_bad_input, test_discovery_live) backs up every
    # running container of such a name, and these modules all start such containers.
    "test_bad_input.py": "scalr-names",
    "test_discovery_live.py": "scalr-names",
    "test_roundtrip.py": "scalr-names",
    "test_secrets.py": "scalr-names",
    # One image build (a module fixture) for both image tests, and the heaviest CPU load on one worker.
    "test_image.py": "image",
}


class ModuleGroupScheduling(LoadGroupScheduling):
    """xdist's loadgroup, with the groups of XDIST_GROUPS: a work unit is a group's tests or a single test.

    (xdist 3.8 marks a test's group by appending it to the test's node id, which pytest 9.2's node ids
    no longer allow: its own xdist_group marker has no effect there.)
    """

    def _split_scope(self, nodeid: str) -> str:
        group = XDIST_GROUPS.get(Path(nodeid.split("::", 1)[0]).name)
        return f"group:{group}" if group else super()._split_scope(nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> LoadGroupScheduling | None:
    """The scheduler of `--dist loadgroup` (scripts/test): ModuleGroupScheduling."""
    return ModuleGroupScheduling(config, log) if config.getvalue("dist") == "loadgroup" else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keeps to the tests of this run's phase, the `slow` ones first.

    Slow first: xdist hands out work in this order, and a long test started last would hold the whole run
    while the other workers idle.
    """
    phase = os.environ.get("BW_TEST_PHASE", "")
    if phase and phase not in PHASES:
        raise pytest.UsageError(f"BW_TEST_PHASE={phase!r}: expected one of {', '.join(PHASES)} or nothing")
    kept = [item for item in items
            if not phase or (item.get_closest_marker("alone") is not None) == (phase == "alone")]
    if len(kept) < len(items):
        kept_ids = {id(item) for item in kept}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
    kept.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise
    items[:] = kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fails an `alone` test that an xdist worker was given: other tests run beside it there."""
    if WORKER and item.get_closest_marker("alone") is not None:
        pytest.fail("this test must run alone (marker `alone`): run it through scripts/test, or without -n",
                    pytrace=False)


def docker(*args: str, check: bool = True, input: bytes | None = None, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the docker CLI against the test engine (extra `env` for `-e NAME` passed by name)."""
    done = subprocess.run(["docker", *args], input=input.decode() if input else None, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {done.stderr}")
    return done


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


@dataclass
class PgContainer:
    """A running PostgreSQL container of the test engine."""

    name: str
    major: str
    user: str
    database: str
    password: str

    @property
    def id(self) -> str:
        return docker("inspect", "--format", "{{.Id}}", self.name).stdout.strip()

    def psql(self, sql: str, database: str | None = None, user: str | None = None, check: bool = True) -> str:
        """Runs SQL (psql -At, ON_ERROR_STOP) inside the container over its local socket."""
        done = docker("exec", "-i", "-e", "PGPASSWORD", self.name, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
                      "-U", user or self.user, "-d", database or self.database,
                      input=sql.encode(), check=check, env={"PGPASSWORD": self.password})
        return done.stdout.strip()

    def require_password_locally(self) -> None:
        """Makes local socket connections ask for a password (the image trusts them by default)."""
        docker("exec", self.name, "sh", "-c",
               "sed -i 's/^local\\(.*\\)trust$/local\\1scram-sha-256/' \"$PGDATA/pg_hba.conf\"")
        self.psql("SELECT pg_reload_conf()")
        done = docker("exec", self.name, "psql", "-X", "-U", self.user, "-d", self.database, "-w", "-c", "select 1",
                      check=False)
        assert done.returncode != 0, "local connections still work without a password"


def wait_ready(name: str, timeout: float = 60) -> None:
    """Waits until PostgreSQL is PID 1 (initdb finished) and accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = docker("exec", name, "sh", "-c",
                      "tr '\\0' ' ' </proc/1/cmdline | grep -q '^postgres' && pg_isready -q", check=False)
        if done.returncode == 0:
            return
        time.sleep(0.2)
    logs = docker("logs", name, check=False)
    raise AssertionError(f"{name} did not become ready: {logs.stdout[-2000:]} {logs.stderr[-2000:]}")


# The factory's type, for the tests' signatures.
StartPg = Callable[..., PgContainer]


@pytest.fixture
def start_pg(engine: str) -> Iterator[StartPg]:
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


@dataclass
class Repo:
    """A local restic repository for one test."""

    path: Path
    password: str = REPO_PASSWORD
    env: dict[str, str] = field(default_factory=dict)

    def restic(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["restic", *args], capture_output=True, text=True, errors="replace",
                              env={**os.environ, "RESTIC_REPOSITORY": str(self.path),
                                   "RESTIC_PASSWORD": self.password}, timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"restic {' '.join(args)} failed: {done.stderr}")
        return done

    def snapshots(self) -> list[dict[str, Any]]:
        """Every snapshot in the repository, as restic lists it (not through the watcher): JSON, hence Any."""
        if not (self.path / "config").exists():
            return []
        # --no-lock: a daemon's prune may hold the exclusive lock; a listing during it may see a
        # pack vanish, so one retry.
        for attempt in range(3):
            done = self.restic("--no-lock", "snapshots", "--json", check=attempt == 2)
            if done.returncode == 0:
                break
            time.sleep(1)
        return list(json.loads(done.stdout or "[]"))

    def snapshots_of(self, container: str) -> list[dict[str, Any]]:
        return [s for s in self.snapshots() if f"container={container}" in (s.get("tags") or [])]


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
        "WATCHER_HOST": TEST_HOST,
    })
    return env


def run_watcher(args: Sequence[str], env: dict[str, str], *, timeout: float = 600,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `python -m watcher ARGS` to completion (stdin closed unless `input` is given)."""
    return subprocess.run([sys.executable, "-m", "watcher", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaemonProcess:
    """`backup-watcher run` as a real process, with its JSON log and its HTTP endpoints."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**env, "WATCHER_METRICS_ADDRESS": f"127.0.0.1:{self.port}"}
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "watcher", "run"], env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def status(self) -> list[dict[str, object]]:
        """The daemon's /status rows ([] while it is not listening yet)."""
        try:
            code, body = self.get("/status")
        except OSError:
            return []
        return json.loads(body) if code == 200 else []

    def row(self, name: str) -> dict[str, object] | None:
        return next((r for r in self.status() if r["target"] == name), None)

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def lines(self) -> list[dict[str, object]]:
        """Every log line so far, parsed (a line that is not JSON fails the test)."""
        if not self._log.closed:
            self._log.flush()
        parsed = []
        for raw in self.log_path.read_text().splitlines():
            if raw.strip():
                try:
                    parsed.append(json.loads(raw))
                except ValueError:
                    raise AssertionError(f"log line is not JSON: {raw!r}") from None
        return parsed

    def events(self, event: str, **fields: object) -> list[dict[str, object]]:
        return [line for line in self.lines()
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())]

    def stop(self, sig: int = 15, timeout: float = 120) -> int:
        """Sends `sig` and waits; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._log.close()
        return code


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Polls `predicate` until it returns something truthy; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# The factory's type, for the tests' signatures.
StartDaemon = Callable[[dict[str, str]], DaemonProcess]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
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
