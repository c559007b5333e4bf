"""Fixtures on the real test ground: the private Docker engine, PostgreSQL containers, restic.

Run through `scripts/test`, which brings the test ground up and exports DOCKER_HOST and PATH.
Every container started here has `--network none` and a name starting with `bwt-` or the name
the test asks for, and is removed when its test ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadGroupScheduling

# The plain helpers live in tests/kit.py (the benchmark uses them too); re-exported here for the test
# modules that import them from this file (__all__: an explicit re-export, as mypy --strict wants).
from tests.integration.mariadb_kit import start_mariadb, start_redis
from tests.kit import (
    PG_IMAGES,
    REPO_PASSWORD,
    DaemonProcess,
    PgContainer,
    Repo,
    Webhook,
    docker,
    event_time,
    free_port,
    run_watcher,
    wait_for,
    wait_ready,
)

__all__ = [
    "BIG_TABLE",
    "PG_IMAGES",
    "REPO_PASSWORD",
    "TEST_HOST",
    "TEST_LABEL",
    "DaemonProcess",
    "PgContainer",
    "Repo",
    "SecondEngine",
    "StartDaemon",
    "StartPg",
    "Webhook",
    "docker",
    "event_time",
    "free_port",
    "process_command_lines",
    "run_watcher",
    "start_mariadb",
    "start_redis",
    "wait_for",
    "wait_for_copy",
    "wait_ready",
]

TEST_LABEL = "backup-watcher-test.owner=pytest"
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
    # The second engine (a session fixture) is started once per worker that needs it: one worker.
    "test_disaster_recovery.py": "second-engine",
    "test_fleet.py": "second-engine",
    "test_fault_dockerd.py": "second-engine",
    # One image build (a module fixture) for both image tests, and the heaviest CPU load on one worker.
    "test_image.py": "image",
    # Its cases throttle database containers and time faults against the stall bound: side by side on
    # several workers they starve each other (a throttled dump silent for longer than the bound).
    "test_fault_matrix.py": "fault-matrix",
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


@contextmanager
def engine_lock(*, exclusive: bool) -> Iterator[None]:
    """Holds the test ground's lock (in $BW_TESTGROUND_RUN, shared by every test run on this machine): an
    `alone` test holds it exclusively, any other engine test shared, so that `alone` also means alone
    beside the other clones' runs on the same engine. A waiting exclusive holder goes first: it holds the
    turnstile that every newcomer passes. Without BW_TESTGROUND_RUN (no scripts/test), no lock.
    """
    run = os.environ.get("BW_TESTGROUND_RUN")
    if not run:
        yield
        return
    with open(Path(run, "tests.turnstile"), "a") as turnstile, open(Path(run, "tests.lock"), "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def engine_share(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every engine test holds the test ground's lock for its whole run, exclusively if marked `alone`."""
    with engine_lock(exclusive=request.node.get_closest_marker("alone") is not None):
        yield


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


# The factory's type, for the tests' signatures.
StartPg = Callable[..., PgContainer]


@pytest.fixture
def start_pg(engine: str) -> Iterator[StartPg]:
    """Factory: starts a PostgreSQL container (--network none), waits until it is ready, removes it after.

    `docker_host` starts it on another engine (the `second_engine` fixture's) instead of $DOCKER_HOST's.
    """
    started: list[tuple[str, dict[str, str]]] = []

    def start(name: str | None = None, major: str = "17", *, user: str = "app", database: str = "appdb",
              password: str = "db-pw", labels: dict[str, str] | None = None,
              extra_env: dict[str, str] | None = None, docker_args: tuple[str, ...] = (),
              image: str | None = None, ready_timeout: float = 60, docker_host: str | None = None) -> PgContainer:
        name = name or f"bwt-{uuid.uuid4().hex[:8]}-db"
        on = {"DOCKER_HOST": docker_host} if docker_host else {}
        argv = ["run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL, *docker_args,
                "-e", f"POSTGRES_USER={user}", "-e", f"POSTGRES_DB={database}"]
        env = {"POSTGRES_PASSWORD": password, **(extra_env or {})}
        for key in env:
            # By name only: the value reaches the container without being in our argv.
            argv += ["-e", key]
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        started.append((name, on))
        docker("rm", "-f", "-v", name, check=False, env=on)  # a leftover of an interrupted run
        subprocess.run(["docker", *argv, image or PG_IMAGES[major]], check=True, capture_output=True,
                       env={**os.environ, **env, **on})
        wait_ready(name, ready_timeout, docker_host=docker_host)
        return PgContainer(name, major, user, database, password, docker_host)

    yield start
    for name, on in started:
        docker("rm", "-f", "-v", name, check=False, env=on)


