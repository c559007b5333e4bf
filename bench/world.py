"""The run's world: the benchmark's engine, its repositories, its containers and its daemons, built on
the test kit (tests/kit.py: the docker CLI, PgContainer, readiness, Repo, DaemonProcess)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker  # docker-py, a dependency of the watcher (installed in .venv)

from bench.common import command, json_lines, parse_ts, say
from tests import kit

OWNER_LABEL = "backup-watcher-bench.owner"  # value: the pid of the bench run that made the container
HOST = "bench"  # restic --host of every snapshot, WATCHER_HOST
DB_USER = "bench"
FAR_SCHEDULE = "0 3 1 1 *"  # once a year: no scheduled backup during the run


def enter_environment(engine: str, workdir: Path) -> None:
    """Points this process, and so every command it starts (the kit's docker and restic too), at the
    benchmark's engine and a restic cache of its own, without any WATCHER_/RESTIC_ variable of the caller's."""
    for name in [k for k in os.environ if k.startswith(("WATCHER_", "RESTIC_"))]:
        del os.environ[name]
    os.environ["DOCKER_HOST"] = engine
    os.environ["RESTIC_CACHE_DIR"] = str(workdir / "restic-cache")


@dataclass
class World:
    """The engine, work directory, image and secrets of one run, and what it started (to clean up)."""

    engine: str
    workdir: Path
    major: str
    quick: bool
    repo_password_file: Path
    pg_password: str
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    containers: list[str] = field(default_factory=list)
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)
    big_size: int = 0  # pg_database_size of the big database, once filled
    _repos: int = 0

    @property
    def image(self) -> str:
        return kit.PG_IMAGES[self.major]

    def name(self, suffix: str) -> str:
        return f"bwb-{self.run_id}-{suffix}"

    def new_repo(self, label: str, init: bool = True) -> Repo:
        """A repository of its own in the work directory (initialised unless `init` is false)."""
        self._repos += 1
        repo = Repo(self.workdir / f"repo-{self._repos:02d}-{label}", self.repo_password_file)
        if init:
            repo.restic("init")
        return repo

    def watcher_env(self, repo: Repo, patterns: str, **extra: str) -> dict[str, str]:
        """The environment of a watcher command selecting `patterns` and backing up into `repo`."""
        env = repo.command_env()
        env.update({"WATCHER_CONTAINER_PATTERNS": patterns, "WATCHER_INIT_REPOSITORY": "true",
                    "WATCHER_HOST": HOST})
        env.update(extra)
        return env


class Repo(kit.Repo):
    """The kit's repository (the benchmark's own restic calls), plus the environment of the commands it
    measures, which read the password from a file, and what the storage benchmark reads of it."""

    def __init__(self, path: Path, password_file: Path) -> None:
        super().__init__(path, password=password_file.read_text().strip())
        self.password_file = password_file

    def command_env(self) -> dict[str, str]:
        """Environment of a measured command (watcher, bare pipeline): repository and password file."""
        return {**os.environ, "RESTIC_REPOSITORY": str(self.path), "RESTIC_PASSWORD_FILE": str(self.password_file)}

    def du(self) -> int:
        """Bytes the repository takes on disk (packs, index, snapshots, keys), as `du -sb` counts them."""
        return int(command(["du", "-sb", str(self.path)]).stdout.split()[0])

    def raw_stats(self, snapshot: str | None = None) -> dict[str, Any]:
        """`restic stats --mode raw-data` of the repository, or of one snapshot."""
        args = ["--no-lock", "stats", "--json", "--mode", "raw-data"]
        if snapshot:
            args.append(snapshot)
        return dict(json.loads(self.restic(*args).stdout))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# --- containers ---------------------------------------------------------------------------------
def start_pg(world: World, name: str, database: str) -> kit.PgContainer:
    """Starts a PostgreSQL container like the official image's (--network none, the password by name
    only, owner label for clean-up); returns it without waiting for it to be ready."""
    world.containers.append(name)
    kit.docker("run", "-d", "--network", "none", "--name", name, "--label", f"{OWNER_LABEL}={os.getpid()}",
               "-e", f"POSTGRES_USER={DB_USER}", "-e", f"POSTGRES_DB={database}", "-e", "POSTGRES_PASSWORD",
               world.image, env={"POSTGRES_PASSWORD": world.pg_password}, timeout=600)
    return kit.PgContainer(name, world.major, DB_USER, database, world.pg_password)


def remove_containers(world: World, names: Sequence[str]) -> None:
    for start in range(0, len(names), 50):
        kit.docker("rm", "-f", "-v", *names[start:start + 50], check=False, timeout=600)
    gone = set(names)
    world.containers[:] = [c for c in world.containers if c not in gone]


def remove_stale(world: World) -> None:
    """Removes the containers left by an interrupted earlier run (their owner pid is gone)."""
    listed = kit.docker("ps", "-a", "--filter", f"label={OWNER_LABEL}",
                        "--format", f'{{{{.Names}}}} {{{{.Label "{OWNER_LABEL}"}}}}', timeout=600).stdout.split("\n")
    stale = []
    for line in listed:
        if not line.strip():
            continue
        name, _, owner = line.partition(" ")
        try:
            os.kill(int(owner), 0)
        except (ValueError, ProcessLookupError):
            stale.append(name)
        except PermissionError:
            pass
    if stale:
        say(f"removing {len(stale)} container(s) of an interrupted earlier run")
        remove_containers(world, stale)


_local = threading.local()


def api(world: World) -> docker.APIClient:
    """One docker-py client per thread (the events benchmark starts containers from a pool)."""
    client = getattr(_local, "client", None)
    if client is None:
        client = docker.APIClient(base_url=world.engine, version="auto", timeout=120)
        _local.client = client
    return client


# --- daemons ------------------------------------------------------------------------------------
class DaemonLog:
    """Follows a daemon's JSON log file, reading only what was appended since the last poll: the
    events benchmark polls every 5 ms while measuring, so re-reading the whole log (the kit's
    DaemonProcess.events) would cost more with every line and compete with the daemon for the CPU."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.lines: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """Reads the complete lines appended since the last poll; returns them parsed."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        new = json_lines(b"\n".join(complete).decode(errors="replace"))
        self.lines.extend(new)
        return new

    def events(self, event: str) -> list[dict[str, Any]]:
        """Every line so far whose event is `event`."""
        self.poll()
        return [line for line in self.lines if line.get("event") == event]

    def registered(self, ids: Iterable[str], since: int) -> dict[str, float]:
        """container id → timestamp of its target_registered line, among the lines from index `since`."""
        wanted = {i[:12]: i for i in ids}
        self.poll()
        found: dict[str, float] = {}
        for line in self.lines[since:]:
            if line.get("event") == "target_registered" and line.get("container_id") in wanted:
                found.setdefault(wanted[line["container_id"]], parse_ts(line["timestamp"]))
        return found


