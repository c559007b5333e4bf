"""The copies' configuration (SPEC §12): WATCHER_COPY_TO and each copy's WATCHER_COPY_<NAME>_* settings.

Read and validated with the rest of the configuration (`watcher.config.load_config` calls `read_copies`),
every problem reported together. Each copy has its own repository, password, retention, schedule and
backend credentials (its ENV_FILE: a different storage account's AWS_*/B2_*/RESTIC_REST_*), and gets an
environment of its own: `copy_env` holds the copy's credentials and none of the primary's.

`restic copy` opens both repositories in one process with one set of backend variables: where the
copy's ENV_FILE and the primary's environment set the same variable to different values (two rest-servers
with different RESTIC_REST_USERNAME, two S3 accounts), that process cannot be given both. Such a copy is
`streamed`: each snapshot is dumped from the primary by one restic process and backed up into the copy by
another, each with its own environment (`watcher.copyjob`, `watcher.copyrelay`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watcher.settings import (
    BOOL,
    CRON,
    Invalid,
    Kind,
    duration,
    read_secret,
    split_list,
    unreadable,
    url_password,
    whole,
)

COPY_TO = "WATCHER_COPY_TO"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables that name or open a repository, or carry a backend's credentials: the primary's are never
# given to a copy's processes (and a copy's never to the primary's). The rest (PATH, HOME, TZ,
# RESTIC_CACHE_DIR, ...) is shared.
BACKEND_PREFIXES = ("RESTIC_", "AWS_", "B2_", "AZURE_", "GOOGLE_", "OS_", "ST_", "RCLONE_")
SHARED_RESTIC = frozenset({"RESTIC_CACHE_DIR", "RESTIC_COMPRESSION", "RESTIC_PACK_SIZE", "RESTIC_READ_CONCURRENCY",
                           "RESTIC_PROGRESS_FPS"})
# The repository and its password of a copy come from its own settings, not from its ENV_FILE.
_OWN_SETTINGS = ("RESTIC_REPOSITORY", "RESTIC_REPOSITORY_FILE", "RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE",
                 "RESTIC_PASSWORD_COMMAND", "RESTIC_FROM_")
# How the primary's repository and password are named when `restic copy` opens it as its source.
FROM_NAMES = {"RESTIC_REPOSITORY": "RESTIC_FROM_REPOSITORY", "RESTIC_REPOSITORY_FILE": "RESTIC_FROM_REPOSITORY_FILE",
              "RESTIC_PASSWORD": "RESTIC_FROM_PASSWORD", "RESTIC_PASSWORD_FILE": "RESTIC_FROM_PASSWORD_FILE",
              "RESTIC_PASSWORD_COMMAND": "RESTIC_FROM_PASSWORD_COMMAND", "RESTIC_KEY_HINT": "RESTIC_FROM_KEY_HINT"}
_SECRET_WORDS = ("PASSWORD", "SECRET", "KEY", "TOKEN", "SAS")
DEFAULT_OPEN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class CopySpec:
    """One copy: its name (as in WATCHER_COPY_TO, lower case), repository, keeps, schedule (None: after every
    backup pass), whether this host prunes it, and its backend environment (secrets kept out of repr)."""

    name: str
    # Out of repr: a REST or S3 URL may carry its password (rest:https://user:pw@host/); messages name the
    # repository through settings.mask_url.
    repository: str = field(repr=False)
    keeps: tuple[int, int, int]
    schedule: str | None = None
    prune: bool = True
    open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S
    password: str = field(default="", repr=False)
    backend_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Backend variables set differently for the primary and the copy: `restic copy` cannot carry both, each
    # snapshot is streamed from one restic process into another instead.
    clashes: tuple[str, ...] = ()

    @property
    def streamed(self) -> bool:
        """Whether its snapshots are streamed (dump | backup) rather than copied by `restic copy`."""
        return bool(self.clashes)

    @property
    def prefix(self) -> str:
        """The prefix of its variables: WATCHER_COPY_OFFSITE_ for `offsite`."""
        return copy_prefix(self.name)

    def secrets(self) -> list[str]:
        """Every string of this copy that is masked wherever it shows up."""
        found = [self.password, *(value for key, value in self.backend_env.items() if is_secret_name(key))]
        if (in_url := url_password(self.repository)) is not None:
            found.append(in_url)
        return [secret for secret in found if secret]


def copy_prefix(name: str) -> str:
    """WATCHER_COPY_<NAME>_ of a copy's name."""
    return f"WATCHER_COPY_{name.upper()}_"


