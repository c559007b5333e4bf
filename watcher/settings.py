"""How one setting (SPEC §4) is read from the environment, checked, offered as a flag and shown.

The table of settings is `watcher.config.Config`: each of its fields made with `setting(...)` is one
row (variable, default, kind, flag, secret, how it is shown, help line). This module holds what a
row is made of: `Setting`, the kinds of value (`Kind`: a parser that raises `Invalid` with the fix,
and the formatter that writes the value back), and the helpers shared by settings and labels
(`parse_bool` reads `WATCHER_INIT_REPOSITORY` and the `backup-watcher.enable`/`drill` labels alike).
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
import zoneinfo
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

from watcher.durations import DurationError, format_duration, parse_duration
from watcher.schedule import validate_cron

T = TypeVar("T")
SETTING_KEY = "setting"
# Container names are [a-zA-Z0-9][a-zA-Z0-9_.-]*; a pattern may add the glob characters.
_PATTERN_CHARS = re.compile(r"^[A-Za-z0-9_.\-*?\[\]!]+$")


class Invalid(ValueError):
    """A value a parser refuses. Each problem says what is wrong and what to write instead.

    `about_value` False: the problems name their own culprit (one item of a list), so the whole
    value is not repeated before them.
    """

    def __init__(self, *problems: str, about_value: bool = True) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.about_value = about_value


class Shown(Enum):
    """How `check-config` prints a setting's value."""

    PLAIN = "plain"
    MASKED = "masked"  # *** and where it came from: never the value
    URL_MASKED = "url-masked"  # the URL with its password replaced by ***


@dataclass(frozen=True)
class Kind(Generic[T]):
    """A kind of value: `parse` turns the text into it (raising Invalid), `format` writes it back."""

    parse: Callable[[str], T]
    format: Callable[[T], str] = str


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One row of the table of settings.

    `default` is written as in the environment; None means no value (the field is None). A blank
    variable means the default, unless `blank_is_off`: then the parser reads the blank text, which
    switches the setting off (as does an empty file given for a secret). A secret is never a flag
    (argv is readable by every user of the host): it also accepts NAME_FILE, and its flag, if any,
    is that file's path.
    """

    name: str
    default: str | None
    kind: Kind[T]
    help: str
    secret: bool = False
    flag: bool = True
    shown: Shown = Shown.PLAIN
    unset: str = "(none)"
    blank_is_off: bool = False

    @property
    def flag_variable(self) -> str | None:
        """The variable the setting's flag stands for (NAME_FILE for a secret), or None if it has none."""
        if not self.flag:
            return None
        return f"{self.name}_FILE" if self.secret else self.name

    def source(self, environ: Mapping[str, str]) -> str:
        """The variable the value comes from: NAME_FILE when a secret is given by file, else NAME."""
        return f"{self.name}_FILE" if self.secret and environ.get(f"{self.name}_FILE") else self.name

    def read(self, environ: Mapping[str, str], problems: list[str]) -> T | None:
        """Returns the setting's value in `environ` (the default when unset or blank).

        Appends to `problems` (naming the variable, never a secret's value) and returns None when
        the value is invalid or a secret's file cannot be read.
        """
        text = read_secret(environ, self.name, problems) if self.secret else environ.get(self.name)
        # A secret's file that is there but empty is its value, not the default: a check may refuse it.
        from_file = self.secret and bool(environ.get(f"{self.name}_FILE"))
        if text is None or (not text.strip() and not self.blank_is_off and not from_file):
            text = self.default
        if text is None:
            return None
        try:
            return self.kind.parse(text)
        except Invalid as exc:
            problems.extend(self._problem(environ, text, problem, exc.about_value) for problem in exc.problems)
            return None

    def _problem(self, environ: Mapping[str, str], text: str, problem: str, about_value: bool) -> str:
        if self.secret or not about_value:
            return f"{self.source(environ)}: {problem}"
        return f"{self.name}={text.strip()!r}: {problem}"

    def show(self, value: T | None, source: str) -> str:
        """The value as check-config prints it; a secret's value never."""
        if value is None or value == ():
            return self.unset
        if self.shown is Shown.MASKED:
            count = f"{len(value)} value{'' if len(value) == 1 else 's'} " if isinstance(value, tuple) else ""
            return f"*** ({count}from {source})"
        shown = self.kind.format(value)
        return mask_url(shown) if self.shown is Shown.URL_MASKED else shown


