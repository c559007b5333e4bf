"""The SQL of the key-ordered dump (watcher.keydump): the psql scripts of its two sessions, pure text.

Both scripts reach psql through the exec's environment (`sh -c 'printf %s "$BW_KEYDUMP_SQL" | psql …'`),
never through the exec's input (which a socket proxy older than HAProxy 3.1 cannot carry) nor through
argv (Docker events). Their output is lines with a random token of the run (`lock-TOKEN …`, `ready-TOKEN`,
`copy-TOKEN {json}`, `copied-TOKEN`): no row of a table can be one unless it knows the token.

The holder session opens the dump's transaction, exports its snapshot, locks the keyed tables one by one
as pg_dump does (each LOCK bounded by statement_timeout, the lock wait), lists the large ones and then
waits, its transaction open, until the dump's other sessions (pg_dump, then the copy session; told apart
by their application_name) have come and gone: no input is needed to end it. The copy session imports
the snapshot and, for each listed table, first prints its boundary rows' keys (about one row in
CHUNK_ROWS, by a hash of its key: where the dump's chunks end, computed by the server), then copies the
table ORDER BY its key, its key's columns first; the watcher finds the boundary rows by their keys and
never looks at a row by itself. At its end it cancels the holder's wait (which might have missed a short
copy session between two looks).
"""

from __future__ import annotations

from collections.abc import Sequence

SCRIPT_VARIABLE = "BW_KEYDUMP_SQL"
PSQL = ("psql", "--no-psqlrc", "--no-password", "--quiet", "--tuples-only", "--no-align", "-v", "ON_ERROR_STOP=1")
MIN_TABLE_BYTES = 1 << 20  # smaller tables keep pg_dump's own order: their order costs little storage
MAX_TABLES = 1000  # the largest ones: pg_dump's argv names each (--exclude-table-data)
CHUNK_ROWS = 1024  # a power of two: a chunk ends after a row whose key hashes to 0 modulo this
POLL_S = 1  # how often the holder looks whether the dump's sessions are still there (each look costs CPU)
# How long the holder waits with none of the dump's sessions there (before pg_dump came, between pg_dump's
# end and the copy session's start, or after a dump that failed) before it ends by itself.
HOLDER_GRACE_S = 60

# The keyed tables, one row each: a primary key or a valid unique index on plain not-null columns with
# default btree operator classes and the columns' collations, so `ORDER BY` those columns is a total order
# an index scan delivers. Time-ordered keys come first (identity, serial, date/time, or values that grow
# with the table: pg_stats correlation ≥ 0.9), then primary keys, then fewer columns. The column list is
# pg_dump's (no dropped or generated columns; a key of a generated column is no key here), the key's
# columns first: each row's COPY line then starts with its key, as the boundary rows are printed.
# Catalogs only: no lock on any table is taken here, and
# OFFSET 0 keeps the planner from evaluating a condition of the query around it (pg_relation_size, which
# waits for a table's lock) on tables that are not keyed.
KEYED = r"""(
WITH keys AS (
  SELECT i.indrelid, i.indexrelid, i.indisprimary, i.indnkeyatts, i.indkey[0:i.indnkeyatts - 1] AS key_attnums,
         (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.n)
            FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) AS order_by,
         (SELECT a.attidentity <> '' OR a.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype)
                 OR EXISTS (SELECT 1 FROM pg_depend d JOIN pg_class s ON s.oid = d.objid
                             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                               AND d.refobjid = a.attrelid AND d.refobjsubid = a.attnum AND d.deptype = 'a'
                               AND s.relkind = 'S')
                 OR coalesce((SELECT s.correlation >= 0.9 FROM pg_stats s WHERE s.schemaname = n.nspname
                              AND s.tablename = c.relname AND s.attname = a.attname), false)
            FROM pg_attribute a
           WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0]) AS time_ordered
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
     AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                     WHERE k.attnum = 0 OR NOT a.attnotnull OR a.attgenerated <> ''
                        OR i.indcollation[k.n - 1] <> a.attcollation
                        OR NOT (SELECT o.opcdefault FROM pg_opclass o WHERE o.oid = i.indclass[k.n - 1]))
), best AS (
  SELECT DISTINCT ON (indrelid) indrelid, order_by, key_attnums FROM keys
   ORDER BY indrelid, time_ordered DESC, indisprimary DESC, indnkeyatts, indexrelid
)
SELECT c.oid, n.nspname AS schema, c.relname AS name,
       quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS qualified,
       b.order_by || coalesce(', ' || (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
                                          FROM pg_attribute a
                                         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                           AND a.attgenerated = '' AND a.attnum <> ALL (b.key_attnums)), '')
         AS columns,
       b.order_by
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN best b ON b.indrelid = c.oid
 WHERE c.relkind = 'r' AND c.relpersistence IN ('p', 'u')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'
   AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_class'::regclass AND e.objid = c.oid
                   AND e.deptype = 'e')
OFFSET 0
) AS kt"""

