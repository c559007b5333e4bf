"""Configuration from the environment (SPEC §4): one table of settings, validated up front, every problem at once.

The table is `Config`: each field made with `setting(...)` is one setting, and that one row drives
loading (`load_config`: every problem reported together, each naming its variable and the fix), the
command's flags (`flags()`, `--schedule` for WATCHER_SCHEDULE), `check-config`'s print-out
(`effective_config`) and the healthcheck (which reads WATCHER_METRICS_ADDRESS by its row).

Adding a setting is adding one field to `Config`, where it is to appear in `--help` and check-config:

    lock_wait_timeout_s: float = setting("WATCHER_LOCK_WAIT_TIMEOUT", "5m", duration(),
                                         help="bound on waiting for a table lock during a dump")

- The field's type is its kind's value type (mypy checks it); a default of None means unset, and the
  type is then `X | None`. Durations are floats in seconds, their fields named `..._s`.
- Kinds (parser and formatter) are in `watcher.settings`: BOOL, TEXT, whole(minimum), duration(minimum),
  choice(...), CRON, CRON_OR_OFF, ZONE, PATTERNS, ADDRESS, FILE, LIST; a new kind is a `Kind(parse,
  format)` whose parse raises `Invalid("what is wrong and what to write")`.
- A secret: `secret=True, shown=Shown.MASKED`. It is never a flag (its NAME_FILE path is), accepts
  NAME_FILE, and is kept out of repr and added to `secrets` for masking.
- A check across settings (retention all 0, the password or the repository missing) is a `_check_*`
  function listed in `CHECKS`.
- The README's table of settings is kept by hand: add the row there too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from alerting.notify import url_secret_parts
from alerting.notify import validate as validate_apprise
from watcher.copyconfig import CopySpec, is_secret_name, read_copies
from watcher.durations import format_duration
from watcher.schedule import DEFAULT_DRILL_SCHEDULE, DEFAULT_SCHEDULE
from watcher.settings import (
    ADDRESS,
    BOOL,
    CRON,
    CRON_OR_OFF,
    DOCKER_HOST,
    FILE,
    FRACTION,
    LIST,
    PATTERNS,
    SECRET_TEXT,
    TEXT,
    ZONE,
    Address,
    Setting,
    Shown,
    choice,
    duration,
    flag_name,
    mask_url,
    read_secret,
    rows,
    setting,
    url_password,
    whole,
)

MIN_RESTIC = (0, 17, 0)
LOG_LEVELS = ("debug", "info", "warning", "error")
# Secrets of restic's backends, read from the environment by restic itself: passed through, each also
# accepted as NAME_FILE (read here, as restic does not). They are not settings of the watcher.
RESTIC_SECRET_VARIABLES = (
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


@dataclass(frozen=True)
class Bounds:
    """How long jobs may wait on live databases and the repository's lock, and run at all, in seconds
    (SPEC §4, §11); the defaults are those of the settings WATCHER_LOCK_WAIT_TIMEOUT, _QUERY_TIMEOUT,
    _READY_TIMEOUT, _DUMP_TIMEOUT, _LOCK_RETRY and _STALL_TIMEOUT."""

    lock_wait_s: float = 300.0
    query_s: float = 600.0
    ready_s: float = 120.0
    dump_s: float = 21600.0
    lock_retry_s: float = 1800.0
    stall_s: float = 900.0


@dataclass(frozen=True, kw_only=True)
class Config:
    """The validated configuration: the table of settings, one field per setting.

    Secrets stay in `restic_env`, `restic_password` and `apprise_urls` (none of them in repr);
    `secrets` holds every secret string, for masking.
    """

    restic_env: Mapping[str, str] = field(repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)
    secret_sources: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The copies (SPEC §12), read from WATCHER_COPY_TO and WATCHER_COPY_<NAME>_* (watcher.copyconfig).
    copies: tuple[CopySpec, ...] = ()

    docker_host: str | None = setting(
        "DOCKER_HOST", None, DOCKER_HOST, unset="unix:///var/run/docker.sock",
        help="Docker endpoint: unix:///path/docker.sock or tcp://host:port (also a socket proxy)")
    restic_repository: str | None = setting(
        "RESTIC_REPOSITORY", None, TEXT, shown=Shown.URL_MASKED, help="the restic repository")
    restic_repository_file: str | None = setting(
        "RESTIC_REPOSITORY_FILE", None, TEXT, help="file naming the restic repository; restic reads it")
    restic_password: str | None = setting(
        "RESTIC_PASSWORD", None, SECRET_TEXT, secret=True, shown=Shown.MASKED,
        unset="*** (from RESTIC_PASSWORD_COMMAND)",
        help="the repository password; restic reads RESTIC_PASSWORD_FILE itself")
    init_repository: bool = setting(
        "WATCHER_INIT_REPOSITORY", "false", BOOL, help="true: restic init the repository when it does not exist")
    schedule: str = setting("WATCHER_SCHEDULE", DEFAULT_SCHEDULE, CRON, help="default backup schedule (cron, 5 fields)")
    timezone: str = setting("WATCHER_TIMEZONE", "UTC", ZONE, help="IANA zone the schedules are read in")
    container_patterns: tuple[str, ...] = setting(
        "WATCHER_CONTAINER_PATTERNS", "scalr-*-db,scalr-auth-postgres", PATTERNS, blank_is_off=True,
        unset="(none: the enable label only)",
        help="comma-separated name globs that select containers, besides the opt-in label; empty: label only")
    keep_daily: int = setting("WATCHER_KEEP_DAILY", "30", whole(0), help="daily snapshots kept")
    keep_weekly: int = setting("WATCHER_KEEP_WEEKLY", "4", whole(0), help="weekly snapshots kept")
    keep_monthly: int = setting("WATCHER_KEEP_MONTHLY", "6", whole(0), help="monthly snapshots kept")
    prune: bool = setting(
        "WATCHER_PRUNE", "true", BOOL,
        help="false: the daemon never runs forget/prune (a host with append-only credentials; another host "
             "prunes); `backup-watcher prune` still runs where the credentials allow deleting")
    concurrency: int = setting("WATCHER_CONCURRENCY", "2", whole(1), help="backups running at once")
    drill_schedule: str | None = setting(
        "WATCHER_DRILL_SCHEDULE", DEFAULT_DRILL_SCHEDULE, CRON_OR_OFF, blank_is_off=True, unset="(disabled)",
        help="restore drill schedule (cron; empty disables)")
    metrics_address: Address = setting(
        "WATCHER_METRICS_ADDRESS", "0.0.0.0:9810", ADDRESS, help="HOST:PORT of /metrics, /healthz and /status")
    apprise_urls: tuple[str, ...] = setting(
        "WATCHER_APPRISE_URLS", "", LIST, secret=True, shown=Shown.MASKED,
        help="Apprise URLs, comma or space separated")
    apprise_config: str | None = setting(
        "WATCHER_APPRISE_CONFIG", None, FILE, help="path of an Apprise config file (text or YAML)")
    log_format: str = setting("WATCHER_LOG_FORMAT", "json", choice("json", "console"), help="json or console")
    log_level: str = setting("WATCHER_LOG_LEVEL", "info", choice(*LOG_LEVELS), help="least level logged")
    host: str | None = setting(
        "WATCHER_HOST", None, TEXT, unset="(the Docker engine's host name)", help="restic --host of every snapshot")
    restic_binary: str = setting(
        "WATCHER_RESTIC_BINARY", "restic", TEXT, help="the restic program (0.17 or later)")
    shutdown_grace_s: float = setting(
        "WATCHER_SHUTDOWN_GRACE", "5s", duration(),
        help="how long running backups may finish after SIGTERM/SIGINT before they are aborted")
    reconcile_interval_s: float = setting(
        "WATCHER_RECONCILE_INTERVAL", "5m", duration(5), help="time between full container-list reconciliations")
    progress_log_interval_s: float = setting(
        "WATCHER_PROGRESS_LOG_INTERVAL", "30s", duration(1),
        help="how often a running backup, restore or drill writes its `<kind>_progress` log line (the daemon, "
             "and one-shot commands whose stdout is no terminal)")
    lock_wait_timeout_s: float = setting(
        "WATCHER_LOCK_WAIT_TIMEOUT", "5m", duration(1),
        help="bound on waiting for a table lock another session holds: pg_dump --lock-wait-timeout and "
             "lock_timeout of every query on a live database (label backup-watcher.lock-wait-timeout per container)")
    query_timeout_s: float = setting(
        "WATCHER_QUERY_TIMEOUT", "10m", duration(1),
        help="statement_timeout of every query on a live database (listing databases, the drill's live checks, "
             "restore's psql steps)")
    ready_timeout_s: float = setting(
        "WATCHER_READY_TIMEOUT", "2m", duration(1),
        help="how long a backup waits for PostgreSQL in a container to accept connections")
    dump_timeout_s: float = setting(
        "WATCHER_DUMP_TIMEOUT", "6h", duration(1), help="how long one database's dump into restic may run in all")
    stall_timeout_s: float = setting(
        "WATCHER_STALL_TIMEOUT", "15m", duration(1),
        help="a dump whose stream moves no data for this long is aborted (a paused container, a hung server, "
             "frozen storage; label backup-watcher.stall-timeout per container)")
    shrink_threshold: float = setting(
        "WATCHER_SHRINK_THRESHOLD", "0.5", FRACTION,
        help="a dump smaller than this fraction of its history's previous normal one is kept but flagged, and "
             "retention forgets nothing of that history until a normal dump follows or `backup-watcher ack`")
    dump_order: str = setting(
        "WATCHER_DUMP_ORDER", "key", choice("key", "physical"),
        help="key: the rows of tables of 1 MiB or more with a primary key (or unique not-null index) are dumped in "
             "key order, so a day's change stores only the changed stretches anew; physical: pg_dump's own order")
    lock_retry_s: float = setting(
        "WATCHER_LOCK_RETRY", "30m", duration(1),
        help="how long a restic command waits for a repository lock another live process holds (restic "
             "--retry-lock): backups wait out a running prune, a prune waits out running backups")

    @property
    def retention(self) -> Retention:
        """The host-wide retention."""
        return Retention(self.keep_daily, self.keep_weekly, self.keep_monthly)

    @property
    def bounds(self) -> Bounds:
        """The bounds of jobs, as the job context carries them."""
        return Bounds(self.lock_wait_timeout_s, self.query_timeout_s, self.ready_timeout_s, self.dump_timeout_s,
                      lock_retry_s=self.lock_retry_s, stall_s=self.stall_timeout_s)

    @property
    def metrics_host(self) -> str:
        """The host part of WATCHER_METRICS_ADDRESS."""
        return self.metrics_address.host

    @property
    def metrics_port(self) -> int:
        """The port of WATCHER_METRICS_ADDRESS."""
        return self.metrics_address.port


SETTINGS: dict[str, Setting[Any]] = {row.name: row for _, row in rows(Config)}
_FIELDS = {row.name: field_name for field_name, row in rows(Config)}
# Settings that also work as command-line flags (SPEC §4), by the variable each flag sets. Not the
# secrets themselves: argv is readable by every user of the host and lands in shell histories; their
# _FILE forms are paths.
FLAG_VARIABLES = tuple(variable for row in SETTINGS.values() if (variable := row.flag_variable))


def flags() -> list[tuple[str, str, str]]:
    """(flag, variable, help) of every setting that is a flag, in the table's order."""
    table = []
    for row in SETTINGS.values():
        variable = row.flag_variable
        if variable is not None:
            default = f"; default {row.default!r}" if row.default else ""
            meaning = f"path of a file holding {row.help}" if row.secret else row.help
            table.append((flag_name(variable), variable, f"{meaning} ({variable}{default})"))
    return table


