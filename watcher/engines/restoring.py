"""`restore` of a snapshot that another engine than PostgreSQL wrote: MariaDB/MySQL through
MariaDBRestorer, engine=command through the destination's restore command (or a clear "none defined").

The command line, the snapshot choice and the confirmation are the same as PostgreSQL's (watcher.cli);
roles are PostgreSQL's only (a MariaDB's users and grants are in its globals snapshot: see the README).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from watcher import commands, engines
from watcher.discovery import LABEL_PREFIX, ContainerInfo, Target, discover, mariadb_credentials_of
from watcher.engines.command import shell_command
from watcher.execute import run_pipeline

if TYPE_CHECKING:
    from watcher.cli import App
    from watcher.restic import Snapshot

RESTORE_TIMEOUT_SECONDS = 12 * 3600.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def restore_other_engine(app: App, args: argparse.Namespace, snapshot: Snapshot) -> int:
    """Restores a MariaDB/MySQL or engine=command snapshot into the destination container after
    confirmation; returns 0 when restored, 1 when it failed, 2 when not confirmed. Raises UsageError for a
    destination that is not there."""
    from watcher.cli import UsageError

    name = args.into or args.target
    info = app.docker.inspect(name)
    if info is None or not info.running:
        raise UsageError(f"{name}: no running container of that name to restore into")
    if snapshot.engine == engines.COMMAND:
        return _restore_command(app, args, snapshot, info)
    if snapshot.engine in (engines.MARIADB, engines.MYSQL):
        return _restore_mariadb(app, args, snapshot, info)
    raise UsageError(f"snapshot {snapshot.short_id} was written by engine {snapshot.engine!r}, which this "
                     f"version cannot restore (known: {', '.join(engines.ENGINES)})")


def _restore_mariadb(app: App, args: argparse.Namespace, snapshot: Snapshot, info: ContainerInfo) -> int:
    """The MariaDB half of restore_other_engine."""
    from watcher.cli import _confirmed
    from watcher.engines.mariadb_restore import MariaDBRestoreError, MariaDBRestorer

    found = discover(info, app.rules())
    user = found.credentials.user if isinstance(found, Target) else (
        (info.labels.get(f"{LABEL_PREFIX}user") or "").strip() or None)
    creds = mariadb_credentials_of(info.env, user)
    restorer = MariaDBRestorer(app.docker_host, app.repository, app.masker, snapshot.engine, app.config.bounds,
                               app.cancel)
    database = snapshot.database
    try:
        exists = restorer.prepare(info.id, info.name, creds, database)
    except MariaDBRestoreError as exc:
        print(f"restore FAILED: {app.masker(str(exc))}; nothing was changed", file=sys.stderr)
        return EXIT_FAILED
    fate = "there will be DROPPED and replaced" if exists else "does not exist there yet: it will be created"
    print(f"Restore {snapshot.engine} snapshot {snapshot.short_id} ({snapshot.time:%Y-%m-%d %H:%M:%S} UTC, host "
          f"{snapshot.host}) of {snapshot.container}/{database}\n  into database {database!r} of container "
          f"{info.name}.\n  The database {database!r} {fate}.", file=sys.stderr)
    if not args.yes and not _confirmed(database):
        print("not confirmed; nothing was changed", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = restorer.restore(snapshot, info.id, info.name, creds, database)
    except MariaDBRestoreError as exc:
        print(f"restore FAILED: {app.masker(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    print(f"restored {database!r} in {info.name} from snapshot {snapshot.short_id} in {result.duration_s:.1f}s")
    return EXIT_OK


def restore_command_of(info: ContainerInfo) -> str | None:
    """The destination's label backup-watcher.restore-command (stripped), None when it has none."""
    return (info.labels.get(f"{LABEL_PREFIX}restore-command") or "").strip() or None


def _restore_command(app: App, args: argparse.Namespace, snapshot: Snapshot, info: ContainerInfo) -> int:
    """The engine=command half of restore_other_engine: the snapshot piped into the destination's restore
    command, or a clear refusal when it defines none."""
    from watcher.cli import _confirmed

    restore_command = restore_command_of(info)
    path = "/" + commands.dump_filename(snapshot.database, ".dump")
    if restore_command is None:
        print(f"restore: {info.name} defines no restore command (label {LABEL_PREFIX}restore-command, run inside "
              f"the container with the backup on its stdin); nothing was changed. The backup itself: restic dump "
              f"{snapshot.short_id} {path}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Restore snapshot {snapshot.short_id} ({snapshot.time:%Y-%m-%d %H:%M:%S} UTC, host {snapshot.host}) of "
          f"{snapshot.container}\n  into container {info.name} by its restore command: {restore_command}",
          file=sys.stderr)
    if not args.yes and not _confirmed(info.name):
        print("not confirmed; nothing was changed", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    restorer = commands.exec_helper(info.id, shell_command(restore_command), stdin=True)
    dump = commands.restic_dump(app.repository.binary, snapshot.id, snapshot.database, ".dump")
    done = run_pipeline([dump, restorer], env={**app.repository.env, "DOCKER_HOST": app.docker_host},
                        masker=app.masker, timeout=RESTORE_TIMEOUT_SECONDS, cancel=app.cancel, capture_stdout=False)
    if not done.ok:
        print(f"restore FAILED: {done.describe_failure()}", file=sys.stderr)
        return EXIT_FAILED
    print(f"restored {info.name} from snapshot {snapshot.short_id} in {time.monotonic() - started:.1f}s "
          "with its restore command")
    return EXIT_OK
