"""The test data: one table `orders`, generated in SQL and sized by pg_database_size, and the
day-to-day change the storage benchmark applies to it."""

from __future__ import annotations

from bench.common import say
from tests.kit import PgContainer

BIG_DB = "benchdb"
FLEET_DB = "fleetdb"
SQL_TIMEOUT = 7200  # a batch of 400,000 rows, VACUUM of a big table on a busy machine

SCHEMA = """
CREATE TABLE orders (
    id bigint NOT NULL,
    account_id integer NOT NULL,
    amount numeric(12,2) NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    status text NOT NULL,
    note text NOT NULL
);
"""


def insert_sql(first: int, last: int) -> str:
    return f"""
INSERT INTO orders
SELECT g, (random() * 1000000)::int, round((random() * 10000)::numeric, 2),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '7 seconds',
       timestamptz '2024-01-01 00:00:00+00' + g * interval '7 seconds' + random() * interval '30 days',
       (ARRAY['new', 'paid', 'shipped', 'delivered', 'cancelled'])[1 + g % 5],
       md5(g::text) || ' ' || md5(random()::text) || ' ' || md5(random()::text)
FROM generate_series({first}, {last}) AS g;
"""


def sql(db: PgContainer, text: str, database: str | None = None) -> str:
    """Runs SQL in `db` (the kit's psql -At) with the benchmark's bound; returns its output."""
    return db.psql(text, database=database, timeout=SQL_TIMEOUT)


def fill_database(db: PgContainer, target_bytes: int, quiet: bool = False) -> int:
    """Fills the container's database with the orders table up to about `target_bytes`
    (pg_database_size); returns the number of rows."""
    sql(db, SCHEMA)
    base = database_size(db)
    # A first batch to learn the bytes per row (about 190 with the primary key), then the rest.
    probe = max(1_000, min(20_000, int((target_bytes - base) / 190)))
    sql(db, insert_sql(1, probe) + "ALTER TABLE orders ADD PRIMARY KEY (id);")
    grown = database_size(db) - base
    per_row = max(grown / probe, 50.0)
    rows = max(probe, int((target_bytes - base) / per_row))
    done = probe
    batch = 400_000
    while done < rows:
        last = min(rows, done + batch)
        sql(db, insert_sql(done + 1, last))
        done = last
        if not quiet:
            say(f"  {db.name}: {done}/{rows} rows")
    sql(db, "VACUUM ANALYZE orders;")
    sql(db, "CHECKPOINT;")
    return rows


def database_size(db: PgContainer) -> int:
    return int(sql(db, "SELECT pg_database_size(current_database())"))


def row_count(db: PgContainer, database: str | None = None) -> int:
    return int(sql(db, "SELECT count(*) FROM orders", database))


