"""A backup that meets its repository locked exclusively by another restic process (a `restic prune` from a
maintenance host) waits the lock out and succeeds, holding nothing in the database while it waits.

The dump's helper starts before restic (issue 20's early start) and restic takes its pipe only once it has
the repository's lock (--retry-lock, WATCHER_LOCK_RETRY). Until then the dump is read ahead into memory: one
that fits (watcher.handoff.READ_AHEAD_BYTES) ends there whole, its exec and sessions gone; a larger one that
restic has not taken READ_AHEAD_WAIT_S after the read-ahead filled is abandoned (its exec and sessions end)
and dumped anew once restic takes it. Either way no pg_dump, snapshot or table lock stays open in the database
for as long as the repository's lock lasts, and the stall bound (WATCHER_STALL_TIMEOUT, here shorter than the
lock) does not fail the backup. Both dump orders, a dump that fits and one that does not, and the same path
without any lock.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from tests.integration.conftest import PgContainer, Repo, StartPg, docker, wait_for
from tests.integration.test_key_order import restic_dump, restore_into
from watcher.handoff import READ_AHEAD_BYTES, READ_AHEAD_WAIT_S
from watcher.stall import STALL_BOUND_NAMES

pytestmark = [pytest.mark.engine, pytest.mark.slow]

STALL_S = 20
# The first check comes well after a dump larger than the read-ahead was abandoned (it fills in a second or
# two, then waits READ_AHEAD_WAIT_S) and still before the stall bound, at which a dump blocked on restic's
# pipe ends by itself (and so would show nothing held from then on).
CHECK_AT_S = READ_AHEAD_WAIT_S + 8
# The lock outlasts the stall bound and its watchdog's look interval (a tenth of the bound), with room.
RELEASE_AT_S = STALL_S + 8

# A bigint key: the key order (WATCHER_DUMP_ORDER=key) applies to the table. About 200 bytes a row in the
# dump (custom format, --compress=0): 15 000 rows (3 MB) fit in the read-ahead (4 MiB), 60 000 (12 MB) do not.
TABLE = """
CREATE TABLE t (id bigint PRIMARY KEY, payload text NOT NULL);
INSERT INTO t SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, {rows}) AS g;
"""
ROWS = {"small": 15_000, "large": 60_000}
FINGERPRINT = "SELECT count(*) || ' ' || md5(string_agg(t::text, ',' ORDER BY id)) FROM t"

# (dump order, size, repository locked)
# The physical order's small dump takes the same path as the key order's (watcher.handoff.Destination).
CASES = [("key", "small", True), ("key", "large", True), ("physical", "large", True), ("key", "small", False)]


class RepositoryLock:
    """An exclusive lock on `repo` held by another live restic process of this host: never stale to restic.

    `restic key passwd` takes the exclusive lock before it reads the new password from its stdin (restic
    0.18), and holds it for as long as that stays open; closing it (an empty password, refused) ends the
    command, which removes its lock. `hide` and `show` move the lock file out of the repository's locks/
    and back: restic sees only the locks listed there, and the holder rewrites its own only every 5 minutes.
    """

    def __init__(self, repo: Repo, side: Path) -> None:
        self.locks, self.side = repo.path / "locks", side
        side.mkdir()
        self._stderr: IO[bytes] = (side / "holder.err").open("wb")
        self.proc = subprocess.Popen(["restic", "key", "passwd"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr,
                                     env={**os.environ, "RESTIC_REPOSITORY": str(repo.path),
                                          "RESTIC_PASSWORD": repo.password})
        wait_for(lambda: self.proc.poll() is not None or self._written(), 60, "restic key passwd's lock")
        assert self.proc.poll() is None, (side / "holder.err").read_text()
        (self.file,) = self._written()
        lock = json.loads(repo.restic("--no-lock", "cat", "lock", self.file.name).stdout)
        assert lock["exclusive"] is True and lock["pid"] == self.proc.pid, lock

    def _written(self) -> list[Path]:
        """The lock files restic has finished: its local backend writes `ID-tmp-RANDOM` first and renames it to
        the ID (CI, session 9: the temporary name was read as the lock's)."""
        return [path for path in self.locks.iterdir() if re.fullmatch(r"[0-9a-f]{64}", path.name)]

    @property
    def held(self) -> bool:
        return self.proc.poll() is None and self.file.exists()

    def hide(self) -> None:
        self.file.rename(self.side / self.file.name)

    def show(self) -> None:
        (self.side / self.file.name).rename(self.file)

    def release(self) -> None:
        """Ends the holder, which removes its lock (shown first if hidden)."""
        if self.proc.poll() is None:
            if (self.side / self.file.name).exists():
                self.show()
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._stderr.close()


class Backup:
    """`python -m watcher backup CONTAINER` running, its output in files (nothing blocks on a full pipe)."""

    def __init__(self, env: dict[str, str], container: str, where: Path) -> None:
        self.out_path, self.err_path = where / "backup.out", where / "backup.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "watcher", "backup", container], env=env,
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")


def _show_at_first_snapshot(lock: RepositoryLock, repo: Repo, shown: threading.Event, stop: threading.Event) -> None:
    """Shows the lock as soon as the repository has its first snapshot (the container's globals, which a
    backup writes before its databases), so that the lock meets the database's backup: restic needs a few
    hundred milliseconds of key derivation before it looks at the locks, this takes a few."""
    snapshots = repo.path / "snapshots"
    while not stop.is_set():
        if any(snapshots.iterdir()):
            lock.show()
            shown.set()
            return
        time.sleep(0.005)


def _client_sessions(db: PgContainer) -> list[str]:
    """Every client session of the server but the one asking: name, state, query."""
    rows = db.psql("SELECT concat_ws(' | ', application_name, state, left(query, 80)) FROM pg_stat_activity "
                   "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()", database="postgres")
    return rows.splitlines()


def _exec_processes(db: PgContainer) -> list[str]:
    """Every process in the container that is not the server's own (its backends included, and one that has
    just ended: `[postgres]`): an exec's."""
    rows = [row.split(None, 1) for row in docker("top", db.name, "-o", "pid,args").stdout.splitlines()[1:]]
    return [" ".join(row) for row in rows if not row[1].startswith(("postgres", "[postgres]"))]


def _nothing_held_while_restic_waits(db: PgContainer, repo: Repo, backup: Backup, lock: RepositoryLock,
                                     started: float) -> None:
    """From CHECK_AT_S after the database's backup started until RELEASE_AT_S, about once a second: the
    backup waits (running, no snapshot of the database) for the lock (still held), and the database has
    no session and the container no exec of the dump."""
    time.sleep(max(0.0, started + CHECK_AT_S - time.monotonic()))
    while True:
        assert backup.proc.poll() is None, f"the backup ended while the repository was locked:\n{backup.output()}"
        assert lock.held
        assert repo.snapshots_of(db.name) == [], "restic did not wait for the lock: the test proves nothing"
        assert _client_sessions(db) == [], "the dump holds a session while restic waits for the repository's lock"
        assert _exec_processes(db) == [], "the dump's exec runs on while restic waits for the repository's lock"
        if time.monotonic() >= started + RELEASE_AT_S:
            return
        time.sleep(1)


@pytest.mark.parametrize(("order", "size", "locked"), CASES,
                         ids=[f"{o}-{s}" + ("" if locked else "-unlocked") for o, s, locked in CASES])
def test_a_backup_waits_out_an_exclusive_repository_lock_with_nothing_held_in_the_database(
        order: str, size: str, locked: bool, start_pg: StartPg, repo: Repo, watcher_env: dict[str, str],
        tmp_path: Path) -> None:
    """The repository locked exclusively from before the database's dump starts until past the stall bound:
    from READ_AHEAD_WAIT_S + 8 s on, nothing of the dump is left in the database or the container; once the
    lock is gone the backup exits 0 without a stall, with one snapshot of the database that restores to the
    source's rows. Unlocked, the same backup simply succeeds."""
    db = start_pg(f"h7lock-{order}-{size}{'' if locked else '-free'}-db", "15")
    db.psql(TABLE.format(rows=ROWS[size]))
    expected = db.psql(FINGERPRINT)
    repo.restic("init")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_DUMP_ORDER": order,
           "WATCHER_STALL_TIMEOUT": f"{STALL_S}s", "WATCHER_LOCK_RETRY": "5m"}

    lock = RepositoryLock(repo, tmp_path / "lock") if locked else None
    stop, shown = threading.Event(), threading.Event()
    try:
        if lock is not None:
            # Hidden while the globals' backup passes: it comes first, and restic would wait the lock out there.
            lock.hide()
            threading.Thread(target=_show_at_first_snapshot, args=(lock, repo, shown, stop), daemon=True).start()
        backup = Backup(env, db.name, tmp_path)
        try:
            if lock is not None:
                wait_for(lambda: shown.is_set() or backup.proc.poll() is not None, 120, "the globals' snapshot")
                assert shown.is_set(), f"the backup ended before its globals' snapshot:\n{backup.output()}"
                _nothing_held_while_restic_waits(db, repo, backup, lock, time.monotonic())
                lock.release()
            backup.proc.wait(timeout=180)
        finally:
            if backup.proc.poll() is None:
                backup.proc.kill()
                backup.proc.wait(timeout=30)
    finally:
        stop.set()
        if lock is not None:
            lock.release()

    output = backup.output()
    assert backup.proc.returncode == 0, output
    assert STALL_BOUND_NAMES not in output and "took no data" not in output, output
    snapshots = repo.snapshots_of(db.name)
    assert len(snapshots) == 1, output
    dump = restic_dump(repo, snapshots[0]["id"], "/appdb.pgdump")
    assert (len(dump) > READ_AHEAD_BYTES) == (size == "large"), f"a {size} dump of {len(dump)} bytes"
    restore_into(db, "restored", dump)
    assert db.psql(FINGERPRINT, database="restored") == expected
