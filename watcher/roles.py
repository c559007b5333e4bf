"""Roles for a restore on another host: which roles a dump needs, and creating the missing ones from the
globals snapshot of the same pass (SPEC §10).

A dump's objects and grants name roles (owners, grantees, default privileges, policies); on a fresh host
those roles do not exist and pg_restore stops at the first of them. The container's globals snapshot
(`pg_dumpall --globals-only`) holds every role with its attributes, password hash, settings and
memberships. From it, the roles that are missing here are created; a role that exists is never
altered. The globals' SQL is read into memory only (it holds password hashes): it reaches psql on
stdin, never argv nor a log, and every hash in it is masked in whatever psql says.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from watcher import commands, dbproperties
from watcher.config import Bounds
from watcher.discovery import Credentials
from watcher.execute import ExecError, Masker, run_in_container
from watcher.restic import Repository, Snapshot

log = structlog.get_logger("watcher.roles")
READ_TIMEOUT_SECONDS = 12 * 3600.0
# Roles every cluster has, and the pseudo-roles of GRANT/REVOKE: never created, never missing.
_NOT_ROLES = {"PUBLIC", "CURRENT_USER", "SESSION_USER", "CURRENT_ROLE", "GROUP", "-", ""}


class RoleError(Exception):
    """The roles a restore needs cannot be had; the message names them and says why."""


# --- reading SQL: words, quoted identifiers, strings ---------------------------------------------------
_TOKEN = re.compile(r"""\s+|--[^\n]*|"((?:[^"]|"")*)"|[Ee]?'((?:[^']|'')*)'|([A-Za-z_][A-Za-z0-9_$]*)|(\$\$|.)""",
                    re.DOTALL)


@dataclass(frozen=True)
class Token:
    """One token of a statement: a bare `word`, a quoted `ident`, a `string` literal or `punct`."""

    kind: str
    text: str

    @property
    def name(self) -> str:
        """The identifier it stands for (a bare word as written: pg_dump quotes every other name)."""
        return self.text


def tokens(sql: str) -> list[Token]:
    """The tokens of `sql` (comments and blanks dropped)."""
    found: list[Token] = []
    for match in _TOKEN.finditer(sql):
        quoted, string, word, punct = match.groups()
        if quoted is not None:
            found.append(Token("ident", quoted.replace('""', '"')))
        elif string is not None:
            found.append(Token("string", string.replace("''", "'")))
        elif word is not None:
            found.append(Token("word", word))
        elif punct is not None:
            found.append(Token("punct", punct))
    return found


def statements(sql: str) -> list[str]:
    """The statements of a pg_dumpall script, without their `;` (psql's backslash lines and comments
    dropped); a `;` inside a string or a quoted name does not end one."""
    found: list[str] = []
    current: list[str] = []
    for line in sql.splitlines(keepends=True):
        if not current and (line.startswith("\\") or line.startswith("--") or not line.strip()):
            continue
        current.append(line)
        text = "".join(current)
        if _ends_statement(text):
            found.append(text.rstrip().removesuffix(";").strip())
            current = []
    return found


def _ends_statement(text: str) -> bool:
    """Whether `text` ends with a `;` outside quotes (its quotes are balanced and its last token is `;`)."""
    stripped = text.rstrip()
    if not stripped.endswith(";"):
        return False
    in_string = in_ident = False
    for char in stripped:
        if char == "'" and not in_ident:
            in_string = not in_string
        elif char == '"' and not in_string:
            in_ident = not in_ident
    return not in_string and not in_ident


def _is_name(token: Token) -> bool:
    return token.kind == "ident" or (token.kind == "word" and token.text not in _NOT_ROLES)


def _names_after(words: Sequence[Token], keyword: str, stop: Iterable[str]) -> list[str]:
    """The role names listed after the last top-level `keyword` (TO, FROM), up to a word of `stop`."""
    at = max((i for i, t in enumerate(words) if t.kind == "word" and t.text == keyword), default=None)
    if at is None:
        return []
    names: list[str] = []
    stops = set(stop)
    for token in words[at + 1:]:
        if token.kind == "word" and token.text in stops:
            break
        if _is_name(token):
            names.append(token.name)
    return names


