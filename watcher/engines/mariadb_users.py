"""Users, roles and grants for a MariaDB restore on another host (SPEC §10, §13): the engine's equivalent of
watcher.roles for PostgreSQL, with the same contract.

A MariaDB's globals snapshot is `mariadb-dump --system=users`: a CREATE USER (with its password hash) or
CREATE ROLE per account, then the GRANTs to each. On a fresh host the application's user is missing, and
the restored database is of no use to the application until it exists. Restore creates, from the globals
of the same pass, the accounts that are missing: those that hold grants on the restored database(s), with
the roles granted to them (transitively), or with `every_account` (whole-host recovery) every account of
the globals. An account that exists is never altered: no grant, password or default role is applied to
it. A created account gets its own statements and every grant to it; grants on tables and routines can
only be given once their database is restored, so they run after it (`after`), and those on databases this
restore does not bring back are left out and counted. The SQL (it holds password hashes) reaches the
container's client on stdin, never argv nor a log, and every hash is masked in whatever the client says.

The dump's own scaffolding (the `mariadb_dump_import_role`, SET ROLE, session settings, MySQL 8-only
comments) is left out: a role is created as the restoring account, which therefore administers it, as the
dumping account did.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from watcher import commands

if TYPE_CHECKING:
    from watcher.discovery import Credentials
    from watcher.engines.mariadb_restore import MariaDBRestorer
    from watcher.restic import Snapshot

log = structlog.get_logger("watcher.engines.mariadb_users")

# The dump's scaffolding and the pseudo-accounts of GRANT: never created, never missing.
IMPORT_ROLE = "mariadb_dump_import_role"
Account = tuple[str, str]  # (user, host); a role's host is ""

_TOKEN = re.compile(r"""\s+|--[^\n]*|(/\*.*?\*/)|`((?:[^`]|``)*)`|'((?:[^'\\]|\\.|'')*)'|([A-Za-z0-9_$.]+)|(.)""",
                    re.DOTALL)
_OBJECT_KINDS = frozenset({"TABLE", "PROCEDURE", "FUNCTION", "PACKAGE", "BODY"})
_VERSIONED = re.compile(r"/\*M!\d{5,6}\s?(.*)\*/\Z", re.DOTALL)


class UsersError(Exception):
    """The users a restore needs cannot be had; the message names them and says why."""


@dataclass(frozen=True)
class Token:
    """One token: a bare `word`, a backquoted `ident`, a `string` literal, `punct`, or a `comment`."""

    kind: str
    text: str

    @property
    def is_name(self) -> bool:
        """Whether it can stand for a user, host or role name."""
        return self.kind in ("word", "ident", "string")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text.replace("''", "'"))


def tokens(sql: str) -> list[Token]:
    """The tokens of `sql` (blanks and `--` comments dropped; `/* */` comments kept whole)."""
    found: list[Token] = []
    for match in _TOKEN.finditer(sql):
        comment, ident, string, word, punct = match.groups()
        if comment is not None:
            found.append(Token("comment", comment))
        elif ident is not None:
            found.append(Token("ident", ident.replace("``", "`")))
        elif string is not None:
            found.append(Token("string", _unescape(string)))
        elif word is not None:
            found.append(Token("word", word))
        elif punct is not None:
            found.append(Token("punct", punct))
    return found


def statements(sql: str) -> list[str]:
    """The statements of a dump that MariaDB runs, as text without their `;`: a `/*M!NNNNNN … */` comment
    stands for its contents (MariaDB runs them), a `/*!NNNNN … */` one for nothing (session settings and MySQL
    8-only statements). A `;` inside a string or a name does not end one."""
    found: list[str] = []
    start = 0
    for match in _TOKEN.finditer(sql):
        comment, punct = match.group(1), match.group(5)
        if comment is not None and (inner := _VERSIONED.match(comment)) is not None:
            found.append(inner.group(1).strip())
            start = match.end()
        elif comment is not None:
            start = match.end()
        elif punct == ";":
            text = sql[start:match.start()].strip()
            if text:
                found.append(text)
            start = match.end()
    return [text for text in found if text]