def is_secret_name(key: str) -> bool:
    """Whether a backend variable holds a secret (its value is masked; its name is not)."""
    return any(word in key.upper() for word in _SECRET_WORDS)


def is_backend_variable(key: str) -> bool:
    """Whether a variable names or opens a repository or carries backend credentials."""
    return key.startswith(BACKEND_PREFIXES) and key not in SHARED_RESTIC


def shared_env(restic_env: Mapping[str, str]) -> dict[str, str]:
    """The part of the primary's environment that is no repository's: what every restic process may see."""
    return {key: value for key, value in restic_env.items() if not is_backend_variable(key)}


def copy_env(restic_env: Mapping[str, str], spec: CopySpec) -> dict[str, str]:
    """The environment of a restic process that works on the copy alone: the shared variables, the copy's
    backend variables, its repository and its password; nothing of the primary's repository."""
    return {**shared_env(restic_env), **spec.backend_env, "RESTIC_REPOSITORY": spec.repository,
            "RESTIC_PASSWORD": spec.password}


def transfer_env(restic_env: Mapping[str, str], spec: CopySpec) -> dict[str, str]:
    """The environment of `restic copy` (and `init --copy-chunker-params`) into the copy from the primary:
    the copy's environment plus the primary's repository and password under restic's RESTIC_FROM_* names and
    the primary's backend variables (which `read_copies` made sure do not clash with the copy's)."""
    env = copy_env(restic_env, spec)
    for key, value in restic_env.items():
        if key in FROM_NAMES:
            env[FROM_NAMES[key]] = value
        elif is_backend_variable(key) and not key.startswith("RESTIC_FROM_"):
            env.setdefault(key, value)  # never over the copy's own: a copy with clashes is streamed instead
    return env


