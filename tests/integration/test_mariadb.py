"""MariaDB as a first-class engine (SPEC §13), on Debian's MariaDB 10.11 (bookworm) and 11.8 (trixie):
backup streamed from inside the container with the integrity gate, databases=all, users and grants as the
globals, restore into a scratch database then the swap, and drills in a throwaway container."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Repo, docker, process_command_lines, run_watcher, wait_for
from tests.integration.mariadb_kit import (
    APP_PASSWORD,
    APP_USERS,
    ITEMS,
    NASTY_PASSWORD,
    MariaContainer,
    StartMariaDB,
    app_login,
)
from tests.kit import RestServer

pytestmark = pytest.mark.engine

SEED = r"""
CREATE TABLE people (
    id bigint PRIMARY KEY AUTO_INCREMENT,
    name varchar(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci NOT NULL,
    photo longblob,
    profile json,
    balance decimal(20, 6),
    born datetime(6),
    seen timestamp(3) NULL,
    note text CHARACTER SET utf8mb4
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
INSERT INTO people (name, photo, profile, balance, born, seen, note)
SELECT CONCAT('Zoë Ångström 名前 😀 ', seq), UNHEX(CONCAT(MD5(seq), '00FF0A0D5C27')),
       JSON_OBJECT('n', seq, 'tags', JSON_ARRAY('ü', seq % 7), 'nested', JSON_OBJECT('x', NULL)),
       seq * 1234.567891, TIMESTAMP'2001-02-03 04:05:06.789123' + INTERVAL seq HOUR,
       TIMESTAMP'2020-01-01 00:00:00.125' + INTERVAL seq MINUTE,
       CONCAT('line one\nline two\ttab ''quote'' \\ backslash ', seq)
FROM seq_1_to_2000;
CREATE TABLE invoices (no int PRIMARY KEY AUTO_INCREMENT, person bigint, amount decimal(12, 2),
                       FOREIGN KEY (person) REFERENCES people(id)) ENGINE=InnoDB AUTO_INCREMENT=1000;
INSERT INTO invoices (person, amount) SELECT seq, seq / 3 FROM seq_1_to_500;
CREATE TABLE audit (id int PRIMARY KEY AUTO_INCREMENT, what varchar(100)) ENGINE=InnoDB;
CREATE VIEW rich AS SELECT name, balance FROM people WHERE balance > 1000000;
DELIMITER ;;
CREATE TRIGGER invoices_audit AFTER INSERT ON invoices FOR EACH ROW
  INSERT INTO audit (what) VALUES (CONCAT('invoice ', NEW.no));;
CREATE PROCEDURE pay(IN who bigint, IN how_much decimal(12, 2))
BEGIN
  INSERT INTO invoices (person, amount) VALUES (who, how_much);
END;;
DELIMITER ;
CREATE EVENT nightly ON SCHEDULE EVERY 1 DAY STARTS '2030-01-01 00:00:00' DISABLE
  DO DELETE FROM audit WHERE id < 0;
CALL pay(1, 9.99);
"""

CHANGE = """
DELETE FROM invoices WHERE no % 3 = 0;
UPDATE people SET name = 'changed', profile = JSON_OBJECT() WHERE id < 100;
INSERT INTO people (name) VALUES ('new row');
CREATE OR REPLACE VIEW rich AS SELECT name, balance FROM people WHERE balance > 0;
DROP TRIGGER invoices_audit;
DROP PROCEDURE pay;
CREATE TABLE extra (x int);
"""

FINGERPRINT = """
SET SESSION group_concat_max_len = 1073741824;
SELECT 'people', MD5(GROUP_CONCAT(CONCAT_WS('|', id, name, HEX(photo), profile, balance, born, seen, HEX(note))
                                  ORDER BY id SEPARATOR '#')) FROM people;
SELECT 'invoices', MD5(GROUP_CONCAT(CONCAT_WS('|', no, person, amount) ORDER BY no SEPARATOR '#')) FROM invoices;
SELECT 'audit', MD5(GROUP_CONCAT(CONCAT_WS('|', id, what) ORDER BY id SEPARATOR '#')) FROM audit;
SELECT 'rich', MD5(GROUP_CONCAT(CONCAT_WS('|', name, balance) ORDER BY name, balance SEPARATOR '#')) FROM rich;
SELECT 'auto_increment', AUTO_INCREMENT FROM information_schema.TABLES
  WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'invoices';
SELECT 'tables', GROUP_CONCAT(TABLE_NAME ORDER BY TABLE_NAME) FROM information_schema.TABLES
  WHERE TABLE_SCHEMA = DATABASE();
SELECT 'triggers', GROUP_CONCAT(CONCAT(TRIGGER_NAME, ':', ACTION_STATEMENT)) FROM information_schema.TRIGGERS
  WHERE TRIGGER_SCHEMA = DATABASE();
SELECT 'routines', GROUP_CONCAT(CONCAT(ROUTINE_NAME, ':', ROUTINE_DEFINITION)) FROM information_schema.ROUTINES
  WHERE ROUTINE_SCHEMA = DATABASE();
SELECT 'events', GROUP_CONCAT(CONCAT(EVENT_NAME, ':', EVENT_DEFINITION, ':', STATUS)) FROM information_schema.EVENTS
  WHERE EVENT_SCHEMA = DATABASE();
SELECT 'charset', DEFAULT_CHARACTER_SET_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = DATABASE();
"""

BIG_TABLE = """
CREATE TABLE a_big (id int PRIMARY KEY, payload text) ENGINE=InnoDB;
INSERT INTO a_big SELECT seq, REPEAT(MD5(seq), 12) FROM seq_1_to_300000;
"""


def _backup(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_watcher(["backup", *args], env)


def _paths(repo: Repo, name: str) -> list[str]:
    return sorted(path for snap in repo.snapshots_of(name) for path in snap["paths"])


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_backup_of_every_kind_of_object_with_a_nasty_password(
        suite: str, start_mariadb: StartMariaDB, repo: Repo, watcher_env: dict[str, str]) -> None:
    name = f"bwt-e18-maria-{suite}"
    # trixie reads the root password from a file (MARIADB_ROOT_PASSWORD_FILE), inside the container.
    db = start_mariadb(name, suite, password_file=suite == "trixie")
    db.sql(SEED, "shop")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name}
    since = docker("system", "info", "--format", "{{.SystemTime}}").stdout.strip()
    seen: set[str] = set()
    backup = subprocess.Popen([sys.executable, "-m", "watcher", "backup"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    while backup.poll() is None:
        seen.update(line for line in process_command_lines() if "mariadb-dump" in line)
        time.sleep(0.02)
    out, err = backup.communicate(timeout=300)
    assert backup.returncode == 0, out + err
    snapshots = repo.snapshots_of(name)
    assert [s["paths"] for s in snapshots] == [["/shop.sql"]]
    assert {"engine=mariadb", "database=shop"} <= set(snapshots[0]["tags"])
    globals_ = repo.globals_of(name)
    assert len(globals_) == 1 and "engine=mariadb" in globals_[0]["tags"]
    users = repo.restic("dump", globals_[0]["id"], "/globals.sql").stdout
    assert "CREATE USER `root`@`%`" in users and "GRANT ALL PRIVILEGES ON *.*" in users
    dump = repo.restic("dump", snapshots[0]["id"], "/shop.sql").stdout
    for part in ("CREATE TABLE `people`", "TRIGGER", "invoices_audit", "PROCEDURE `pay`", "EVENT `nightly`",
                 "VIEW `rich`", "-- Dump completed"):
        assert part in dump, part
    assert seen, "the dump ran (seen in the process list)"
    until = docker("system", "info", "--format", "{{.SystemTime}}").stdout.strip()
    events = docker("events", "--since", since, "--until", until, "--filter", f"container={name}",
                    "--format", "{{json .}}").stdout
    assert "exec_create: sh -c" in events and "MARIADB_ROOT_PASSWORD" in events, events[:2000]
    for text in [*seen, out, err, events]:
        assert NASTY_PASSWORD not in text and "quoted" not in text


def test_all_databases_leaves_out_the_system_schemas(start_mariadb: StartMariaDB, repo: Repo,
                                                     watcher_env: dict[str, str]) -> None:
    name = "bwt-e18-maria-all"
    db = start_mariadb(name, labels={"backup-watcher.databases": "all"})
    db.sql("CREATE DATABASE wiki; CREATE TABLE wiki.pages (id int PRIMARY KEY); INSERT INTO wiki.pages VALUES (1);")
    backup = _backup({**watcher_env, "WATCHER_CONTAINER_PATTERNS": name})
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert _paths(repo, name) == ["/shop.sql", "/wiki.sql"]


def test_dump_failing_part_way_leaves_no_snapshot(start_mariadb: StartMariaDB, repo: Repo,
                                                  watcher_env: dict[str, str]) -> None:
    # The dump user may read a_big but not z_secret: mariadb-dump streams a_big, then fails on z_secret.
    name = "bwt-e18-maria-partway"
    db = start_mariadb(name, labels={"backup-watcher.user": "dumper"},
                       extra_env={"MARIADB_USER": "dumper", "MARIADB_PASSWORD": "dump-pw"})
    small_table = BIG_TABLE.replace("seq_1_to_300000", "seq_1_to_20000")
    db.sql(small_table + "CREATE TABLE z_secret (id int, secret text); INSERT INTO z_secret VALUES (1, 'x');", "shop")
    db.sql("REVOKE ALL ON shop.* FROM dumper; GRANT EVENT, LOCK TABLES ON shop.* TO dumper;"
           "GRANT SELECT, SHOW VIEW, TRIGGER ON shop.a_big TO dumper; GRANT SELECT (id) ON shop.z_secret TO dumper;")
    backup = _backup({**watcher_env, "WATCHER_CONTAINER_PATTERNS": name})
    assert backup.returncode == 1, backup.stdout + backup.stderr
    assert "z_secret" in backup.stdout and "no snapshot was written" in backup.stdout, backup.stdout
    assert repo.snapshots_of(name) == []


def _wait_for_dump(db: MariaContainer) -> None:
    """Waits until mariadb-dump is streaming a_big's rows."""
    wait_for(lambda: "FROM `a_big`" in db.sql(
        "SELECT info FROM information_schema.PROCESSLIST WHERE info LIKE 'SELECT %'", check=False), 120,
        "mariadb-dump to stream a_big", interval=0.05)


def test_server_killed_mid_dump_leaves_no_snapshot(start_mariadb: StartMariaDB, repo: Repo,
                                                   watcher_env: dict[str, str]) -> None:
    name = "bwt-e18-maria-killed"
    db = start_mariadb(name)
    db.sql(BIG_TABLE, "shop")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name}
    backup = subprocess.Popen([sys.executable, "-m", "watcher", "backup"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    _wait_for_dump(db)
    rows = docker("top", name, "-eo", "pid,comm").stdout.splitlines()[1:]
    server = [int(row.split()[0]) for row in rows if row.split()[1] == "mariadbd"]
    assert server, rows
    os.kill(server[0], signal.SIGKILL)  # as the OOM killer would
    out, err = backup.communicate(timeout=300)
    assert backup.returncode == 1, out + err
    assert "no snapshot was written" in out, out
    assert repo.snapshots_of(name) == []
    assert "no errors were found" in repo.restic("check").stdout


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_backup_change_restore_returns_every_table_exactly(
        suite: str, start_mariadb: StartMariaDB, repo: Repo, watcher_env: dict[str, str]) -> None:
    name = f"bwt-e18-maria-rt-{suite}"
    db = start_mariadb(name, suite)
    db.sql(SEED, "shop")
    before = db.sql(FINGERPRINT, "shop")
    assert "invoices_audit" in before and "pay:" in before and "nightly:" in before
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name}
    backup = _backup(env)
    assert backup.returncode == 0, backup.stdout + backup.stderr

    db.sql(CHANGE, "shop")
    assert db.sql(FINGERPRINT, "shop") != before
    restore = run_watcher(["restore", name, "latest", "--yes"], env)
    assert restore.returncode == 0, restore.stdout + restore.stderr
    after = db.sql(FINGERPRINT, "shop")
    assert after.splitlines() == before.splitlines()
    # No scratch copy or tables moved aside are left; the restored trigger and procedure work.
    assert db.sql("SHOW DATABASES LIKE 'shop\\_bw\\_%'") == ""
    db.sql("CALL pay(2, 1.50);", "shop")
    assert db.sql("SELECT COUNT(*) FROM audit WHERE what LIKE 'invoice %'", "shop") == "2"


def test_restore_of_a_dump_that_does_not_load_leaves_the_database_untouched(
        start_mariadb: StartMariaDB, repo: Repo, watcher_env: dict[str, str]) -> None:
    name = "bwt-e18-maria-badload"
    db = start_mariadb(name)
    db.sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);", "shop")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name}
    assert _backup(env).returncode == 0
    # The destination's restore user may create and drop databases but insert nowhere but its own:
    # the load into the scratch copy fails at its first write.
    into = start_mariadb(f"{name}-into", labels={"backup-watcher.user": "restorer"},
                         extra_env={"MARIADB_USER": "restorer", "MARIADB_PASSWORD": "r-pw"})
    into.sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (7);", "shop")
    into.sql("GRANT CREATE, DROP, SELECT ON *.* TO restorer;")
    restore = run_watcher(["restore", name, "latest", "--into", into.name, "--yes"], env)
    assert restore.returncode == 1, restore.stdout + restore.stderr
    assert "was left untouched" in restore.stderr and "denied" in restore.stderr, restore.stderr
    assert into.sql("SELECT GROUP_CONCAT(id) FROM t", "shop") == "7"
    assert into.sql("SHOW DATABASES LIKE 'shop\\_bw\\_%'") == ""


def _drill_containers() -> list[str]:
    return docker("ps", "-a", "--filter", "label=backup-watcher.role=drill", "--filter",
                  "label=backup-watcher.drill-source=bwt-e18-maria-drill", "--format", "{{.Names}}").stdout.split()


def test_drill_passes_and_reports_row_counts_and_fails_on_a_damaged_repository(
        start_mariadb: StartMariaDB, repo: Repo, watcher_env: dict[str, str]) -> None:
    name = "bwt-e18-maria-drill"
    db = start_mariadb(name, "trixie")
    db.sql(SEED + APP_USERS, "shop")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name}
    assert _backup(env).returncode == 0
    db.sql("INSERT INTO invoices (person, amount) VALUES (3, 1);", "shop")  # after the backup: not counted

    done = run_watcher(["drill", name], env)
    assert done.returncode == 0, done.stdout + done.stderr
    for table, rows in {"people": 2000, "invoices": 501, "audit": 1, "items": 300}.items():
        assert f"{table}: dump {rows}, restored {rows}\n" in done.stdout, done.stdout
    # The drill rehearses a fresh host: the app's user and its role created from the globals first.
    created = next(line for line in done.stderr.splitlines() if '"event": "users_created"' in line)
    assert '"users": "app@%,auditor"' in created, created
    assert f"ok      {name}/shop" in done.stdout
    assert _drill_containers() == []

    for pack in (p for p in (repo.path / "data").rglob("*") if p.is_file()):
        pack.chmod(0o644)
        data = bytearray(pack.read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
        pack.write_bytes(bytes(data))
    damaged = run_watcher(["drill", name], env)
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    # Whichever it reads first, the globals or the dump, fails the drill naming the snapshot.
    assert f"FAILED  {name}/shop" in damaged.stdout, damaged.stdout
    assert "restore of snapshot" in damaged.stdout or "reading globals snapshot" in damaged.stdout, damaged.stdout
    assert _drill_containers() == []


def test_a_streamed_copy_restores_on_a_fresh_host_with_the_app_users_login(
        start_mariadb: StartMariaDB, repo: Repo, watcher_env: dict[str, str], tmp_path: Path) -> None:
    name = "h18-maria-copy"
    db = start_mariadb(name)
    db.sql(APP_USERS, "shop")
    before = db.sql(ITEMS, "shop")
    # Two rest-servers with a user each: restic copy could not carry both, each snapshot is streamed.
    primary = RestServer(tmp_path / "primary", "primary-user", "primary-rest-pw-h18")
    offsite = RestServer(tmp_path / "offsite", "offsite-user", "offsite-rest-pw-h18")
    secret = tmp_path / "offsite.password"
    secret.write_text("offsite-pw-h18\n")
    env = {**watcher_env, "RESTIC_REPOSITORY": primary.url, "RESTIC_REST_USERNAME": primary.user,
           "RESTIC_REST_PASSWORD": primary.password, "WATCHER_CONTAINER_PATTERNS": name, "WATCHER_HOST": "old-host",
           "WATCHER_COPY_TO": "offsite", "WATCHER_COPY_OFFSITE_REPOSITORY": offsite.url,
           "WATCHER_COPY_OFFSITE_PASSWORD_FILE": str(secret),
           "WATCHER_COPY_OFFSITE_ENV_FILE": str(offsite.env_file(tmp_path / "offsite.env"))}
    backup = _backup(env)
    assert backup.returncode == 0, backup.stdout + backup.stderr
    copied = run_watcher(["copy"], env)
    assert copied.returncode == 0 and "offsite: 2 snapshot(s) copied" in copied.stdout, copied.stdout + copied.stderr
    assert '"method": "streamed"' in copied.stderr
    listing = subprocess.run(["restic", "--no-lock", "snapshots", "--json"], capture_output=True, text=True,
                             check=True, timeout=120, env={**os.environ, "RESTIC_REPOSITORY": offsite.url,
                                                           "RESTIC_PASSWORD": "offsite-pw-h18",
                                                           "RESTIC_REST_USERNAME": offsite.user,
                                                           "RESTIC_REST_PASSWORD": offsite.password}).stdout
    in_copy = sorted((tuple(s["paths"]), tuple(sorted(s["tags"]))) for s in json.loads(listing))
    assert in_copy == [(("/globals.sql",), ("backup-watcher", f"container={name}", "engine=mariadb", "globals")),
                       (("/shop.sql",), ("backup-watcher", f"container={name}", "database=shop", "engine=mariadb"))]
    primary.stop()  # the old host and the primary's backend are gone: the copy restores alone

    fresh = start_mariadb(name)  # a fresh container of the same name and env, without the app's user
    assert fresh.sql("SELECT COUNT(*) FROM mysql.user WHERE User IN ('app', 'auditor')") == "0"
    restore = run_watcher(["restore", name, "latest", "--host", "old-host", "--from", "offsite", "--yes"],
                          {**env, "WATCHER_HOST": "new-host"})
    assert restore.returncode == 0, restore.stdout + restore.stderr
    said = next(line for line in restore.stderr.splitlines() if line.startswith("Users created"))
    assert sorted(said.split("globals: ", 1)[1].split(";")[0].split(", ")) == ["app@%", "auditor"], said
    assert fresh.sql(ITEMS, "shop") == before
    # The app user logs in with its password, reads through its default role, deletes by its table grant.
    assert app_login(fresh, APP_PASSWORD, ITEMS) == (0, before)
    assert app_login(fresh, APP_PASSWORD, "DELETE FROM items WHERE id = 1") == (0, "")
    code, said = app_login(fresh, "not the password", "SELECT 1")
    assert code != 0 and "Access denied" in said
    hashes = db.sql("SELECT authentication_string FROM mysql.user WHERE User = 'app'")
    assert hashes.startswith("*")
    for output in (backup.stdout + backup.stderr, copied.stdout + copied.stderr, restore.stdout + restore.stderr):
        assert APP_PASSWORD not in output and hashes not in output


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_a_locked_table_fails_the_dump_within_the_lock_wait_bound_naming_the_table(
        suite: str, start_mariadb: StartMariaDB, repo: Repo, watcher_env: dict[str, str]) -> None:
    name = f"h18-maria-lock-{suite}"
    db = start_mariadb(name, suite, labels={"backup-watcher.lock-wait-timeout": "3s"})
    db.sql("CREATE TABLE accounts (id int PRIMARY KEY); INSERT INTO accounts VALUES (1);"
           "CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders VALUES (1);", "shop")
    # Another session holds orders with LOCK TABLES … WRITE for two minutes (as a long migration would).
    holder = subprocess.Popen(["docker", "exec", "-i", name, "sh", "-c",
                               'MYSQL_PWD=$MARIADB_ROOT_PASSWORD exec mariadb -uroot shop'],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert holder.stdin is not None
    holder.stdin.write(b"LOCK TABLES orders WRITE; SELECT SLEEP(120);\n")
    holder.stdin.close()
    sleeping = "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP(120)%'"
    wait_for(lambda: db.sql(sleeping) != "", 30, "the lock to be held")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name}
    try:
        backup = _backup(env)
        assert backup.returncode == 1, backup.stdout + backup.stderr
        assert "mariadb-dump gave up waiting for a lock on table `orders` after 3s" in backup.stdout, backup.stdout
        assert "no snapshot was written" in backup.stdout
        assert repo.snapshots_of(name) == []
        assert db.sql(sleeping) != "", "the lock was still held when the dump gave up"
        # The interrupted dump left no query of its own waiting on the server.
        assert db.sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT /*!40001%'") == "0"
    finally:
        db.sql(f"KILL {db.sql(sleeping) or 0};", check=False)
        holder.wait(timeout=60)
    healed = _backup(env)  # the lock gone, the next run succeeds
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert _paths(repo, name) == ["/shop.sql"]
