"""Configuration from the environment (SPEC §4), validated up front with every problem reported at once."""

from __future__ import annotations

import re
import urllib.parse
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from alerting.notify import url_secret_parts
from alerting.notify import validate as validate_apprise
from watcher.durations import DurationError, format_duration, parse_duration
from watcher.schedule import validate_cron

DEFAULT_PATTERNS = ("scalr-*-db", "scalr-auth-postgres")
MIN_RESTIC = (0, 17, 0)
LOG_LEVELS = ("debug", "info", "warning", "error")
# Secrets that restic and its backends read from the environment; each also accepts NAME_FILE.
RESTIC_SECRET_VARIABLES = (
    "RESTIC_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "B2_ACCOUNT_KEY",
    "AZURE_ACCOUNT_KEY",
    "AZURE_ACCOUNT_SAS",
    "OS_PASSWORD",
    "RESTIC_REST_PASSWORD",
    "GOOGLE_ACCESS_TOKEN",
)
# Container names are [a-zA-Z0-9][a-zA-Z0-9_.-]*; a pattern may add the glob characters.
_PATTERN_CHARS = re.compile(r"^[A-Za-z0-9_.\-*?\[\]!]+$")


class ConfigError(Exception):
    """Configuration problems, all of them; str() lists one per line with the variable's name."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Retention:
    """How many daily, weekly and monthly snapshots to keep per container and database."""

    daily: int = 30
    weekly: int = 4
    monthly: int = 6


# --- Bounds of jobs (issue 13, the runner): to be ported into the table of settings ------------------
# name, default, parser (parse_duration, at least MIN_BOUND_SECONDS), Bounds field; none is secret, each
# is also a flag (--lock-wait-timeout for WATCHER_LOCK_WAIT_TIMEOUT), shown by check-config as written.
BOUND_SETTINGS = (
    # pg_dump --lock-wait-timeout and lock_timeout of every query on a live database; per container
    # the label backup-watcher.lock-wait-timeout wins.
    ("WATCHER_LOCK_WAIT_TIMEOUT", "5m", "lock_wait_s"),
    # statement_timeout of every query on a live database (listing databases, the drill's live
    # checks, restore's psql steps); the command inside the container gets this plus a margin.
    ("WATCHER_QUERY_TIMEOUT", "10m", "query_s"),
    # how long a backup waits for PostgreSQL in a container to accept connections.
    ("WATCHER_READY_TIMEOUT", "2m", "ready_s"),
    # how long one database's dump into restic may run in all.
    ("WATCHER_DUMP_TIMEOUT", "6h", "dump_s"),
)
MIN_BOUND_SECONDS = 1.0


@dataclass(frozen=True)
class Bounds:
    """How long jobs may wait on live databases and run at all, in seconds (SPEC §4, §11)."""

    lock_wait_s: float = 300.0
    query_s: float = 600.0
    ready_s: float = 120.0
    dump_s: float = 21600.0


def read_bounds(environ: Mapping[str, str], problems: list[str]) -> Bounds:
    """The bounds the environment sets (defaults for those it does not); appends a problem per bad value."""
    values: dict[str, float] = {}
    for name, _default, attribute in BOUND_SETTINGS:
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        try:
            seconds = parse_duration(raw)
        except DurationError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if seconds < MIN_BOUND_SECONDS:
            problems.append(f"{name}={raw!r}: must be at least {MIN_BOUND_SECONDS:g}s")
            continue
        values[attribute] = seconds
    return Bounds(**values)


def bounds_shown(bounds: Bounds) -> dict[str, str]:
    """The bounds as check-config prints them (5m, 6h)."""
    return {name: format_duration(getattr(bounds, attribute)) for name, _default, attribute in BOUND_SETTINGS}
# --- end of the bounds of jobs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The validated configuration; secrets stay inside `restic_env` and `apprise_urls`."""

    docker_host: str | None
    restic_repository: str | None
    restic_env: Mapping[str, str]
    restic_binary: str
    init_repository: bool
    schedule: str
    timezone: str
    container_patterns: tuple[str, ...]
    retention: Retention
    concurrency: int
    drill_schedule: str | None
    metrics_host: str
    metrics_port: int
    apprise_urls: tuple[str, ...]
    apprise_config: str | None
    log_format: str
    log_level: str
    host: str | None
    shutdown_grace_s: int = 5
    reconcile_interval_s: int = 300
    bounds: Bounds = field(default_factory=Bounds)
    secrets: tuple[str, ...] = field(default=(), repr=False)


