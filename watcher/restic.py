"""The restic repository as the watcher uses it: version gate, existence and init, snapshot listing."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from watcher import commands
from watcher.durations import format_duration
from watcher.execute import Completed, Masker, run_pipeline

MIN_VERSION = (0, 17, 0)
EXIT_NO_REPOSITORY = 10
EXIT_LOCKED = 11
EXIT_WRONG_PASSWORD = 12
QUERY_TIMEOUT_SECONDS = 300.0


class ResticError(Exception):
    """restic is missing, too old, or failed; the message is masked and names what to fix."""


def restic_error_text(lines: list[str]) -> str:
    """Turns restic's stderr (JSON messages and plain lines) into readable text, one line each."""
    readable: list[str] = []
    for line in lines:
        try:
            message = json.loads(line)
        except ValueError:
            # restic prefixes the source command's stderr with "subprocess <argv0>: ".
            readable.append(re.sub(r"^subprocess \S+: ", "", line))
            continue
        if isinstance(message, dict):
            error = message.get("error")
            text = error.get("message") if isinstance(error, dict) else message.get("message")
            if text:
                readable.append(str(text))
    return "\n".join(dict.fromkeys(readable))


def repository_lock_problem(returncode: int, stderr: str, retry_s: float) -> str | None:
    """A sentence naming WATCHER_LOCK_RETRY when restic gave up waiting for a repository lock another
    process holds (exit 11, or its words); None when that is not why it failed."""
    if returncode != EXIT_LOCKED and "repository is already locked" not in stderr:
        return None
    return (f"restic gave up waiting for the repository lock another process holds (a prune, another host's "
            f"job?) after {format_duration(retry_s)}: the bound is WATCHER_LOCK_RETRY. A lock left by a process "
            "that died is removed by `restic unlock` (the daemon runs it at start and before each prune)")


# restic's words when an upload's retry met a file the first try had already stored: the connection broke
# after the backend wrote it and before it answered, and rest-server refuses to overwrite (restic/rest-server#196).
_RETRIED = re.compile(r"^Save\(<([a-z]+)/([0-9a-f]+)>\) returned error, retrying after \S+: (.*)$", re.MULTILINE)
_REFUSED_SAVE = re.compile(r"^Save\(<([a-z]+)/([0-9a-f]+)>\) failed: .*\(403\)", re.MULTILINE)


def refused_retry(stderr: str) -> str | None:
    """The kind of file (`data`, `index`, `snapshot`, `lock`, ...) whose upload restic retried after a broken
    connection and the backend then refused (403), most likely because the first try had arrived; None when
    restic did not fail that way. A retry after a 403 of its own is a refusal from the start (a permission),
    not this."""
    broken = {(kind, name) for kind, name, error in _RETRIED.findall(stderr) if "(403)" not in error}
    return next((kind for kind, name in _REFUSED_SAVE.findall(stderr) if (kind, name) in broken), None)


def refused_retry_problem(stderr: str) -> str | None:
    """A sentence saying why restic failed when the backend refused the retry of an upload after a broken
    connection (refused_retry) and what it left; None when that is not why it failed."""
    kind = refused_retry(stderr)
    if kind is None:
        return None
    head = ("the connection to the repository broke during an upload, and the backend refused restic's retry, "
            "most likely because the first try had already arrived (rest-server answers a repeated upload 403 "
            "Forbidden)")
    if kind == "snapshot":
        return (f"{head}: this was the snapshot's own file, so the snapshot is most likely in the repository "
                "despite this failure (`restic snapshots` shows it); the next run writes another")
    if kind == "lock":
        return (f"{head}: this was restic's lock file, left in the repository; `restic unlock` removes it (the "
                "daemon runs it at start and before each prune)")
    return f"{head}: the next run uploads it anew, and `restic check` finds the unused file harmless"


def local_permission_problem(repository: str, said: str) -> str | None:
    """What fixes restic's `permission denied` on a repository on a path (the image runs as uid 10001, and a
    directory made by root is not its own); None for other failures and other backends."""
    if "permission denied" not in said.lower():
        return None
    if not repository.startswith(("/", "local:", ".")):
        return None
    if repository.removeprefix("local:").rstrip("/") not in said:
        return None  # another repository's path refused (a copy's source, RESTIC_FROM_REPOSITORY): not this one's
    uid, gid = os.getuid(), os.getgid()
    return (f"restic runs as uid {uid}, gid {gid} and may not read or write the repository's directory "
            f"{repository}: give it and everything in it to that user on the host, e.g. `chown -R {uid}:{gid} DIR`, "
            f"or create it with `install -d -m 700 -o {uid} -g {gid} DIR`")


