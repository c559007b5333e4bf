"""Faults at a chosen point of a dump's stream, for the fault matrix (SPEC §11): a PostgreSQL container whose
dump takes seconds, where the stream is, and what must hold after a fault (no process, no lock, a sound
repository, a next run that heals). Used by test_fault_matrix.py (the test engine) and test_fault_dockerd.py
(the second engine, restarted).

Where the stream is: the exec helper passes the dump to restic, so its written bytes (/proc/PID/io `wchar`)
over the dump's size is the fraction streamed. The database container runs on a small CPU quota while a
fault is injected, so that a 20 MB dump takes seconds and 10 %, 50 % and 90 % are reachable. The helper
holds its first READ_AHEAD_BYTES (4 MiB) in memory until restic reads (watcher.handoff), so the 10 % point
lands where restic starts reading: about 20 % of the dump has left the container then.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.conftest import TEST_HOST, process_command_lines
from tests.kit import REPO_PASSWORD, PgContainer, docker, run_watcher, wait_for

# About 20 MB of hex text that restic cannot shrink much: uploads happen along the whole stream.
TABLE = """
CREATE TABLE payload (id int PRIMARY KEY, body text);
INSERT INTO payload SELECT g, md5(random()::text) || md5(random()::text) || md5(random()::text)
  || md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
  || md5(random()::text) FROM generate_series(1, 80000) AS g;
"""
# The share of a CPU the container gets while a fault is injected: the dump then takes a few seconds.
SLOW_CPUS = "0.1"


@dataclass
class Source:
    """A PostgreSQL container (of any engine: its PgContainer says which), with the size of its database's dump."""

    db: PgContainer
    dump_bytes: int

    @classmethod
    def filled(cls, db: PgContainer) -> Source:
        """`db` with TABLE created in it and its dump measured."""
        db.psql(TABLE)
        return cls(db, dump_size(db))

    @contextlib.contextmanager
    def slowed(self) -> Iterator[None]:
        """The container on a small CPU quota (a dump of seconds) for the block; lifted after it."""
        docker("update", "--cpus", SLOW_CPUS, self.db.name, env=self.db.engine_env)
        try:
            yield
        finally:
            docker("update", "--cpus", "0", self.db.name, env=self.db.engine_env)