def day_change(db: PgContainer, pattern: str) -> str:
    """Applies the day-to-day change: +0.5 % rows appended, 0.1 % updated, 0.1 % deleted; returns psql's
    command tags ("UPDATE n, DELETE n, INSERT 0 n").

    oldest: the oldest 0.1 % of rows are deleted (a retention job) and one contiguous range of old rows
    (at 10 % of the ids) is updated: the first change is near the start of the table, as in TESTING.md's
    reference, where the seed design stored its dump again nearly whole (+84 MB of 87).
    recent: the updated and the deleted rows are each one contiguous range of recent ids, at 90 % and
    80 % (an append-mostly table whose newest rows still change; the seed design's best case).
    scattered: they are picked uniformly at random over the whole table (e.g. a last_seen column on
    every account).
    """
    top = int(sql(db, "SELECT max(id) FROM orders"))
    append, update, delete = max(1, top // 200), max(1, top // 1000), max(1, top // 1000)
    if pattern in ("oldest", "recent"):
        if pattern == "oldest":
            up_lo = int(top * 0.10)
            where_delete = f"id IN (SELECT id FROM orders ORDER BY id LIMIT {delete})"
        else:
            up_lo, del_lo = int(top * 0.90), int(top * 0.80)
            where_delete = f"id BETWEEN {del_lo} AND {del_lo + delete - 1}"
        where_update = f"id BETWEEN {up_lo} AND {up_lo + update - 1}"
    else:
        where_update = f"id IN (SELECT 1 + floor(random() * {top})::bigint FROM generate_series(1, {update}))"
        where_delete = f"id IN (SELECT 1 + floor(random() * {top})::bigint FROM generate_series(1, {delete}))"
    output = sql(db, f"UPDATE orders SET amount = amount + 1, status = 'changed', updated_at = now() "
                     f"WHERE {where_update};\nDELETE FROM orders WHERE {where_delete};\n"
                     + insert_sql(top + 1, top + append))
    tags = [line for line in output.split("\n") if line.strip()]
    return ", ".join(tags)


# --- the realistic database of 2d-2f (issue 19): two tables where autovacuum has run ---------------
REAL_DB = "realdb"
UUID_DB = "uuiddb"

REAL_SCHEMA = SCHEMA + """
CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id bigint NOT NULL,
    kind text NOT NULL,
    at timestamptz NOT NULL,
    payload text NOT NULL
);
"""

UUID_SCHEMA = """
CREATE TABLE sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id integer NOT NULL,
    started_at timestamptz NOT NULL,
    last_seen timestamptz NOT NULL,
    agent text NOT NULL
);
"""


def events_sql(count: int, first_order: int) -> str:
    return f"""
INSERT INTO events (order_id, kind, at, payload)
SELECT {first_order} + g, (ARRAY['created', 'paid', 'shipped', 'mailed'])[1 + g % 4],
       timestamptz '2024-01-01 00:00:00+00' + g * interval '26 seconds',
       md5(g::text) || ' ' || md5(random()::text)
FROM generate_series(1, {count}) AS g;
"""


def sessions_sql(count: int) -> str:
    return f"""
INSERT INTO sessions (account_id, started_at, last_seen, agent)
SELECT (random() * 100000)::int, now() - random() * interval '300 days', now(),
       md5(g::text) || ' ' || md5(random()::text)
FROM generate_series(1, {count}) AS g;
"""


def fill_realistic(db: PgContainer, orders: int, events: int) -> None:
    """Fills the container's database with `orders` orders and `events` events, then ages it as weeks of
    use do: scattered rows deleted and updated (cancelled orders purged, statuses changed), and VACUUM
    (what autovacuum does): both tables have free space on pages all over them, which the next day's
    inserts and updated rows' new versions reuse."""
    sql(db, REAL_SCHEMA)
    batch = 400_000
    for first in range(1, orders + 1, batch):
        sql(db, insert_sql(first, min(orders, first + batch - 1)))
    sql(db, "ALTER TABLE orders ADD PRIMARY KEY (id);")
    sql(db, events_sql(events, 0))
    for table in ("orders", "events"):
        age(db, table, "id")
    sql(db, "CHECKPOINT;")


def fill_uuid(db: PgContainer, sessions: int) -> None:
    """Fills the container's database with `sessions` rows keyed by random UUIDv4, aged as fill_realistic's."""
    sql(db, UUID_SCHEMA)
    sql(db, sessions_sql(sessions))
    age(db, "sessions", "account_id")
    sql(db, "CHECKPOINT;")


def age(db: PgContainer, table: str, column: str) -> None:
    """Scattered deletes (1.5 %) and updates (1.9 %) of `table`, then VACUUM ANALYZE: free space all over it."""
    sql(db, f"DELETE FROM {table} WHERE {column} % 67 = 3;\n"
            f"UPDATE {table} SET {touch(table)} WHERE {column} % 53 = 5;\nVACUUM ANALYZE {table};")


def touch(table: str) -> str:
    """The SET clause of an update of `table`'s rows (a status change, a session seen again)."""
    return {"orders": "status = 'changed', updated_at = now(), amount = amount + 1",
            "events": "kind = 'retried', at = at + interval '1 minute'",
            "sessions": "last_seen = now()"}[table]


def realistic_change(db: PgContainer) -> str:
    """The day-2 change of fill_realistic's database, per table: +0.5 % rows inserted, 0.1 % updated (one
    range of recent rows), 0.1 % deleted (the oldest: a retention job), the inserts and the updated
    rows' new versions landing in the free space autovacuum left all over the table; returns psql's
    command tags."""
    tags = []
    for table in ("orders", "events"):
        top = int(sql(db, f"SELECT max(id) FROM {table}"))
        n = int(sql(db, f"SELECT count(*) FROM {table}"))
        insert = insert_sql(top + 1, top + n // 200) if table == "orders" else events_sql(n // 200, top)
        tags.append(sql(db, f"UPDATE {table} SET {touch(table)} WHERE id IN (SELECT id FROM {table} "
                            f"WHERE id > {int(top * 0.9)} ORDER BY id LIMIT {n // 1000});\n"
                            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT {n // 1000});\n"
                            + insert))
    return ", ".join(line for tag in tags for line in tag.split("\n") if line.strip())


def uuid_change(db: PgContainer) -> str:
    """The same amount of change on fill_uuid's table: the newest sessions seen again, the oldest purged,
    new sessions (random keys) started; returns psql's command tags."""
    n = int(sql(db, "SELECT count(*) FROM sessions"))
    tags = sql(db, f"UPDATE sessions SET {touch('sessions')} WHERE id IN (SELECT id FROM sessions ORDER BY started_at "
                   f"DESC LIMIT {n // 1000});\n"
                   f"DELETE FROM sessions WHERE id IN (SELECT id FROM sessions ORDER BY started_at "
                   f"LIMIT {n // 1000});\n"
                   + sessions_sql(n // 200))
    return ", ".join(line for line in tags.split("\n") if line.strip())
