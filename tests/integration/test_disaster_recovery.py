"""Disaster recovery (SPEC §10): a lost host's databases rebuilt on another engine from the repository alone.

Two engines on one machine stand for two hosts (TESTING.md): the test engine is host A, the second
dockerd (the `second_engine` fixture) host B. Both share one restic repository.
"""

from __future__ import annotations

import uuid

import pytest

from tests.integration.conftest import PgContainer, Repo, SecondEngine, StartPg, docker, run_watcher
from tests.integration.conftest import _copy_image as copy_image
from tests.integration.mariadb_kit import APP_PASSWORD as MARIA_APP_PASSWORD
from tests.integration.mariadb_kit import (
    APP_USERS,
    ITEMS,
    MARIADB_IMAGES,
    NASTY_PASSWORD,
    REDIS_IMAGE,
    StartMariaDB,
    StartRedis,
    app_login,
    redis_contents,
)
from tests.integration.mariadb_kit import RESTORE as REDIS_RESTORE

REDIS_DUMP = "redis-cli --rdb - 2>/dev/null"

pytestmark = [pytest.mark.engine, pytest.mark.slow]

APP_PASSWORD = "app-login old pw 'q' ✓"
SETUP = f"""
CREATE ROLE owner_role NOLOGIN;
CREATE ROLE app_login LOGIN PASSWORD '{APP_PASSWORD.replace("'", "''")}';
ALTER ROLE app_login SET statement_timeout = '7s';
GRANT owner_role TO app_login;
CREATE ROLE "Read Only" LOGIN;
CREATE SCHEMA shop AUTHORIZATION owner_role;
SET ROLE owner_role;
CREATE TABLE shop.items (id int PRIMARY KEY, name text);
INSERT INTO shop.items SELECT g, md5(g::text) FROM generate_series(1, 500) AS g;
CREATE TABLE shop.orders (id int PRIMARY KEY, item int REFERENCES shop.items, qty int);
INSERT INTO shop.orders SELECT g, 1 + g % 500, g % 7 FROM generate_series(1, 1500) AS g;
GRANT USAGE ON SCHEMA shop TO "Read Only";
GRANT SELECT ON ALL TABLES IN SCHEMA shop TO "Read Only";
GRANT INSERT ON shop.orders TO app_login;
RESET ROLE;
REVOKE CONNECT ON DATABASE appdb FROM PUBLIC;
GRANT CONNECT ON DATABASE appdb TO app_login, "Read Only";
ALTER DATABASE appdb SET search_path = shop, public;
ALTER ROLE "Read Only" IN DATABASE appdb SET work_mem = '8MB';
"""
# What must be equal on both hosts, one query each (role attributes and settings, memberships, owners,
# table grants, the database's owner, ACL and settings, content).
FACTS = {
    "roles": "SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication,"
             " rolbypassrls, rolconfig FROM pg_roles WHERE rolname !~ '^pg_' ORDER BY 1",
    # Not the bootstrap superuser's: each host's initdb set it (same password, another salt), and it is kept.
    "passwords": "SELECT rolname, rolpassword FROM pg_authid WHERE rolname !~ '^pg_' AND rolname <> current_user"
                 " ORDER BY 1",
    "memberships": "SELECT r.rolname, m.rolname, a.admin_option FROM pg_auth_members a"
                   " JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member"
                   " WHERE r.rolname !~ '^pg_' ORDER BY 1, 2",
    "owners": "SELECT 'schema', nspname, pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'shop'"
              " UNION ALL SELECT 'table', relname, pg_get_userbyid(relowner) FROM pg_class"
              " WHERE relnamespace = 'shop'::regnamespace AND relkind = 'r' ORDER BY 1, 2",
    "grants": "SELECT grantee, table_name, privilege_type FROM information_schema.role_table_grants"
              " WHERE table_schema = 'shop' ORDER BY 1, 2, 3",
    # The ACL's entries as a set (PostgreSQL 15 keeps them in the order they were granted).
    "database": "SELECT pg_get_userbyid(datdba), (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(datacl) a)"
                " FROM pg_database WHERE datname = 'appdb'",
    "database_settings": "SELECT coalesce(pg_get_userbyid(nullif(setrole, 0)), '-'), setconfig FROM pg_db_role_setting"
                         " WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = 'appdb') ORDER BY 1",
    "content": "SELECT md5(string_agg(i::text, ',' ORDER BY i.id)) FROM shop.items i"
               " UNION ALL SELECT md5(string_agg(o::text, ',' ORDER BY o.id)) FROM shop.orders o",
}


def facts(db: PgContainer) -> dict[str, str]:
    return {name: db.psql(sql) for name, sql in FACTS.items()}


