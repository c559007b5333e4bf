"""Restore drills on the real engine: pass, fail with a reason, always clean up, never become targets."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import tarfile
from dataclasses import replace

import pytest

from tests.integration.conftest import (
    PG_IMAGES,
    TEST_HOST,
    TEST_LABEL,
    DaemonProcess,
    PgContainer,
    Repo,
    StartDaemon,
    StartPg,
    Webhook,
    docker,
    run_watcher,
    wait_for,
)
from watcher.drill_leftovers import OWNER_LABEL, this_process

pytestmark = [pytest.mark.engine, pytest.mark.slow]

SEED = """
CREATE TABLE orders (id int PRIMARY KEY, note text);
INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 4321) AS g;
CREATE TABLE "Line Items" (order_id int, qty numeric);
INSERT INTO "Line Items" SELECT g % 100, g FROM generate_series(1, 777) AS g;
CREATE TABLE empty_one (x int);
CREATE SCHEMA billing;
CREATE TABLE billing.invoices AS SELECT g AS id FROM generate_series(1, 55) AS g;
"""


def drill_containers() -> list[str]:
    """Drill containers of the tests' watcher identity (WATCHER_HOST=TEST_HOST in watcher_env)."""
    return docker("ps", "-a", "--filter", "label=backup-watcher.role=drill",
                  "--filter", f"label=backup-watcher.drill-host={TEST_HOST}", "--format", "{{.Names}}").stdout.split()


@pytest.fixture(autouse=True)
def no_drill_leftovers() -> None:
    """Each test starts without drill containers of an interrupted earlier run."""
    leftovers = drill_containers()
    if leftovers:
        docker("rm", "-f", "-v", *leftovers, check=False)
    docker("rm", "-f", "-v", "bwt-pattern-impostor", check=False)