def _check_retention(values: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    keeps = (values["keep_daily"], values["keep_weekly"], values["keep_monthly"])
    if keeps == (0, 0, 0):
        return ["WATCHER_KEEP_DAILY/_WEEKLY/_MONTHLY are all 0: that would forget every snapshot"]
    return []


def _check_repository(values: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    if values["restic_repository"] or values["restic_repository_file"]:
        return []
    return ["RESTIC_REPOSITORY: no repository given (e.g. /srv/restic, s3:https://host/bucket)"]


def _check_password(values: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    if environ.get("RESTIC_PASSWORD_FILE") and values["restic_password"] == "":
        return ["RESTIC_PASSWORD_FILE: the file is empty"]
    if not any(environ.get(k) for k in ("RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND")):
        return ["RESTIC_PASSWORD (or RESTIC_PASSWORD_FILE): the repository password is missing"]
    return []


def _check_apprise(values: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    # The URLs are checked also when the config file is missing (its own problem is reported by its row).
    return validate_apprise(values["apprise_urls"] or (), values["apprise_config"])


# Checks across settings; each sees the values read (None for one that is invalid) and the environment.
CHECKS: tuple[Callable[[Mapping[str, Any], Mapping[str, str]], list[str]], ...] = (
    _check_retention, _check_repository, _check_password, _check_apprise,
)


def _restic_environment(environ: Mapping[str, str], problems: list[str]) -> tuple[dict[str, str], list[str]]:
    """restic's environment (every variable but the watcher's own, backend secrets read from NAME_FILE)
    and the backend secrets' values."""
    restic_env = {k: v for k, v in environ.items() if not k.startswith("WATCHER_")}
    secrets = []
    for name in RESTIC_SECRET_VARIABLES:
        value = read_secret(environ, name, problems)
        if value is not None:
            restic_env[name] = value
            restic_env.pop(f"{name}_FILE", None)
            secrets.append(value)
    return restic_env, secrets


def _secret_parts(value: str) -> list[str]:
    """A secret, and when it is a URL (Apprise's) the parts of it that are secrets on their own."""
    if "://" not in value:
        return [value]
    try:
        return url_secret_parts(value)
    except ValueError:  # urlsplit refuses it (an unclosed '['): the whole still masks it
        return [value]


def _secret_strings(values: Mapping[str, Any]) -> list[str]:
    """Every string of the settings' values that must be masked wherever it shows up."""
    found: list[str] = []
    for name, row in SETTINGS.items():
        value = values[_FIELDS[name]]
        if row.secret and value:
            items = value if isinstance(value, tuple) else (value,)
            found += [part for item in items for part in _secret_parts(item)]
        elif row.shown is Shown.URL_MASKED and value and (password := url_password(value)):
            found.append(password)
    return found



def load_config(environ: Mapping[str, str]) -> Config:
    """Reads and validates the whole configuration; raises ConfigError listing every problem."""
    problems: list[str] = []
    values: dict[str, Any] = {field_name: row.read(environ, problems) for field_name, row in rows(Config)}
    restic_env, backend_secrets = _restic_environment(environ, problems)
    for check in CHECKS:
        problems += check(values, environ)
    keeps = (values["keep_daily"] or 0, values["keep_weekly"] or 0, values["keep_monthly"] or 0)
    copies = read_copies(environ, restic_env, keeps, problems)
    if problems:
        raise ConfigError(problems)
    sources = {name: row.source(environ) for name, row in SETTINGS.items() if row.secret}
    copy_secrets = [secret for spec in copies for secret in spec.secrets()]
    return Config(**values, restic_env=restic_env, secrets=(*_secret_strings(values), *backend_secrets, *copy_secrets),
                  secret_sources=sources, copies=copies)


def effective_config(config: Config) -> dict[str, str]:
    """The configuration as an operator reads it, by variable, every secret masked."""
    return {name: row.show(getattr(config, _FIELDS[name]), config.secret_sources.get(name, name))
            for name, row in SETTINGS.items()}


def effective_copies(config: Config) -> dict[str, str]:
    """The copies' settings (SPEC §12) as an operator reads them, every secret masked."""
    shown = {"WATCHER_COPY_TO": ",".join(spec.name for spec in config.copies) or "(none)"}
    for spec in config.copies:
        shown.update(copy_settings_shown(spec))
    return shown


def copy_settings_shown(spec: CopySpec) -> dict[str, str]:
    """A copy's settings as check-config prints them: its password and backend secrets masked."""
    prefix = spec.prefix
    backend = ", ".join(f"{key}=***" if is_secret_name(key) else f"{key}={value}"
                        for key, value in sorted(spec.backend_env.items()))
    return {f"{prefix}REPOSITORY": mask_url(spec.repository), f"{prefix}PASSWORD": "***",
            f"{prefix}KEEP_DAILY": str(spec.keeps[0]), f"{prefix}KEEP_WEEKLY": str(spec.keeps[1]),
            f"{prefix}KEEP_MONTHLY": str(spec.keeps[2]),
            f"{prefix}SCHEDULE": spec.schedule or "(after every backup pass)",
            f"{prefix}PRUNE": "true" if spec.prune else "false",
            f"{prefix}OPEN_TIMEOUT": format_duration(spec.open_timeout_s),
            f"{prefix}ENV_FILE": backend or "(none)"}
