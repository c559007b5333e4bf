"""A fleet on one repository (SPEC §11, fault 8): two Docker engines, one watcher daemon on each, one repository
served by restic's rest-server 0.13.

Host B backs up with append-only credentials (rest-server --append-only) and WATCHER_PRUNE=false; host A has
credentials that may delete and prunes (its daemon after each pass, and `backup-watcher prune`), keeping one
snapshot a day. Three passes: the daemons' catch-up pass (A's daemon prunes after it), then one-shot backups
of both hosts at once, each followed by A's `backup-watcher prune`. In the second pass B's dump is held in
the middle (its container paused) while A's prune starts: the prune must wait for B's backup to end
(restic's locks, WATCHER_LOCK_RETRY), not fail and not remove what B is writing. In the end every pass of B
is there, A's newest pass is, the dumps read back, and `restic check --read-data` finds the repository whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.conftest import (
    DaemonProcess,
    PgContainer,
    SecondEngine,
    StartDaemon,
    StartPg,
    docker,
    event_time,
    wait_for,
    wait_for_copy,
)
from tests.kit import RestServer

pytestmark = [pytest.mark.engine, pytest.mark.slow]
RUN = uuid.uuid4().hex[:6]
PASSES = 3


def _restic(repository: str, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["restic", *args], env={**os.environ, "RESTIC_REPOSITORY": repository,
                                                  "RESTIC_PASSWORD": password},
                          capture_output=True, text=True, timeout=300)


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "watcher", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, out + err
    return out, err


def _snapshots(repository: str, password: str, host: str) -> dict[str, int]:
    """How many snapshots of each history (database, or `globals`) the host has."""
    done = _restic(repository, password, "--no-lock", "snapshots", "--json", "--host", host)
    assert done.returncode == 0, done.stderr
    counts: dict[str, int] = {}
    for snap in json.loads(done.stdout):
        history = next(tag for tag in snap["tags"] if tag.startswith("database=") or tag == "globals")
        counts[history] = counts.get(history, 0) + 1
    return counts


def _wait_for_backup(daemon: DaemonProcess, db: PgContainer) -> None:
    wait_for(lambda: daemon.events("backup_succeeded", target=db.name, database=db.database), 120,
             f"the first pass of {db.name}", interval=0.5)


def test_two_hosts_one_repository_one_pruner_nothing_lost_prune_waits_for_backups(
        start_pg: StartPg, start_daemon: StartDaemon, watcher_env: dict[str, str], second_engine: SecondEngine,
        tmp_path: Path) -> None:
    # Two servers over one directory: host A's credentials may delete, host B's only append.
    deleting = RestServer(tmp_path / "rest").url
    append_only = RestServer(tmp_path / "rest", append_only=True).url
    password = watcher_env["RESTIC_PASSWORD"]
    db_a: PgContainer = start_pg(f"bwt-f16a-fleeta{RUN}-db", "17")
    db_b: PgContainer = start_pg(f"bwt-f16a-fleetb{RUN}-db", "15", docker_host=second_engine.host)
    db_a.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) AS g")
    # Big enough that its dump streams for a moment, so that it can be held in the middle.
    db_b.psql("CREATE TABLE a_big AS SELECT g AS id, repeat(md5(g::text), 12) AS payload "
              "FROM generate_series(1, 60000) AS g")
    host_a, host_b = f"fleet-a-{RUN}", f"fleet-b-{RUN}"
    slot = f"0 {(datetime.now(UTC).hour + 12) % 24} * * *"  # half a day away: the catch-up is the first pass
    common = {**watcher_env, "WATCHER_SCHEDULE": slot, "WATCHER_RECONCILE_INTERVAL": "5",
              "WATCHER_KEEP_DAILY": "1", "WATCHER_KEEP_WEEKLY": "0", "WATCHER_KEEP_MONTHLY": "0"}
    env_a = {**common, "RESTIC_REPOSITORY": deleting, "WATCHER_HOST": host_a, "WATCHER_CONTAINER_PATTERNS": db_a.name}
    env_b = {**common, "RESTIC_REPOSITORY": append_only, "WATCHER_HOST": host_b, "DOCKER_HOST": second_engine.host,
             "WATCHER_CONTAINER_PATTERNS": db_b.name, "WATCHER_PRUNE": "false", "WATCHER_INIT_REPOSITORY": "false"}
    daemon_a = start_daemon(env_a)  # initialises the repository
    daemon_b = start_daemon(env_b)
    for daemon, db in ((daemon_a, db_a), (daemon_b, db_b)):
        _wait_for_backup(daemon, db)
    wait_for(lambda: daemon_a.events("prune_succeeded"), 120, "host A's prune after its pass", interval=0.5)

    # Second pass: B's dump is held in the middle while A's prune starts; the prune waits for it.
    db_a.psql("UPDATE t SET v = md5(v) WHERE id % 2 = 0")
    backup_b = _start(["backup", db_b.name], daemon_b.env)
    backup_a = _start(["backup", db_a.name], daemon_a.env)
    wait_for_copy(db_b)
    docker("pause", db_b.name, env=db_b.engine_env)
    try:
        prune = _start(["prune"], daemon_a.env)
        time.sleep(3)  # long enough for the prune to reach the lock B's backup holds
    finally:
        unpaused_at = datetime.now(UTC)
        docker("unpause", db_b.name, env=db_b.engine_env)
    _finish(backup_a)
    _, backup_b_log = _finish(backup_b)
    _, prune_log = _finish(prune)
    pruned = [line for line in prune_log.splitlines() if '"prune_succeeded"' in line]
    assert pruned, prune_log
    assert event_time(json.loads(pruned[0])) > unpaused_at, "the prune ended only after B's held backup"
    assert '"backup_succeeded"' in backup_b_log

    # Third pass: both hosts at once, then A's prune.
    db_a.psql("UPDATE t SET v = md5(v) WHERE id % 3 = 0")
    for process in [_start(["backup", db_b.name], daemon_b.env), _start(["backup", db_a.name], daemon_a.env)]:
        _finish(process)
    _finish(_start(["prune"], daemon_a.env))

    for daemon in (daemon_a, daemon_b):
        assert daemon.stop() == 0
    assert not daemon_b.events("prune_started"), "host B never prunes"
    assert not daemon_a.events("prune_failed") and not daemon_b.events("backup_failed")
    # B: every pass of every history is there (only A prunes, and only its own host's histories).
    assert _snapshots(deleting, password, host_b) == {f"database={db_b.database}": PASSES, "globals": PASSES}
    # A: one a day (WATCHER_KEEP_DAILY=1), its newest pass.
    assert _snapshots(deleting, password, host_a) == {f"database={db_a.database}": 1, "globals": 1}
    dump = subprocess.run(["restic", "dump", "--host", host_b, "--tag", f"database={db_b.database}", "latest",
                           f"/{db_b.database}.pgdump"],
                          env={**os.environ, "RESTIC_REPOSITORY": deleting, "RESTIC_PASSWORD": password},
                          capture_output=True, timeout=300)
    assert dump.returncode == 0 and dump.stdout.startswith(b"PGDMP") and b"a_big" in dump.stdout
    check = _restic(deleting, password, "check", "--read-data")
    assert check.returncode == 0 and "no errors were found" in check.stdout, check.stdout + check.stderr