# --- a second engine: another "host" beside the test engine (TESTING.md) ------------------------------------
class SecondEngine:
    """A second dockerd with its own data root and socket (`host`, a DOCKER_HOST), which a test may restart."""

    def __init__(self, data_root: Path, state: Path) -> None:
        self.data_root, self.state = data_root, state
        self.host = f"unix://{state}/docker.sock"
        self.env = {"DOCKER_HOST": self.host}  # points the docker CLI at this engine
        self.proc = _start_second_engine(data_root, state, self.host)

    def restart(self, timeout: float = 60) -> None:
        """Stops this dockerd as `systemctl restart docker` would (SIGTERM: it stops its containers, which
        come back by their restart policy) and starts it again on the same data root and socket; returns
        once it answers. Raises AssertionError when it does not stop or answer within `timeout` seconds."""
        self.stop(timeout)
        self.proc = _start_second_engine(self.data_root, self.state, self.host)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM, then SIGKILL when it has not exited within `timeout` seconds."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"the second dockerd did not stop within {timeout}s") from None


@pytest.fixture(scope="session")
def second_engine(engine: str) -> Iterator[SecondEngine]:
    """A second dockerd (SecondEngine: its DOCKER_HOST is `.host`) holding the PostgreSQL images.

    Started like testground/up.sh's engine (no bridge, no iptables), its data root cached under
    $BW_TESTGROUND between runs (images are loaded from the first engine only when missing or different),
    and stopped at the end of the session. One session at a time uses it: others wait on its lock.
    """
    ground, run = os.environ.get("BW_TESTGROUND"), os.environ.get("BW_TESTGROUND_RUN")
    if not ground or not run:
        pytest.fail("the test ground is not up: run the tests through scripts/test")
    state = Path(run, "engine-b")
    state.mkdir(parents=True, exist_ok=True)
    with open(Path(run, "engine-b.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = SecondEngine(Path(ground, "docker-b"), state)
        try:
            for tag in PG_IMAGES.values():
                _copy_image(tag, second.host)
            yield second
        finally:
            rows = docker("ps", "-aq", "--filter", f"label={TEST_LABEL}", check=False, env=second.env)
            if rows.stdout.split():
                docker("rm", "-f", "-v", *rows.stdout.split(), check=False, env=second.env)
            with contextlib.suppress(AssertionError):
                second.stop()


def _start_second_engine(data_root: Path, state: Path, host: str) -> subprocess.Popen[bytes]:
    """Starts the second dockerd and waits (60 s at most) until it answers."""
    pidfile = state / "dockerd.pid"
    if pidfile.exists():  # a daemon an interrupted session left running
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            wait_for(lambda: not pidfile.exists(), 60, "the left-over second dockerd to stop")
    data_root.mkdir(parents=True, exist_ok=True)
    with open(state / "dockerd.log", "ab") as log:
        proc = subprocess.Popen(
            ["dockerd", "--data-root", str(data_root), "--exec-root", str(state / "exec"), "--host", host,
             "--pidfile", str(pidfile), "--bridge=none", "--iptables=false", "--ip-masq=false"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or docker("info", check=False, timeout=10,
                                                           env={"DOCKER_HOST": host}).returncode == 0,
                 60, "the second dockerd to answer")
    except AssertionError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise AssertionError(f"the second dockerd exited: {(state / 'dockerd.log').read_text()[-2000:]}")
    return proc


def _copy_image(tag: str, host: str) -> None:
    """`docker save TAG | DOCKER_HOST=host docker load`, unless that engine has the same image already."""
    wanted = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    there = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False, env={"DOCKER_HOST": host})
    if there.returncode == 0 and there.stdout.strip() == wanted:
        return
    save = subprocess.Popen(["docker", "image", "save", tag], stdout=subprocess.PIPE)
    load = subprocess.run(["docker", "image", "load"], stdin=save.stdout, capture_output=True, timeout=600,
                          env={**os.environ, "DOCKER_HOST": host})
    assert save.stdout is not None
    save.stdout.close()
    assert save.wait(timeout=600) == 0 and load.returncode == 0, f"copying {tag} failed: {load.stderr!r}"


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
    """Waits until the dump is streaming `table`'s rows: pg_dump's COPY, or (WATCHER_DUMP_ORDER=key, a
    large keyed table) the key session's COPY in key order."""
    query = (f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY public.{table} %' "
             f"OR query LIKE 'COPY (SELECT % FROM public.{table} ORDER BY %'")
    wait_for(lambda: db.psql(query, database="postgres", check=False) == "1", timeout,
             f"pg_dump to stream {table}", interval=0.02)


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


@pytest.fixture(autouse=True)
def _stop_rest_servers() -> Iterator[None]:
    """Every rest-server a test started (tests.kit.RestServer) is stopped after it."""
    from tests.kit import RestServer

    yield
    for server in list(RestServer.running):
        server.stop()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    """A JSON endpoint for Apprise (tests.kit.Webhook), closed after the test."""
    hook = Webhook()
    yield hook
    hook.close()
