"""Backup → change → restore round trip on PostgreSQL 15 and 17: every table comes back exactly."""

from __future__ import annotations

import pytest

from tests.integration.conftest import TEST_HOST, PgContainer, Repo, StartPg, docker, run_watcher, wait_ready
from watcher import commands

pytestmark = pytest.mark.engine

SEED = r"""
CREATE TABLE people (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    photo bytea,
    profile jsonb,
    balance numeric(20, 6),
    born timestamptz,
    seen timestamp
);
CREATE INDEX people_name_idx ON people (name);
INSERT INTO people (name, photo, profile, balance, born, seen)
SELECT 'Zoë Ångström 名前 ' || g,
       decode(md5(g::text), 'hex') || '\x00ff'::bytea,
       jsonb_build_object('n', g, 'tags', jsonb_build_array('ü', g % 7), 'nested', jsonb_build_object('x', null)),
       (g * 1234.567891)::numeric(20, 6),
       timestamptz '2001-02-03 04:05:06.789+00' + g * interval '1 hour 3 seconds',
       timestamp '1999-12-31 23:59:59.999999' + g * interval '1 day'
FROM generate_series(1, 2000) AS g;
CREATE SEQUENCE invoice_no START 1000 INCREMENT 7;
SELECT nextval('invoice_no') FROM generate_series(1, 13);
CREATE TABLE invoices (no bigint PRIMARY KEY DEFAULT nextval('invoice_no'), person bigint REFERENCES people(id),
                       amount numeric);
INSERT INTO invoices (person, amount) SELECT g, g / 3.0 FROM generate_series(1, 500) AS g;
CREATE VIEW rich AS SELECT name, balance FROM people WHERE balance > 1000000;
CREATE TABLE docs (id int PRIMARY KEY, blob oid);
INSERT INTO docs VALUES (1, lo_from_bytea(0, convert_to(repeat('large object ✓ ', 5000), 'UTF8')));
"""

CHANGE = """
DELETE FROM invoices WHERE no % 3 = 0;
UPDATE people SET name = 'changed', profile = '{}' WHERE id < 100;
INSERT INTO people (name) VALUES ('new row');
SELECT nextval('invoice_no') FROM generate_series(1, 50);
CREATE OR REPLACE VIEW rich AS SELECT name, balance FROM people WHERE balance > 0;
SELECT lo_unlink(blob) FROM docs;
DELETE FROM docs;
CREATE TABLE extra (x int);
"""

FINGERPRINT = """
SELECT 'people', md5(string_agg(t::text, '|' ORDER BY t.id)) FROM people t
UNION ALL SELECT 'invoices', md5(string_agg(t::text, '|' ORDER BY t.no)) FROM invoices t
UNION ALL SELECT 'rich', md5(string_agg(t::text, '|' ORDER BY t.name)) FROM rich t
UNION ALL SELECT 'docs', md5(string_agg(t.id || ':' || md5(lo_get(t.blob)), '|' ORDER BY t.id)) FROM docs t
UNION ALL SELECT 'sequence', last_value::text FROM invoice_no
UNION ALL SELECT 'index', indexdef FROM pg_indexes WHERE indexname = 'people_name_idx'
UNION ALL SELECT 'tables', string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'
ORDER BY 1;
"""


@pytest.mark.parametrize("major", ["15", "17"])
def test_backup_change_restore_returns_every_table_exactly(
    major: str, start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]
) -> None:
    db: PgContainer = start_pg(f"scalr-rt{major}-db", major)
    db.psql(SEED)
    before = db.psql(FINGERPRINT)
    assert "people|" in before and "docs|" in before and "sequence|4584" in before

    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": f"scalr-rt{major}-db"}
    backup = run_watcher(["backup"], env)
    assert backup.returncode == 0, backup.stderr
    snapshots = repo.snapshots_of(db.name)
    assert len(snapshots) == 1
    assert snapshots[0]["paths"] == ["/appdb.pgdump"]
    assert "database=appdb" in snapshots[0]["tags"]
    assert snapshots[0]["hostname"] == TEST_HOST

    db.psql(CHANGE)
    assert db.psql(FINGERPRINT) != before

    restore = run_watcher(["restore", db.name, "latest", "--yes"], env)
    assert restore.returncode == 0, restore.stderr
    assert db.psql(FINGERPRINT) == before
    # The scratch database is gone after the swap.
    assert db.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%bw_restore%'", database="postgres") == "0"