def read_secret(environ: Mapping[str, str], name: str, problems: list[str]) -> str | None:
    """Returns NAME, or the content of the file NAME_FILE names (trailing newline stripped).

    Appends a problem (naming the variable, never the value) when both are set or the file
    cannot be read.
    """
    value = environ.get(name)
    path = environ.get(f"{name}_FILE")
    if value and path:
        problems.append(f"{name} and {name}_FILE are both set: set only one")
        return value
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            problems.append(f"{name}_FILE: cannot read {path}: {exc.strerror}")
            return None
    return value or None


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int, problems: list[str]) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name}={raw!r}: not a whole number")
        return default
    if value < minimum:
        problems.append(f"{name}={raw!r}: must be at least {minimum}")
        return default
    return value


def _bool(environ: Mapping[str, str], name: str, default: bool, problems: list[str]) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    problems.append(f"{name}={raw!r}: must be true or false")
    return default


def split_list(raw: str) -> list[str]:
    """Splits a comma- or whitespace-separated list, dropping empty items."""
    return [item for item in re.split(r"[\s,]+", raw.strip()) if item]


def validate_pattern(pattern: str) -> str | None:
    """Returns why a container-name glob is invalid, or None if it is fine."""
    if not _PATTERN_CHARS.match(pattern):
        return "may hold only letters, digits, '_', '.', '-' and the glob characters * ? [ ] !"
    depth = 0
    for char in pattern:
        if char == "[":
            if depth:
                return "has a '[' inside a bracket expression"
            depth = 1
        elif char == "]" and depth:
            depth = 0
    if depth:
        return "has an unclosed '['"
    return None


def parse_address(raw: str) -> tuple[str, int] | None:
    """Parses HOST:PORT (HOST may be empty or [v6]); returns None when it is not one."""
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - documented default: all interfaces


def mask_url(url: str) -> str:
    """Masks the password of a URL-like string (rest:https://user:pw@host/, s3:..., sftp:user@host)."""
    # Greedy up to the last '@' before the path, as restic's URL parser splits a raw '@' in a password.
    return re.sub(r"(://[^/@:]*:)[^/]*@", r"\1***@", url)


# Settings that also work as command-line flags (SPEC §4). Not the secrets themselves: argv is
# readable by every user of the host and lands in shell histories; their _FILE forms are paths.
FLAG_VARIABLES = (
    "DOCKER_HOST", "RESTIC_REPOSITORY", "RESTIC_REPOSITORY_FILE", "RESTIC_PASSWORD_FILE", "WATCHER_HOST",
    "WATCHER_SCHEDULE", "WATCHER_TIMEZONE", "WATCHER_CONTAINER_PATTERNS", "WATCHER_KEEP_DAILY",
    "WATCHER_KEEP_WEEKLY", "WATCHER_KEEP_MONTHLY", "WATCHER_CONCURRENCY", "WATCHER_DRILL_SCHEDULE",
    "WATCHER_METRICS_ADDRESS", "WATCHER_APPRISE_URLS_FILE", "WATCHER_APPRISE_CONFIG", "WATCHER_LOG_FORMAT",
    "WATCHER_LOG_LEVEL", "WATCHER_INIT_REPOSITORY", "WATCHER_SHUTDOWN_GRACE", "WATCHER_RECONCILE_INTERVAL",
    "WATCHER_RESTIC_BINARY", *(name for name, _default, _attribute in BOUND_SETTINGS),
)


def flag_name(variable: str) -> str:
    """The flag of a setting: --schedule for WATCHER_SCHEDULE, --docker-host for DOCKER_HOST."""
    return "--" + variable.removeprefix("WATCHER_").lower().replace("_", "-")


def with_flags(environ: Mapping[str, str], flags: Mapping[str, str | None]) -> dict[str, str]:
    """The environment with the flags given (by variable name) put over it: a flag wins."""
    return {**environ, **{name: value for name, value in flags.items() if value is not None}}


