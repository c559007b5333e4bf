"""The checks of a PostgreSQL drill after its restore (watcher.drill_restore):
- every table of the dump exists after the restore, with exactly as many rows as the dump holds;
- a table that is non-empty in the live database is not empty in the restore (the live queries are
  bounded by lock_timeout and statement_timeout: a locked table fails the drill naming the lock wait);
- the database and its tables have the dump's owners, and the database its settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from watcher import commands
from watcher.discovery import Target
from watcher.drill_container import DRILL_TIMEOUT_SECONDS, DrillContainer, run_pipeline_checked
from watcher.execute import Completed, ExecError, run_in_container
from watcher.jobs import JobError, lock_wait_of, lock_wait_problem, run_on_live
from watcher.restic import Snapshot

_COPY = re.compile(r"^COPY (.+?) (?:\(.*\) )?FROM stdin;$")


@dataclass(frozen=True)
class TableCheck:
    """One table: rows in the dump, rows after the restore, and whether the live table has rows."""

    table: str
    in_dump: int
    restored: int | None
    live_nonempty: bool | None

    @property
    def problem(self) -> str | None:
        """Why this table fails the check, or None."""
        if self.restored is None:
            return f"{self.table}: missing after the restore"
        if self.restored != self.in_dump:
            return f"{self.table}: {self.restored} rows restored, the dump holds {self.in_dump}"
        if self.live_nonempty and self.restored == 0:
            return f"{self.table}: empty in the restore but not in the live database"
        return None


@dataclass(frozen=True)
class ExpectedProperties:
    """What a restored database must show of its dump's database-level properties."""

    owner: str
    settings: tuple[str, ...]  # names of the database's own settings (ALTER DATABASE … SET)
    table_owners: dict[str, str] = field(default_factory=dict)  # "schema.table" → owner