def login_over_tcp(db: PgContainer, password: str) -> tuple[int, str]:
    """app_login connects over TCP on the container's loopback (password auth, scram) and reads its setting."""
    done = docker("exec", "-e", "PGPASSWORD", db.name, "psql", "-X", "-At", "-h", "127.0.0.1", "-U", "app_login",
                  "-d", "appdb", "-c", "SHOW statement_timeout", check=False,
                  env={"PGPASSWORD": password, **db.engine_env})
    return done.returncode, done.stdout.strip() + done.stderr.strip()


def test_restore_all_rebuilds_a_lost_host_on_another_engine(
        start_pg: StartPg, second_engine: SecondEngine, repo: Repo, watcher_env: dict[str, str]) -> None:
    run = uuid.uuid4().hex[:6]
    host_a, host_b = f"dr-a-{run}", f"dr-b-{run}"
    names = {major: f"bwt-dr{run}-pg{major}" for major in ("15", "17")}
    on_a = {major: start_pg(name, major) for major, name in names.items()}
    for db in on_a.values():
        db.psql(SETUP)
    env_a = {**watcher_env, "WATCHER_HOST": host_a, "WATCHER_CONTAINER_PATTERNS": ",".join(names.values())}
    backup = run_watcher(["backup"], env_a)
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert backup.stdout.count("/(globals)  snapshot") == 2, backup.stdout

    # Host B: fresh containers of the same names and env, nothing else.
    on_b = {major: start_pg(name, major, docker_host=second_engine.host) for major, name in names.items()}
    assert "owner_role" not in on_b["17"].psql("SELECT string_agg(rolname, ',') FROM pg_roles")
    env_b = {**watcher_env, "DOCKER_HOST": second_engine.host, "WATCHER_HOST": host_b,
             "WATCHER_CONTAINER_PATTERNS": ",".join(names.values())}
    done = run_watcher(["restore", "--all", "--host", host_a, "--yes"], env_b)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in names.values():
        said = next(line for line in done.stderr.splitlines() if line.startswith(f"{name}: Roles created"))
        created = said.split("globals: ", 1)[1].split(";")[0].split(", ")
        assert sorted(created) == ["Read Only", "app_login", "owner_role"], said
        assert any(line.split()[:2] == [name, "appdb"] and line.split()[3] == "ok" for line in done.stdout.splitlines())

    for major in names:
        on_a_facts, on_b_facts = facts(on_a[major]), facts(on_b[major])
        differing = {name: (on_a_facts[name], on_b_facts[name]) for name in FACTS
                     if on_a_facts[name] != on_b_facts[name]}
        assert not differing, (major, differing)
        assert login_over_tcp(on_b[major], APP_PASSWORD) == (0, "7s")
        code, said = login_over_tcp(on_b[major], "not the password")
        assert code != 0 and "password authentication failed" in said
    for output in (backup.stdout + backup.stderr, done.stdout + done.stderr):
        assert APP_PASSWORD not in output and "SCRAM-SHA-256$" not in output


def test_restore_all_names_a_missing_container_and_fails(
        start_pg: StartPg, second_engine: SecondEngine, repo: Repo, watcher_env: dict[str, str]) -> None:
    run = uuid.uuid4().hex[:6]
    here, gone = f"bwt-dr{run}-here", f"bwt-dr{run}-gone"
    for name in (here, gone):
        start_pg(name, "15").psql("CREATE TABLE t AS SELECT 1 AS x;")
    env_a = {**watcher_env, "WATCHER_HOST": f"dr-a-{run}", "WATCHER_CONTAINER_PATTERNS": f"{here},{gone}"}
    assert run_watcher(["backup"], env_a).returncode == 0
    on_b = start_pg(here, "15", docker_host=second_engine.host)
    env_b = {**watcher_env, "DOCKER_HOST": second_engine.host, "WATCHER_HOST": f"dr-b-{run}"}
    refused = run_watcher(["restore", "--all", "--host", f"dr-a-{run}"], env_b)
    assert refused.returncode == 2 and "pass --yes" in refused.stderr
    assert on_b.psql("SELECT to_regclass('t') IS NULL") == "t", "nothing may change without confirmation"
    done = run_watcher(["restore", "--all", "--host", f"dr-a-{run}", "--yes"], env_b)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert "ok" in rows[here].split()
    assert "FAILED" in rows[gone].split() and f"no running container named {gone}" in rows[gone]
    assert on_b.psql("SELECT x FROM t") == "1"