_OPENING = ("SET statement_timeout = 0;\nSET lock_timeout = 0;\nSET idle_in_transaction_session_timeout = 0;\n"
            "SELECT pg_catalog.set_config('search_path', '', false);\n"
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;\n")


def app_name(token: str, role: str) -> str:
    """The application_name of one of the dump's sessions (role: hold, dump or copy)."""
    return f"bw-keydump-{token}-{role}"


def holder_script(token: str, lock_wait_ms: int) -> str:
    """The holder session's script (see the module's docstring); `token` is hex (it is put in SQL as is)."""
    if not token.isalnum():
        raise ValueError("the token must be alphanumeric")
    # Only this module's constants, a checked hex token and integers are put into the SQL here.
    listed = f"""SELECT coalesce(string_agg(oid::text, ','), '') AS bw_oids, count(*) > 0 AS bw_keyed
  FROM (SELECT kt.oid FROM {KEYED} WHERE pg_relation_size(kt.oid) >= {MIN_TABLE_BYTES}
         ORDER BY pg_relation_size(kt.oid) DESC, kt.oid LIMIT {MAX_TABLES}) AS big \\gset
SELECT 'table ' || json_build_object('oid', kt.oid, 'schema', kt.schema, 'name', kt.name,
                                     'qualified', kt.qualified, 'columns', kt.columns, 'order_by', kt.order_by)
  FROM {KEYED} WHERE kt.oid = ANY (string_to_array(:'bw_oids', ',')::oid[]) ORDER BY kt.schema, kt.name;
"""  # noqa: S608
    return (_OPENING  # noqa: S608
            + "SELECT 'snapshot ' || pg_catalog.pg_export_snapshot();\n"
            # pg_dump's way with --lock-wait-timeout: a statement_timeout around each LOCK TABLE. The
            # tables are locked before their sizes are read (pg_relation_size waits for a lock too).
            + f"SET statement_timeout = {int(lock_wait_ms)};\n"
            + f"SELECT format('SELECT %L', 'lock-{token} ' || kt.qualified),\n"
            + "       format('LOCK TABLE %s IN ACCESS SHARE MODE', kt.qualified)\n"
            + f"  FROM {KEYED} ORDER BY kt.schema, kt.name \\gexec\n"
            + "SET statement_timeout = 0;\n"
            + f"\\echo locked-{token}\n"
            + listed
            + f"\\echo ready-{token}\n"
            + "\\if :bw_keyed\n" + _hold(token) + "\\endif\n"
            + "COMMIT;\n")


def _hold(token: str) -> str:
    """The holder's wait: until the copy session has come and the dump's sessions are gone, or none of
    them was there for HOLDER_GRACE_S (a dump that failed, or whose watcher died, before its copy)."""
    dump, copy = app_name(token, "dump"), app_name(token, "copy")
    return f"""DO $bw$
DECLARE
  quiet_since timestamptz := clock_timestamp();
  copy_seen boolean := false;
  alive boolean;
  copying boolean;
BEGIN
  LOOP
    PERFORM pg_stat_clear_snapshot();
    SELECT count(*) > 0, coalesce(bool_or(application_name = '{copy}'), false) INTO alive, copying
      FROM pg_stat_activity WHERE application_name IN ('{dump}', '{copy}');
    IF alive THEN
      quiet_since := clock_timestamp();
      copy_seen := copy_seen OR copying;
    ELSIF copy_seen OR clock_timestamp() - quiet_since > interval '{HOLDER_GRACE_S} seconds' THEN
      EXIT;
    END IF;
    PERFORM pg_sleep({POLL_S});
  END LOOP;
END $bw$;
"""  # noqa: S608


def copy_script(token: str, snapshot: str, oids: Sequence[int], settings: str) -> str:
    """The copy session's script: the snapshot imported, pg_dump's settings (`settings`, the archive's
    encoding among them), then for each table of `oids` (in the holder's order) its bounds line, the keys
    of its boundary rows in key order, its start line, its rows in key order, and its end line."""
    if not token.isalnum() or not all(part.isalnum() for part in snapshot.split("-")):
        raise ValueError("the token and snapshot must be alphanumeric")
    listed = ",".join(str(int(oid)) for oid in oids)
    mask = CHUNK_ROWS - 1
    # Only constants, the checked token and snapshot id, integers and pg_dump's settings go into the SQL.
    return (_OPENING  # noqa: S608
            + f"SET TRANSACTION SNAPSHOT '{snapshot}';\n"
            + settings
            # enable_sort off for the copies only (an index scan, no sort): the catalog query that writes
            # them takes minutes without sorts on a big catalog.
            + "SELECT 'SET enable_sort = off',\n"
            + f"       format('SELECT %L', 'bounds-{token}'),\n"
            + "       format('COPY (SELECT %s FROM %s WHERE (pg_catalog.hashtext(\n"
            + f"         pg_catalog.concat_ws(pg_catalog.chr(9), %s)) & {mask}) = 0 ORDER BY %s) TO STDOUT',\n"
            + "         kt.order_by, kt.qualified, kt.order_by, kt.order_by),\n"
            + f"       format('SELECT %L', 'copy-{token} ' || json_build_object(\n"
            + "         'oid', kt.oid, 'columns', kt.columns, 'order_by', kt.order_by)),\n"
            + "       format('COPY (SELECT %s FROM %s ORDER BY %s) TO STDOUT',\n"
            + "         kt.columns, kt.qualified, kt.order_by),\n"
            + f"       format('SELECT %L', 'copied-{token}')\n"
            + f"  FROM {KEYED} WHERE kt.oid = ANY ('{{{listed}}}'::oid[]) ORDER BY kt.schema, kt.name \\gexec\n"
            + "COMMIT;\n"
            # The holder's work is done: end its wait now (it might not have seen a short copy session).
            + "SELECT pg_catalog.pg_cancel_backend(pid) FROM pg_catalog.pg_stat_activity\n"
            + f" WHERE application_name = '{app_name(token, 'hold')}';\n")


def script_command() -> tuple[str, ...]:
    """The exec's command: psql reading the script in SCRIPT_VARIABLE (printf is the shell's own)."""
    return ("sh", "-c", f'printf %s "${SCRIPT_VARIABLE}" | "$@"', "sh", *PSQL)