def parse_time(raw: str) -> datetime:
    """Parses restic's RFC 3339 timestamps (nanoseconds, any offset) into an aware UTC datetime."""
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", raw)
    if not match:
        raise ValueError(f"not an RFC 3339 time: {raw!r}")
    base, fraction, offset = match.groups()
    fraction = (fraction or ".0")[:7]
    offset = "+00:00" if offset in (None, "Z") else offset
    return datetime.fromisoformat(f"{base}{fraction}{offset}").astimezone(UTC)


def parse_version(output: str) -> tuple[int, int, int] | None:
    """Reads (major, minor, patch) from `restic version` output; None if it is not there."""
    match = re.search(r"restic (\d+)\.(\d+)\.(\d+)", output)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


@dataclass(frozen=True)
class Snapshot:
    """One of the watcher's snapshots, as `restic snapshots --json` describes it."""

    id: str
    short_id: str
    time: datetime
    host: str
    container: str
    database: str
    bytes: int | None
    # A container's globals (roles), not a database: `database` is then commands.GLOBALS_DATABASE.
    globals: bool = False
    # `backup-watcher ack` accepted this snapshot's size as its history's new normal (commands.ACK_TAG).
    acked: bool = False
    engine: str = "postgres"  # the engine that wrote it (tag engine=…); older snapshots without the tag: postgres
    # Every tag and the file's path as restic holds them: a streamed copy writes the same (watcher.copyjob).
    # Not compared: they describe the snapshot that the fields above identify.
    tags: tuple[str, ...] = field(default=(), compare=False)
    path: str | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, item: Mapping[str, object]) -> Snapshot | None:
        """Builds one from a `restic snapshots --json` element; None if it is not the watcher's."""
        tags = [str(tag) for tag in item.get("tags") or []]  # type: ignore[attr-defined]
        container = next((t[len(commands.CONTAINER_TAG):] for t in tags if t.startswith(commands.CONTAINER_TAG)), None)
        database = next((t[len(commands.DATABASE_TAG):] for t in tags if t.startswith(commands.DATABASE_TAG)), None)
        engine = next((t[len(commands.ENGINE_TAG):] for t in tags if t.startswith(commands.ENGINE_TAG)), "postgres")
        is_globals = database is None and commands.GLOBALS_TAG in tags
        if is_globals:
            database = commands.encode_name(commands.GLOBALS_DATABASE)
        if container is None or database is None:
            return None
        summary = item.get("summary")
        size = summary.get("total_bytes_processed") if isinstance(summary, dict) else None
        snapshot_id = str(item["id"])
        paths = [str(path) for path in item.get("paths") or []]  # type: ignore[attr-defined]
        return cls(
            id=snapshot_id,
            short_id=str(item.get("short_id") or snapshot_id[:8]),
            time=parse_time(str(item["time"])),
            host=str(item.get("hostname", "")),
            container=container,
            database=commands.decode_name(database),
            bytes=int(size) if isinstance(size, int) else None,
            globals=is_globals,
            acked=commands.ACK_TAG in tags,
            engine=engine,
            tags=tuple(tags),
            path=paths[0] if len(paths) == 1 else None,
        )


def parse_snapshots(output: bytes, *, include_globals: bool = False) -> list[Snapshot]:
    """Parses `restic snapshots --json` output, oldest first; skips snapshots that are not ours, and the
    globals snapshots unless `include_globals`."""
    data = json.loads(output or b"[]") or []
    snapshots = [snap for item in data if (snap := Snapshot.from_json(item)) is not None
                 and (include_globals or not snap.globals)]
    return sorted(snapshots, key=lambda snap: snap.time)


