"""Plain helpers shared by the engine tests (tests/integration) and the benchmark (bench/).

The Docker CLI against the engine of $DOCKER_HOST, a PostgreSQL container of it, readiness, a local
restic repository, `python -m watcher` run to completion or as a daemon, polling with a bound.
No fixtures here (they stay in tests/integration/conftest.py, which re-exports these names) and no
import outside the standard library: bench/run's .venv need not have pytest.

Both sides import it as `tests.kit`, with the clone's root on sys.path and no path set by hand:
pytest (default "prepend" import mode) puts the root there to import tests/integration/conftest.py
as `tests.integration.conftest` (tests/ and tests/integration/ are packages), and bench/run runs
`python -m bench` from the root, which puts it first on sys.path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

PG_IMAGES = {"15": "backup-watcher-test/postgres:15", "17": "backup-watcher-test/postgres:17"}
REPO_PASSWORD = "repo-pw 'quoted' $(not-run) ✓"


def docker(*args: str, check: bool = True, input: bytes | None = None, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the docker CLI against the test engine (extra `env` for `-e NAME` passed by name)."""
    done = subprocess.run(["docker", *args], input=input.decode() if input else None, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {done.stderr}")
    return done


@dataclass
class PgContainer:
    """A running PostgreSQL container of the test engine."""

    name: str
    major: str
    user: str
    database: str
    password: str
    docker_host: str | None = None  # another engine than $DOCKER_HOST's (a second "host")

    @property
    def engine_env(self) -> dict[str, str]:
        """The environment that points the docker CLI at this container's engine."""
        return {"DOCKER_HOST": self.docker_host} if self.docker_host else {}

    @property
    def id(self) -> str:
        return docker("inspect", "--format", "{{.Id}}", self.name, env=self.engine_env).stdout.strip()

    def psql(self, sql: str, database: str | None = None, user: str | None = None, check: bool = True,
             timeout: float = 120) -> str:
        """Runs SQL (psql -At, ON_ERROR_STOP) inside the container over its local socket; returns its
        output (command tags included). The benchmark's big batches need more than the default `timeout`."""
        done = docker("exec", "-i", "-e", "PGPASSWORD", self.name, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
                      "-U", user or self.user, "-d", database or self.database,
                      input=sql.encode(), check=check, env={"PGPASSWORD": self.password, **self.engine_env},
                      timeout=timeout)
        return done.stdout.strip()

    def require_password_locally(self) -> None:
        """Makes local socket connections ask for a password (the image trusts them by default)."""
        docker("exec", self.name, "sh", "-c",
               "sed -i 's/^local\\(.*\\)trust$/local\\1scram-sha-256/' \"$PGDATA/pg_hba.conf\"")
        self.psql("SELECT pg_reload_conf()")
        done = docker("exec", self.name, "psql", "-X", "-U", self.user, "-d", self.database, "-w", "-c", "select 1",
                      check=False)
        assert done.returncode != 0, "local connections still work without a password"


def wait_ready(name: str, timeout: float = 60, docker_host: str | None = None) -> None:
    """Waits until the container's final PostgreSQL serves: it listens on TCP, which the entrypoint's
    temporary initdb server (listen_addresses='') does not. Whatever runs as PID 1 (`--init`). On the
    engine of `docker_host` (default $DOCKER_HOST)."""
    env = {"DOCKER_HOST": docker_host} if docker_host else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = docker("exec", name, "sh", "-c",
                      "psql -X -At -U \"${POSTGRES_USER:-postgres}\" -d postgres "
                      "-c \"SELECT current_setting('listen_addresses') <> ''\"", check=False, env=env)
        if done.returncode == 0 and done.stdout.strip() == "t":
            return
        time.sleep(0.2)
    logs = docker("logs", name, check=False, env=env)
    raise AssertionError(f"{name} did not become ready: {logs.stdout[-2000:]} {logs.stderr[-2000:]}")


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

    def snapshots(self, *, include_globals: bool = False) -> list[dict[str, Any]]:
        """Every database snapshot in the repository (with `include_globals` the containers' globals
        snapshots too), as restic lists it (not through the watcher): JSON, hence Any."""
        if not (self.path / "config").exists():
            return []
        # --no-lock: a daemon's prune may hold the exclusive lock; a listing during it may see a
        # pack vanish, so one retry.
        for attempt in range(3):
            done = self.restic("--no-lock", "snapshots", "--json", check=attempt == 2)
            if done.returncode == 0:
                break
            time.sleep(1)
        listed = list(json.loads(done.stdout or "[]"))
        return [s for s in listed if include_globals or "globals" not in (s.get("tags") or [])]

    def snapshots_of(self, container: str) -> list[dict[str, Any]]:
        """The database snapshots of one container."""
        return [s for s in self.snapshots() if f"container={container}" in (s.get("tags") or [])]

    def globals_of(self, container: str) -> list[dict[str, Any]]:
        """The globals snapshots of one container."""
        return [s for s in self.snapshots(include_globals=True)
                if f"container={container}" in (s.get("tags") or []) and "globals" in s["tags"]]


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
        """Every whole log line so far, parsed (a line that is not JSON fails the test). A last line without
        its newline is one the daemon is still writing (a long one comes in several writes): left for later."""
        if not self._log.closed:
            self._log.flush()
        parsed = []
        text = self.log_path.read_text()
        whole = text if text.endswith("\n") or self.proc.poll() is not None else text[:text.rfind("\n") + 1]
        for raw in whole.splitlines():
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


def event_time(line: dict[str, object]) -> datetime:
    """When the daemon wrote a log line (its `timestamp`)."""
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Polls `predicate` until it returns something truthy; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RestServer:
    """restic's rest-server on 127.0.0.1 over `path`, with one htpasswd user of its own (a copy's backend, SPEC §12)
    or, without a `user`, no authentication; `stop` (or `kill`) and `start` again keep its port and data (a backend
    that goes down and comes back). Two servers over one `path` serve the same repositories (one of them
    `append_only`: a database host's credentials and the maintenance host's). Every server started is listed in
    `RestServer.running` until stopped (conftest stops them after each test)."""

    running: list[RestServer] = []  # noqa: RUF012 - the one registry of live servers, shared on purpose

    def __init__(self, path: Path, user: str = "", password: str = "", *, append_only: bool = False) -> None:
        import base64
        import hashlib
        import shutil

        binary = shutil.which("rest-server")
        assert binary is not None, "rest-server is missing: bring the test ground up (testground/up.sh)"
        self.binary, self.path, self.user, self.password = binary, path, user, password
        self.append_only = append_only
        self.port = free_port()
        path.mkdir(parents=True, exist_ok=True)
        self.htpasswd: Path | None = None
        if user:
            digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
            self.htpasswd = path.parent / f"{path.name}.htpasswd"
            self.htpasswd.write_text(f"{user}:{{SHA}}{digest}\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """The restic repository URL (no credentials in it: they travel in RESTIC_REST_USERNAME/_PASSWORD)."""
        return self.repository_url("repo")

    def repository_url(self, name: str) -> str:
        """The URL of another repository `name` on this server (one server, several repositories)."""
        return f"rest:http://127.0.0.1:{self.port}/{name}"

    @property
    def credentials(self) -> dict[str, str]:
        """restic's environment for this server's user (empty without authentication)."""
        return {"RESTIC_REST_USERNAME": self.user, "RESTIC_REST_PASSWORD": self.password} if self.user else {}

    def start(self) -> None:
        """Starts serving and waits until it listens."""
        import socket

        auth = ["--htpasswd-file", str(self.htpasswd)] if self.htpasswd else ["--no-auth"]
        argv = [self.binary, "--path", str(self.path), "--listen", f"127.0.0.1:{self.port}", *auth,
                *(["--append-only"] if self.append_only else [])]
        with (self.path.parent / f"{self.path.name}-{self.port}.log").open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(lambda: self.proc is None or self.proc.poll() is not None or listening(), 30, "rest-server")
        assert self.proc.poll() is None, "rest-server did not start"
        RestServer.running.append(self)

    def stop(self) -> None:
        """Stops serving (the data stays)."""
        self._end(kill=False)

    def kill(self) -> None:
        """Kills it (SIGKILL: a backend that crashes mid-request); the data stays."""
        self._end(kill=True)

    def _end(self, *, kill: bool) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None
        if self in RestServer.running:
            RestServer.running.remove(self)

    def size(self) -> int:
        """Bytes of the repository's files on disk."""
        return sum(file.stat().st_size for file in self.path.rglob("*") if file.is_file())

    def env_file(self, where: Path) -> Path:
        """A WATCHER_COPY_<NAME>_ENV_FILE with this server's user and password."""
        where.write_text(f"RESTIC_REST_USERNAME={self.user}\nRESTIC_REST_PASSWORD={self.password}\n")
        return where


class Webhook:
    """A JSON endpoint on 127.0.0.1 (Apprise's json://) that keeps every notification posted to it, in order.

    `url` carries `user` and `password` when given (Apprise sends them as basic auth) and ends in `path`:
    what a test checks for secrets that must not leak. `close` stops it.
    """

    def __init__(self, user: str = "", password: str = "", path: str = "hook") -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []  # type: list[dict[str, object]]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        login = f"{user}:{password}@" if user else ""
        self.url = f"json://{login}127.0.0.1:{self.server.server_address[1]}/{path}"

    def titles(self) -> list[str]:
        """The title of every notification so far."""
        return [str(item["title"]) for item in self.received]

    def types(self) -> dict[str, str]:
        """The Apprise type each notification arrived with, by its title."""
        return {str(item["title"]): str(item["type"]) for item in self.received}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
