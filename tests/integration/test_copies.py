"""Copies to further repositories (SPEC §12), with real restic, rest-server and PostgreSQL 15 and 17.

The primary is a local path; `offsite` a rest-server with an htpasswd user of its own (its credentials in the
copy's ENV_FILE), keeping weekly snapshots only; `vault` an append-only rest-server that this host never
prunes (WATCHER_COPY_VAULT_PRUNE=false). A copy gets only the snapshots it lacks, keeps what its own keeps say,
restores and drills alone when the primary is gone, and a copy whose backend is down never holds up a backup:
it is paged once as behind, once when it caught up, and then holds every snapshot it missed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.conftest import (
    TEST_HOST,
    PgContainer,
    Repo,
    StartDaemon,
    StartPg,
    Webhook,
    run_watcher,
    wait_for,
)
from tests.kit import RestServer

pytestmark = [pytest.mark.engine, pytest.mark.slow]
RUN = uuid.uuid4().hex[:6]


ROWS = "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100000) AS g;"
CHECKSUM = "SELECT count(*), md5(string_agg(id::text || v, ',' ORDER BY id)) FROM t"


def _snapshots(repository: str, password: str, env: dict[str, str] | None = None) -> list[dict[str, object]]:
    done = subprocess.run(["restic", "--no-lock", "snapshots", "--json"], capture_output=True, text=True,
                          env={**os.environ, **(env or {}), "RESTIC_REPOSITORY": repository,
                               "RESTIC_PASSWORD": password}, timeout=120, check=True)
    return list(json.loads(done.stdout))


def _of(snapshots: list[dict[str, object]], container: str) -> list[dict[str, object]]:
    return [s for s in snapshots if f"container={container}" in (s.get("tags") or [])]  # type: ignore[operator]


def _old_passes(repo: Repo, container: str, days_ago: tuple[int, ...]) -> None:
    """Snapshots of a history of this host taken weeks ago (restic --time), as earlier passes left them."""
    for days in days_ago:
        when = (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S")
        subprocess.run(["restic", "backup", "--stdin", "--stdin-filename", "appdb.pgdump", "--host", TEST_HOST,
                        "--tag", "backup-watcher", "--tag", f"container={container}", "--tag", "database=appdb",
                        "--time", when], input=f"pass of {when}".encode(), capture_output=True, timeout=120,
                       check=True, env={**os.environ, "TZ": "UTC", "RESTIC_REPOSITORY": str(repo.path),
                                        "RESTIC_PASSWORD": repo.password})


def _size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _copy_env(tmp_path: Path, name: str, server: RestServer, password: str, **settings: str) -> dict[str, str]:
    prefix = f"WATCHER_COPY_{name.upper()}_"
    secret = tmp_path / f"{name}.password"
    secret.write_text(password + "\n")
    return {f"{prefix}REPOSITORY": server.url, f"{prefix}PASSWORD_FILE": str(secret),
            f"{prefix}ENV_FILE": str(server.env_file(tmp_path / f"{name}.env")),
            **{prefix + key: value for key, value in settings.items()}}


def test_copies_get_only_new_snapshots_keep_their_own_retention_and_restore_without_the_primary(
        start_pg: StartPg, watcher_env: dict[str, str], repo: Repo, tmp_path: Path) -> None:
    dbs: list[PgContainer] = [start_pg(f"bwt-c17-copy{RUN}-{major}", major) for major in ("15", "17")]
    for db in dbs:
        db.psql(ROWS)
    offsite = RestServer(tmp_path / "offsite", "offsite-user", f"offsite-rest-pw-{RUN}")
    vault = RestServer(tmp_path / "vault", "vault-user", f"vault-rest-pw-{RUN}", append_only=True)
    old = f"bwt-c17-old{RUN}"
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": ",".join(db.name for db in dbs),
           "WATCHER_COPY_TO": "offsite,vault",
           **_copy_env(tmp_path, "offsite", offsite, f"offsite-pw-{RUN}", KEEP_DAILY="0", KEEP_WEEKLY="2",
                       KEEP_MONTHLY="0"),
           **_copy_env(tmp_path, "vault", vault, f"vault-pw-{RUN}", KEEP_DAILY="1", KEEP_WEEKLY="0",
                       KEEP_MONTHLY="0", PRUNE="false")}
    first = run_watcher(["backup"], env)
    assert first.returncode == 0, first.stdout + first.stderr
    _old_passes(repo, old, (22, 15, 8, 7))

    copied = run_watcher(["copy"], env)
    assert copied.returncode == 0, copied.stdout + copied.stderr
    # 2 databases + 2 globals + 4 earlier passes, into each copy; the append-only one never forgets.
    assert "ok      offsite: 8 snapshot(s) copied" in copied.stdout and "ok      vault: 8 snapshot(s) copied, 0 " \
        "forgotten" in copied.stdout, copied.stdout
    vault_first = vault.size()
    checksum = dbs[1].psql(CHECKSUM)

    dbs[0].psql("INSERT INTO t VALUES (100001, 'one more row');")
    primary_first = _size(repo.path)
    second = run_watcher(["backup"], env)
    primary_grown = _size(repo.path) - primary_first
    assert second.returncode == 0, second.stdout + second.stderr
    again = run_watcher(["copy"], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "ok      offsite: 4 snapshot(s) copied" in again.stdout and "ok      vault: 4 snapshot(s) copied" \
        in again.stdout, again.stdout
    grown = vault.size() - vault_first
    # Only the 4 new snapshots, and of those only the data the copy does not hold yet: it grows by what the
    # primary grew by (its packs and index), not by another whole copy.
    assert 0 < grown <= primary_grown * 1.1 + 65536 and grown < vault_first, (grown, primary_grown, vault_first)

    pruned = run_watcher(["prune"], env)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    primary = _snapshots(str(repo.path), repo.password)
    offsite_env = {"RESTIC_REST_USERNAME": offsite.user, "RESTIC_REST_PASSWORD": offsite.password}
    in_offsite = _snapshots(offsite.url, f"offsite-pw-{RUN}", offsite_env)
    in_vault = _snapshots(vault.url, f"vault-pw-{RUN}",
                          {"RESTIC_REST_USERNAME": vault.user, "RESTIC_REST_PASSWORD": vault.password})
    # Each repository keeps what its own keeps say: the primary one a day (30 days), offsite one a week (2
    # weeks), the vault everything (this host never prunes it). (restic keeps the oldest snapshot too while a
    # policy has fewer periods than it may keep: the histories of today's two passes say nothing here.)
    assert (len(_of(primary, old)), len(_of(in_offsite, old)), len(_of(in_vault, old))) == (4, 2, 4)
    # Had this host pruned the vault, its keep-daily 1 would have left the newest of both passes only.
    assert len(_of(in_vault, dbs[0].name)) == 4  # (database + globals) x 2 passes
    assert {s["original"] for s in _of(in_offsite, dbs[1].name)} <= {s["id"] for s in _of(primary, dbs[1].name)}

    # The primary is lost: the off-site copy restores and drills alone.
    shutil.rmtree(repo.path)
    dbs[1].psql("DELETE FROM t WHERE id % 2 = 0;")
    listed = run_watcher(["snapshots", dbs[1].name, "--from", "offsite", "--json"], env)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 4, listed.stdout + listed.stderr
    restored = run_watcher(["restore", dbs[1].name, "latest", "--from", "offsite", "--yes"], env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert dbs[1].psql(CHECKSUM) == checksum
    drilled = run_watcher(["drill", dbs[1].name, "--from", "offsite"], env)
    assert drilled.returncode == 0 and drilled.stdout.startswith("ok "), drilled.stdout + drilled.stderr
    wrong = {key: value for key, value in env.items() if key != "WATCHER_COPY_OFFSITE_PASSWORD_FILE"}
    checked = run_watcher(["check-config"], {**wrong, "WATCHER_COPY_OFFSITE_PASSWORD": f"not-the-pw-{RUN}"})
    assert checked.returncode == 2 and "wrong password (check WATCHER_COPY_OFFSITE_PASSWORD" in checked.stderr, \
        checked.stderr
    assert f"not-the-pw-{RUN}" not in checked.stdout + checked.stderr
    unknown = run_watcher(["snapshots", "--from", "attic"], env)
    assert unknown.returncode == 2 and "--from attic: no copy of that name (WATCHER_COPY_TO names: offsite, vault)" \
        in unknown.stderr


def test_a_copy_backend_down_for_three_passes_holds_up_no_backup_is_paged_once_and_catches_up(
        start_pg: StartPg, start_daemon: StartDaemon, watcher_env: dict[str, str], tmp_path: Path,
        webhook: Webhook) -> None:
    db = start_pg(f"bwt-c17-lag{RUN}-db", "17")
    db.psql(ROWS)
    offsite = RestServer(tmp_path / "offsite", "offsite-user", f"offsite-rest-pw-{RUN}")
    # Every minute a pass; neither repository forgets anything here, so every snapshot can be counted.
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_SCHEDULE": "* * * * *",
           "WATCHER_PRUNE": "false", "WATCHER_RECONCILE_INTERVAL": "5", "WATCHER_APPRISE_URLS": webhook.url,
           "WATCHER_COPY_TO": "offsite",
           **_copy_env(tmp_path, "offsite", offsite, f"offsite-pw-{RUN}", PRUNE="false", OPEN_TIMEOUT="5s")}
    daemon = start_daemon(env)
    wait_for(lambda: any(int(str(e["snapshots_copied"])) > 0 for e in daemon.events("copy_succeeded", copy="offsite")),
             180, "the first pass's snapshots in the copy", interval=0.5)
    offsite.stop()
    before = len(daemon.events("backup_succeeded", target=db.name, database=db.database))
    wait_for(lambda: len(daemon.events("backup_succeeded", target=db.name, database=db.database)) >= before + 3,
             300, "three passes while the copy's backend is down", interval=1)
    assert not daemon.events("backup_failed")
    # A copy is tried after each pass (and retried between, backing off); each try fails within its bound.
    wait_for(lambda: len(daemon.events("copy_failed", copy="offsite")) >= 3, 60, "a failed copy after each pass")
    wait_for(lambda: "[backup-watcher] FAILED: copy offsite is behind" in webhook.titles(), 60, "the behind alert")
    metrics = daemon.metrics()
    lag = re.search(r'backup_watcher_copy_lag_seconds\{copy="offsite",database="appdb",target="[^"]+"} (\S+)',
                    metrics)
    assert lag is not None and float(lag.group(1)) > 60, [line for line in metrics.splitlines() if "copy" in line]
    status = run_watcher(["status", "--json"], daemon.env)  # the daemon's view, as an operator asks for it
    row = next(r for r in json.loads(status.stdout) if r["target"] == db.name)
    appdb = next(d for d in row["databases"] if d["database"] == "appdb")
    assert appdb["copies"]["offsite"]["lag_s"] > 60, appdb
    table = run_watcher(["status"], daemon.env).stdout
    assert f"copy offsite: {db.name} appdb lacks snapshots for" in table, table

    offsite.start()
    wait_for(lambda: "[backup-watcher] RECOVERED: copy offsite caught up" in webhook.titles(), 180, "the recovery")
    assert daemon.stop() == 0
    assert webhook.titles().count("[backup-watcher] FAILED: copy offsite is behind") == 1
    assert webhook.titles().count("[backup-watcher] RECOVERED: copy offsite caught up") == 1
    primary = _of(_snapshots(env["RESTIC_REPOSITORY"], env["RESTIC_PASSWORD"]), db.name)
    copied = _of(_snapshots(offsite.url, f"offsite-pw-{RUN}", {"RESTIC_REST_USERNAME": offsite.user,
                                                               "RESTIC_REST_PASSWORD": offsite.password}), db.name)
    # Every snapshot the primary held when the copy last ran reached the copy (the pass after may be newer).
    newest_copy = max(str(s["time"]) for s in copied)
    assert {s["id"] for s in primary if str(s["time"]) <= newest_copy} == {s["original"] for s in copied}
    assert len(copied) >= 2 * 4  # database + globals of the first pass and of the three passes it missed
    for text in (daemon.log_path.read_text(), metrics, json.dumps(webhook.received)):
        assert f"offsite-pw-{RUN}" not in text and offsite.password not in text


def test_a_copy_whose_backend_user_clashes_with_the_primarys_is_streamed_whole_and_restores(
        start_pg: StartPg, watcher_env: dict[str, str], tmp_path: Path) -> None:
    db = start_pg(f"bwt-c17-stream{RUN}-db", "15")
    db.psql(ROWS)
    checksum = db.psql(CHECKSUM)
    # Two rest-servers, each with a user of its own: restic copy could carry only one RESTIC_REST_USERNAME.
    primary = RestServer(tmp_path / "primary", "primary-user", f"primary-rest-pw-{RUN}")
    offsite = RestServer(tmp_path / "offsite", "offsite-user", f"offsite-rest-pw-{RUN}")
    env = {**watcher_env, "RESTIC_REPOSITORY": primary.url, "RESTIC_REST_USERNAME": primary.user,
           "RESTIC_REST_PASSWORD": primary.password, "WATCHER_CONTAINER_PATTERNS": db.name,
           "WATCHER_COPY_TO": "offsite", **_copy_env(tmp_path, "offsite", offsite, f"offsite-pw-{RUN}")}
    for _ in range(2):
        done = run_watcher(["backup"], env)
        assert done.returncode == 0, done.stdout + done.stderr
    copied = run_watcher(["copy"], env)
    assert copied.returncode == 0 and "ok      offsite: 4 snapshot(s) copied" in copied.stdout, \
        copied.stdout + copied.stderr
    assert '"method": "streamed"' in copied.stderr
    again = run_watcher(["copy"], env)
    assert "ok      offsite: 0 snapshot(s) copied" in again.stdout, again.stdout + again.stderr

    in_primary = _snapshots(primary.url, env["RESTIC_PASSWORD"], {"RESTIC_REST_USERNAME": primary.user,
                                                                   "RESTIC_REST_PASSWORD": primary.password})
    in_copy = _snapshots(offsite.url, f"offsite-pw-{RUN}", {"RESTIC_REST_USERNAME": offsite.user,
                                                            "RESTIC_REST_PASSWORD": offsite.password})

    def kept(snapshots: list[dict[str, object]]) -> set[tuple[object, ...]]:
        return {(str(s["time"])[:19], s["hostname"], tuple(s["tags"]), tuple(s["paths"]),  # type: ignore[arg-type]
                 s["summary"]["total_bytes_processed"]) for s in snapshots}  # type: ignore[index]

    # Time (to the second), host, tags, file name and size of each snapshot are kept.
    assert kept(in_copy) == kept(in_primary)
    primary.stop()  # the primary's backend is gone: the copy restores alone
    db.psql("DELETE FROM t WHERE id % 3 = 0;")
    restored = run_watcher(["restore", db.name, "latest", "--from", "offsite", "--yes"], env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert db.psql(CHECKSUM) == checksum
