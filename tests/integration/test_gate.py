"""The integrity gate: a dump that fails, is killed, or loses its container never becomes a snapshot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.integration.conftest import BIG_TABLE, PgContainer, Repo, StartPg, docker, wait_for_copy

pytestmark = pytest.mark.engine

# A table the dump user `dumper` may not read (row-level security): its dump fails when it reaches it.
UNREADABLE_TABLE = """
CREATE TABLE z_secret (id int, secret text);
INSERT INTO z_secret VALUES (1, 'x');
ALTER TABLE z_secret ENABLE ROW LEVEL SECURITY;
CREATE POLICY only_owner ON z_secret USING (current_user = 'app');
CREATE ROLE dumper LOGIN;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO dumper;
"""


def _start_backup(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "watcher", "backup"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _kill_from_host(container: str, program: str) -> None:
    """SIGKILLs a process of a container from the host, as the OOM killer would."""
    rows = docker("top", container, "-eo", "pid,comm").stdout.splitlines()[1:]
    pids = [int(row.split()[0]) for row in rows if row.split()[1] == program]
    assert pids, f"no {program} running in {container}: {rows}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("major", "order"), [("15", "physical"), ("17", "physical"), ("17", "key")])
def test_dump_failing_part_way_leaves_no_snapshot(major: str, order: str, start_pg: StartPg, repo: Repo,
                                                  watcher_env: dict[str, str]) -> None:
    # The dump role may read a_big but not the rows of z_secret: in physical order pg_dump streams a_big
    # first, then fails on z_secret, part-way through the dump. In key order (a_big is keyed and large)
    # pg_dump fails on z_secret before its table of contents is out, so before a_big is copied.
    name = f"bwt-partway{major}{order[0]}-db"
    db: PgContainer = start_pg(name, major, labels={"backup-watcher.user": "dumper"})
    db.psql(BIG_TABLE + UNREADABLE_TABLE)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name, "WATCHER_DUMP_ORDER": order}
    backup = _start_backup(env)
    if order == "physical":
        wait_for_copy(db)
    out, err = backup.communicate(timeout=300)
    assert backup.returncode == 1, err
    assert "z_secret" in out and "no snapshot was written" in out, out
    assert repo.snapshots_of(name) == []


@pytest.mark.parametrize(("major", "order", "streamer"), [
    ("15", "key", "psql"), ("17", "key", "psql"), ("17", "physical", "pg_dump")])
def test_pg_dump_killed_mid_stream_leaves_no_snapshot(major: str, order: str, streamer: str, start_pg: StartPg,
                                                      repo: Repo, watcher_env: dict[str, str]) -> None:
    """The process streaming a_big's rows is killed: pg_dump's COPY (physical order), or the key session's
    psql (key order: pg_dump has long written the rest and exited by then)."""
    name = f"bwt-killed{major}{order[0]}-db"
    db: PgContainer = start_pg(name, major)
    db.psql(BIG_TABLE)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name, "WATCHER_DUMP_ORDER": order}
    # The repository exists first: into a new one, the dump that starts beside the repository check is given up
    # and started again after `restic init`, and the kill could meet the first one (CI, session 9: the second
    # dump then ran whole and the backup succeeded).
    repo.restic("init")
    backup = _start_backup(env)
    wait_for_copy(db)
    _kill_from_host(name, streamer)
    out, err = backup.communicate(timeout=300)
    assert backup.returncode == 1, err
    assert "pg_dump" in out and "exited with status 137" in out, out
    assert repo.snapshots_of(name) == []

    # The repository is consistent and the next run heals.
    healed = subprocess.run([sys.executable, "-m", "watcher", "backup"], env=env, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert len(repo.snapshots_of(name)) == 1
    assert "no errors were found" in repo.restic("check").stdout


@pytest.mark.parametrize("major", ["15", "17"])
def test_container_stopped_mid_stream_leaves_no_snapshot(major: str, start_pg: StartPg, repo: Repo,
                                                         watcher_env: dict[str, str]) -> None:
    name = f"bwt-stopped{major}-db"
    db: PgContainer = start_pg(name, major)
    db.psql(BIG_TABLE)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name}
    backup = _start_backup(env)
    wait_for_copy(db)
    # No grace: PostgreSQL's smart shutdown on SIGTERM would let a short dump finish (a whole, valid
    # snapshot); the container must go away while COPY streams.
    docker("stop", "-t", "0", name)
    out, err = backup.communicate(timeout=300)
    assert backup.returncode == 1, err
    assert "no snapshot was written" in out and "pg_dump" in out, out
    assert repo.snapshots_of(name) == []
    assert "no errors were found" in repo.restic("check").stdout


def test_dump_failing_while_restic_opens_the_repository_leaves_no_snapshot(start_pg: StartPg, repo: Repo,
                                                                           watcher_env: dict[str, str]) -> None:
    # The exec helper starts before restic and pg_dump fails at its first table, within a fraction of a
    # second, while restic is still deriving its key and loading the index (a second or more): the verdict
    # must wait for restic's command and fail it.
    name = "bwt-earlyfail-db"
    db: PgContainer = start_pg(name, "15", labels={"backup-watcher.user": "dumper"})
    db.psql(UNREADABLE_TABLE)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name, "WATCHER_DUMP_ORDER": "physical"}
    out, err = _start_backup(env).communicate(timeout=300)
    assert "z_secret" in out and "no snapshot was written" in out, (out, err)
    assert repo.snapshots_of(name) == []