def setting(name: str, default: str | None, kind: Kind[T], *, help: str, secret: bool = False,
            flag: bool = True, shown: Shown = Shown.PLAIN, unset: str = "(none)", blank_is_off: bool = False) -> T:
    """A dataclass field that is one row of the table of settings; its type is its kind's value type."""
    row = Setting(name, default, kind, help, secret, flag, shown, unset, blank_is_off)
    # A field without a default: the loader always passes every value. Only plain values in repr:
    # a Config that lands in a log line or a traceback shows no secret.
    field: Any = dataclasses.field(metadata={SETTING_KEY: row}, repr=shown is Shown.PLAIN)
    return field  # type: ignore[no-any-return]


def rows(config_class: type) -> Iterator[tuple[str, Setting[Any]]]:
    """The rows of a table: (field name, Setting) of every field made with `setting`, in order."""
    for field in dataclasses.fields(config_class):
        row = field.metadata.get(SETTING_KEY)
        if row is not None:
            yield field.name, row


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
            problems.append(f"{name}_FILE: {unreadable(path, exc)}")
            return None
    return value or None


def unreadable(path: str, exc: OSError) -> str:
    """Why the file `path` could not be read, and for a refused read whom it must be readable by: the image
    runs as uid 10001, so a secret the host's root wrote (and did not chown) is the usual culprit."""
    said = f"cannot read {path}: {exc.strerror}"
    if isinstance(exc, PermissionError):
        uid, gid = os.getuid(), os.getgid()
        said += (f" (this process runs as uid {uid}, gid {gid}: make the file, and the directories above it, "
                 f"readable by that user on the host, e.g. `chown {uid}:{gid} FILE`)")
    return said


def flag_name(variable: str) -> str:
    """The flag of a setting: --schedule for WATCHER_SCHEDULE, --docker-host for DOCKER_HOST."""
    return "--" + variable.removeprefix("WATCHER_").lower().replace("_", "-")


def with_flags(environ: Mapping[str, str], flags: Mapping[str, str | None]) -> dict[str, str]:
    """The environment with the flags given (by variable name) put over it: a flag wins."""
    return {**environ, **{name: value for name, value in flags.items() if value is not None}}


def mask_url(url: str) -> str:
    """Masks the password of a URL-like string (rest:https://user:pw@host/, s3:..., sftp:user@host)."""
    # Greedy up to the last '@' before the path, as restic's URL parser splits a raw '@' in a password.
    return re.sub(r"(://[^/@:]*:)[^/]*@", r"\1***@", url)


def url_password(url: str) -> str | None:
    """The password inside a restic repository URL (rest:https://user:pw@host/), if any."""
    try:
        return urllib.parse.urlsplit(url.split(":", 1)[-1]).password or None
    except ValueError:  # not a URL after all (an unclosed '[' in the host)
        return None


def split_list(raw: str) -> list[str]:
    """Splits a comma- or whitespace-separated list, dropping empty items."""
    return [item for item in re.split(r"[\s,]+", raw.strip()) if item]


# --- kinds of value -------------------------------------------------------------------------------