def read_env_file(path: str) -> dict[str, str]:
    """Reads KEY=VALUE lines (blank lines, `#` comments, an `export ` prefix and quotes around a value allowed);
    raises Invalid naming the line that is not one, or OSError when the file cannot be read."""
    values: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY.match(key):
            raise Invalid(f"line {number} is not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _names(environ: Mapping[str, str], problems: list[str]) -> list[str]:
    names = [name.lower() for name in split_list(environ.get(COPY_TO, ""))]
    for name in names:
        if not _NAME.match(name):
            problems.append(f"{COPY_TO}: copy name {name!r} may hold only letters, digits and _, and start with a "
                            "letter (it becomes part of variable names: WATCHER_COPY_<NAME>_REPOSITORY)")
    if len(set(names)) != len(names):
        problems.append(f"{COPY_TO}: a copy is named twice")
    return [name for name in dict.fromkeys(names) if _NAME.match(name)]


def _backend_env(environ: Mapping[str, str], prefix: str, restic_env: Mapping[str, str],
                 problems: list[str]) -> dict[str, str]:
    path = environ.get(f"{prefix}ENV_FILE")
    if not path:
        return {}
    try:
        values = read_env_file(path)
    except OSError as exc:
        problems.append(f"{prefix}ENV_FILE: {unreadable(path, exc)}")
        return {}
    except Invalid as exc:
        problems.append(f"{prefix}ENV_FILE: {path}: {exc}")
        return {}
    for key in sorted(values):
        if key.startswith((*_OWN_SETTINGS, "WATCHER_")):
            problems.append(f"{prefix}ENV_FILE: {key} does not belong there: the copy's repository and password are "
                            f"{prefix}REPOSITORY and {prefix}PASSWORD(_FILE); the file holds its backend's "
                            "credentials only (AWS_*, B2_*, RESTIC_REST_*, ...)")
    return values


def clashing(restic_env: Mapping[str, str], backend_env: Mapping[str, str]) -> tuple[str, ...]:
    """The backend variables that the primary's environment and a copy's ENV_FILE set to different values."""
    return tuple(sorted(key for key, value in backend_env.items()
                        if is_backend_variable(key) and key in restic_env and restic_env[key] != value))


def _read_one(name: str, environ: Mapping[str, str], restic_env: Mapping[str, str],
              default_keeps: tuple[int, int, int], problems: list[str]) -> CopySpec | None:
    prefix = copy_prefix(name)
    before = len(problems)
    repository = (environ.get(f"{prefix}REPOSITORY") or "").strip()
    if not repository:
        problems.append(f"{prefix}REPOSITORY: the repository of copy {name!r} is missing "
                        "(e.g. /mnt/usb/restic, s3:https://host/bucket, rest:https://host/repo)")
    password = read_secret(environ, f"{prefix}PASSWORD", problems)
    if not password and not any(p.startswith(f"{prefix}PASSWORD") for p in problems[before:]):
        problems.append(f"{prefix}PASSWORD (or {prefix}PASSWORD_FILE): the password of copy {name!r} is missing")
    keeps = tuple(_value(environ, f"{prefix}KEEP_{period}", whole(0), str(default), problems)
                  for period, default in zip(("DAILY", "WEEKLY", "MONTHLY"), default_keeps, strict=True))
    if keeps == (0, 0, 0):
        problems.append(f"{prefix}KEEP_DAILY/_WEEKLY/_MONTHLY are all 0: that would forget every snapshot of the copy")
    schedule_text = (environ.get(f"{prefix}SCHEDULE") or "").strip()
    schedule = _value(environ, f"{prefix}SCHEDULE", CRON, schedule_text, problems) if schedule_text else None
    prune = _value(environ, f"{prefix}PRUNE", BOOL, "true", problems)
    open_timeout = _value(environ, f"{prefix}OPEN_TIMEOUT", duration(1), "2m", problems)
    backend = _backend_env(environ, prefix, restic_env, problems)
    if len(problems) > before:
        return None
    return CopySpec(name, repository, (keeps[0], keeps[1], keeps[2]), schedule, bool(prune),
                    float(open_timeout or DEFAULT_OPEN_TIMEOUT_S), password or "", backend,
                    clashing(restic_env, backend))


def _value(environ: Mapping[str, str], variable: str, kind: Kind[Any], default: str, problems: list[str]) -> Any:
    text = (environ.get(variable) or "").strip() or default
    try:
        return kind.parse(text)
    except Invalid as exc:
        problems.extend(f"{variable}={text!r}: {problem}" for problem in exc.problems)
        return None


def read_copies(environ: Mapping[str, str], restic_env: Mapping[str, str],
                default_keeps: tuple[int, int, int], problems: list[str]) -> tuple[CopySpec, ...]:
    """The copies WATCHER_COPY_TO names, each read from its WATCHER_COPY_<NAME>_* variables; appends every
    problem (naming the variable and the fix, never a secret) to `problems`. A WATCHER_COPY_<NAME>_* variable
    of a name that WATCHER_COPY_TO does not list is a problem too (a typo would silently copy nowhere)."""
    names = _names(environ, problems)
    specs = [spec for name in names if (spec := _read_one(name, environ, restic_env, default_keeps, problems))]
    known = tuple(copy_prefix(name) for name in names)
    stray = sorted(key for key in environ if key.startswith("WATCHER_COPY_") and key != COPY_TO
                   and not key.startswith(known))
    if stray:
        problems.append(f"{', '.join(stray)}: no copy of that name in {COPY_TO}={environ.get(COPY_TO, '')!r}: "
                        "add its name there, or remove the variable")
    return tuple(specs)
