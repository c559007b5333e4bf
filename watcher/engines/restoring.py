"""One container's share of a restore, for every engine: `restore` of one snapshot and `restore --all --host
OLD` (watcher.recovery) both run it, so that they show, confirm and report alike.

A Step is prepared first (nothing changes: the destination is asked whether each database exists, and which
roles or users the restore would create from the globals of the same pass), then run: roles (PostgreSQL) or
users (MariaDB, watcher.engines.mariadb_users) first, then each snapshot. PostgreSQL restores through
watcher.restore and watcher.roles, MariaDB/MySQL through MariaDBRestorer, engine=command through the
destination's restore command, the label backup-watcher.restore-command; a command target without one
cannot be prepared, and the message says how to restore it by hand.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from watcher import commands, engines
from watcher.discovery import LABEL_PREFIX, ContainerInfo, Target, discover, mariadb_credentials_of
from watcher.engines.command import shell_command
from watcher.execute import run_pipeline

if TYPE_CHECKING:
    from watcher.cli import App, Destination
    from watcher.engines.mariadb_restore import MariaDBRestorer
    from watcher.engines.mariadb_users import UserMaker, UserPlan
    from watcher.restic import Snapshot
    from watcher.roles import RolePlan

RESTORE_TIMEOUT_SECONDS = 12 * 3600.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
Say = Callable[[str], None]


class StepFailed(Exception):
    """A step cannot be prepared; the message (masked) says why and what to do. Nothing was changed."""


@dataclass(frozen=True)
class Restored:
    """What became of one snapshot: restored (in `duration_s`) or not, and why not."""

    snapshot: Snapshot
    ok: bool
    detail: str
    duration_s: float = 0.0


@dataclass(frozen=True)
class Preview:
    """What a prepared step will do: where each snapshot goes and what becomes of what is there (in the order of
    the step's snapshots), and the roles or users it creates (None for an engine without)."""

    into: tuple[str, ...]
    fates: tuple[str, ...]
    accounts: str | None = None


class Step(Protocol):
    """One destination container and the snapshots it receives."""

    container: str
    snapshots: list[Snapshot]

    def prepare(self) -> Preview:
        """Asks the destination what the restore will do; raises StepFailed (nothing changed)."""

    def run(self, say: Say) -> list[Restored]:
        """Restores every snapshot (roles or users first, told through `say`); never raises."""


def database_fate(database: str, exists: bool) -> str:
    """What a restore does to the database of that name in the destination."""
    if exists:
        return f"The database {database!r} there will be DROPPED and replaced."
    return f"The database {database!r} does not exist there yet: it will be created."


def step_for(app: App, name: str, snapshots: Sequence[Snapshot], listed: Sequence[Snapshot], *,
             whole_host: bool = False) -> Step:
    """The step that restores `snapshots` (one engine's) into the running container `name`; `listed`: every
    snapshot of the repository (globals included); `whole_host`: every missing role or user of the globals
    is created. Raises StepFailed when there is no such container or the engines differ."""
    kinds = sorted({snap.engine for snap in snapshots})
    if len(kinds) != 1:
        raise StepFailed(f"the latest snapshots of {name} were written by several engines ({', '.join(kinds)}): "
                         f"restore them one by one with `backup-watcher restore {name} SNAPSHOT`")
    info = app.docker.inspect(name)
    if info is None or not info.running:
        raise StepFailed(f"no running container named {name} on this engine: start it (same name, image and "
                         "environment as on the old host) and run this again")
    engine = kinds[0]
    if engine == engines.POSTGRES:
        from watcher.cli import destination_of
        destination = destination_of(app, name)
        if destination is None:
            raise StepFailed(f"{name} stopped")
        return PostgresStep(app, destination, list(snapshots), list(listed), whole_host)
    if engine in (engines.MARIADB, engines.MYSQL):
        return MariaDBStep(app, info, engine, list(snapshots), list(listed), whole_host)
    if engine == engines.COMMAND:
        return CommandStep(app, info, list(snapshots))
    raise StepFailed(f"the snapshots of {name} were written by engine {engine!r}, which this version cannot "
                     f"restore (known: {', '.join(engines.ENGINES)})")


def restore_one(app: App, args: argparse.Namespace, snapshot: Snapshot, listed: Sequence[Snapshot]) -> int:
    """`restore TARGET SNAPSHOT` (`listed`: every snapshot of the repository, globals included): prepares the
    step, shows it, asks (unless --yes) and runs it; returns 0 when
    restored, 1 when it failed (nothing changed when it could not be prepared), 2 when not confirmed. Raises
    UsageError for a destination that is not there."""
    from watcher.cli import UsageError, confirmed_by_typing

    name = args.into or args.target
    try:
        step = step_for(app, name, [snapshot], listed)
    except StepFailed as exc:
        raise UsageError(f"restore into {name}: {exc}") from exc
    try:
        preview = step.prepare()
    except StepFailed as exc:
        print(f"restore FAILED: {app.masker(str(exc))}; nothing was changed", file=sys.stderr)
        return EXIT_FAILED
    print(f"Restore snapshot {snapshot.short_id} ({snapshot.time:%Y-%m-%d %H:%M:%S} UTC, host {snapshot.host}) "
          f"of {snapshot.container}/{snapshot.database}\n  into {preview.into[0]}.\n  {preview.fates[0]}"
          + (f"\n  {preview.accounts}" if preview.accounts else ""), file=sys.stderr)
    # A command target's snapshot names no database of its own: the operator types the container's name.
    what, word = (("container's name", name) if snapshot.engine == engines.COMMAND
                  else ("database name", snapshot.database))
    if not args.yes and not confirmed_by_typing(word, f"Type the {what} ({word}) to confirm: "):
        print("not confirmed; nothing was changed", file=sys.stderr)
        return EXIT_USAGE
    with app.showing_progress():
        done = step.run(lambda said: print(said, file=sys.stderr))[0]
    if not done.ok:
        print(f"restore FAILED: {app.masker(done.detail)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"restored {snapshot.database!r} in {name} from snapshot {snapshot.short_id} in {done.duration_s:.1f}s"
          + (" with its restore command" if snapshot.engine == engines.COMMAND else ""))
    return EXIT_OK


def _each(app: App, snapshots: Sequence[Snapshot], failure: type[Exception],
          restore: Callable[[Snapshot], float]) -> list[Restored]:
    """Restores each snapshot in turn with `restore` (returns its seconds); one that raises `failure` fails
    alone (its masked message), and after a cancel the rest are "interrupted". Returns one result each."""
    results = []
    for snap in snapshots:
        if app.cancel.is_set():
            results.append(Restored(snap, False, "interrupted"))
            continue
        try:
            seconds = restore(snap)
        except failure as exc:
            results.append(Restored(snap, False, app.masker(str(exc))))
            continue
        results.append(Restored(snap, True, f"restored in {seconds:.1f}s", seconds))
    return results


def _not_done(snapshots: Sequence[Snapshot], why: str) -> list[Restored]:
    return [Restored(snap, False, why) for snap in snapshots]


class PostgresStep:
    """PostgreSQL: roles from the globals (watcher.roles), then pg_restore (watcher.restore)."""

    def __init__(self, app: App, destination: Destination, snapshots: list[Snapshot], listed: list[Snapshot],
                 whole_host: bool) -> None:
        self.app, self.destination, self.snapshots, self.listed = app, destination, snapshots, listed
        self.container = destination.info.name
        self.whole_host = whole_host
        self.roles: RolePlan | None = None

    def prepare(self) -> Preview:
        """Whether each database exists, and the roles to create; raises StepFailed."""
        from watcher.cli import roles_sentence
        from watcher.restore import RestoreError
        from watcher.roles import RoleError

        dest = self.destination
        try:
            fates = tuple(database_fate(snap.database, dest.restorer.prepare(dest.id, self.container, dest.creds,
                                                                             snap.database))
                          for snap in self.snapshots)
            self.roles = dest.role_plan(self.snapshots, self.listed, every_role=self.whole_host)
        except (RestoreError, RoleError) as exc:
            raise StepFailed(self.app.masker(str(exc))) from exc
        into = tuple(f"database {snap.database!r} of container {self.container}" for snap in self.snapshots)
        return Preview(into, fates, roles_sentence(self.roles, future=True))

    def run(self, say: Say) -> list[Restored]:
        """Roles first (none restored when they fail), then each database."""
        from watcher.cli import roles_sentence
        from watcher.restore import RestoreError
        from watcher.roles import RoleError

        dest, plan = self.destination, self.roles
        assert plan is not None, "prepare() first"
        try:
            dest.roles.create(plan, dest.id, self.container, dest.creds)
        except RoleError as exc:
            problem = self.app.masker(str(exc))
            return _not_done(self.snapshots, f"creating the roles failed, nothing restored: {problem}")
        if plan.create:
            say(roles_sentence(plan, future=False))
        return _each(self.app, self.snapshots, RestoreError,
                     lambda snap: dest.restorer.restore(snap, dest.id, self.container, dest.creds,
                                                        snap.database).duration_s)


class MariaDBStep:
    """MariaDB/MySQL: users from the globals (watcher.engines.mariadb_users), then each database into a
    scratch copy and the swap (watcher.engines.mariadb_restore), then the users' grants on restored objects."""

    def __init__(self, app: App, info: ContainerInfo, engine: str, snapshots: list[Snapshot],
                 listed: list[Snapshot], whole_host: bool) -> None:
        from watcher.engines.mariadb_restore import MariaDBRestorer
        from watcher.engines.mariadb_users import UserMaker

        self.app, self.info, self.snapshots, self.listed = app, info, snapshots, listed
        self.container = info.name
        self.whole_host = whole_host
        found = discover(info, app.rules())
        user = found.credentials.user if isinstance(found, Target) else (
            (info.labels.get(f"{LABEL_PREFIX}user") or "").strip() or None)
        self.creds = mariadb_credentials_of(info.env, user)
        self.restorer: MariaDBRestorer = MariaDBRestorer(app.docker_host, app.repository, app.masker, engine,
                                                         app.config.bounds, app.cancel)
        self.users: UserMaker = UserMaker(self.restorer)
        self.plan: UserPlan | None = None

    def prepare(self) -> Preview:
        """Waits until the server answers; whether each database exists, and the users to create (MariaDB
        globals only: MySQL's mysqldump keeps none). Raises StepFailed."""
        from watcher.engines.mariadb_restore import MariaDBRestoreError
        from watcher.engines.mariadb_users import UsersError, users_sentence
        from watcher.roles import globals_for

        fates = []
        try:
            for snap in self.snapshots:
                exists = self.restorer.prepare(self.info.id, self.container, self.creds, snap.database)
                fates.append(database_fate(snap.database, exists))
            source = globals_for(self.listed, max(self.snapshots, key=lambda s: s.time))
            self.plan = self.users.plan(self.info.id, self.creds, {snap.database for snap in self.snapshots},
                                        source, every_account=self.whole_host)
        except (MariaDBRestoreError, UsersError) as exc:
            raise StepFailed(self.app.masker(str(exc))) from exc
        into = tuple(f"database {snap.database!r} of container {self.container}" for snap in self.snapshots)
        return Preview(into, tuple(fates), users_sentence(self.plan, future=True))

    def run(self, say: Say) -> list[Restored]:
        """Users first (none restored when they fail), each database, then the grants on restored objects (a
        failure there fails every row: the databases are back, some rights are not)."""
        from watcher.engines.mariadb_restore import MariaDBRestoreError
        from watcher.engines.mariadb_users import UsersError, users_sentence

        plan = self.plan
        assert plan is not None, "prepare() first"
        try:
            self.users.create(plan, self.info.id, self.container, self.creds)
        except UsersError as exc:
            return _not_done(self.snapshots, f"creating the users failed, nothing restored: "
                                             f"{self.app.masker(str(exc))}")
        if plan.create:
            say(users_sentence(plan, future=False))
        results = _each(self.app, self.snapshots, MariaDBRestoreError,
                        lambda snap: self.restorer.restore(snap, self.info.id, self.container, self.creds,
                                                           snap.database).duration_s)
        try:
            self.users.grant_on_objects(plan, self.info.id, self.creds)
        except UsersError as exc:
            problem = self.app.masker(str(exc))
            return [Restored(r.snapshot, False, f"{r.detail}, but {problem}" if r.ok else r.detail) for r in results]
        return results


def restore_command_of(info: ContainerInfo) -> str | None:
    """The destination's label backup-watcher.restore-command (stripped), None when it has none."""
    return (info.labels.get(f"{LABEL_PREFIX}restore-command") or "").strip() or None


def by_hand(container: str, snapshot: Snapshot) -> str:
    """How to restore an engine=command snapshot without a restore command."""
    path = "/" + commands.dump_filename(snapshot.database, ".dump")
    return (f"restic dump {snapshot.short_id} {path} | docker exec -i {container} <the command that reads the "
            "backup on stdin>")


class CommandStep:
    """engine=command: the snapshot piped into the destination's restore command."""

    def __init__(self, app: App, info: ContainerInfo, snapshots: list[Snapshot]) -> None:
        self.app, self.info, self.snapshots = app, info, snapshots
        self.container = info.name
        self.command = restore_command_of(info)

    def prepare(self) -> Preview:
        """Raises StepFailed, saying how to restore it by hand, when the destination defines no restore
        command."""
        if self.command is None:
            raise StepFailed(f"{self.container} defines no restore command (label {LABEL_PREFIX}restore-command, "
                             "run inside the container with the backup on its stdin). By hand: "
                             f"{by_hand(self.container, self.snapshots[0])}")
        return Preview(tuple(f"container {self.container}" for _ in self.snapshots),
                       tuple(f"Its restore command replaces what it holds: {self.command}" for _ in self.snapshots))

    def run(self, say: Say) -> list[Restored]:
        """`restic dump | restore command` per snapshot."""
        assert self.command is not None, "prepare() first"
        results = []
        for snap in self.snapshots:
            started = time.monotonic()
            restorer = commands.exec_helper(self.info.id, shell_command(self.command), stdin=True)
            dump = commands.restic_dump(self.app.repository.binary, snap.id, snap.database, ".dump")
            done = run_pipeline([dump, restorer], env=self.app.repository.pipeline_env(self.app.docker_host),
                                masker=self.app.masker, timeout=RESTORE_TIMEOUT_SECONDS, cancel=self.app.cancel,
                                capture_stdout=False)
            duration = time.monotonic() - started
            results.append(Restored(snap, True, f"restored in {duration:.1f}s by its restore command", duration)
                           if done.ok else Restored(snap, False, done.describe_failure()))
        return results
