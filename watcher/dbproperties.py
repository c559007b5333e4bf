"""Database-level properties kept in a dump: owner, settings, ACL, comment.

`pg_dump --format=custom` always stores the database's own entries in its archive: DATABASE (with
the owner), DATABASE PROPERTIES (`ALTER DATABASE … SET`, `ALTER ROLE … IN DATABASE … SET`, the
connection limit), and COMMENT, SECURITY LABEL and ACL entries named `DATABASE <name>`. A plain
`pg_restore` into an existing database skips them all; `pg_restore --create --schema-only --file=-`
prints them (it reads only the archive's table of contents, at its start, and exits; the exec
helper then still passes the rest of the stream on, up to its own bound of 30 s, before it closes
the pipe: a cost that only shows on dumps of hundreds of MB). This module
reads that text and turns it into a script for another database name (a restore's scratch copy).
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from watcher import commands
from watcher.execute import Completed, Masker, run_pipeline
from watcher.restic import restic_error_text

_HEADER = re.compile(r"^-- Name: (?P<name>.*); Type: (?P<type>.*); Schema: (?P<schema>.*); Owner: (?P<owner>.*)$")
# Statements that name roles after TO/FROM (over-counting one only makes a drill skip owners).
_NAMES_GRANTEES = ("GRANT ", "REVOKE ", "ALTER DEFAULT PRIVILEGES ", "CREATE POLICY ")
_DATABASE_OBJECT_TYPES = frozenset({"COMMENT", "SECURITY LABEL", "ACL"})
_GRANTEE = re.compile(r'\b(?:TO|FROM)\s+("(?:[^"]|"")*"|[^\s;,]+)')
_SESSION_ROLE = re.compile(r'^SET SESSION AUTHORIZATION\s+("(?:[^"]|"")*"|[^\s;]+)', re.MULTILINE)
_ROLE_IN_DATABASE = re.compile(r'^ALTER ROLE\s+("(?:[^"]|"")*"|[^\s;]+)\s+IN DATABASE', re.MULTILINE)
_SETTING = re.compile(r'^ALTER DATABASE\s+(?:"(?:[^"]|"")*"|[^\s;]+)\s+SET\s+("(?:[^"]|"")*"|[^\s;]+)\s+(?:TO|=)',
                      re.MULTILINE)


def quote_ident(name: str) -> str:
    """`name` as an always-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def unquote_ident(token: str) -> str:
    """The name an identifier token stands for (pg_dump leaves only plain lower-case names bare)."""
    if token.startswith('"') and token.endswith('"') and len(token) >= 2:
        return token[1:-1].replace('""', '"')
    return token


@dataclass
class DatabaseProperties:
    """What an archive says about its database, and which roles its objects name."""

    database: str | None = None
    owner: str | None = None
    # The COMMENT, SECURITY LABEL, ACL and DATABASE PROPERTIES statements, each naming `database`.
    statements: list[str] = field(default_factory=list)
    # Every role the archive's objects are owned by, granted to or set for (PUBLIC excluded).
    roles: set[str] = field(default_factory=set)
    # "schema.table" (as the catalog spells them, unquoted) → the table's owner in the dump.
    table_owners: dict[str, str] = field(default_factory=dict)

    def setting_names(self) -> list[str]:
        """The names of the database's own settings (`ALTER DATABASE … SET name …`), sorted."""
        return sorted({unquote_ident(m.group(1)) for s in self.statements for m in _SETTING.finditer(s)})

    def roles_of(self, statement: str) -> set[str]:
        """The roles one statement names (grantees, `ALTER ROLE … IN DATABASE` targets)."""
        return _roles_named(statement)

    def script(self, target: str, existing_roles: set[str] | None = None) -> str:
        """The statements that give database `target` these properties, as one script.

        With `existing_roles`, an owner or statement naming a role not in it is left out (a drill
        container that lacks the roles); without, everything is kept and a missing role fails.
        """
        lines: list[str] = []
        if self.owner and (existing_roles is None or self.owner in existing_roles):
            lines.append(f"ALTER DATABASE {quote_ident(target)} OWNER TO {quote_ident(self.owner)};")
        for statement in self.statements:
            if existing_roles is not None and not _roles_named(statement) <= existing_roles:
                continue
            lines.append(retarget(statement, self.database or target, target))
        return "\n".join(lines) + ("\n" if lines else "")