class Repository:
    """Runs restic against one repository with one environment and one masker."""

    def __init__(self, binary: str, env: Mapping[str, str], masker: Masker, repository_label: str) -> None:
        self.binary = binary
        self.env = dict(env)
        self.masker = masker
        self.label = repository_label

    @property
    def _location(self) -> str:
        """Where the repository is, as restic is told (its label may be a copy's name, or say only that a file
        names it: for the advice on a local path's owner)."""
        return self.env.get("RESTIC_REPOSITORY", "") or self.label

    def pipeline_env(self, docker_host: str, *extras: Mapping[str, str]) -> dict[str, str]:
        """The environment of a pipeline of restic and exec helpers (a backup, a restore, a drill's load):
        the repository's, the Docker engine the helpers reach the container through, and `extras` in order,
        a later one's value winning (restic's progress settings, a password the helper passes by name)."""
        env = {**self.env, "DOCKER_HOST": docker_host}
        for extra in extras:
            env.update(extra)
        return env

    def run(self, argv: tuple[str, ...], timeout: float = QUERY_TIMEOUT_SECONDS,
            cancel: threading.Event | None = None, *, on_stdout_line: Callable[[str], None] | None = None,
            on_tick: Callable[[Sequence[int]], None] | None = None) -> Completed:
        """Runs a restic command with the repository's environment (its stdout lines to `on_stdout_line` as they
        come, its pid to `on_tick` about once a second, when given); raises ResticError if restic is missing."""
        try:
            return run_pipeline([argv], env=self.env, masker=self.masker, timeout=timeout, cancel=cancel,
                                on_stdout_line=on_stdout_line, on_tick=on_tick)
        except FileNotFoundError as exc:
            raise ResticError(
                f"restic not found (looked for {self.binary!r}; install restic >= 0.17 or set WATCHER_RESTIC_BINARY)"
            ) from exc

    def version(self) -> tuple[int, int, int]:
        """Returns restic's version; raises ResticError if it is missing or older than 0.17."""
        done = self.run(commands.restic_version(self.binary), timeout=30)
        found = parse_version(done.stdout.decode(errors="replace"))
        if not done.ok or found is None:
            raise ResticError(f"cannot tell restic's version: {done.describe_failure()}")
        if found < MIN_VERSION:
            raise ResticError(
                f"restic {'.'.join(map(str, found))} found at {self.binary!r}, but backup-watcher needs restic >= "
                f"{'.'.join(map(str, MIN_VERSION))} (for --stdin-from-command, which keeps failed dumps out of "
                "the repository)"
            )
        return found

    def ensure(self, init: bool) -> bool:
        """Checks that the repository exists and opens with the password; initialises it if allowed.

        Returns True if it was initialised now. Raises ResticError naming the culprit otherwise.
        """
        done = self.run(commands.restic_cat_config(self.binary), timeout=120)
        if done.ok:
            return False
        if done.returncode == EXIT_WRONG_PASSWORD:
            raise ResticError(self.failure("opening the repository", done))
        if done.returncode == EXIT_NO_REPOSITORY:
            if not init:
                raise ResticError(
                    f"repository {self.label} does not exist: create it with `restic init`, or set "
                    "WATCHER_INIT_REPOSITORY=true to let backup-watcher initialise it"
                )
            created = self.run(commands.restic_init(self.binary), timeout=300)
            if not created.ok:
                said = created.describe_failure()
                advice = local_permission_problem(self._location, said)
                raise ResticError(f"repository {self.label}: init failed: {said}" + (f" ({advice})" if advice else ""))
            return True
        raise ResticError(self.failure("opening the repository", done))

    def failure(self, doing: str, done: Completed) -> str:
        """What went wrong while `doing` something with restic, in words: restic's own message (never its
        JSON) and, for the exit codes that have one, what to check."""
        said = restic_error_text(done.stderr_tail.splitlines()) or done.describe_failure()
        advice = {
            EXIT_WRONG_PASSWORD: "check RESTIC_PASSWORD / RESTIC_PASSWORD_FILE: it is not this repository's password",
            EXIT_NO_REPOSITORY: "check RESTIC_REPOSITORY, or create the repository with `restic init`",
            EXIT_LOCKED: "another restic holds the repository's lock; `restic unlock` removes locks of dead ones",
        }.get(done.returncode) or refused_retry_problem(said) or local_permission_problem(self._location, said)
        head = f"{doing} {self.label} failed: {said}"
        return f"{head} ({advice})" if advice else head

    def snapshots(self, *, host: str | None = None, container: str | None = None,
                  database: str | None = None, include_globals: bool = False,
                  timeout: float = QUERY_TIMEOUT_SECONDS) -> list[Snapshot]:
        """Lists the watcher's database snapshots (and, with `include_globals`, the containers' globals
        snapshots), oldest first, within `timeout` seconds; raises ResticError when restic fails."""
        done = self.run(commands.restic_snapshots(self.binary, host=host, container=container, database=database),
                        timeout=timeout)
        if not done.ok:
            raise ResticError(self.failure("listing the snapshots of", done))
        return parse_snapshots(done.stdout, include_globals=include_globals and database is None)