def test_a_role_the_globals_lack_fails_the_restore_before_the_live_database_is_touched(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db = start_pg(f"bwt-dr{uuid.uuid4().hex[:6]}-db", "17")
    db.psql("CREATE ROLE owner_role NOLOGIN; CREATE TABLE t (x int); ALTER TABLE t OWNER TO owner_role;")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_HOST": "dr-old"}
    assert run_watcher(["backup"], env).returncode == 0
    globals_ids = [s["id"] for s in repo.globals_of(db.name)]
    assert len(globals_ids) == 1
    repo.restic("forget", *globals_ids)  # the globals pruned (or never taken)

    # The old host is gone: a fresh container of the same name, whose database already holds something.
    fresh = start_pg(db.name, "17")
    fresh.psql("CREATE TABLE keep_me AS SELECT 42 AS answer;")
    done = run_watcher(["restore", db.name, "latest", "--host", "dr-old", "--yes"],
                       {**env, "WATCHER_HOST": "dr-new"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "owner_role" in done.stderr and "no globals snapshot" in done.stderr and "nothing was changed" in done.stderr
    assert fresh.psql("SELECT answer FROM keep_me") == "42"
    assert fresh.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'owner_role'") == "0"


def test_a_dump_role_that_may_not_read_password_hashes_still_keeps_the_roles(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db = start_pg(f"bwt-dr{uuid.uuid4().hex[:6]}-db", "15", labels={"backup-watcher.user": "bw_dump"})
    # No superuser, nor pg_read_all_data (which reads pg_authid too): the tables' readers' rights only.
    db.psql(SETUP + 'CREATE ROLE bw_dump LOGIN; GRANT "Read Only" TO bw_dump;')
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    done = run_watcher(["backup"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    globals_line = next(line for line in done.stdout.splitlines() if "/(globals)" in line)
    assert "without password hashes" in globals_line
    assert done.stderr.count('"globals_without_passwords"') == 1
    snapshot = repo.globals_of(db.name)[-1]
    sql = repo.restic("dump", snapshot["id"], "/globals.sql").stdout
    assert "CREATE ROLE owner_role;" in sql and "CREATE ROLE app_login;" in sql
    assert "ALTER ROLE app_login SET statement_timeout TO '7s';" in sql
    assert "PASSWORD" not in sql


def test_restore_all_brings_back_mariadb_with_its_users_and_redis_and_names_what_it_cannot(
        start_mariadb: StartMariaDB, start_redis: StartRedis, second_engine: SecondEngine, repo: Repo,
        watcher_env: dict[str, str]) -> None:
    run = uuid.uuid4().hex[:6]
    maria, redis, manual = f"h18-dr{run}-maria", f"h18-dr{run}-redis", f"h18-dr{run}-manual"
    for image in (MARIADB_IMAGES["bookworm"], REDIS_IMAGE):
        copy_image(image, second_engine.host)
    on_a = start_mariadb(maria)
    on_a.sql(APP_USERS, "shop")
    items = on_a.sql(ITEMS, "shop")
    redis_labels = {"backup-watcher.engine": "command", "backup-watcher.dump-command": REDIS_DUMP,
                    "backup-watcher.restore-command": REDIS_RESTORE}
    for name in (redis, manual):
        start_redis(name, redis_labels)
        docker("exec", "-i", name, "redis-cli", input="".join(f"SET k{i} v{i}\n" for i in range(200)).encode())
    keys = redis_contents(redis)
    env_a = {**watcher_env, "WATCHER_HOST": f"dr-a-{run}", "WATCHER_CONTAINER_PATTERNS": f"h18-dr{run}-*"}
    backup = run_watcher(["backup"], env_a)
    assert backup.returncode == 0, backup.stdout + backup.stderr

    # Host B: fresh containers of the same names and env; `manual`'s defines no restore command there.
    on_b = start_mariadb(maria, docker_host=second_engine.host)
    start_redis(redis, redis_labels, docker_host=second_engine.host)
    start_redis(manual, {"backup-watcher.dump-command": REDIS_DUMP}, docker_host=second_engine.host)
    env_b = {**watcher_env, "DOCKER_HOST": second_engine.host, "WATCHER_HOST": f"dr-b-{run}"}
    done = run_watcher(["restore", "--all", "--host", f"dr-a-{run}", "--yes"], env_b)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert rows[maria].split()[1] == "shop" and rows[maria].split()[3] == "ok", done.stdout
    assert rows[redis].split()[1] == "stdout" and rows[redis].split()[3] == "ok", done.stdout
    assert rows[manual].split()[3] == "FAILED" and "defines no restore command" in rows[manual], done.stdout
    assert f"docker exec -i {manual}" in rows[manual]  # how to restore it by hand
    said = next(line for line in done.stderr.splitlines() if line.startswith(f"{maria}: Users created"))
    assert sorted(said.split("globals: ", 1)[1].split(";")[0].split(", ")) == ["app@%", "auditor"], said

    assert on_b.sql(ITEMS, "shop") == items
    assert app_login(on_b, MARIA_APP_PASSWORD, ITEMS) == (0, items)
    assert redis_contents(redis, second_engine.host) == keys
    assert redis_contents(manual, second_engine.host)[0] == 0
    for output in (backup.stdout + backup.stderr, done.stdout + done.stderr):
        assert MARIA_APP_PASSWORD not in output and NASTY_PASSWORD not in output