def _roles_named(text: str) -> set[str]:
    roles: set[str] = set()
    for statement in split_statements(text):
        if statement.startswith(_NAMES_GRANTEES):
            roles |= {unquote_ident(m.group(1)) for m in _GRANTEE.finditer(_outside_literals(statement))}
        roles |= {unquote_ident(m.group(1)) for m in _ROLE_IN_DATABASE.finditer(statement)}
        roles |= {unquote_ident(m.group(1)) for m in _SESSION_ROLE.finditer(statement)}
    roles.discard("PUBLIC")
    return roles


def _outside_literals(statement: str) -> str:
    """The statement with its string literals blanked ('' stays), so that text inside them never matches."""
    return re.sub(r"'(?:[^']|'')*'", "''", statement)


class PropertiesReader:
    """Collects DatabaseProperties from the lines of `pg_restore --create --schema-only --file=-`."""

    def __init__(self) -> None:
        self.properties = DatabaseProperties()
        self._keep = False
        self._body: list[str] = []

    def __call__(self, line: str) -> None:
        header = _HEADER.match(line)
        if header:
            self._close()
            self._open(header.group("name"), header.group("type"), header.group("owner"))
            if header.group("type") == "TABLE" and header.group("owner") not in ("", "-"):
                self.properties.table_owners[f"{header.group('schema')}.{header.group('name')}"] = header.group("owner")
        elif line.startswith(("\\connect ", "\\unrestrict ", "\\restrict ")):
            self._close()
        elif self._keep or line.startswith((*_NAMES_GRANTEES, "SET SESSION AUTHORIZATION ")):
            self._body.append(line)

    def _open(self, name: str, kind: str, owner: str) -> None:
        if owner and owner != "-":
            self.properties.roles.add(owner)
        if kind == "DATABASE":
            self.properties.database = name
            self.properties.owner = owner
        database = self.properties.database
        self._keep = kind == "DATABASE PROPERTIES" or (
            kind in _DATABASE_OBJECT_TYPES and database is not None and name.startswith("DATABASE ")
            and unquote_ident(name.removeprefix("DATABASE ")) == database)

    def _close(self) -> None:
        text = "\n".join(self._body).strip()
        if text:
            self.properties.roles |= _roles_named(text)
            if self._keep:
                self.properties.statements.extend(split_statements(text))
        self._body = []
        self._keep = False

    def result(self) -> DatabaseProperties:
        """The properties read so far (call after the last line)."""
        self._close()
        return self.properties


def split_statements(text: str) -> list[str]:
    """`text` split at the semicolons that end statements (not those inside literals or identifiers)."""
    statements: list[str] = []
    start = 0
    quote: str | None = None
    for index, char in enumerate(text):
        if quote is not None:
            if char == quote:
                quote = None  # a doubled quote closes and reopens: same result
        elif char in "'\"":
            quote = char
        elif char == ";":
            statement = _without_leading_comments(text[start:index + 1])
            if statement:
                statements.append(statement)
            start = index + 1
    return statements


def _without_leading_comments(chunk: str) -> str:
    lines = chunk.strip().split("\n")
    while lines and lines[0].startswith("--"):
        lines.pop(0)
    return "\n".join(lines).strip()


_TARGET = re.compile(r'\bDATABASE\s+("(?:[^"]|"")*"|[a-z_][a-z0-9_$]*)(?=[\s;])')


def retarget(statement: str, database: str, target: str) -> str:
    """`statement` with its first `DATABASE <database>` (outside literals) naming `target` instead.

    Raises ValueError when the statement names no such database (so nothing is applied elsewhere).
    """
    blanked = _blank_quoted(statement)
    for match in _TARGET.finditer(blanked):
        token = statement[match.start(1):match.end(1)]
        if unquote_ident(token) == database:
            return statement[:match.start(1)] + quote_ident(target) + statement[match.end(1):]
    raise ValueError(f"statement does not name database {database!r}: {statement[:80]!r}")


def _blank_quoted(statement: str) -> str:
    """The statement with the insides of string literals replaced by spaces (same length), and with
    quoted identifiers other than right after DATABASE untouched, so offsets still match."""
    out = list(statement)
    quote: str | None = None
    for index, char in enumerate(statement):
        if quote == "'":
            if char == "'":
                quote = None
            else:
                out[index] = " "
        elif quote == '"':
            if char == '"':
                quote = None
            else:
                out[index] = "x" if char in " \t\n;" else char
        elif char in "'\"":
            quote = char
    return "".join(out)


class PropertiesUnreadable(Exception):
    """The archive's database entries could not be read; the message says why."""


# How a restic that handles SIGPIPE itself says that the reader of its output went away.
_PIPE_CLOSED = "broken pipe"