def dump_size(db: PgContainer) -> int:
    """The bytes of the database's dump as the watcher makes it (under WATCHER_DUMP_ORDER=key the archive is
    not pg_dump's own byte for byte), read from a backup into a throwaway repository."""
    with tempfile.TemporaryDirectory() as scratch:
        repository = str(Path(scratch) / "repo")
        done = run_watcher(["backup", db.name], watcher_env(repository, Source(db, 0)), timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        snapshots = json.loads(restic(repository, "snapshots", "--json", "--tag", f"database={db.database}").stdout)
        return int(snapshots[0]["summary"]["total_bytes_processed"])


def watcher_env(repository: str, source: Source, **settings: str) -> dict[str, str]:
    """A watcher's environment for `source`'s container (on its engine) and `repository`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHER_", "RESTIC_"))}
    return {**env, **source.db.engine_env, "RESTIC_REPOSITORY": repository, "RESTIC_PASSWORD": REPO_PASSWORD,
            "RESTIC_PACK_SIZE": "4", "WATCHER_INIT_REPOSITORY": "true", "WATCHER_HOST": TEST_HOST,
            "WATCHER_CONTAINER_PATTERNS": source.db.name, **settings}


def restic(repository: str, *args: str) -> subprocess.CompletedProcess[str]:
    """restic ARGS on `repository` (the test's password), to completion."""
    return subprocess.run(["restic", *args], capture_output=True, text=True, errors="replace", timeout=300,
                          env={**os.environ, "RESTIC_REPOSITORY": repository, "RESTIC_PASSWORD": REPO_PASSWORD})


def dumps(repository: str, container: str) -> list[dict[str, object]]:
    """The database snapshots (not the globals') of a container."""
    done = restic(repository, "--no-lock", "snapshots", "--json", "--tag", f"container={container}")
    assert done.returncode == 0, done.stderr
    return [snap for snap in json.loads(done.stdout or "[]") if "globals" not in snap["tags"]]


def locks(repository: str) -> str:
    """The ids of the repository's locks, one a line ('' when there is none)."""
    return restic(repository, "list", "locks", "--no-lock").stdout.strip()


def leftovers(db: PgContainer, repository: str) -> list[str]:
    """pg_dump still in the container, exec helpers that name it, and restic processes of `repository`."""
    container_id = db.id
    # restic's argv holds the helper's (--stdin-from-command); the container's shim names its id too.
    found = [line for line in process_command_lines() if container_id in line and "watcher.dockerexec" in line]
    top = docker("top", db.name, "-eo", "comm", check=False, env=db.engine_env).stdout.split()
    return found + [comm for comm in top if comm in ("pg_dump", "pg_dumpall")] + restic_processes(repository)


def lock_holders_alive(repository: str) -> list[int]:
    """The processes that hold a lock of `repository` and still exist (a zombie too: restic takes the lock of
    an unreaped process for a live one, and here a killed watcher's children wait for PID 1 to reap them)."""
    alive = []
    for lock in locks(repository).split():
        shown = restic(repository, "cat", "lock", lock, "--no-lock")
        if shown.returncode == 0 and Path(f"/proc/{json.loads(shown.stdout)['pid']}").exists():
            alive.append(int(json.loads(shown.stdout)["pid"]))
    return alive


def restic_processes(repository: str) -> list[str]:
    """restic processes (of any watcher: a listing, a backup) working on `repository`."""
    wanted = f"RESTIC_REPOSITORY={repository}".encode()
    found = []
    for entry in os.scandir("/proc"):
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and Path(entry.path, "comm").read_text().strip() == "restic" and \
                    wanted in Path(entry.path, "environ").read_bytes().split(b"\0"):
                found.append(f"restic (pid {entry.name})")
    return found


def helper_of_the_dump(db: PgContainer) -> int | None:
    """The pid of the process that streams `db`'s pg_dump to restic (None while there is none)."""
    container_id = db.id
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            # The exec helper, or under WATCHER_DUMP_ORDER=key the key-ordered dump.
            helper = any(name in argv[:3] for name in (b"watcher.dockerexec", b"watcher.keydump"))
            if helper and container_id.encode() in argv and b"pg_dump" in argv:
                return int(entry.name)
    return None


def streamed(pid: int) -> int | None:
    """Bytes the exec helper `pid` has written so far (None once it is gone)."""
    try:
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    return next(int(line.split()[1]) for line in io.splitlines() if line.startswith("wchar:"))


def wait_for_point(source: Source, fraction: float, watcher: subprocess.Popen[Any] | None = None) -> None:
    """Returns once the dump's exec helper has passed `fraction` of the dump on to restic; fails at once when
    the `watcher` that runs it has ended."""
    def helper() -> int | None:
        if watcher is not None and watcher.poll() is not None:
            out, err = watcher.communicate()
            raise AssertionError(f"the watcher ended before the dump streamed: {out} {err}")
        return helper_of_the_dump(source.db)

    pids: list[int] = []

    def reached() -> bool:
        if not pids:
            found = helper()
            if found is None:
                return False
            pids.append(found)
        written = streamed(pids[-1])
        if written is None:
            # That helper ended before its point: the watcher's first try, before it initialised the repository
            # (an early-started helper ends with restic's exit 10), or the dump ended (helper() then says so).
            pids.clear()
            return False
        return written >= goal

    goal = int(source.dump_bytes * fraction)
    wait_for(reached, 120, f"{fraction:.0%} of the dump", interval=0.005)


def start_backup(source: Source, env: dict[str, str]) -> subprocess.Popen[str]:
    """`backup-watcher backup` of the source's container, running."""
    return subprocess.Popen([sys.executable, "-m", "watcher", "backup", source.db.name], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def assert_clean(source: Source, repository: str) -> None:
    """Nothing of the dump left running, no lock, and a repository that `restic check` finds sound."""
    db = source.db
    wait_for(lambda: not leftovers(db, repository), 30, "no process of the dump left", interval=0.2)
    assert locks(repository) == "", "a lock was left"
    check = restic(repository, "check")
    restics = subprocess.run(["ps", "-C", "restic", "-o", "pid,lstart,args"], capture_output=True, text=True).stdout
    assert check.returncode == 0 and "no errors were found" in check.stdout, check.stdout + check.stderr + restics


def assert_clean_and_heals(source: Source, repository: str, before: int, env: dict[str, str]) -> None:
    """assert_clean, and a next run (the quota lifted) that adds one snapshot of the whole dump."""
    db = source.db
    assert_clean(source, repository)
    healed = run_watcher(["backup", db.name], env, timeout=300)
    assert healed.returncode == 0, healed.stdout + healed.stderr
    after = dumps(repository, db.name)
    assert len(after) == before + 1
    assert_whole(repository, max(after, key=lambda snap: str(snap["time"])), source)
    assert locks(repository) == ""


def assert_whole(repository: str, snapshot: dict[str, object], source: Source) -> None:
    """The snapshot holds the whole dump (its restore size is the dump's)."""
    stats = restic(repository, "stats", "--json", "--mode", "restore-size", str(snapshot["id"]))
    assert json.loads(stats.stdout)["total_size"] == source.dump_bytes, "the snapshot holds the whole dump"