# --- the roles a dump needs ------------------------------------------------------------------------------
_HEADER = re.compile(r"^-- (?:Data for )?Name: .*; Type: (?P<type>.+?); Schema: .*?; Owner: (?P<owner>.*)$")


class NeededRoles:
    """Collects, line by line from `pg_restore --schema-only --file=-`, the roles a dump names: each
    entry's owner (its `-- Name: …; Owner: …` header) and the grantees, grantors and default-privilege
    roles of its ACL entries, the roles of its policies and of its database's role settings."""

    def __init__(self) -> None:
        self.roles: set[str] = set()
        self._type: str | None = None

    def __call__(self, line: str) -> None:
        header = _HEADER.match(line)
        if header is not None:
            self._type = header["type"]
            owner = header["owner"].strip()
            if owner not in _NOT_ROLES:
                self.roles.add(owner)
            return
        if self._type in ("ACL", "DEFAULT ACL", "DATABASE PROPERTIES", "POLICY", "ROW SECURITY"):
            self.roles.update(roles_in_statement(line))


def roles_in_statement(line: str) -> list[str]:
    """The roles one ACL, default-privilege, policy or role-setting statement names."""
    words = tokens(line)
    heads = [t.text for t in words[:4] if t.kind == "word"]
    keywords = {t.text for t in words if t.kind == "word"}
    if heads[:3] == ["SET", "SESSION", "AUTHORIZATION"] and len(words) > 3 and _is_name(words[3]):
        return [words[3].name]
    if heads[:2] == ["ALTER", "ROLE"] and len(words) > 2 and _is_name(words[2]):
        return [words[2].name]
    if heads[:2] == ["CREATE", "POLICY"]:
        return _names_after(words, "TO", ("USING", "WITH"))
    found: list[str] = []
    if heads[:3] == ["ALTER", "DEFAULT", "PRIVILEGES"]:
        found += _names_after(words, "ROLE", ("IN", "GRANT", "REVOKE"))
    if "REVOKE" in keywords:
        found += _names_after(words, "FROM", ("CASCADE", "RESTRICT", "GRANTED"))
    elif "GRANT" in keywords:
        found += _names_after(words, "TO", ("WITH", "GRANTED"))
    if "GRANTED" in keywords:
        found += _names_after(words, "BY", ("CASCADE", "RESTRICT"))
    return found


# --- the globals ----------------------------------------------------------------------------------------
@dataclass
class Globals:
    """A globals snapshot's roles: each role's own statements (in dump order), the memberships, the
    session settings the script starts with, and every password hash it holds (to be masked)."""

    preamble: list[str] = field(default_factory=list)
    roles: dict[str, list[str]] = field(default_factory=dict)
    memberships: list[tuple[str, str, str]] = field(default_factory=list)  # (role, member, statement)
    hashes: list[str] = field(default_factory=list)


_GRANTED_BY = re.compile(r'\s+GRANTED BY\s+(?:"(?:[^"]|"")*"|[^\s;]+)\s*$')


def parse_globals(sql: str) -> Globals:
    """Reads `pg_dumpall --globals-only` output. Tablespaces and parameter grants are left out (a
    tablespace is a directory of the old host)."""
    parsed = Globals()
    for statement in statements(sql):
        words = tokens(statement)
        heads = [t.text for t in words[:4] if t.kind == "word"]
        parsed.hashes += [t.text for t in words if t.kind == "string" and t.text.startswith(("SCRAM-SHA-256$", "md5"))]
        role = _role_of(words, heads)
        if heads[:1] == ["SET"]:
            parsed.preamble.append(statement)
        elif role is not None:
            parsed.roles.setdefault(role, []).append(statement)
        elif heads[:1] == ["GRANT"] and not any(t.kind == "word" and t.text == "ON" for t in words):
            granted = words[1].name if len(words) > 1 and _is_name(words[1]) else None
            members = _names_after(words, "TO", ("WITH", "GRANTED"))
            # The restoring superuser grants: the old grantor may not exist here, nor hold ADMIN OPTION.
            grant = _GRANTED_BY.sub("", statement)
            parsed.memberships += [(granted, member, grant) for member in members[:1] if granted is not None]
    return parsed