def entries_failure(done: Completed) -> str | None:
    """Why a run of commands.database_entries_pipeline did not read the dump's database entries whole, naming
    restic or pg_restore; None when it did.

    pg_restore reads only the archive's table of contents, at its start, and exits; restic, still writing the
    data after it, then meets a closed pipe and ends on SIGPIPE (or, handling the signal, exits non-zero saying
    "broken pipe"). That is no failure when pg_restore exited 0: it had everything it needed. When pg_restore
    failed, the pipe closed before that, and pg_restore is named. Any other restic failure is one even after
    pg_restore's success (as before: nothing that restic reports as an error passes).
    """
    if done.timed_out or done.cancelled or done.problem is not None or len(done.returncodes) != 2:
        return done.describe_failure()
    dump_code, list_code = done.returncodes
    said = restic_error_text(done.stderr_tail.splitlines())
    tail = f": {said}" if said else ""
    cut_off = dump_code == -signal.SIGPIPE or (dump_code != 0 and _PIPE_CLOSED in done.stderr_tail)
    # restic first: a restic that fails (a wrong password, a missing pack) leaves pg_restore an input cut short.
    if dump_code != 0 and not cut_off:
        return f"restic dump failed (exit status {dump_code}){tail}"
    if list_code != 0:
        return f"pg_restore in the container failed (exit status {list_code}){tail}"
    return None


def read_entries(*, restic: str, snapshot_id: str, database: str, container_id: str, env: Mapping[str, str],
                 masker: Masker, timeout: float, readers: Sequence[Callable[[str], None]], reading: str,
                 user: str | None = None, cancel: threading.Event | None = None) -> None:
    """Passes each line of a snapshot's dump's database entries, as the container's own pg_restore prints them
    (commands.database_entries_pipeline), to every one of `readers` (PropertiesReader, roles.NeededRoles).

    `env` is the pipeline's environment (the repository's and DOCKER_HOST); `user` gives the exec its libpq
    environment. Returns once the entries were read whole; raises PropertiesUnreadable saying that `reading`
    (what the caller reads, e.g. "the database entries of snapshot 61a978dd") failed, and why (entries_failure).
    """
    def each(line: str) -> None:
        for reader in readers:
            reader(line)

    done = run_pipeline(commands.database_entries_pipeline(restic, snapshot_id, database, container_id, user),
                        env=env, masker=masker, timeout=timeout, cancel=cancel, capture_stdout=False,
                        on_stdout_line=each)
    failure = entries_failure(done)
    if failure is not None:
        raise PropertiesUnreadable(f"reading {reading} failed: {failure}")


def read_properties(*, restic: str, snapshot_id: str, database: str, container_id: str, user: str,
                    env: Mapping[str, str], masker: Masker, timeout: float,
                    cancel: threading.Event | None = None) -> DatabaseProperties:
    """Reads the database properties of a snapshot's dump (read_entries with a PropertiesReader).

    Returns the DatabaseProperties; raises PropertiesUnreadable when the entries cannot be read or hold no
    DATABASE entry.
    """
    reader = PropertiesReader()
    read_entries(restic=restic, snapshot_id=snapshot_id, database=database, container_id=container_id, env=env,
                 masker=masker, timeout=timeout, readers=(reader,), user=user, cancel=cancel,
                 reading=f"the database entries of snapshot {snapshot_id[:8]}")
    return checked(reader.result(), snapshot_id)


def checked(properties: DatabaseProperties, snapshot_id: str) -> DatabaseProperties:
    """`properties` read from snapshot `snapshot_id`'s dump; raises PropertiesUnreadable when they name no
    database (the dump had no DATABASE entry)."""
    if properties.database is None:
        raise PropertiesUnreadable(f"the dump of snapshot {snapshot_id[:8]} holds no DATABASE entry "
                                   "(a dump of selected tables or schemas cannot restore database properties)")
    return properties


class KnownProperties:
    """The database properties of snapshots whose entries were read already: the role plan of a restore reads
    the same entries of the same dump (watcher.roles), and the restore then takes them here rather than read
    the dump's start a second time (a repository open, an exec and pg_restore: about a second)."""

    def __init__(self) -> None:
        self._by_snapshot: dict[str, DatabaseProperties] = {}

    def keep(self, snapshot_id: str, properties: DatabaseProperties) -> None:
        """Keeps what was read of snapshot `snapshot_id` (the reader's result after its last line)."""
        self._by_snapshot[snapshot_id] = properties

    def take(self, snapshot_id: str) -> DatabaseProperties | None:
        """The properties kept for snapshot `snapshot_id`, forgotten here; None when none were kept."""
        return self._by_snapshot.pop(snapshot_id, None)