def test_restore_refuses_without_tty_and_without_yes(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("scalr-notty-db")
    db.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1);")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "scalr-notty-db"}
    assert run_watcher(["backup"], env).returncode == 0
    db.psql("INSERT INTO t VALUES (2);")

    refused = run_watcher(["restore", db.name], env)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert db.psql("SELECT count(*) FROM t") == "2", "a refused restore must change nothing"


def test_restore_of_a_missing_snapshot_names_it_and_changes_nothing(
    start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]
) -> None:
    db: PgContainer = start_pg("scalr-nosnap-db")
    db.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1);")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "scalr-nosnap-db"}
    assert run_watcher(["backup"], env).returncode == 0

    missing = run_watcher(["restore", db.name, "deadbeef", "--yes"], env)
    assert missing.returncode == 2
    assert "deadbeef" in missing.stderr
    assert db.psql("SELECT count(*) FROM t") == "1"


def test_restore_swap_never_leaves_the_name_without_its_database(
    start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]
) -> None:
    """A swap that cannot move the live database aside changes nothing; an interrupted one is healed."""
    db: PgContainer = start_pg("scalr-swap-db", "15")
    db.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1);")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "scalr-swap-db"}
    assert run_watcher(["backup"], env).returncode == 0
    db.psql("INSERT INTO t VALUES (2);")

    # A prepared transaction holds the database like a session that cannot be terminated: the
    # rename aside is refused.
    db.psql("ALTER SYSTEM SET max_prepared_transactions = 2;", database="postgres")
    docker("restart", "-t", "10", db.name)
    wait_ready(db.name)
    db.psql("BEGIN; SELECT txid_current(); PREPARE TRANSACTION 'hold';")
    refused = run_watcher(["restore", db.name, "latest", "--yes"], env)
    assert refused.returncode == 1, refused.stderr
    assert "could not move 'appdb' aside" in refused.stderr, refused.stderr
    assert "prepared transaction" in refused.stderr, refused.stderr
    # The live database is as it was and takes connections; the restored copy is kept for the operator.
    assert db.psql("SELECT count(*) FROM t") == "2"
    assert db.psql("SELECT count(*) FROM t", database="appdb_bw_restore") == "1"
    assert db.psql("SELECT count(*) FROM pg_database WHERE datname = 'appdb_bw_previous'", database="postgres") == "0"
    # A backup of every database does not take the scratch copy for one of the container's databases.
    listed = docker("exec", "-e", "PGUSER=app", "-e", "PGDATABASE=postgres", db.name,
                    *commands.list_databases_command()).stdout.split("\0")
    assert "appdb" in listed and "appdb_bw_restore" not in listed, listed

    db.psql("ROLLBACK PREPARED 'hold';")
    done = run_watcher(["restore", db.name, "latest", "--yes"], env)
    assert done.returncode == 0, done.stderr
    assert db.psql("SELECT count(*) FROM t") == "1"

    # A restore killed between its two renames leaves the old database only under the aside name:
    # the next restore first puts it back, then swaps as usual.
    db.psql("INSERT INTO t VALUES (5);")
    db.psql("ALTER DATABASE appdb RENAME TO appdb_bw_previous;", database="postgres")
    healed = run_watcher(["restore", db.name, "latest", "--yes"], env)
    assert healed.returncode == 0, healed.stderr
    assert "restore_interrupted_swap_healed" in healed.stderr, healed.stderr
    assert db.psql("SELECT count(*) FROM t") == "1"
    leftovers = "SELECT count(*) FROM pg_database WHERE datname LIKE '%bw_restore' OR datname LIKE '%bw_previous'"
    assert db.psql(leftovers, database="postgres") == "0"