@pytest.mark.parametrize("major", ["15", "17"])
def test_drill_of_a_healthy_target_reports_counts_matching_the_source(major: str, start_pg: StartPg, repo: Repo,
                                                                      watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg(f"bwt-drill{major}-db", major)
    db.psql(SEED)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    assert run_watcher(["backup"], env).returncode == 0
    at_backup = {"public.orders": 4321, 'public."Line Items"': 777, "public.empty_one": 0, "billing.invoices": 55}
    db.psql("INSERT INTO orders SELECT g, 'later' FROM generate_series(5000, 5100) AS g;")  # after the backup

    done = run_watcher(["drill", db.name], env)
    assert done.returncode == 0, done.stdout + done.stderr
    for table, rows in at_backup.items():
        assert f"{table}: dump {rows}, restored {rows}\n" in done.stdout, done.stdout
    succeeded = [json.loads(line) for line in done.stderr.splitlines() if '"drill_succeeded"' in line]
    assert succeeded and succeeded[0]["counts"] == at_backup
    assert succeeded[0]["restore_duration_s"] > 0
    assert drill_containers() == []


def test_a_one_shot_drill_removes_only_the_drill_containers_whose_maker_is_gone(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    """An operator's `backup-watcher drill` beside a daemon that is drilling (the same identity, the same
    container) must not remove the daemon's drill container: only those whose maker has ended, or that are
    older than any drill when made elsewhere, or that name no maker (an older watcher's)."""
    db: PgContainer = start_pg("bwt-drillowner-db", "15")
    db.psql(SEED)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    assert run_watcher(["backup"], env).returncode == 0
    ended = subprocess.Popen(["true"])
    ended.wait()
    me = this_process()
    owners = {"bw-drill-live-maker": me.label(),  # stands for the daemon's running drill
              "bw-drill-ended-maker": replace(me, pid=ended.pid, started="1").label(),
              "bw-drill-earlier-run": replace(me, namespace="1").label(),  # this container before a restart
              "bw-drill-young-elsewhere": replace(me, hostname="another-watcher").label(),
              "bw-drill-no-owner": None}
    for name, owner in owners.items():
        docker("run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL,
               "--label", "backup-watcher.role=drill", "--label", f"backup-watcher.drill-host={TEST_HOST}",
               *(["--label", f"{OWNER_LABEL}={owner}"] if owner else []),
               "--entrypoint", "sleep", PG_IMAGES["15"], "600")
    try:
        done = run_watcher(["drill", db.name], env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert sorted(drill_containers()) == ["bw-drill-live-maker", "bw-drill-young-elsewhere"]
        removed = {json.loads(line)["container"]: json.loads(line)["reason"] for line in done.stderr.splitlines()
                   if '"drill_leftover_removed"' in line}
        assert removed == {"bw-drill-ended-maker": f"the watcher process that made it ({ended.pid}) has ended",
                           "bw-drill-earlier-run": "the run of this container or machine that made it has ended "
                                                   "(restarted since)",
                           "bw-drill-no-owner": "it names no owner (made by an older watcher)"}
    finally:
        docker("rm", "-f", *owners, check=False)


def test_drill_of_an_unreadable_snapshot_fails_once_with_reason_alert_and_metric(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str],
        webhook: Webhook) -> None:
    db: PgContainer = start_pg("bwt-baddrill-db", "15")
    db.psql(SEED)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    assert run_watcher(["backup"], env).returncode == 0
    # Make the snapshot's data unreadable: damage every data pack in the middle.
    packs = [p for p in (repo.path / "data").rglob("*") if p.is_file()]
    assert packs
    for pack in packs:
        pack.chmod(0o644)
        data = bytearray(pack.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(64)
        pack.write_bytes(bytes(data))

    daemon_env = {**env, "WATCHER_SCHEDULE": "0 3 * * *", "WATCHER_DRILL_SCHEDULE": "* * * * *",
                  "WATCHER_APPRISE_URLS": webhook.url}
    daemon: DaemonProcess = start_daemon(daemon_env)
    wait_for(lambda: len(daemon.events("drill_failed", target=db.name)) >= 2, 200, "two failed drills", interval=1)
    wait_for(lambda: 'backup_watcher_restore_drills_total{database="appdb",result="failure",target="bwt-baddrill-db"}'
             in daemon.metrics(), 10, "the failure metric")
    assert daemon.stop() == 0

    failure = daemon.events("drill_failed", target=db.name)[0]
    assert "restore of snapshot" in str(failure["error"]) and "failed" in str(failure["error"])
    drill_alerts = [t for t in webhook.titles() if "restore drill" in t]
    assert drill_alerts == [f"[backup-watcher] FAILED: restore drill of {db.name}"]
    assert drill_containers() == []


def test_no_drill_container_remains_after_sigterm_or_after_sigkill_and_restart(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("bwt-killdrill-db", "17")
    db.psql(SEED)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_SCHEDULE": "0 3 * * *",
           "WATCHER_DRILL_SCHEDULE": "* * * * *", "WATCHER_SHUTDOWN_GRACE": "0"}
    assert run_watcher(["backup"], env).returncode == 0

    daemon: DaemonProcess = start_daemon(env)
    wait_for(lambda: drill_containers(), 90, "a drill container to appear", interval=0.2)
    assert daemon.stop(signal.SIGTERM, timeout=60) == 0
    assert drill_containers() == []

    killed: DaemonProcess = start_daemon(env)
    wait_for(lambda: drill_containers(), 90, "a drill container to appear", interval=0.2)
    killed.stop(signal.SIGKILL)
    assert drill_containers(), "SIGKILL leaves the drill container behind"
    again: DaemonProcess = start_daemon(env)
    assert drill_containers() == []
    assert again.events("drill_leftover_removed")
    assert again.stop() == 0


def test_drill_containers_are_never_targets(start_pg: StartPg, start_daemon: StartDaemon, repo: Repo,
                                            watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("bwt-pattern-db", "15")
    db.psql(SEED)
    # A container that looks like a drill's, with a name the pattern matches, opted in by label too. (The
    # pattern is this test's own: other tests' drill containers, which bw-drill-* matches, are never
    # targets either, but their databases would be.)
    docker("run", "-d", "--network", "none", "--name", "bwt-pattern-impostor", "--label", TEST_LABEL,
           "--label", "backup-watcher.role=drill", "--label", "backup-watcher.enable=true",
           "-e", "POSTGRES_PASSWORD=test-only", PG_IMAGES["15"])
    try:
        env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "bwt-pattern-*,bw-drill-*", "WATCHER_SCHEDULE": "0 3 * * *",
               "WATCHER_DRILL_SCHEDULE": "* * * * *"}
        daemon: DaemonProcess = start_daemon(env)
        seen: set[str] = set()

        def drill_done() -> bool:
            seen.update(str(row["target"]) for row in daemon.status())
            return bool(daemon.events("drill_succeeded", target=db.name))

        wait_for(drill_done, 150, "a drill", interval=0.1)
        assert daemon.stop() == 0
        assert db.name in seen
        assert not [name for name in seen if name.startswith("bw-drill-") or name == "bwt-pattern-impostor"], seen
        assert not [e for e in daemon.events("target_registered") if str(e["target"]).startswith("bw-drill-")]
    finally:
        docker("rm", "-f", "-v", "bwt-pattern-impostor", check=False)



def back_up_and_drill(db: PgContainer, watcher_env: dict[str, str]) -> None:
    """Seeds `db`, backs it up and drills it: the drill passes with the seed's counts and leaves no container."""
    db.psql(SEED)
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    assert run_watcher(["backup"], env).returncode == 0
    done = run_watcher(["drill", db.name], env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "public.orders: dump 4321, restored 4321\n" in done.stdout, done.stdout
    assert drill_containers() == []


@pytest.mark.parametrize("major", ["15", "17"])
def test_drill_of_a_container_started_with_init_passes(major: str, start_pg: StartPg, repo: Repo,
                                                        watcher_env: dict[str, str]) -> None:
    """PID 1 of the source (and so of its drill container) is docker-init, not postgres."""
    db: PgContainer = start_pg(f"bwt-drillinit{major}-db", major, docker_args=("--init",))
    assert docker("exec", db.name, "cat", "/proc/1/comm").stdout.strip() != "postgres"
    back_up_and_drill(db, watcher_env)


# Runs in the entrypoint's temporary server (listen_addresses=''), 20 s, then replaces the database: a
# drill that restored into that server would see its restore wiped and fail. The source container sets
# BWT_FAST_INIT (a drill container gets only POSTGRES_*), so only the drill waits.
SLOW_INIT_SCRIPT = b"""[ -n "${BWT_FAST_INIT:-}" ] || sleep 20
psql -v ON_ERROR_STOP=1 -X -q -U "$user" -d postgres --set=db="$db" <<'SQL'
DROP DATABASE :"db";
CREATE DATABASE :"db";
SQL
"""


def build_slow_init_image(major: str) -> str:
    """The test image plus a /docker-entrypoint-initdb.d script that runs 20 s; returns its tag."""
    tag = f"backup-watcher-test/postgres-slowinit:{major}"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as archive:
        for name, data in (("Dockerfile", f"FROM {PG_IMAGES[major]}\nCOPY slow.sh /docker-entrypoint-initdb.d/\n"
                                          .encode()),
                           ("slow.sh", SLOW_INIT_SCRIPT)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    built = subprocess.run(["docker", "build", "--network", "none", "-q", "-t", tag, "-"], input=context.getvalue(),
                           capture_output=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr.decode(errors="replace")
    return tag


def test_drill_waits_out_an_initdb_script_of_20_seconds(start_pg: StartPg, repo: Repo,
                                                         watcher_env: dict[str, str]) -> None:
    image = build_slow_init_image("17")
    db: PgContainer = start_pg("bwt-drillslow-db", "17", image=image, extra_env={"BWT_FAST_INIT": "1"})
    back_up_and_drill(db, watcher_env)


def _drill_events(stderr: str, event: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if f'"{event}"' in line]


@pytest.mark.parametrize("major", ["15", "17"])
def test_drill_rehearses_recovery_with_the_roles_of_the_globals_owners_and_settings(
        major: str, start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg(f"bwt-drillprops{major}-db", major)
    db.psql(SEED)
    db.psql("""
        ALTER DATABASE appdb SET search_path TO billing, public;
        ALTER DATABASE appdb SET timezone TO 'Asia/Tokyo';
        REVOKE CONNECT ON DATABASE appdb FROM PUBLIC;
        COMMENT ON DATABASE appdb IS 'drilled';
        CREATE ROLE bw_drill_owner NOLOGIN;
        CREATE ROLE bw_drill_reader LOGIN PASSWORD 'reader-secret-1';
        GRANT bw_drill_owner TO bw_drill_reader;
        ALTER DATABASE appdb OWNER TO bw_drill_owner;
        GRANT CONNECT ON DATABASE appdb TO bw_drill_reader;
    """, database="postgres")
    db.psql("ALTER TABLE orders OWNER TO bw_drill_owner; GRANT SELECT ON orders TO bw_drill_reader;", database="appdb")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    assert run_watcher(["backup"], env).returncode == 0

    # The drill container has only POSTGRES_USER: the roles come from the globals of the same pass,
    # then owners, grants and settings are restored and checked, as on a fresh host.
    done = run_watcher(["drill", db.name], env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not _drill_events(done.stderr, "drill_without_owners"), done.stderr
    created = _drill_events(done.stderr, "roles_created")
    assert created and set(str(created[0]["roles"]).split(",")) == {"bw_drill_owner", "bw_drill_reader"}, done.stderr
    succeeded = _drill_events(done.stderr, "drill_succeeded")
    assert succeeded[0]["database_owner"] == "bw_drill_owner"
    assert succeeded[0]["database_settings"] == ["TimeZone", "search_path"]
    assert succeeded[0]["table_owners"] == ["app", "bw_drill_owner"]
    assert "public.orders: dump 4321, restored 4321\n" in done.stdout, done.stdout
    assert "reader-secret-1" not in done.stdout + done.stderr and "SCRAM-SHA-256$" not in done.stdout + done.stderr

    # Without the globals snapshot (pruned), the drill still checks the data and the settings, without owners.
    for snapshot in repo.globals_of(db.name):
        repo.restic("forget", snapshot["id"])
    done = run_watcher(["drill", db.name], env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    without = _drill_events(done.stderr, "drill_without_owners")
    assert without and without[0]["missing_roles"] == ["bw_drill_owner", "bw_drill_reader"], done.stderr
    succeeded = _drill_events(done.stderr, "drill_succeeded")
    assert succeeded[0]["database_owner"] == "app" and succeeded[0]["table_owners"] == ["app"]
    assert succeeded[0]["database_settings"] == ["TimeZone", "search_path"]
    assert "public.orders: dump 4321, restored 4321\n" in done.stdout, done.stdout
