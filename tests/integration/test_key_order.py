"""Key-ordered dumps (WATCHER_DUMP_ORDER=key, issue 19) on PostgreSQL 15 and 17: a restore equals a restore
of pg_dump's own dump of the same data (every table's content, the schema), the archive's TABLE DATA
entries are pg_dump's, the large keyed tables' rows are stored in key order, and rows written during the
dump are in it exactly when the dump's one snapshot saw them, in key-ordered and other tables alike."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import PgContainer, Repo, StartPg, docker, run_watcher, wait_for
from tests.integration.test_image import Proxy
from watcher import archive

pytestmark = pytest.mark.engine

# orders: large, identity key, referenced by an FK; "Odd ""sch"" x"."Big Tab": large, a text key with odd
# names, a generated and a dropped column; log: large, no key (pg_dump's order); small: keyed but small.
# Scattered deletes and updates, then VACUUM and more inserts: the inserts land in free space all over
# orders, so its physical order is not its key order.
SEED = r"""
CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text NOT NULL,
                     amount numeric(12, 2), at timestamptz);
INSERT INTO orders (note, amount, at)
SELECT md5(g::text) || ' ✓ ' || repeat('x', g % 50), g / 7.0, timestamptz '2024-01-01 00:00+00' + g * interval '1 min'
FROM generate_series(1, 12000) AS g;
CREATE TABLE lines (order_id bigint NOT NULL REFERENCES orders (id), qty int);
INSERT INTO lines SELECT g, g % 9 FROM generate_series(1, 12000) AS g;
CREATE SCHEMA "Odd ""sch"" x";
CREATE TABLE "Odd ""sch"" x"."Big Tab" ("Key ""k"" " text PRIMARY KEY, gone int, "Value" text, "select" int,
                                         twice int GENERATED ALWAYS AS ("select" * 2) STORED);