PROPERTIES_SEED = """
CREATE ROLE bw_props_owner NOLOGIN;
CREATE ROLE bw_props_ro LOGIN;
CREATE ROLE "bw props odd";
ALTER DATABASE appdb OWNER TO bw_props_owner;
ALTER DATABASE appdb SET search_path TO app, public;
ALTER DATABASE appdb SET timezone TO 'Asia/Tokyo';
ALTER ROLE bw_props_ro IN DATABASE appdb SET work_mem TO '8MB';
REVOKE CONNECT, TEMPORARY ON DATABASE appdb FROM PUBLIC;
GRANT CONNECT ON DATABASE appdb TO bw_props_ro;
GRANT CONNECT, TEMPORARY ON DATABASE appdb TO "bw props odd";
COMMENT ON DATABASE appdb IS 'the DATABASE appdb; it''s
two lines';
"""

PROPERTIES = """
SELECT 'owner', pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = 'appdb'
UNION ALL SELECT 'acl', array_to_string(ARRAY(SELECT a::text FROM unnest(datacl) a ORDER BY 1), ' ')
  FROM pg_database WHERE datname = 'appdb'
UNION ALL SELECT 'comment', shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = 'appdb'
UNION ALL SELECT 'setting ' || coalesce(pg_get_userbyid(nullif(setrole, 0)), '-'), array_to_string(setconfig, ';')
  FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = 'appdb'
ORDER BY 1;
"""


@pytest.mark.parametrize("major", ["15", "17"])
def test_restore_keeps_the_database_owner_settings_acl_and_comment(
    major: str, start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]
) -> None:
    db: PgContainer = start_pg(f"scalr-props{major}-db", major)
    db.psql(PROPERTIES_SEED, database="postgres")
    db.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1);")
    before = db.psql(PROPERTIES, database="postgres")
    assert "owner|bw_props_owner" in before and "TimeZone=Asia/Tokyo" in before, before
    assert "work_mem=8MB" in before and "bw_props_ro=c/" in before and "two lines" in before, before

    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    backup = run_watcher(["backup"], env)
    assert backup.returncode == 0, backup.stderr
    db.psql("""
        ALTER DATABASE appdb OWNER TO app;
        ALTER DATABASE appdb RESET ALL;
        ALTER ROLE bw_props_ro IN DATABASE appdb RESET ALL;
        GRANT ALL ON DATABASE appdb TO PUBLIC;
        REVOKE ALL ON DATABASE appdb FROM bw_props_ro, "bw props odd";
        COMMENT ON DATABASE appdb IS NULL;
    """, database="postgres")
    assert db.psql(PROPERTIES, database="postgres") != before

    restore = run_watcher(["restore", db.name, "latest", "--yes"], env)
    assert restore.returncode == 0, restore.stderr
    assert db.psql(PROPERTIES, database="postgres") == before
    assert db.psql("SELECT current_setting('TimeZone')") == "Asia/Tokyo"
    assert db.psql("SELECT count(*) FROM t") == "1"
    # The scratch name is gone and nothing names it.
    assert db.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%bw_restore%'", database="postgres") == "0"

    # A property whose role is gone, and not in the globals either (pruned), fails the restore before
    # anything changes, naming the role. (With the globals there, the role is created from them.)
    db.psql('REVOKE ALL ON DATABASE appdb FROM "bw props odd"; DROP ROLE "bw props odd";', database="postgres")
    db.psql("INSERT INTO t VALUES (2);")
    repo.restic("forget", *[s["id"] for s in repo.globals_of(db.name)])
    refused = run_watcher(["restore", db.name, "latest", "--yes"], env)
    assert refused.returncode == 1, refused.stderr
    assert "bw props odd" in refused.stderr and "nothing was changed" in refused.stderr, refused.stderr
    assert db.psql("SELECT count(*) FROM t") == "2"