def _role_of(words: Sequence[Token], heads: Sequence[str]) -> str | None:
    """The role a CREATE/ALTER ROLE, COMMENT ON ROLE or SECURITY LABEL … ON ROLE statement is about."""
    if heads[:2] in (["CREATE", "ROLE"], ["ALTER", "ROLE"]) and len(words) > 2 and _is_name(words[2]):
        return words[2].name
    for i in range(len(words) - 2):
        if words[i].text == "ON" and words[i + 1].text == "ROLE" and heads[:1] in (["COMMENT"], ["SECURITY"]):
            return words[i + 2].name if _is_name(words[i + 2]) else None
    return None


# --- the plan -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolePlan:
    """What a restore does about roles: which it creates (in this order, by `script`) and which it keeps."""

    create: tuple[str, ...]
    keep: tuple[str, ...]
    script: str = ""
    hashes: tuple[str, ...] = ()


def plan_roles(needed: Iterable[str], existing: Iterable[str], globals_: Globals | None, *,
               every_role: bool = False, source: str = "the globals snapshot") -> RolePlan:
    """The roles to create: those `needed` that do not exist, with the roles they are members of or have as
    members (transitively), or with `every_role` every role of the globals that does not exist.

    Raises RoleError naming every needed role that neither exists nor is in the globals.
    """
    have = set(existing)
    wanted = set(needed)
    known = set(globals_.roles) if globals_ is not None else set()
    missing = sorted(wanted - have - known)
    if missing:
        where = source if globals_ is not None else "no globals snapshot (pruned, or taken before globals were kept)"
        raise RoleError(f"the snapshot needs role(s) {', '.join(missing)}, which exist neither in this container "
                        f"nor in {where}: create them first, or restore with a globals snapshot that has them")
    if globals_ is None:
        return RolePlan((), tuple(sorted(wanted & have)))
    create = (known - have) if every_role else _with_relatives(wanted - have, globals_, have)
    ordered = tuple(role for role in globals_.roles if role in create)
    # Kept: the roles this restore would otherwise have made, which exist already and stay as they are.
    kept = (wanted | known) & have if every_role else wanted & have
    return RolePlan(ordered, tuple(sorted(kept)), _script(ordered, have, globals_), tuple(globals_.hashes))


def _with_relatives(start: set[str], globals_: Globals, have: set[str]) -> set[str]:
    """`start` and every missing role linked to it by memberships, either way, transitively."""
    chosen = set(start)
    grew = True
    while grew:
        grew = False
        for role, member, _ in globals_.memberships:
            for near, far in ((role, member), (member, role)):
                if near in chosen and far not in chosen and far not in have and far in globals_.roles:
                    chosen.add(far)
                    grew = True
    return chosen


def _script(create: Sequence[str], have: set[str], globals_: Globals) -> str:
    """One transaction: the roles' own statements, then the memberships that involve one of them."""
    if not create:
        return ""
    after = have | set(create)
    lines = ["\\set VERBOSITY terse", *(s + ";" for s in globals_.preamble), "BEGIN;"]
    for role in create:
        lines += [s + ";" for s in globals_.roles[role]]
    lines += [grant + ";" for role, member, grant in globals_.memberships
              if (role in create or member in create) and role in after and member in after]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def globals_for(snapshots: Sequence[Snapshot], database_snapshot: Snapshot) -> Snapshot | None:
    """The globals snapshot of the same pass as `database_snapshot`: that container's and host's newest at
    or before its time, else (a history older than its globals) its oldest after; None when there is none."""
    own = [s for s in snapshots if s.globals and s.container == database_snapshot.container
           and s.host == database_snapshot.host]
    before = [s for s in own if s.time <= database_snapshot.time]
    if before:
        return max(before, key=lambda s: s.time)
    return min(own, key=lambda s: s.time, default=None)