def parse_bool(raw: str) -> bool:
    """Reads a yes/no setting or label: true/yes/1/on or false/no/0/off, any case; raises Invalid."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise Invalid("must be true or false")


def _format_bool(value: bool) -> str:
    return "true" if value else "false"


def _as_is(raw: str) -> str:
    return raw


BOOL = Kind(parse_bool, _format_bool)
TEXT = Kind(str.strip)
SECRET_TEXT = Kind(_as_is)  # a password's blanks are its own


def whole(minimum: int) -> Kind[int]:
    """Whole numbers of at least `minimum`."""
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise Invalid("not a whole number") from None
        if value < minimum:
            raise Invalid(f"must be at least {minimum}")
        return value
    return Kind(parse)


def _parse_fraction(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise Invalid("not a number: write a fraction between 0 and 1, such as 0.5") from None
    if not 0 < value < 1:
        raise Invalid("must lie strictly between 0 and 1 (0.5: a dump below half of the previous one is flagged)")
    return value


# A fraction strictly between 0 and 1 (WATCHER_SHRINK_THRESHOLD).
FRACTION = Kind(_parse_fraction)


def duration(minimum: float = 0) -> Kind[float]:
    """Durations in seconds, written 90s, 15m, 6h, 1d or a plain number of seconds (SPEC §4)."""
    def parse(raw: str) -> float:
        try:
            seconds = parse_duration(raw)
        except DurationError:
            raise Invalid("not a duration: write e.g. 90s, 15m, 6h or 1d (a plain number is seconds)") from None
        if seconds < minimum:
            raise Invalid(f"must be at least {format_duration(minimum)}")
        return seconds
    return Kind(parse, format_duration)


def choice(*options: str) -> Kind[str]:
    """One of `options`, in any case."""
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise Invalid(f"must be one of {', '.join(options)}")
        return value
    return Kind(parse)


def _parse_cron(raw: str) -> str:
    schedule = raw.strip()
    error = validate_cron(schedule)
    if error:
        raise Invalid(error)
    return schedule


CRON = Kind(_parse_cron)


def _parse_cron_or_off(raw: str) -> str | None:
    return _parse_cron(raw) if raw.strip() else None


def _format_cron_or_off(value: str | None) -> str:
    return value or ""


CRON_OR_OFF = Kind(_parse_cron_or_off, _format_cron_or_off)


def _parse_zone(raw: str) -> str:
    zone = raw.strip()
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # OSError: a name that is a directory of the zone database (Europe) or too long for a path.
        raise Invalid("unknown time zone (use an IANA name such as Europe/Berlin)") from None
    return zone


ZONE = Kind(_parse_zone)


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


def _parse_patterns(raw: str) -> tuple[str, ...]:
    # Commas only: a blank inside a pattern is a mistake to report, not a separator.
    patterns = tuple(pattern.strip() for pattern in raw.split(",") if pattern.strip())
    problems = [f"pattern {pattern!r} {why}" for pattern in patterns if (why := validate_pattern(pattern))]
    if problems:
        raise Invalid(*problems, about_value=False)
    return patterns


def _join(values: tuple[str, ...]) -> str:
    return ",".join(values)


PATTERNS = Kind(_parse_patterns, _join)


class Address(NamedTuple):
    """A HOST:PORT to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(raw: str) -> Address | None:
    """Parses HOST:PORT (HOST may be empty or [v6]); returns None when it is not one."""
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return Address(host.strip("[]") or "0.0.0.0", int(port))  # noqa: S104 - documented default: all interfaces


def _parse_address(raw: str) -> Address:
    address = parse_address(raw)
    if address is None:
        raise Invalid("expected HOST:PORT, e.g. 0.0.0.0:9810")
    return address


ADDRESS = Kind(_parse_address)


def _parse_docker_host(raw: str) -> str:
    host = raw.strip()
    scheme = urllib.parse.urlsplit(host).scheme
    if scheme == "ssh":
        # docker-py could list containers over SSH, but dumps stream through the watcher's own exec
        # client, which speaks to a socket or TCP only: refuse here rather than fail every backup.
        raise Invalid("ssh:// is not supported; run the watcher on the Docker host "
                      "(unix:///var/run/docker.sock) or reach the engine by tcp://host:port")
    if scheme not in ("unix", "tcp", "http"):
        raise Invalid("use unix:///path/docker.sock or tcp://host:port")
    return host


DOCKER_HOST = Kind(_parse_docker_host)


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(split_list(raw))


LIST = Kind(_parse_list, _join)


def _parse_file(raw: str) -> str:
    if not Path(raw).is_file():
        raise Invalid("no such file")
    return raw


FILE = Kind(_parse_file)