def load_config(environ: Mapping[str, str]) -> Config:
    """Reads and validates the whole configuration; raises ConfigError listing every problem."""
    problems: list[str] = []

    docker_host = environ.get("DOCKER_HOST") or None
    scheme = urllib.parse.urlsplit(docker_host).scheme if docker_host else ""
    if scheme == "ssh":
        # docker-py could list containers over SSH, but dumps stream through the watcher's own exec
        # client, which speaks to a socket or TCP only: refuse here rather than fail every backup.
        problems.append(f"DOCKER_HOST={docker_host!r}: ssh:// is not supported; run the watcher on the Docker host "
                        "(unix:///var/run/docker.sock) or reach the engine by tcp://host:port")
    elif docker_host and scheme not in ("unix", "tcp", "http"):
        problems.append(f"DOCKER_HOST={docker_host!r}: use unix:///path/docker.sock or tcp://host:port")

    restic_env = {k: v for k, v in environ.items() if not k.startswith("WATCHER_")}
    secrets: list[str] = []
    for name in RESTIC_SECRET_VARIABLES:
        if name == "RESTIC_PASSWORD" and environ.get("RESTIC_PASSWORD_FILE"):
            # restic reads RESTIC_PASSWORD_FILE itself; we only check that it can.
            if environ.get("RESTIC_PASSWORD"):
                problems.append("RESTIC_PASSWORD and RESTIC_PASSWORD_FILE are both set: set only one")
            password = read_secret({"RESTIC_PASSWORD_FILE": environ["RESTIC_PASSWORD_FILE"]}, name, problems)
            if password is not None:
                secrets.append(password)
                if not password:
                    problems.append("RESTIC_PASSWORD_FILE: the file is empty")
            continue
        value = read_secret(environ, name, problems)
        if value is not None:
            restic_env[name] = value
            restic_env.pop(f"{name}_FILE", None)
            secrets.append(value)
    if not any(environ.get(k) for k in ("RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND")):
        problems.append("RESTIC_PASSWORD (or RESTIC_PASSWORD_FILE): the repository password is missing")
    repository = environ.get("RESTIC_REPOSITORY") or None
    if not repository and not environ.get("RESTIC_REPOSITORY_FILE"):
        problems.append("RESTIC_REPOSITORY: no repository given (e.g. /srv/restic, s3:https://host/bucket)")
    if repository:
        parsed_password = urllib.parse.urlsplit(repository.split(":", 1)[-1]).password
        if parsed_password:
            secrets.append(parsed_password)

    schedule = environ.get("WATCHER_SCHEDULE", "").strip() or "0 3 * * *"
    error = validate_cron(schedule)
    if error:
        problems.append(f"WATCHER_SCHEDULE={schedule!r}: {error}")
    drill_schedule: str | None = environ.get("WATCHER_DRILL_SCHEDULE", "0 5 1 * *").strip() or None
    if drill_schedule:
        error = validate_cron(drill_schedule)
        if error:
            problems.append(f"WATCHER_DRILL_SCHEDULE={drill_schedule!r}: {error}")

    timezone = environ.get("WATCHER_TIMEZONE", "").strip() or "UTC"
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # OSError: a name that is a directory of the zone database (Europe) or too long for a path.
        problems.append(f"WATCHER_TIMEZONE={timezone!r}: unknown time zone (use an IANA name such as Europe/Berlin)")

    raw_patterns = environ.get("WATCHER_CONTAINER_PATTERNS")
    # Commas only: a blank inside a pattern is a mistake to report, not a separator.
    patterns = (tuple(p.strip() for p in raw_patterns.split(",") if p.strip()) if raw_patterns is not None
                else DEFAULT_PATTERNS)
    for pattern in patterns:
        why = validate_pattern(pattern)
        if why:
            problems.append(f"WATCHER_CONTAINER_PATTERNS: pattern {pattern!r} {why}")

    retention = Retention(
        daily=_int(environ, "WATCHER_KEEP_DAILY", 30, 0, problems),
        weekly=_int(environ, "WATCHER_KEEP_WEEKLY", 4, 0, problems),
        monthly=_int(environ, "WATCHER_KEEP_MONTHLY", 6, 0, problems),
    )
    if retention == Retention(0, 0, 0):
        problems.append("WATCHER_KEEP_DAILY/_WEEKLY/_MONTHLY are all 0: that would forget every snapshot")
    concurrency = _int(environ, "WATCHER_CONCURRENCY", 2, 1, problems)

    raw_address = environ.get("WATCHER_METRICS_ADDRESS", "").strip() or "0.0.0.0:9810"
    address = parse_address(raw_address)
    if address is None:
        problems.append(f"WATCHER_METRICS_ADDRESS={raw_address!r}: expected HOST:PORT, e.g. 0.0.0.0:9810")
        address = ("0.0.0.0", 9810)  # noqa: S104

    apprise_raw = read_secret(environ, "WATCHER_APPRISE_URLS", problems) or ""
    apprise_urls = tuple(split_list(apprise_raw))
    for url in apprise_urls:
        secrets.extend(url_secret_parts(url))
    apprise_config = environ.get("WATCHER_APPRISE_CONFIG") or None
    if apprise_config and not Path(apprise_config).is_file():
        problems.append(f"WATCHER_APPRISE_CONFIG={apprise_config!r}: no such file")
        problems.extend(validate_apprise(apprise_urls, None))
    else:
        problems.extend(validate_apprise(apprise_urls, apprise_config))

    log_format = environ.get("WATCHER_LOG_FORMAT", "").strip().lower() or "json"
    if log_format not in ("json", "console"):
        problems.append(f"WATCHER_LOG_FORMAT={log_format!r}: must be json or console")
    log_level = environ.get("WATCHER_LOG_LEVEL", "").strip().lower() or "info"
    if log_level not in LOG_LEVELS:
        problems.append(f"WATCHER_LOG_LEVEL={log_level!r}: must be one of {', '.join(LOG_LEVELS)}")

    init_repository = _bool(environ, "WATCHER_INIT_REPOSITORY", False, problems)
    shutdown_grace = _int(environ, "WATCHER_SHUTDOWN_GRACE", 5, 0, problems)
    reconcile_interval = _int(environ, "WATCHER_RECONCILE_INTERVAL", 300, 5, problems)
    bounds = read_bounds(environ, problems)
    if problems:
        raise ConfigError(problems)
    return Config(
        docker_host=docker_host,
        restic_repository=repository,
        restic_env=restic_env,
        restic_binary=environ.get("WATCHER_RESTIC_BINARY", "").strip() or "restic",
        init_repository=init_repository,
        schedule=schedule,
        timezone=timezone,
        container_patterns=patterns,
        retention=retention,
        concurrency=concurrency,
        drill_schedule=drill_schedule,
        metrics_host=address[0],
        metrics_port=address[1],
        apprise_urls=apprise_urls,
        apprise_config=apprise_config,
        log_format=log_format,
        log_level=log_level,
        host=environ.get("WATCHER_HOST", "").strip() or None,
        shutdown_grace_s=shutdown_grace,
        reconcile_interval_s=reconcile_interval,
        bounds=bounds,
        secrets=tuple(secrets),
    )