# --- running it -----------------------------------------------------------------------------------------
class RoleMaker:
    """Finds the roles a snapshot needs in a destination container and creates the missing ones."""

    def __init__(self, docker_host: str, repository: Repository, masker: Masker, bounds: Bounds,
                 cancel: threading.Event | None = None, known: dbproperties.KnownProperties | None = None) -> None:
        self.docker_host = docker_host
        self.repository = repository
        self.masker = masker
        self.bounds = bounds
        self.cancel = cancel
        # Where the database properties read with the roles go, for the restore that follows (None: not kept).
        self.known = known

    def needed_roles(self, snapshot: Snapshot, container_id: str) -> set[str]:
        """The roles the snapshot's dump names, read by the destination's own pg_restore (no connection), its
        database properties kept in `known` on the way; raises RoleError."""
        collector = NeededRoles()
        # The properties are parsed only for a restore that takes them (`known`).
        properties = dbproperties.PropertiesReader() if self.known is not None else None
        readers: list[Callable[[str], None]] = [collector] if properties is None else [collector, properties]
        try:
            # Its --create prints the database's own entries too (its owner, ACL, per-database role settings).
            dbproperties.read_entries(restic=self.repository.binary, snapshot_id=snapshot.id,
                                      database=snapshot.database, container_id=container_id,
                                      env=self.repository.pipeline_env(self.docker_host),
                                      masker=self.masker, timeout=READ_TIMEOUT_SECONDS, readers=readers,
                                      reading=f"the roles snapshot {snapshot.short_id} needs", cancel=self.cancel)
        except dbproperties.PropertiesUnreadable as exc:
            raise RoleError(str(exc)) from exc
        if self.known is not None and properties is not None:
            self.known.keep(snapshot.id, properties.result())
        return collector.roles

    def existing_roles(self, container_id: str, creds: Credentials) -> set[str]:
        """Every role of the destination's cluster; raises RoleError."""
        out = self._psql(container_id, creds, "SELECT rolname FROM pg_roles;\n", self.masker)
        return {line for line in out.split("\n") if line}

    def read_globals(self, snapshot: Snapshot) -> Globals:
        """The parsed globals of a globals snapshot; raises RoleError."""
        done = self.repository.run(commands.restic_dump_globals(self.repository.binary, snapshot.id),
                                   timeout=600, cancel=self.cancel)
        if not done.ok:
            raise RoleError(self.repository.failure(f"reading globals snapshot {snapshot.short_id} from", done))
        return parse_globals(done.stdout.decode(errors="replace"))

    def create(self, plan: RolePlan, container_id: str, container_name: str, creds: Credentials) -> None:
        """Creates the plan's roles in one transaction (all or none); raises RoleError."""
        if not plan.create:
            return
        self._psql(container_id, creds, plan.script, self.masker.with_secrets(plan.hashes, statement_quotes=False))
        log.info("roles_created", target=container_name, roles=",".join(plan.create),
                 kept=",".join(plan.keep))

    def _psql(self, container_id: str, creds: Credentials, script: str, masker: Masker) -> str:
        env = commands.live_query_env(creds.user, "postgres", lock_wait_s=self.bounds.lock_wait_s,
                                      statement_s=self.bounds.query_s)
        if creds.password:
            env["PGPASSWORD"] = creds.password
        try:
            done = run_in_container(self.docker_host, container_id, commands.psql_script_command({}), env=env,
                                    masker=masker.with_secrets([creds.password]),
                                    timeout=self.bounds.query_s + 30.0, cancel=self.cancel, stdin=script.encode())
        except ExecError as exc:
            raise RoleError(str(exc)) from exc
        if not done.ok:
            raise RoleError(f"psql failed: {done.describe_failure()}")
        return done.stdout.decode()