class Daemon(kit.DaemonProcess):
    """`python -m watcher run` (the kit's DaemonProcess) as the benchmark runs it: yearly schedule,
    concurrency 1, reconcile every hour, no drills; started once it logs `watching`."""

    def __init__(self, world: World, repo: Repo, label: str, patterns: str | None = None, **extra: str) -> None:
        settings = {"WATCHER_SCHEDULE": FAR_SCHEDULE, "WATCHER_CONCURRENCY": "1",
                    "WATCHER_RECONCILE_INTERVAL": "3600", "WATCHER_DRILL_SCHEDULE": "", **extra}
        env = world.watcher_env(repo, patterns or world.name("ev-*"), **settings)
        super().__init__(env, world.workdir / f"daemon-{label}.log")
        world.daemons.append(self.proc)
        self.log = DaemonLog(self.log_path)
        kit.wait_for(lambda: self.proc.poll() is not None or self.log.events("watching"), 120,
                     f"daemon {label} to log `watching`: {self.log_path}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon did not start: {self.log_path.read_text()[-3000:]}")

    def body(self, path: str) -> bytes:
        """The body of GET `path` on the daemon's HTTP port; raises RuntimeError unless it answers 200."""
        code, body = self.get(path, timeout=10)
        if code != 200:
            raise RuntimeError(f"GET {path} answered {code}")
        return body

    def proc_stat(self) -> tuple[float, int, int]:
        """(CPU seconds so far, VmRSS bytes, threads) of the daemon process."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
        rss = threads = 0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        return cpu, rss, threads