class RowCounter:
    """Counts the rows of each COPY block of `pg_restore --data-only` text, line by line, so a large
    dump never sits in memory (COPY text escapes newlines: one line is one row)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._current: str | None = None

    def __call__(self, line: str) -> None:
        if self._current is None:
            match = _COPY.match(line)
            if match:
                self._current = match.group(1)
                self.counts.setdefault(self._current, 0)
        elif line == "\\.":
            self._current = None
        else:
            self.counts[self._current] += 1


class DrillChecks:
    """Compares a restored drill container with its dump, and with the live database it was taken of."""

    def __init__(self, container: DrillContainer) -> None:
        self.container = container
        self.ctx = container.ctx

    def table_checks(self, target: Target, snapshot: Snapshot, database: str) -> tuple[TableCheck, ...]:
        """Returns each table of the dump of `database` in `snapshot`, by name: its rows in the dump, its
        rows after the restore and whether the live table has rows. Raises JobError when the dump cannot
        be read, the restored rows cannot be counted or the live database cannot be asked."""
        container = self.container
        counter = RowCounter()
        as_text = commands.exec_helper(container.container_id, commands.pg_restore_data_as_text_command(),
                                       stdin=True, env_values=commands.pg_env(container.creds.user, database))
        dump = commands.restic_dump(self.ctx.repository.binary, snapshot.id, database)
        failure = run_pipeline_checked(self.ctx, [dump, as_text], container.pipeline_env(), container.masker,
                                       on_stdout_line=counter)
        if failure is not None:
            raise JobError(f"reading the dump of snapshot {snapshot.short_id} failed: {failure}")
        in_dump = counter.counts
        if not in_dump:
            return ()
        restored = self._restored_counts(database, list(in_dump))
        live = self._live_nonempty(target, database, list(in_dump))
        return tuple(
            TableCheck(table, rows, int(restored[table]) if table in restored else None,
                       (live[table] == "t") if table in live else None)
            for table, rows in sorted(in_dump.items())
        )

    def property_problems(self, expected: ExpectedProperties) -> list[str]:
        """Returns why the restored database's owner, settings or tables' owners differ from the dump's,
        or nothing; raises JobError."""
        found = _pairs_of(self.container.query((
            "SELECT 'owner', pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = :'db'\n"
            "UNION ALL SELECT 'settings', coalesce(string_agg(split_part(s, '=', 1), ','), '')\n"
            "  FROM pg_db_role_setting, unnest(setconfig) AS s\n"
            "  WHERE setrole = 0 AND setdatabase = (SELECT oid FROM pg_database WHERE datname = :'db');\n"
        ), {"db": self.container.creds.database}))
        problems = []
        if found.get("owner") != expected.owner:
            problems.append(f"database owner: {found.get('owner')} after the restore, the dump has {expected.owner}")
        settings = sorted(filter(None, found.get("settings", "").split(",")))
        if settings != sorted(expected.settings):
            problems.append(f"database settings: {', '.join(settings) or 'none'} after the restore, "
                            f"the dump has {', '.join(sorted(expected.settings)) or 'none'}")
        return problems + self._table_owner_problems(expected.table_owners)

    def _table_owner_problems(self, expected: dict[str, str]) -> list[str]:
        """Returns why restored tables' owners differ from the dump's (at most 10), or nothing; raises JobError."""
        if not expected:
            return []
        found = _pairs_of(self.container.query((
            "SELECT n.nspname || '.' || c.relname, pg_get_userbyid(c.relowner)\n"
            "  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p');\n"
        ), database=self.container.creds.database))
        return [f"owner of table {table}: {found.get(table, 'no such table')} after the restore, the dump has {owner}"
                for table, owner in sorted(expected.items()) if found.get(table) != owner][:10]

    def _restored_counts(self, database: str, tables: list[str]) -> dict[str, str]:
        """Returns table → rows in the drill container (no other session there: bounded by the drill's
        timeout); raises JobError."""
        # Table names are pg_dump's own COPY targets, already quoted identifiers.
        script = "\n".join(f"SELECT {_quote_literal(table)}, count(*) FROM {table};"  # noqa: S608
                            for table in tables)
        done = run_in_container(self.ctx.docker_host, self.container.container_id, commands.psql_pairs_command(),
                                env=commands.pg_env(self.container.creds.user, database), masker=self.ctx.masker,
                                timeout=DRILL_TIMEOUT_SECONDS, cancel=self.ctx.cancel, stdin=script.encode())
        if not done.ok:
            raise JobError(f"counting restored rows failed: {done.describe_failure()}")
        return _pairs(done)

    def _live_nonempty(self, target: Target, database: str, tables: list[str]) -> dict[str, str]:
        """Returns table → 't'/'f' (has rows) in the live database, for the tables it still has; raises
        JobError.

        Both queries are bounded (lock_timeout, statement_timeout): a table another session holds
        locked fails the drill naming the lock wait instead of holding it up. A table dropped since
        the backup is left out.
        """
        existing = _pairs(self._live_query(target, database, "\n".join(
            f"SELECT {_quote_literal(table)}, to_regclass({_quote_literal(table)}) IS NOT NULL;" for table in tables)))
        present = [table for table in tables if existing.get(table) == "t"]
        if not present:
            return {}
        return _pairs(self._live_query(target, database, "\n".join(
            f"SELECT {_quote_literal(table)}, EXISTS (SELECT 1 FROM {table});" for table in present)))  # noqa: S608

    def _live_query(self, target: Target, database: str, script: str) -> Completed:
        """Runs `SELECT label, value` statements on the live database; returns their Completed run, raises
        JobError naming a lock wait."""
        try:
            done = run_on_live(self.ctx, target, commands.psql_pairs_command(), database, stdin=script.encode())
        except ExecError as exc:
            raise JobError(f"checking the live database {database!r} in {target.name}: {exc}") from exc
        if not done.ok:
            hint = lock_wait_problem(done.stderr_tail, lock_wait_of(self.ctx, target))
            failure = done.describe_failure()
            raise JobError(f"checking the live database {database!r} in {target.name} failed: "
                           + (f"{hint}\n{failure}" if hint else failure))
        return done


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _pairs(done: Completed) -> dict[str, str]:
    """label → value of psql's unaligned `label|value` lines."""
    return _pairs_of(done.stdout.decode(errors="replace"))


def _pairs_of(output: str) -> dict[str, str]:
    """label → value of psql's unaligned `label|value` lines."""
    results: dict[str, str] = {}
    for line in output.splitlines():
        label, sep, value = line.rpartition("|")
        if sep:
            results[label] = value
    return results