def account_at(words: Sequence[Token], index: int) -> tuple[Account | None, int]:
    """The account named at `words[index]` (`user`@`host`, or a role's bare name) and the index after it;
    (None, index) when no name stands there."""
    if index >= len(words) or not words[index].is_name:
        return None, index
    user = words[index].text
    if index + 2 < len(words) and words[index + 1].text == "@" and words[index + 2].is_name:
        return (user, words[index + 2].text), index + 3
    return (user, ""), index + 1


def shown(account: Account) -> str:
    """An account as messages name it: user@host, or a role's name."""
    return f"{account[0]}@{account[1]}" if account[1] else account[0]


def quoted(account: Account) -> str:
    """An account in SQL: 'user'@'host', or 'role'."""
    def literal(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{literal(account[0])}@{literal(account[1])}" if account[1] else literal(account[0])


@dataclass(frozen=True)
class Grant:
    """One GRANT of the globals: to whom, and the database whose objects it needs restored first (None: a
    global, database-level, proxy or role grant, which needs nothing)."""

    grantee: Account
    statement: str
    database: str | None = None
    role: Account | None = None  # a role grant's role
    on: str | None = None  # the database a database-level or object grant is on


@dataclass
class UserGlobals:
    """A MariaDB globals snapshot's accounts: each one's creating statements, the grants, the default-role
    settings, and every password hash or authentication string it holds (to be masked)."""

    accounts: dict[Account, list[str]] = field(default_factory=dict)
    grants: list[Grant] = field(default_factory=list)
    defaults: dict[Account, str] = field(default_factory=dict)
    hashes: list[str] = field(default_factory=list)


def parse_user_globals(sql: str) -> UserGlobals:
    """Reads `mariadb-dump --system=users` output."""
    parsed = UserGlobals()
    for statement in statements(sql):
        words = [t for t in tokens(statement) if t.kind != "comment"]
        if "IDENTIFIED" in (t.text.upper() for t in words if t.kind == "word"):
            parsed.hashes += [t.text for t in words if t.kind == "string" and t.text]
        _read_statement(parsed, words, statement)
    return parsed


def _read_statement(parsed: UserGlobals, words: Sequence[Token], statement: str) -> None:
    """Adds what one statement says about accounts to `parsed` (nothing for the dump's scaffolding)."""
    heads = [t.text.upper() for t in words[:3] if t.kind == "word"]
    if heads[:2] == ["CREATE", "USER"]:
        account, _ = account_at(words, 2)
        if account is not None:
            parsed.accounts.setdefault(account, []).append(statement)
    elif heads[:2] == ["CREATE", "ROLE"] and "IF" not in heads:
        role, _ = account_at(words, 2)
        if role is not None and role[0] != IMPORT_ROLE:
            parsed.accounts.setdefault(role, []).append(f"CREATE ROLE {quoted(role)}")
    elif heads[:1] == ["GRANT"]:
        grant = _grant(words, statement)
        if grant is not None and grant.grantee[0] != IMPORT_ROLE and grant.role != (IMPORT_ROLE, ""):
            parsed.grants.append(grant)
    elif heads[:3] == ["SET", "DEFAULT", "ROLE"]:
        at = next((i for i, t in enumerate(words) if t.kind == "word" and t.text.upper() == "FOR"), None)
        account = account_at(words, at + 1)[0] if at is not None else None
        if account is not None:
            parsed.defaults[account] = statement


def _grant(words: Sequence[Token], statement: str) -> Grant | None:
    """The Grant of a GRANT statement's tokens; None for one to a pseudo-account (CURRENT_USER())."""
    upper = [t.text.upper() if t.kind == "word" else None for t in words]
    to = next((i for i, word in enumerate(upper) if word == "TO"), None)
    if to is None:
        return None
    grantee, _ = account_at(words, to + 1)
    if grantee is None or (to + 2 < len(words) and words[to + 2].text == "("):
        return None
    on = next((i for i, word in enumerate(upper[:to]) if word == "ON"), None)
    if on is None:  # GRANT role TO account
        return Grant(grantee, statement, role=account_at(words, 1)[0])
    target = list(words[on + 1:to])
    while target and target[0].kind == "word" and target[0].text.upper() in _OBJECT_KINDS:
        target = target[1:]
    if len(target) >= 3 and target[0].is_name and target[1].text == "." and target[2].text != "*":
        return Grant(grantee, statement, database=target[0].text, on=target[0].text)
    if len(target) == 1 and target[0].kind == "word" and "." in target[0].text:  # db.tbl written bare
        database, _, rest = target[0].text.partition(".")
        return Grant(grantee, statement, database=database if rest != "*" else None, on=database or None)
    if target and target[0].is_name and target[0].text and target[0].text != "*":
        return Grant(grantee, statement, on=target[0].text)
    return Grant(grantee, statement)


@dataclass(frozen=True)
class UserPlan:
    """What a restore does about users: which accounts it creates (`script`, then `after` once the databases
    are restored) and which it keeps; `left_out`: grants to created accounts on objects of databases this
    restore does not bring back."""

    create: tuple[Account, ...]
    keep: tuple[Account, ...]
    script: str = ""
    after: str = ""
    hashes: tuple[str, ...] = ()
    left_out: int = 0
    source: str = ""  # the globals snapshot it was made from; "" when there was none

    def created(self) -> list[str]:
        """The created accounts as messages name them."""
        return [shown(account) for account in self.create]

    def kept(self) -> list[str]:
        """The kept accounts as messages name them."""
        return [shown(account) for account in self.keep]


def plan_users(databases: Collection[str], existing: Iterable[Account], globals_: UserGlobals | None, *,
               every_account: bool = False, source: str = "the globals snapshot") -> UserPlan:
    """The accounts to create before restoring `databases`: those with a grant on one of them that do not
    exist, with the roles granted to them (transitively), or with `every_account` every account of the
    globals that does not exist. Without globals nothing is created (the plan keeps what exists)."""
    have = set(existing)
    if globals_ is None:
        return UserPlan((), ())
    wanted = wanted_accounts(databases, globals_, every_account=every_account)
    create = tuple(account for account in globals_.accounts if account in wanted - have)
    keep = tuple(sorted(wanted & have))
    before, after, left_out = _scripts(create, set(databases), globals_)
    return UserPlan(create, keep, before, after, tuple(globals_.hashes), left_out, source)


def wanted_accounts(databases: Collection[str], globals_: UserGlobals, *, every_account: bool) -> set[Account]:
    """The accounts of the globals a restore of `databases` wants: those with a grant on one of them and the
    roles granted to those (transitively), or with `every_account` every one."""
    known = set(globals_.accounts)
    if every_account:
        return known
    return _with_roles({g.grantee for g in globals_.grants if g.on in databases} & known, globals_)


def _with_roles(start: set[Account], globals_: UserGlobals) -> set[Account]:
    """`start` and every role granted to one of them, transitively."""
    chosen = set(start)
    grew = True
    while grew:
        grew = False
        for grant in globals_.grants:
            role = grant.role
            if role is not None and grant.grantee in chosen and role not in chosen and role in globals_.accounts:
                chosen.add(role)
                grew = True
    return chosen


def _scripts(create: Sequence[Account], databases: set[str], globals_: UserGlobals) -> tuple[str, str, int]:
    """The SQL that creates `create` with their grants (roles first, so that role grants find them), the SQL of
    their grants on restored objects, and how many grants on objects of other databases are left out."""
    if not create:
        return "", "", 0
    ordered = sorted(create, key=lambda account: account[1] != "")  # roles (host "") first
    chosen = set(create)
    before = [statement for account in ordered for statement in globals_.accounts[account]]
    after: list[str] = []
    left_out = 0
    for grant in globals_.grants:
        if grant.grantee not in chosen:
            continue
        if grant.database is None:
            before.append(grant.statement)
        elif grant.database in databases:
            after.append(grant.statement)
        else:
            left_out += 1
    before += [globals_.defaults[account] for account in ordered if account in globals_.defaults]

    def script(lines: list[str]) -> str:
        return "".join(line + ";\n" for line in lines)
    return script(before), script(after), left_out


def drop_script(accounts: Iterable[Account]) -> str:
    """SQL that removes `accounts` again (a creation that failed part-way: none is left half made)."""
    return "".join(f"DROP {'USER' if account[1] else 'ROLE'} IF EXISTS {quoted(account)};\n" for account in accounts)


def users_sentence(plan: UserPlan, *, future: bool) -> str:
    """What a restore does (`future`) or did about users: which it creates and which exist already (kept)."""
    kept = f"kept (exist already): {', '.join(plan.kept())}" if plan.keep else "none of them exists already"
    if not plan.source:
        return ("No globals snapshot of that pass (pruned, or taken without root): no user is created; the "
                "application's users must exist already.")
    if not plan.create:
        return f"Users the databases' grants name: {kept}." if plan.keep else "No user to create."
    verb = "will be created" if future else "created"
    skipped = (f"; {plan.left_out} grant(s) on objects of databases not restored here are left out"
               if plan.left_out else "")
    return f"Users {verb} from the old host's globals: {', '.join(plan.created())}; {kept}{skipped}."


def parse_existing(output: str) -> set[Account]:
    """The accounts of `SELECT User, Host FROM mysql.user` (tab-separated; a role's host is empty)."""
    found: set[Account] = set()
    for line in output.splitlines():
        user, _, host = line.partition("\t")
        if user:
            found.add((user, host))
    return found


EXISTING_SQL = "SELECT User, Host FROM mysql.user;\n"


class UserMaker:
    """Reads a MariaDB globals snapshot, plans the accounts a restore needs in a destination container and
    creates the missing ones, through the restorer's client (`MariaDBRestorer.sql`)."""

    def __init__(self, restorer: MariaDBRestorer) -> None:
        self.restorer = restorer

    def plan(self, container_id: str, creds: Credentials, databases: Collection[str], globals_snapshot: Snapshot | None,
             *, every_account: bool = False) -> UserPlan:
        """The plan for restoring `databases` here from `globals_snapshot` (None: nothing is created); raises
        UsersError when the globals or the container's accounts cannot be read."""
        from watcher.engines.mariadb_restore import MariaDBRestoreError
        if globals_snapshot is None:
            return UserPlan((), ())
        repository = self.restorer.repository
        done = repository.run(commands.restic_dump_globals(repository.binary, globals_snapshot.id), timeout=600,
                              cancel=self.restorer.cancel)
        if not done.ok:
            raise UsersError(repository.failure(f"reading globals snapshot {globals_snapshot.short_id} from", done))
        globals_ = parse_user_globals(done.stdout.decode(errors="replace"))
        existing: set[Account] = set()
        # A restoring account that may not read mysql.user (not root) still restores a database that needs
        # no account of the globals.
        if wanted_accounts(databases, globals_, every_account=every_account):
            try:
                existing = parse_existing(self.restorer.sql(container_id, creds, EXISTING_SQL))
            except MariaDBRestoreError as exc:
                raise UsersError(f"listing the users of the container failed: {exc}") from exc
        return plan_users(databases, existing, globals_, every_account=every_account,
                          source=f"globals snapshot {globals_snapshot.short_id}")

    def create(self, plan: UserPlan, container_id: str, container_name: str, creds: Credentials) -> None:
        """Creates the plan's accounts with their grants; when that fails part-way, removes the ones it made (all
        or none). Raises UsersError."""
        from watcher.engines.mariadb_restore import MariaDBRestoreError
        if not plan.create:
            return
        try:
            self.restorer.sql(container_id, creds, plan.script, plan.hashes)
        except MariaDBRestoreError as exc:
            try:
                self.restorer.sql(container_id, creds, drop_script(plan.create))
            except MariaDBRestoreError as cleanup:
                raise UsersError(f"creating users {', '.join(plan.created())} failed, and removing them again "
                                 f"too ({cleanup}): {exc}") from exc
            raise UsersError(f"creating users {', '.join(plan.created())} failed, none was kept: {exc}") from exc
        log.info("users_created", target=container_name, users=",".join(plan.created()),
                 kept=",".join(plan.kept()))

    def grant_on_objects(self, plan: UserPlan, container_id: str, creds: Credentials) -> None:
        """The created accounts' grants on tables and routines, once their databases are restored; raises
        UsersError."""
        from watcher.engines.mariadb_restore import MariaDBRestoreError
        if not plan.after:
            return
        try:
            self.restorer.sql(container_id, creds, plan.after, plan.hashes)
        except MariaDBRestoreError as exc:
            raise UsersError(f"granting the created users their rights on tables and routines failed: {exc}") from exc