ALTER TABLE "Odd ""sch"" x"."Big Tab" DROP COLUMN gone;
INSERT INTO "Odd ""sch"" x"."Big Tab" ("Key ""k"" ", "Value", "select")
SELECT md5(g::text), E'tab\there, newline\nthere, back\\slash ' || repeat('y', 80), g
FROM generate_series(1, 8000) AS g;
CREATE TABLE log (at timestamptz, line text);
INSERT INTO log SELECT now(), repeat(md5(g::text), 4) FROM generate_series(1, 9000) AS g;
CREATE TABLE small (id int PRIMARY KEY, v text);
INSERT INTO small SELECT g, 'v' || g FROM generate_series(1, 50) AS g;
DELETE FROM lines WHERE order_id % 5 = 1;
DELETE FROM orders WHERE id % 5 = 1;
UPDATE orders SET amount = amount + 1 WHERE id % 7 = 3;
VACUUM ANALYZE orders;
INSERT INTO orders (note, amount, at) SELECT 'later ' || g, g, now() FROM generate_series(1, 1500) AS g;
ANALYZE;
"""

TABLES = ["orders", "lines", '"Odd ""sch"" x"."Big Tab"', "log", "small"]
FINGERPRINT = "\nUNION ALL ".join(
    f"SELECT '{name}', count(*)::text || ' ' || md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {name} t"
    for name in TABLES) + "\nORDER BY 1;"


def restic_dump(repo: Repo, snapshot: str, path: str) -> bytes:
    done = subprocess.run(["restic", "dump", snapshot, path], capture_output=True, timeout=300, check=False,
                          env={**os.environ, "RESTIC_REPOSITORY": str(repo.path), "RESTIC_PASSWORD": repo.password})
    assert done.returncode == 0, done.stderr
    return done.stdout


def docker_bytes(*args: str, stdin: bytes | None = None) -> bytes:
    """The docker CLI with binary input and output (archives); returns its stdout."""
    done = subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def restore_into(db: PgContainer, database: str, dump: bytes) -> None:
    db.psql(f'CREATE DATABASE "{database}"', database="postgres")
    docker_bytes("exec", "-i", db.name, "pg_restore", "-U", db.user, "--single-transaction", "--exit-on-error",
                 "-d", database, stdin=dump)


def data_entries(dump: bytes) -> dict[tuple[str | None, str | None], tuple[object, ...]]:
    """Every TABLE DATA entry of an archive, by (schema, table): its fields but the dump id, and the FK
    constraints that depend on it (by name)."""
    _, entries, _ = archive.read_head(dump)
    found: dict[tuple[str | None, str | None], tuple[object, ...]] = {}
    for e in entries:
        if e.desc == "TABLE DATA":
            dependents = sorted(str(d.tag) for d in entries if e.dump_id in d.deps)
            by_id = {x.dump_id: (x.desc, x.tag) for x in entries}
            found[(e.namespace, e.tag)] = (e.tableoid, e.oid, e.defn, e.drop_stmt, e.copy_stmt, e.tablespace,
                                          e.tableam, e.relkind, e.owner, e.with_oids, e.section, e.had_dumper,
                                          [by_id[d] for d in e.deps], dependents)
    return found


def ids_in_dump(db: PgContainer, dump: bytes) -> list[int]:
    text = docker_bytes("exec", "-i", db.name, "pg_restore", "--data-only", "--table=orders", "--file=-",
                        stdin=dump).decode()
    return [int(line.split("\t", 1)[0]) for line in text.splitlines() if line[:1].isdigit()]


@pytest.mark.parametrize("major", ["15", "17"])
def test_a_key_ordered_dump_restores_as_pg_dumps_own(major: str, start_pg: StartPg, repo: Repo,
                                                     watcher_env: dict[str, str]) -> None:
    db = start_pg(f"bwt-d19-ko{major}-db", major)
    db.psql(SEED)
    assert int(db.psql("SELECT pg_relation_size('orders')")) >= 1 << 20
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_DUMP_ORDER": "key"}
    backup = run_watcher(["backup"], env)
    assert backup.returncode == 0, backup.stderr
    ours = restic_dump(repo, repo.snapshots_of(db.name)[0]["id"], "/appdb.pgdump")
    theirs = docker_bytes("exec", db.name, "pg_dump", "-U", db.user, "--format=custom", "--compress=0", "appdb")

    ordered = ids_in_dump(db, ours)
    assert ordered == sorted(ordered) and len(ordered) == 11100
    assert ids_in_dump(db, theirs) != ordered, "the seed left orders in key order: the test proves nothing"
    assert data_entries(ours) == data_entries(theirs)

    restore_into(db, "from_ours", ours)
    restore_into(db, "from_theirs", theirs)
    expected = db.psql(FINGERPRINT)
    assert "orders|11100 " in expected and "log|9000 " in expected
    assert db.psql(FINGERPRINT, database="from_ours") == db.psql(FINGERPRINT, database="from_theirs") == expected
    # pg_dump 17.6 and later fence its script with \restrict KEY, a random key per run.
    schemas = ["\n".join(line for line in docker("exec", db.name, "pg_dump", "-U", db.user, "--schema-only",
                                                  name).stdout.splitlines() if not line.startswith("\\"))
               for name in ("from_ours", "from_theirs")]
    assert schemas[0] == schemas[1]
    assert "FOREIGN KEY (order_id) REFERENCES public.orders(id)" in schemas[0]


WRITER = r"""
CREATE TABLE stamps (n int);
CREATE PROCEDURE write_pairs(total int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..total LOOP
    INSERT INTO orders (note, amount, at) VALUES ('writer ' || i, i, now());
    INSERT INTO log VALUES (now(), 'writer ' || i);
    COMMIT;
    PERFORM pg_sleep(0.002);
  END LOOP;
END $$;
"""


def test_rows_written_during_the_dump_are_in_it_exactly_when_its_snapshot_saw_them(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db = start_pg("bwt-d19-kowriter-db", "17")
    db.psql(SEED + WRITER)
    writer = threading.Thread(target=lambda: db.psql("CALL write_pairs(1000000)", check=False, timeout=600),
                              daemon=True)
    writer.start()
    try:
        wait_for(lambda: int(db.psql("SELECT count(*) FROM log WHERE line LIKE 'writer %'")) >= 50, 60,
                 "the writer's first 50 commits")
        backup = run_watcher(["backup"], {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name,
                                          "WATCHER_DUMP_ORDER": "key"})
        assert backup.returncode == 0, backup.stderr
        written = int(db.psql("SELECT count(*) FROM log WHERE line LIKE 'writer %'"))
    finally:
        db.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'CALL write_pairs%'")
        writer.join(timeout=60)
    restore_into(db, "restored", restic_dump(repo, repo.snapshots_of(db.name)[0]["id"], "/appdb.pgdump"))
    pairs = "SELECT string_agg(split_part({col}, ' ', 2), ',' ORDER BY split_part({col}, ' ', 2)::int) FROM {table} " \
            "WHERE {col} LIKE 'writer %'"
    in_orders = db.psql(pairs.format(col="note", table="orders"), database="restored").split(",")
    in_log = db.psql(pairs.format(col="line", table="log"), database="restored").split(",")
    # One snapshot for both tables (orders in key order by the key session, log by pg_dump): the same
    # writes, and those are the first ones in commit order; the writer went on during the dump.
    assert in_orders == in_log
    assert in_orders == [str(n) for n in range(1, len(in_orders) + 1)]
    assert 50 <= len(in_orders) < written


def test_a_key_ordered_backup_passes_the_least_privilege_socket_proxy(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str], tmp_path: Path) -> None:
    """The shipped HAProxy configuration (HAProxy 2.6 here: it answers the exec upgrade with 200 and never
    carries an exec's input) in front of the engine: the default key order backs up through it, in key order,
    within a bound, and leaves no session of the dump behind."""
    db = start_pg("h19-ko-proxy-db", "15")
    db.psql(SEED)
    proxy = Proxy(tmp_path, allow_drills=False)
    try:
        env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "DOCKER_HOST": f"unix://{proxy.socket}"}
        env.pop("WATCHER_DUMP_ORDER", None)  # the default
        started = time.monotonic()
        backup = run_watcher(["backup", db.name], env, timeout=300)
        took = time.monotonic() - started
    finally:
        proxy.stop()
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert took < 120, f"the backup through the proxy took {took:.0f} s"
    ours = restic_dump(repo, repo.snapshots_of(db.name)[0]["id"], "/appdb.pgdump")
    ordered = ids_in_dump(db, ours)
    assert ordered == sorted(ordered) and len(ordered) == 11100, "orders went through the proxy in key order"
    # The holder ends by itself once the copy session has gone: within a second or two.
    wait_for(lambda: db.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'bw-keydump-%'")
             == "0", 30, "the dump's sessions to end")
