"""Shrunken dumps (SPEC §11), for real: PostgreSQL, restic, the daemon, Apprise to a JSON webhook.

A dump that shrinks by 90 % is kept but flagged: log `backup_size_anomaly`, metric
`backup_watcher_size_anomaly` = 1, one warning alert. A prune with keep-daily=1 (every earlier snapshot of
the day would go) forgets nothing of its history; a dump of normal size clears the flag by itself; after a
second shrink, `backup-watcher ack` accepts it and the next prune forgets as usual. The one-shot `backup`
makes the later passes (it asks the daemon to list the repository again, which judges them), the daemon's
own catch-up backup the first.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from tests.integration.conftest import (
    DaemonProcess,
    PgContainer,
    Repo,
    StartDaemon,
    StartPg,
    Webhook,
    run_watcher,
    wait_for,
)

pytestmark = [pytest.mark.engine]
RUN = uuid.uuid4().hex[:6]
ROWS = 20000


def _about(webhook: Webhook, name: str) -> list[tuple[str, str]]:
    """(title, type) of every notification about the dump size of `name`, in order."""
    return [(str(item["title"]), str(item["type"])) for item in webhook.received
            if f"dump size of {name}" in str(item["title"])]


def _anomaly_metric(daemon: DaemonProcess, db: PgContainer) -> float | None:
    prefix = f'backup_watcher_size_anomaly{{database="{db.database}",target="{db.name}"}} '
    return next((float(line[len(prefix):]) for line in daemon.metrics().splitlines() if line.startswith(prefix)), None)


def _backup(daemon: DaemonProcess) -> None:
    done = run_watcher(["backup", str(daemon.env["WATCHER_CONTAINER_PATTERNS"])], daemon.env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def _history(repo: Repo, db: PgContainer) -> list[dict[str, object]]:
    return sorted(repo.snapshots_of(db.name), key=lambda snap: str(snap["time"]))


def test_a_90_percent_shrink_is_flagged_spared_by_retention_cleared_by_a_normal_dump_or_by_ack(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str],
        webhook: Webhook) -> None:
    db = start_pg(f"bwt-f16a-shrink{RUN}-db", "15")
    db.psql(f"CREATE TABLE items AS SELECT g AS id, repeat(md5(g::text), 4) AS payload "
            f"FROM generate_series(1, {ROWS}) AS g")
    # The prunes are `backup-watcher prune`, as a maintenance host runs it; the daemon does not prune.
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_KEEP_DAILY": "1", "WATCHER_PRUNE": "false",
           "WATCHER_KEEP_WEEKLY": "0", "WATCHER_KEEP_MONTHLY": "0", "WATCHER_RECONCILE_INTERVAL": "5",
           "WATCHER_SCHEDULE": f"0 {(datetime.now(UTC).hour + 12) % 24} * * *", "WATCHER_APPRISE_URLS": webhook.url}
    daemon = start_daemon(env)
    wait_for(lambda: daemon.events("backup_succeeded", target=db.name, database=db.database), 60,
             "the catch-up backup", interval=0.5)
    wait_for(lambda: _anomaly_metric(daemon, db) == 0, 30, "the size metric at 0", interval=0.5)

    db.psql("DELETE FROM items WHERE id % 10 <> 0")  # 90 % of the rows go
    _backup(daemon)
    wait_for(lambda: daemon.events("backup_size_anomaly", target=db.name, database=db.database), 30,
             "the anomaly to be logged", interval=0.5)
    (flagged,) = daemon.events("backup_size_anomaly", target=db.name, database=db.database)
    assert 0.05 < float(str(flagged["ratio"])) < 0.2
    assert int(str(flagged["bytes"])) < int(str(flagged["reference_bytes"])) / 5
    wait_for(lambda: _anomaly_metric(daemon, db) == 1, 30, "the size metric at 1", interval=0.5)
    wait_for(lambda: _about(webhook, db.name), 30, "the warning alert", interval=0.5)
    assert _about(webhook, db.name) == [(f"[backup-watcher] FAILED: dump size of {db.name}", "warning")]

    # keep-daily=1 would keep only the newest snapshot of the day: the flagged history keeps all of its.
    spared = [snap["id"] for snap in _history(repo, db)]
    assert len(spared) == 2
    pruned = run_watcher(["prune"], env, timeout=300)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert "retention_spared" in pruned.stderr
    assert [snap["id"] for snap in _history(repo, db)] == spared
    assert len(repo.globals_of(db.name)) == 1, "the container's other history was pruned as usual"

    # A dump of normal size clears the flag by itself.
    db.psql(f"INSERT INTO items SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, {ROWS}) AS g "
            "WHERE g % 10 <> 0")
    _backup(daemon)
    wait_for(lambda: daemon.events("size_anomaly_cleared", target=db.name, reason="a dump of normal size"), 30,
             "the flag to clear", interval=0.5)
    wait_for(lambda: _anomaly_metric(daemon, db) == 0, 30, "the size metric back at 0", interval=0.5)
    wait_for(lambda: len(_about(webhook, db.name)) == 2, 30, "the recovery notice", interval=0.5)
    assert _about(webhook, db.name)[1] == (f"[backup-watcher] RECOVERED: dump size of {db.name}", "success")

    # Shrunk again, and this time the operator accepts it: the next prune forgets as usual.
    db.psql("DELETE FROM items WHERE id % 10 <> 0")
    _backup(daemon)
    wait_for(lambda: _anomaly_metric(daemon, db) == 1, 30, "the size metric at 1 again", interval=0.5)
    acked = run_watcher(["ack", db.name, "--database", db.database], env, timeout=300)
    assert acked.returncode == 0, acked.stdout + acked.stderr
    assert f"acknowledged {db.database}: snapshot" in acked.stdout
    wait_for(lambda: daemon.events("size_anomaly_cleared", target=db.name,
                                   reason="acknowledged (`backup-watcher ack`)"), 30, "the ack to show", interval=0.5)
    wait_for(lambda: _anomaly_metric(daemon, db) == 0, 30, "the size metric at 0 after ack", interval=0.5)

    pruned = run_watcher(["prune"], env, timeout=300)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert "retention_spared" not in pruned.stderr
    (kept,) = _history(repo, db)
    assert "size-anomaly-ack" in kept["tags"]  # type: ignore[operator]
    assert daemon.stop() == 0
    check = repo.restic("check")
    assert "no errors were found" in check.stdout