def effective_config(config: Config) -> dict[str, object]:
    """The configuration as an operator reads it, every secret masked."""
    password_source = (
        "RESTIC_PASSWORD_FILE" if config.restic_env.get("RESTIC_PASSWORD_FILE")
        else "RESTIC_PASSWORD_COMMAND" if config.restic_env.get("RESTIC_PASSWORD_COMMAND")
        else "RESTIC_PASSWORD"
    )
    return {
        "DOCKER_HOST": config.docker_host or "unix:///var/run/docker.sock",
        "RESTIC_REPOSITORY": mask_url(config.restic_repository or ""),
        "RESTIC_PASSWORD": f"*** (from {password_source})",
        "WATCHER_INIT_REPOSITORY": str(config.init_repository).lower(),
        "WATCHER_SCHEDULE": config.schedule,
        "WATCHER_TIMEZONE": config.timezone,
        "WATCHER_CONTAINER_PATTERNS": ",".join(config.container_patterns),
        "WATCHER_KEEP_DAILY": config.retention.daily,
        "WATCHER_KEEP_WEEKLY": config.retention.weekly,
        "WATCHER_KEEP_MONTHLY": config.retention.monthly,
        "WATCHER_CONCURRENCY": config.concurrency,
        "WATCHER_DRILL_SCHEDULE": config.drill_schedule or "(disabled)",
        "WATCHER_METRICS_ADDRESS": f"{config.metrics_host}:{config.metrics_port}",
        "WATCHER_APPRISE_URLS": f"*** ({len(config.apprise_urls)} URL(s))" if config.apprise_urls else "(none)",
        "WATCHER_APPRISE_CONFIG": config.apprise_config or "(none)",
        "WATCHER_LOG_FORMAT": config.log_format,
        "WATCHER_LOG_LEVEL": config.log_level,
        "WATCHER_HOST": config.host or "(the Docker engine's host name)",
        "WATCHER_RESTIC_BINARY": config.restic_binary,
        "WATCHER_SHUTDOWN_GRACE": config.shutdown_grace_s,
        "WATCHER_RECONCILE_INTERVAL": config.reconcile_interval_s,
        **bounds_shown(config.bounds),
    }
