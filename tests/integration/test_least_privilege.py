"""Least privilege and one pruner (SPEC §11).

A host with append-only credentials runs with WATCHER_PRUNE=false. The repository is served by restic's
rest-server 0.13 with --append-only (from the test ground), which lets a client create files and remove
its own locks but refuses every other deletion. The daemon backs up pass after pass and never tries to
forget or prune; `backup-watcher prune` with the same credentials fails with one sentence naming
append-only credentials and WATCHER_PRUNE=false, and nothing is lost; with the maintenance host's
credentials (the same data served without --append-only) it applies the keeps. `backup-watcher ack` needs
delete rights too (restic tag rewrites the snapshot): with append-only credentials it fails saying where to
run it, and the shrunken dump stays flagged.

A prune and backups of two hosts at once (restic's locks, WATCHER_LOCK_RETRY): test_fleet.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.conftest import (
    PgContainer,
    StartDaemon,
    StartPg,
    run_watcher,
    wait_for,
)
from tests.kit import RestServer

pytestmark = [pytest.mark.engine, pytest.mark.slow]
RUN = uuid.uuid4().hex[:6]


def _snapshot_ids(repository: str, password: str, container: str) -> list[str]:
    """The ids of a container's database snapshots (not its globals'), oldest first (a tagged copy has its
    original's time: ties in id order, which two servers of one repository may list differently)."""
    done = subprocess.run(["restic", "--no-lock", "snapshots", "--json", "--tag", f"container={container}"],
                          env={**os.environ, "RESTIC_REPOSITORY": repository, "RESTIC_PASSWORD": password},
                          capture_output=True, text=True, timeout=120, check=True)
    listed = sorted(json.loads(done.stdout), key=lambda snap: (str(snap["time"]), str(snap["id"])))
    return [snap["id"] for snap in listed if "globals" not in snap["tags"]]


def test_an_append_only_host_backs_up_pass_after_pass_and_prune_says_why_it_cannot(
        start_pg: StartPg, start_daemon: StartDaemon, watcher_env: dict[str, str],
        tmp_path: Path) -> None:
    # Two servers over one directory: the database host's append-only credentials, the maintenance host's.
    append_only_repository = RestServer(tmp_path / "rest", append_only=True).url
    db: PgContainer = start_pg(f"bwt-appendonly{RUN}-db", "15")
    db.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) AS g;")
    # Keep one snapshot a day: every pass but the last of the day is one for forget to remove. The slot
    # is half a day away: the catch-up backup at start is the daemon's pass, one-shot backups the others.
    env = {**watcher_env, "RESTIC_REPOSITORY": append_only_repository, "WATCHER_CONTAINER_PATTERNS": db.name,
           "WATCHER_PRUNE": "false", "WATCHER_KEEP_DAILY": "1", "WATCHER_KEEP_WEEKLY": "0",
           "WATCHER_KEEP_MONTHLY": "0", "WATCHER_SCHEDULE": f"0 {(datetime.now(UTC).hour + 12) % 24} * * *",
           "WATCHER_RECONCILE_INTERVAL": "5", "WATCHER_LOG_LEVEL": "debug"}
    daemon = start_daemon(env)
    wait_for(lambda: daemon.events("backup_succeeded", target=db.name, database=db.database), 60,
             "the catch-up backup", interval=0.5)
    for _ in range(2):
        done = run_watcher(["backup", db.name], daemon.env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    # A pass is followed by the prune within one loop tick where pruning is on; give it many more.
    checks = len(daemon.events("health_checked"))
    wait_for(lambda: len(daemon.events("health_checked")) >= checks + 2, 60, "two more checks", interval=0.5)
    assert daemon.stop() == 0
    assert len(daemon.events("prune_disabled")) == 1
    assert not daemon.events("prune_started") and not daemon.events("prune_failed")
    passes = _snapshot_ids(append_only_repository, watcher_env["RESTIC_PASSWORD"], db.name)
    assert len(passes) == 3, passes

    pruned = run_watcher(["prune"], env, timeout=300)
    assert pruned.returncode == 1, pruned.stdout + pruned.stderr
    assert "prune FAILED: restic forget failed: the repository refused to delete" in pruned.stdout
    assert "append-only credentials" in pruned.stdout and "WATCHER_PRUNE=false" in pruned.stdout
    assert "unexpected HTTP response" not in pruned.stdout
    # Nothing was removed, and the repository is whole.
    assert _snapshot_ids(append_only_repository, watcher_env["RESTIC_PASSWORD"], db.name) == passes
    check = subprocess.run(["restic", "check"], env={**os.environ, "RESTIC_REPOSITORY": append_only_repository,
                                                      "RESTIC_PASSWORD": watcher_env["RESTIC_PASSWORD"]},
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr

    # The maintenance host's credentials may delete: the same command, WATCHER_PRUNE=false as well, applies
    # the keeps (one a day), and the newest pass is what is left.
    maintenance = {**env, "RESTIC_REPOSITORY": RestServer(tmp_path / "rest").url}
    pruned = run_watcher(["prune"], maintenance, timeout=300)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert "pruned: 4 snapshot(s) forgotten" in pruned.stdout  # two passes' database and globals snapshots
    assert _snapshot_ids(maintenance["RESTIC_REPOSITORY"], watcher_env["RESTIC_PASSWORD"], db.name) == passes[-1:]


def test_ack_with_append_only_credentials_fails_naming_where_to_run_it_and_the_dump_stays_flagged(
        start_pg: StartPg, watcher_env: dict[str, str], tmp_path: Path) -> None:
    # One-shot runs only: the database host's with append-only credentials, the maintenance host's may delete.
    db: PgContainer = start_pg(f"h16-ack{RUN}-db", "17")
    append_only = {**watcher_env, "RESTIC_REPOSITORY": RestServer(tmp_path / "rest", append_only=True).url,
                   "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_KEEP_DAILY": "1", "WATCHER_KEEP_WEEKLY": "0",
                   "WATCHER_KEEP_MONTHLY": "0"}
    maintenance = {**append_only, "RESTIC_REPOSITORY": RestServer(tmp_path / "rest").url}
    password = watcher_env["RESTIC_PASSWORD"]
    db.psql("CREATE TABLE items AS SELECT g AS id, repeat(md5(g::text), 4) AS payload "
            "FROM generate_series(1, 20000) AS g")
    for shrink in ("", "DELETE FROM items WHERE id % 10 <> 0"):  # a normal dump, then one of a tenth
        if shrink:
            db.psql(shrink)
        done = run_watcher(["backup", db.name], append_only, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    passes = _snapshot_ids(append_only["RESTIC_REPOSITORY"], password, db.name)

    refused = run_watcher(["ack", db.name, "--database", db.database], append_only, timeout=300)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"ack FAILED for {db.name} {db.database}: the repository refused to delete" in refused.stdout
    assert "append-only credentials" in refused.stdout and "The dump stays flagged" in refused.stdout
    assert (f"Run `backup-watcher ack {db.name} --database {db.database}` where the credentials may delete"
            in refused.stdout) and f"WATCHER_HOST={append_only['WATCHER_HOST']}" in refused.stdout
    assert f"acknowledged {db.database}" not in refused.stdout
    # Nothing was removed (restic left a tagged copy beside the original), and the dump is still flagged: the
    # maintenance host's prune (keep-daily=1) spares the whole history.
    after = _snapshot_ids(append_only["RESTIC_REPOSITORY"], password, db.name)
    assert set(passes) < set(after) and len(after) == 3, after
    pruned = run_watcher(["prune"], maintenance, timeout=300)
    assert pruned.returncode == 0 and "retention_spared" in pruned.stderr, pruned.stdout + pruned.stderr
    assert _snapshot_ids(maintenance["RESTIC_REPOSITORY"], password, db.name) == after

    # Where the credentials may delete, the same command acknowledges it, and retention forgets again.
    acked = run_watcher(["ack", db.name, "--database", db.database], maintenance, timeout=300)
    assert acked.returncode == 0, acked.stdout + acked.stderr
    assert f"acknowledged {db.database}: snapshot {passes[-1][:8]}" in acked.stdout
    pruned = run_watcher(["prune"], maintenance, timeout=300)
    assert pruned.returncode == 0 and "retention_spared" not in pruned.stderr, pruned.stdout + pruned.stderr
    (kept,) = _snapshot_ids(maintenance["RESTIC_REPOSITORY"], password, db.name)
    assert kept not in passes, "the newest dump is kept, acknowledged (a rewritten snapshot)"
    check = subprocess.run(["restic", "check"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RESTIC_REPOSITORY": maintenance["RESTIC_REPOSITORY"],
                                "RESTIC_PASSWORD": password})
    assert check.returncode == 0, check.stdout + check.stderr
