"""Discovery: a pure function from a container's attributes to a backup target, a rejection, or nothing.

No Docker calls here: `ContainerInfo.from_inspect` turns what `docker inspect` returns into plain
values, and `discover` applies the rules of SPEC §5 to them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TypeVar

from watcher import engines
from watcher.config import Retention
from watcher.settings import BOOL, CRON, Invalid, Kind, duration, whole

T = TypeVar("T")

LABEL_PREFIX = "backup-watcher."
ROLE_LABEL = "backup-watcher.role"
KNOWN_LABELS = frozenset(
    {
        "enable", "schedule", "databases", "user", "keep-daily", "keep-weekly", "keep-monthly", "drill", "role",
        "lock-wait-timeout", "stall-timeout", "engine", "dump-command", "restore-command",
    }
)
ALL_DATABASES = "all"


@dataclass(frozen=True)
class ContainerInfo:
    """What discovery needs to know about one container."""

    id: str
    name: str
    image: str
    labels: Mapping[str, str]
    # Out of repr: the container's whole environment, its database password (POSTGRES_PASSWORD, ...) and
    # whatever else its application keeps there, none of which the watcher's masker knows.
    env: Mapping[str, str] = field(repr=False)
    running: bool = True
    image_id: str = ""
    started_at: float | None = None  # epoch seconds of the container's last start, by the engine's clock
    init: bool = False  # started with an init process as PID 1 (`docker run --init`, compose `init: true`)

    @classmethod
    def from_inspect(cls, attrs: Mapping[str, object]) -> ContainerInfo:
        """Builds one from the dict `docker inspect` (or docker-py's `container.attrs`) returns."""
        config = attrs.get("Config") or {}
        state = attrs.get("State") or {}
        host_config = attrs.get("HostConfig") or {}
        assert isinstance(config, dict) and isinstance(state, dict) and isinstance(host_config, dict)
        env: dict[str, str] = {}
        for item in config.get("Env") or []:
            key, _, value = str(item).partition("=")
            env[key] = value
        return cls(
            id=str(attrs["Id"]),
            name=str(attrs.get("Name", "")).lstrip("/"),
            image=str(config.get("Image") or attrs.get("Image") or ""),
            labels=dict(config.get("Labels") or {}),
            env=env,
            running=bool(state.get("Running", False)),
            image_id=str(attrs.get("Image") or ""),
            started_at=parse_engine_time(state.get("StartedAt")),
            init=host_config.get("Init") is True,
        )


def parse_engine_time(raw: object) -> float | None:
    """Epoch seconds of an engine timestamp (RFC 3339, nanoseconds allowed); returns None for a
    missing, unparsable or zero value (the engine writes 0001-01-01T00:00:00Z for "never")."""
    if not isinstance(raw, str) or not raw or raw.startswith("0001-"):
        return None
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class Credentials:
    """How to reach PostgreSQL inside a container: role, default database, password if known."""

    user: str
    database: str
    password: str | None = field(default=None, repr=False)
    # MariaDB/MySQL: the container env variable that holds the password (or, with _FILE, names its file);
    # the command in the container reads it there, so the password never crosses the exec API or argv.
    password_env: str | None = None


@dataclass(frozen=True)
class Target:
    """One container to back up, with every setting resolved."""

    container_id: str
    name: str
    image: str
    credentials: Credentials
    databases: tuple[str, ...]  # empty means "all" (resolved at run time)
    schedule: str
    retention: Retention
    drill: bool = True
    image_id: str = ""
    started_at: float | None = None  # the container's last start (epoch seconds), None if unknown
    lock_wait_timeout_s: float | None = None  # its own bound on lock waits; None: WATCHER_LOCK_WAIT_TIMEOUT
    stall_timeout_s: float | None = None  # its own bound on a silent dump stream; None: WATCHER_STALL_TIMEOUT
    init: bool = False  # runs an init process as PID 1; its drills do too
    engine: str = engines.POSTGRES  # one of engines.ENGINES
    dump_command: str | None = None  # engine=command: run inside the container, its stdout is the backup
    restore_command: str | None = None  # engine=command: run inside the container, reads the backup on stdin

    @property
    def all_databases(self) -> bool:
        """True when the target backs up every non-template database it has."""
        return not self.databases

    def renamed(self, name: str) -> Target:
        """The same target under a new container name."""
        return replace(self, name=name)


# Docker fixes a container's labels when it is created: editing them takes effect only with a new one.
RELABEL_HINT = ("(labels are fixed when a container is created: correct them in its compose file or run command "
                "and recreate it, e.g. docker compose up -d)")


@dataclass(frozen=True)
class Rejected:
    """A container that asked to be backed up but whose labels are wrong; it is not backed up."""

    container_id: str
    name: str
    problems: tuple[str, ...]

    @property
    def reason(self) -> str:
        """All problems in one line, then how a fix takes effect."""
        return f"{'; '.join(self.problems)} {RELABEL_HINT}"


@dataclass(frozen=True)
class DiscoveryRules:
    """Host-wide defaults that discovery applies."""

    patterns: Sequence[str]
    schedule: str = "0 3 * * *"
    retention: Retention = field(default_factory=Retention)


def credentials_of(env: Mapping[str, str], user_label: str | None = None) -> Credentials:
    """Reads the official image's POSTGRES_* variables; a role label overrides POSTGRES_USER.

    The password is kept only for the role it belongs to.
    """
    env_user = env.get("POSTGRES_USER") or "postgres"
    user = user_label or env_user
    database = env.get("POSTGRES_DB") or env_user
    password = env.get("POSTGRES_PASSWORD") or None
    return Credentials(user=user, database=database, password=password if user == env_user else None)


def mariadb_credentials_of(env: Mapping[str, str], user_label: str | None = None) -> Credentials:
    """Reads the official MariaDB/MySQL images' variables: root with MARIADB_ROOT_PASSWORD or
    MYSQL_ROOT_PASSWORD (or their _FILE), else MARIADB_USER / MYSQL_USER with its *_PASSWORD; the
    database is MARIADB_DATABASE / MYSQL_DATABASE ("" when there is none). A user label overrides the
    user; a password is known (by its variable's name) only for the user it belongs to.
    """
    def first(*names: str) -> str | None:
        return next((name for name in names if env.get(name) or env.get(name + "_FILE")), None)

    root_variable = first("MARIADB_ROOT_PASSWORD", "MYSQL_ROOT_PASSWORD")
    env_user = env.get("MARIADB_USER") or env.get("MYSQL_USER")
    database = env.get("MARIADB_DATABASE") or env.get("MYSQL_DATABASE") or ""
    default_user = "root" if root_variable or not env_user else env_user
    user = user_label or default_user
    if user == "root":
        variable = root_variable
    elif user == env_user:
        variable = first("MARIADB_PASSWORD", "MYSQL_PASSWORD")
    else:
        variable = None
    password = (env.get(variable) or None) if variable else None
    return Credentials(user=user, database=database, password=password, password_env=variable)


def _label(labels: Mapping[str, str], key: str, kind: Kind[T], problems: list[str]) -> T | None:
    """The value of label `backup-watcher.<key>` read as `kind` (the settings' own parsers), or None when
    the label is absent or invalid (a problem naming it is appended)."""
    raw = labels.get(key)
    if raw is None:
        return None
    try:
        return kind.parse(raw)
    except Invalid as exc:
        problems.extend(f"label {LABEL_PREFIX}{key}={raw!r}: {problem}" for problem in exc.problems)
        return None


def _parse_databases(raw: str) -> tuple[str, ...]:
    if raw.strip().lower() == ALL_DATABASES:
        return ()
    names = [name.strip() for name in raw.split(",")]
    if not raw.strip() or any(not name for name in names):
        raise Invalid("a comma list of database names, or 'all'")
    return tuple(dict.fromkeys(names))


DATABASES = Kind(_parse_databases)
KEEP = whole(0)
LOCK_WAIT = duration(1)
STALL_TIMEOUT = duration(1)


def discover(container: ContainerInfo, rules: DiscoveryRules) -> Target | Rejected | None:
    """Decides what a container is to the watcher.

    Returns a Target when it is selected (opt-in label, or name matches a pattern, and no opt-out)
    and every label is valid; a Rejected naming each bad label when it is selected but a label is
    wrong; None when it is not selected (no match, opted out, or one of the watcher's own drill
    containers). Never raises on bad input.
    """
    labels = {key[len(LABEL_PREFIX):]: value for key, value in container.labels.items()
              if key.startswith(LABEL_PREFIX)}
    if "role" in labels:
        # The watcher's own throwaway containers are never targets, whatever their name.
        return None
    problems: list[str] = []
    enabled = _label(labels, "enable", BOOL, problems)
    if enabled is False:
        return None
    selected = enabled is True or any(fnmatch.fnmatchcase(container.name, p) for p in rules.patterns)
    if not selected and not problems:
        return None
    return _target(container, rules, labels, problems)


def _target(container: ContainerInfo, rules: DiscoveryRules, labels: Mapping[str, str],
            problems: list[str]) -> Target | Rejected:
    """The target a selected container's labels make, or its rejection naming every bad label."""
    for key in sorted(labels.keys() - KNOWN_LABELS):
        problems.append(f"label {LABEL_PREFIX}{key}: unknown label (known: {', '.join(sorted(KNOWN_LABELS))})")
    schedule = _label(labels, "schedule", CRON, problems) or rules.schedule
    retention = _retention(labels, rules.retention, problems)
    drill = _label(labels, "drill", BOOL, problems) is not False
    engine = _engine(container, labels, problems)
    user = _user_label(labels, problems)
    credentials = (mariadb_credentials_of(container.env, user) if engine in (engines.MARIADB, engines.MYSQL)
                   else credentials_of(container.env, user))
    databases = _label(labels, "databases", DATABASES, problems)
    lock_wait = _label(labels, "lock-wait-timeout", LOCK_WAIT, problems)
    stall_timeout = _label(labels, "stall-timeout", STALL_TIMEOUT, problems)
    if engine == engines.COMMAND:
        databases = (engines.COMMAND_DATABASE,)
    elif databases is None:
        # No database named by env (a MariaDB without MARIADB_DATABASE): every database of the server.
        databases = (credentials.database,) if credentials.database else ()
    if problems:
        return Rejected(container.id, container.name, tuple(problems))
    return Target(
        container_id=container.id,
        name=container.name,
        image=container.image,
        credentials=credentials,
        databases=databases,
        schedule=schedule,
        retention=retention,
        drill=drill,
        image_id=container.image_id,
        started_at=container.started_at,
        lock_wait_timeout_s=lock_wait,
        stall_timeout_s=stall_timeout,
        init=container.init,
        engine=engine,
        dump_command=_command_label(labels, "dump-command"),
        restore_command=_command_label(labels, "restore-command"),
    )


def _command_label(labels: Mapping[str, str], key: str) -> str | None:
    """The stripped value of a command label, None when absent or blank."""
    return (labels.get(key) or "").strip() or None


def _engine(container: ContainerInfo, labels: Mapping[str, str], problems: list[str]) -> str:
    """The target's engine: the engine label, else command when a dump-command label is there, else the one
    the env contract names. A command label on another engine, an engine=command without its dump command,
    or databases/user labels on one are problems (appended)."""
    raw = labels.get("engine")
    dump_command = _command_label(labels, "dump-command")
    if raw is None:
        engine = engines.COMMAND if dump_command else engines.engine_from_env(container.env)
    else:
        engine = raw.strip().lower()
        if engine not in engines.ENGINES:
            problems.append(f"label {LABEL_PREFIX}engine={raw!r}: one of {', '.join(engines.ENGINES)}")
            return engines.engine_from_env(container.env)
    if engine == engines.COMMAND:
        if dump_command is None:
            problems.append(f"label {LABEL_PREFIX}engine=command needs {LABEL_PREFIX}dump-command (the command "
                            "run inside the container whose stdout is the backup, e.g. redis-cli --rdb -)")
        problems.extend(f"label {LABEL_PREFIX}{key}: not for engine=command (its backup is the dump command's "
                        "output)" for key in ("databases", "user") if key in labels)
        if "restore-command" in labels and _command_label(labels, "restore-command") is None:
            problems.append(f"label {LABEL_PREFIX}restore-command: must not be empty")
    else:
        problems.extend(f"label {LABEL_PREFIX}{key}: only for engine=command (this container's engine is "
                        f"{engine})" for key in ("dump-command", "restore-command") if key in labels)
    return engine


def _retention(labels: Mapping[str, str], default: Retention, problems: list[str]) -> Retention:
    """The host's retention with the container's keep-* labels over it."""
    keeps = {kind: value for kind in ("daily", "weekly", "monthly")
             if (value := _label(labels, f"keep-{kind}", KEEP, problems)) is not None}
    retention = replace(default, **keeps)
    if keeps and retention == Retention(0, 0, 0):
        problems.append(f"labels {LABEL_PREFIX}keep-*: all 0 would forget every snapshot")
    return retention


def _user_label(labels: Mapping[str, str], problems: list[str]) -> str | None:
    """The role the user label names, None when there is none (a blank one is a problem)."""
    user_label = labels.get("user")
    if user_label is not None and not user_label.strip():
        problems.append(f"label {LABEL_PREFIX}user: must not be empty")
        return None
    return user_label.strip() if user_label else None
