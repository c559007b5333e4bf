"""The `backup-watcher` command: parses arguments, builds and wires every object, runs one command.

Exit codes (SPEC §3): 0 success, 1 a job failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

import watcher
from watcher import logs
from watcher.config import (
    FLAG_VARIABLES,
    RESTIC_SECRET_VARIABLES,
    SETTINGS,
    Config,
    ConfigError,
    effective_config,
    effective_copies,
    flags,
    load_config,
)
from watcher.discovery import (
    LABEL_PREFIX,
    ContainerInfo,
    Credentials,
    DiscoveryRules,
    Rejected,
    Target,
    credentials_of,
    discover,
)
from watcher.docker_source import DockerSource, DockerUnavailable
from watcher.execute import Masker
from watcher.jobs import BackupResult, JobContext, backup_one, backup_target, check_repository, new_run_id
from watcher.progress import ProgressBoard
from watcher.restic import Repository, ResticError, Snapshot
from watcher.settings import flag_name, mask_url, with_flags

if TYPE_CHECKING:
    from alerting.notify import Notifier
    from alerting.policy import Alert
    from watcher.daemon import Daemon
    from watcher.drill import DrillResult
    from watcher.metrics import Metrics, MetricsServer
    from watcher.restore import Restorer
    from watcher.roles import RoleMaker, RolePlan
    from watcher.startup_page import StartupPages

# The daemon, the metrics server, Apprise, drills and restores are imported by the commands that use
# them: a one-shot `backup` run from cron over a fleet pays for its imports on every run (about a
# third of a second of CPU for the daemon's and Apprise's).

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
log = structlog.get_logger("watcher.cli")


class UsageError(Exception):
    """The command line or the environment is wrong; exit 2 with this message."""


SETTING_PREFIX = "setting_"


def settings_given(args: argparse.Namespace) -> dict[str, str | None]:
    """The settings flags of a parsed command line, by variable name (None where not given)."""
    return {name.removeprefix(SETTING_PREFIX): value for name, value in vars(args).items()
            if name.startswith(SETTING_PREFIX)}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand, with the settings' flags before the command."""
    parser = argparse.ArgumentParser(
        prog="backup-watcher",
        # No prefixes: --restic-password would otherwise pass for --restic-password-file.
        allow_abbrev=False,
        description="Back up the databases running in Docker containers (PostgreSQL, MariaDB/MySQL, or any with a "
                    "dump command) into restic, and restore them.",
    )
    parser.add_argument("--version", action=_VersionAction)
    _add_settings(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_backup_commands(sub)
    _add_restore_commands(sub)
    sub.add_parser("check-config", help="validate the configuration and print it, secrets masked")
    sub.add_parser("run", help="the daemon: discovery, schedules, retention, metrics (stops on SIGTERM/SIGINT)")
    sub.add_parser("prune", help="apply retention now (restic forget by the keeps, then prune)")
    ack = sub.add_parser(
        "ack", help="accept a flagged shrunken dump as its history's new normal: retention goes on as usual",
        description="Acknowledges the shrunken dumps flagged for TARGET (WATCHER_SHRINK_THRESHOLD): their newest "
                    "snapshots get the tag size-anomaly-ack, the next dumps are compared with them, and retention "
                    "forgets in their histories again. Needs credentials that may delete (restic rewrites the "
                    "snapshot), like prune.")
    ack.add_argument("target", metavar="TARGET", help="container name (when it was backed up)")
    ack.add_argument("--database", help="only this database's history (`(globals)` for the roles); default: every "
                                        "flagged history of TARGET")
    status = sub.add_parser("status", help="targets: state, last snapshot, age, next run, last error")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for command in sub.choices.values():
        command.allow_abbrev = False
        # After the command too (`status --log-level debug`); SUPPRESS keeps a flag given before it.
        _add_settings(command, default=argparse.SUPPRESS)
    return parser


class _VersionAction(argparse.Action):
    """--version: prints the installed version and exits; the version is looked up only then (reading the
    installed packages' metadata costs every other command 10-40 ms of start-up)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[object] | None, option_string: str | None = None) -> None:
        print(f"backup-watcher {watcher.__version__}")
        parser.exit()


def _add_settings(parser: argparse.ArgumentParser, default: object) -> None:
    """The settings' flags, one per setting that is not a secret, on `parser`."""
    settings = parser.add_argument_group(
        "settings", "each also an environment variable (see README); a flag wins over the variable; before or "
        "after the command. Secrets are never flags (argv is visible to every user of the host): use "
        "RESTIC_PASSWORD_FILE and the like")
    for flag, variable, help_line in flags():
        if flag in parser._option_string_actions:
            continue  # the command's own option of that name (restore --host) comes first
        settings.add_argument(flag, dest=f"{SETTING_PREFIX}{variable}", metavar="VALUE", default=default,
                              help=help_line.replace("%", "%%"))


def _add_backup_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """backup and snapshots."""
    backup = sub.add_parser("backup", help="back up now (every discovered target if none is named)")
    backup.add_argument("targets", nargs="*", metavar="TARGET", help="container name")
    snapshots = sub.add_parser("snapshots", help="list snapshots")
    snapshots.add_argument("target", nargs="?", metavar="TARGET")
    snapshots.add_argument("--json", action="store_true", help="print JSON instead of a table")
    snapshots.add_argument("--host", help="only snapshots from this host (default: every host)")
    _add_from(snapshots)
    copy = sub.add_parser("copy", help="copy the snapshots the copies (WATCHER_COPY_TO) lack to them now, then apply "
                                       "each copy's retention")
    copy.add_argument("targets", nargs="*", metavar="TARGET", help="only this container's snapshots (default: all)")


def _add_from(parser: argparse.ArgumentParser) -> None:
    """--from COPY: read a copy (WATCHER_COPY_TO) instead of the primary repository."""
    parser.add_argument("--from", dest="from_copy", metavar="COPY",
                        help="read this copy (a name of WATCHER_COPY_TO) instead of the primary repository")


def _add_restore_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """restore and drill."""
    restore = sub.add_parser(
        "restore", help="restore a snapshot (drops and recreates the database)",
        description="Restores one database from a snapshot into the container of the same name (or --into "
                    "another). `backup-watcher snapshots TARGET` lists the snapshots to choose from.")
    restore.add_argument("target", nargs="?", metavar="TARGET", help="container whose snapshots to restore (its "
                                                                      "name when it was backed up)")
    restore.add_argument("snapshot", nargs="?", default="latest", metavar="SNAPSHOT|latest",
                         help="a snapshot ID as `backup-watcher snapshots` lists it (the short 8-character form "
                              "will do), or latest (the default): the newest snapshot of the database")
    restore.add_argument("--database", help="which database (needed when the target has several)")
    restore.add_argument("--into", metavar="CONTAINER", help="restore into this container instead of TARGET")
    restore.add_argument("--host", help="snapshots of this host (default: WATCHER_HOST or the engine's name)")
    restore.add_argument("--all", action="store_true",
                         help="whole-host recovery: every database --host OLD backed up, into the containers of the "
                              "same names on this engine (roles first, one confirmation, a table of results)")
    restore.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_from(restore)
    drill = sub.add_parser("drill", help="restore drill now: restore the latest snapshot into a throwaway "
                                         "container and check it")
    drill.add_argument("targets", nargs="*", metavar="TARGET", help="container name (default: every target "
                                                                    "without backup-watcher.drill=false)")
    _add_from(drill)


@dataclass
class App:
    """Every long-lived object of one invocation, built once here."""

    config: Config
    masker: Masker
    docker: DockerSource
    repository: Repository
    # Set when a one-shot command is interrupted: every job's pipelines end their processes.
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    # How far the running jobs have come (the terminal's progress lines, the log, metrics, status).
    progress: ProgressBoard = dataclasses.field(default_factory=ProgressBoard)

    @property
    def docker_host(self) -> str:
        """The resolved Docker endpoint."""
        return self.docker.docker_host

    def rules(self) -> DiscoveryRules:
        """The discovery rules the configuration gives."""
        return DiscoveryRules(self.config.container_patterns, self.config.schedule, self.config.retention)

    def showing_progress(self) -> AbstractContextManager[None]:
        """Shows the running jobs' progress while the `with` block runs: live lines when stdout is a
        terminal, else `*_progress` log lines (stdout keeps only the results)."""
        from watcher.progress_display import shown

        return shown(self.progress, terminal=sys.stdout.isatty(), stream=sys.stdout,
                     log_every_s=self.config.progress_log_interval_s)

    def host(self) -> str:
        """The restic --host of this engine's snapshots; raises DockerUnavailable."""
        return self.config.host or self.docker.engine_name()

    def job_context(self) -> JobContext:
        """A JobContext for backups; raises DockerUnavailable."""
        return JobContext(self.docker_host, self.repository, self.host(), self.masker, cancel=self.cancel,
                          bounds=self.config.bounds, progress=self.progress,
                          shrink_threshold=self.config.shrink_threshold, dump_order=self.config.dump_order)


def build_app(config: Config) -> App:
    """Wires the objects; raises UsageError when Docker's endpoint cannot even be set up."""
    masker = Masker(config.secrets)
    try:
        docker_source = DockerSource(config.docker_host)
    except DockerUnavailable as exc:
        raise UsageError(masker(str(exc))) from exc
    repository = Repository(config.restic_binary, config.restic_env, masker,
                            mask_url(config.restic_repository or "(RESTIC_REPOSITORY_FILE)"))
    return App(config, masker, docker_source, repository)


def discover_all(app: App) -> tuple[list[Target], list[Rejected], dict[str, str]]:
    """Discovers every running container; returns targets, rejected ones, and every name → id."""
    rules = app.rules()
    targets: list[Target] = []
    rejected: list[Rejected] = []
    names: dict[str, str] = {}
    for container in app.docker.running_containers():
        names[container.name] = container.id
        found = discover(container, rules)
        if isinstance(found, Target):
            targets.append(found)
        elif isinstance(found, Rejected):
            rejected.append(found)
    return sorted(targets, key=lambda t: t.name), rejected, names


def select_targets(app: App, names: Sequence[str]) -> tuple[list[Target], list[Rejected]]:
    """The discovered targets, or those named; raises UsageError naming a name that is not a target."""
    targets, rejected, known = discover_all(app)
    if not names:
        # Only a command that covers every container speaks of the ones its labels disable.
        for bad in rejected:
            log.error("label_invalid", target=bad.name, error=bad.reason)
        return targets, rejected
    by_name = {t.name: t for t in targets}
    rejected_by_name = {r.name: r for r in rejected}
    chosen = []
    for name in names:
        if name in by_name:
            chosen.append(by_name[name])
        elif name in rejected_by_name:
            raise UsageError(f"{name}: not backed up because of its labels: {rejected_by_name[name].reason}")
        elif name in known:
            raise UsageError(
                f"{name}: not a backup target (its name matches none of WATCHER_CONTAINER_PATTERNS="
                f"{','.join(app.config.container_patterns)} and it has no backup-watcher.enable=true label)"
            )
        else:
            raise UsageError(f"{name}: no running container of that name")
    return chosen, []


def cmd_backup(app: App, args: argparse.Namespace) -> int:
    """Backs up the targets named, or every target; returns 0 when every database's backup succeeded.

    Raises the repository check's error (wrong password, no repository) after whatever did run.
    """
    targets, rejected = select_targets(app, args.targets)
    if not targets and not rejected:
        log.warning("no_targets", patterns=",".join(app.config.container_patterns))
        print("no backup targets found", file=sys.stderr)
        return EXIT_OK
    ctx = app.job_context()
    ctx.repository.version()
    with app.showing_progress():
        batches, check_error = _back_up_all(app, ctx, targets)
    # Backups that never got to run are not reported as failures of their own: the check's error says why.
    results: list[BackupResult] = [result for batch in batches if batch for result in batch
                                   if not result.repository_unverified]
    _print_backup_results(targets, batches, results, rejected)
    if any(result.ok for result in results):
        _ask_daemon_to_refresh(app)
    if check_error is not None:
        # Wrong password, no repository, ...: exit 2 with the check's message, after whatever did run.
        raise check_error
    return EXIT_OK if all(r.ok for r in results) and not rejected else EXIT_FAILED


Batches = list[list[BackupResult] | None]


def _back_up_all(app: App, ctx: JobContext, targets: list[Target]) -> tuple[Batches, BaseException | None]:
    """Backs up `targets` beside the repository check; returns each target's results (None: not
    attempted, the check failed) and the check's error."""
    first_wave = app.config.concurrency
    with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="repository-check") as checker,
          ThreadPoolExecutor(max_workers=app.config.concurrency, thread_name_prefix="backup") as pool):
        # Opening the repository costs restic's key derivation, about half a second of CPU: the check
        # runs beside the first backups instead of before them, and every later backup waits for its
        # verdict. A backup that meets no repository or a wrong password writes nothing.
        check = checker.submit(ctx.repository.ensure, app.config.init_repository)
        unverified = dataclasses.replace(ctx, repository_verified=False)

        def back_up(index: int, target: Target) -> list[BackupResult] | None:
            if index < first_wave:
                return backup_target(unverified, target)
            return None if check.exception() is not None else backup_target(ctx, target)

        batches = list(pool.map(back_up, range(len(targets)), targets))
        check_error = check.exception()
        if check_error is None:
            if check.result():
                log.info("repository_initialised", repository=ctx.repository.label)
            _back_up_unverified_again(ctx, pool, targets, batches)
    return batches, check_error


def _back_up_unverified_again(ctx: JobContext, pool: ThreadPoolExecutor, targets: list[Target],
                              batches: Batches) -> None:
    """Reruns, in place in `batches`, the databases whose backup started before the repository was there.

    Only those: another database of the same target may already have its snapshot.
    """
    again = [(batch, j, target, result.database) for batch, target in zip(batches, targets, strict=True)
             if batch for j, result in enumerate(batch) if result.repository_unverified]
    redone = pool.map(lambda item: backup_one(ctx, item[2], item[3], new_run_id()), again)
    for (rerun_batch, j, _, _), result in zip(again, redone, strict=True):
        rerun_batch[j] = result


def _print_backup_results(targets: list[Target], batches: Batches, results: list[BackupResult],
                          rejected: list[Rejected]) -> None:
    """One line per database backed up, per target not attempted and per target rejected."""
    for target, outcome in zip(targets, batches, strict=True):
        if outcome is None:
            print(f"SKIPPED {target.name}: not attempted, the repository check failed")
    for result in results:
        if result.ok:
            assert result.snapshot_id is not None
            print(f"ok      {result.target}/{result.database}  snapshot {result.snapshot_id[:8]}  "
                  f"{_human_bytes(result.bytes_processed)} in {result.duration_s:.1f}s"
                  + (f"  ({result.note})" if result.note else ""))
        else:
            print(f"FAILED  {result.target}/{result.database}: {result.error}")
    for bad in rejected:
        print(f"FAILED  {bad.name}: bad labels: {bad.reason}")


def cmd_drill(app: App, args: argparse.Namespace) -> int:
    """Drills the targets named, or every target that allows it; returns 0 when every drill passed."""
    targets, _ = select_targets(app, args.targets)
    if not args.targets:
        targets = [t for t in targets if t.drill]
    for target in (t for t in targets if t.engine == "command"):
        print(f"{target.name}: engine=command has no restore drill (its backup is opaque to the watcher)",
              file=sys.stderr)
    targets = [t for t in targets if t.engine != "command"]
    if not targets:
        print("no targets to drill", file=sys.stderr)
        return EXIT_OK
    from watcher.drill import Driller
    from watcher.drill_leftovers import remove_leftovers

    ctx = app.job_context()
    check_repository(ctx, init=False)
    remove_leftovers(app.docker, ctx.host)
    driller = Driller(ctx, app.docker)
    with app.showing_progress():
        results = [result for target in targets for result in driller.drill_target(target)]
    for result in results:
        _print_drill_result(result)
    return EXIT_OK if results and all(r.ok for r in results) else EXIT_FAILED


def _print_drill_result(result: DrillResult) -> None:
    """The drill's verdict on one database, and one line per table compared."""
    snapshot = result.snapshot_id[:8] if result.snapshot_id else "-"
    if result.ok:
        rows = sum(t.restored or 0 for t in result.tables)
        print(f"ok      {result.target}/{result.database}  snapshot {snapshot}  {len(result.tables)} tables, "
              f"{rows} rows, restored in {result.restore_duration_s or 0:.1f}s")
    else:
        print(f"FAILED  {result.target}/{result.database}  snapshot {snapshot}: {result.error}")
    for table in result.tables:
        print(f"          {table.table}: dump {table.in_dump}, restored {table.restored}"
              f"{'' if table.problem is None else '  <-- ' + table.problem}")


def _snapshot_row(snap: Snapshot) -> dict[str, object]:
    return {"id": snap.id, "short_id": snap.short_id, "time": snap.time.isoformat(), "host": snap.host,
            "target": snap.container, "database": snap.database, "bytes": snap.bytes,
            "kind": "globals" if snap.globals else "database", "engine": snap.engine}


def cmd_snapshots(app: App, args: argparse.Namespace) -> int:
    """Lists snapshots as a table or JSON; returns 0."""
    app.repository.version()
    snapshots = app.repository.snapshots(host=args.host, container=args.target, include_globals=True)
    if args.json:
        print(json.dumps([_snapshot_row(s) for s in snapshots], indent=2))
        return EXIT_OK
    rows = [("ID", "TIME (UTC)", "HOST", "TARGET", "DATABASE", "SIZE")]
    for snap in snapshots:
        rows.append((snap.short_id, snap.time.strftime("%Y-%m-%d %H:%M:%S"), snap.host, snap.container,
                     snap.database, _human_bytes(snap.bytes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"{len(snapshots)} snapshot(s)")
    return EXIT_OK


def _human_bytes(size: int | None) -> str:
    """A snapshot's size as the progress line shows sizes ("-" when restic did not say)."""
    from watcher.progress import human_bytes

    return "-" if size is None else human_bytes(size)


def cmd_restore(app: App, args: argparse.Namespace) -> int:
    """Restores a snapshot after confirmation, first creating the roles (PostgreSQL) or users (MariaDB) it needs
    that the destination lacks (from the globals snapshot of the same pass); returns 0 when restored, 1 when
    the restore failed (the live database untouched when the roles could not be had), 2 when not confirmed.
    Raises UsageError for a snapshot or destination that is not there. With --all: whole-host recovery."""
    if args.all:
        from watcher.recovery import recover_host

        return recover_host(app, args)
    from watcher.engines.restoring import restore_one

    snapshot, listed = _restore_snapshot(app, args)
    return restore_one(app, args, snapshot, listed)


def restore_usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a `restore` command line as such (before any engine or repository is asked), or None."""
    if args.all:
        if args.host is None:
            return ("restore --all: name the old host with --host OLD (`backup-watcher snapshots` lists the hosts "
                    "the repository holds)")
        if args.target is not None or args.database or args.into:
            return ("restore --all takes no TARGET, SNAPSHOT, --database or --into: it restores the latest snapshot "
                    "of every database of --host into the container of the same name")
    elif args.target is None:
        return "restore: name the TARGET to restore, or use --all --host OLD to restore every database of a host"
    return None


def roles_sentence(plan: RolePlan, *, future: bool) -> str:
    """What a restore does (`future`) or did about roles: which it creates and which exist already (kept)."""
    kept = f"kept (exist already): {', '.join(plan.keep)}" if plan.keep else "none of them exists already"
    if not plan.create:
        return f"Roles the snapshot needs: {kept}." if plan.keep else "The snapshot needs no role."
    verb = "will be created" if future else "created"
    return f"Roles {verb} from the old host's globals: {', '.join(plan.create)}; {kept}."


@dataclass
class Destination:
    """A running container to restore into: its credentials, and the restorer and role maker bound to it."""

    info: ContainerInfo
    creds: Credentials
    restorer: Restorer
    roles: RoleMaker

    @property
    def id(self) -> str:
        """The container's id."""
        return self.info.id

    def role_plan(self, snapshots: Sequence[Snapshot], listed: Sequence[Snapshot], *,
                  every_role: bool = False) -> RolePlan:
        """The roles to create before restoring `snapshots` here (`listed`: the repository's snapshots, globals
        included); raises RoleError naming a needed role neither here nor in the globals."""
        from watcher.roles import globals_for, plan_roles

        needed: set[str] = set()
        for snapshot in snapshots:
            needed |= self.roles.needed_roles(snapshot, self.id)
        existing = self.roles.existing_roles(self.id, self.creds)
        if needed <= existing and not every_role:
            return plan_roles(needed, existing, None)
        newest = max(snapshots, key=lambda s: s.time)
        source = globals_for(listed, newest)
        globals_ = self.roles.read_globals(source) if source is not None else None
        where = f"globals snapshot {source.short_id} of {source.container} (host {source.host})" if source else ""
        return plan_roles(needed, existing, globals_, every_role=every_role, source=where)


def destination_of(app: App, name: str) -> Destination | None:
    """The running container `name` to restore into, None when there is none; raises DockerUnavailable."""
    from watcher.dbproperties import KnownProperties
    from watcher.restore import Restorer
    from watcher.roles import RoleMaker

    info = app.docker.inspect(name)
    if info is None or not info.running:
        return None
    found = discover(info, app.rules())
    # A destination that is no target (not selected, or its labels rejected) may still name its role.
    user_label = (found.credentials.user if isinstance(found, Target)
                  else (info.labels.get(f"{LABEL_PREFIX}user") or "").strip() or None)
    bounds = app.config.bounds
    if isinstance(found, Target) and found.lock_wait_timeout_s is not None:
        bounds = dataclasses.replace(bounds, lock_wait_s=found.lock_wait_timeout_s)
    # The role plan reads the dump's database entries, properties included, once for the restore too.
    known = KnownProperties()
    return Destination(info, credentials_of(info.env, user_label),
                       Restorer(app.docker_host, app.repository, app.masker, bounds, app.cancel, app.progress, known),
                       RoleMaker(app.docker_host, app.repository, app.masker, bounds, app.cancel, known))


def _restore_snapshot(app: App, args: argparse.Namespace) -> tuple[Snapshot, list[Snapshot]]:
    """The snapshot the restore command names, and every snapshot listed (globals included); raises
    UsageError saying why there is none."""
    from watcher.restore import RestoreError, choose_snapshot

    app.repository.version()
    host = args.host or app.host()
    listed = app.repository.snapshots(include_globals=True)
    everything = [s for s in listed if not s.globals]
    of_target = [s for s in everything if s.container == args.target]
    snapshots = [s for s in of_target if s.host == host]
    if not snapshots:
        raise UsageError(no_snapshots_message(args.target, host, of_target, {s.container for s in everything}))
    try:
        return choose_snapshot(snapshots, args.snapshot, args.database), listed
    except RestoreError as exc:
        raise UsageError(f"{args.target}: {exc}") from exc


def no_snapshots_message(target: str, host: str, of_target: Sequence[Snapshot], containers: set[str]) -> str:
    """Why `target` has no snapshot to restore from `host`, and what to try instead."""
    elsewhere = sorted({s.host for s in of_target})
    if elsewhere:
        return f"{target}: no snapshots from host {host}; snapshots of it exist from host(s) " \
               f"{', '.join(elsewhere)}: use --host"
    close = difflib.get_close_matches(target, sorted(containers), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return (f"{target}: no snapshots of a target of that name in the repository, from any host.{hint} "
            "`backup-watcher snapshots` lists every target and snapshot it holds.")


def confirmed_by_typing(expected: str, question: str) -> bool:
    """Whether the operator answered `question` (a restore's) by typing `expected`; raises UsageError when there is
    no terminal to ask on."""
    if not sys.stdin.isatty():
        raise UsageError("refusing to restore without confirmation: no terminal to ask on (under `docker run` "
                         "or `docker exec`, add -it); pass --yes to restore without asking")
    return input(question).strip() == expected


def cmd_check_config(app: App, args: argparse.Namespace) -> int:
    """Prints the effective configuration, secrets masked; returns 2 when the engine or the repository
    cannot be reached or a selected container's labels are invalid, 0 otherwise."""
    problems: list[str] = []
    try:
        app.docker.engine_name()
        problems.extend(f"container {bad.name}: not backed up: {bad.reason}" for bad in discover_all(app)[1])
    except DockerUnavailable as exc:
        problems.append(str(exc))
    try:
        app.repository.version()
        app.repository.ensure(init=False)
    except ResticError as exc:
        message = str(exc)
        if app.config.init_repository and "does not exist" in message:
            message = ""
        if message:
            problems.append(message)
    problems.extend(_copy_problems(app))
    for key, value in {**effective_config(app.config), **effective_copies(app.config)}.items():
        print(f"{key}={value}")
    if problems:
        print("\nproblems:", file=sys.stderr)
        for problem in problems:
            print(f"  - {app.masker(problem)}", file=sys.stderr)
        return EXIT_USAGE
    print("\nconfiguration OK", file=sys.stderr)
    return EXIT_OK


def _copy_problems(app: App) -> list[str]:
    """Why each copy that cannot be opened cannot (check-config); nothing is created."""
    from watcher.copyjob import CopyTarget, copy_problem

    if not app.config.copies:
        return []
    try:
        ctx = app.job_context()
    except DockerUnavailable:
        return []  # reported with the engine's own problem
    return [problem for spec in app.config.copies
            if (problem := copy_problem(ctx, CopyTarget.of(spec, app.repository, app.config.restic_env),
                                        init=app.config.init_repository)) is not None]


def cmd_run(app: App, args: argparse.Namespace) -> int:
    """The daemon; returns 0 when stopped by a signal. Raises DockerUnavailable, ResticError or UsageError
    (exit 2, at once, paged through Apprise) when it cannot start."""
    from prometheus_client import CollectorRegistry

    from alerting.notify import Notifier
    from alerting.policy import AlertPolicy
    from watcher.clock import SystemClock
    from watcher.daemon import Daemon
    from watcher.metrics import Metrics
    from watcher.registry import Registry

    clock = SystemClock()
    registry = Registry()
    metrics = Metrics(CollectorRegistry(), registry, version=watcher.__version__, clock=lambda: clock.now().timestamp(),
                      progress=app.progress)
    notifier = Notifier(app.config.apprise_urls, app.config.apprise_config, mask=app.masker,
                        on_result=lambda ok: metrics.notifications.labels("success" if ok else "failure").inc())
    # The marker of failed starts is named as main() names it for a configuration error: from the environment
    # with the command line's settings over it (a --repository or --metrics-address given as a flag).
    environ = with_flags(os.environ, settings_given(args))
    try:
        app.docker.check()
        ctx = app.job_context()
        check_repository(ctx, app.config.init_repository)
        metrics.set_restic_version(".".join(map(str, app.repository.version())))
    except (DockerUnavailable, ResticError) as exc:
        reason = app.masker(str(exc))
        log.error("startup_failed", error=reason)
        _page_startup_failure(notifier, startup_alert([reason]), environ)
        raise
    startup_pages(environ).started()
    daemon = Daemon(config=app.config, docker=app.docker, ctx=ctx, registry=registry, metrics=metrics, clock=clock,
                    policy=AlertPolicy(reminder_after=timedelta(hours=24)), notifier=notifier)
    server = _metrics_server(app, metrics, daemon)
    try:
        server.start()
        log.info("metrics_listening", address=f"{app.config.metrics_host}:{server.server_address[1]}")
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: daemon.request_stop())
        notifier.start()
        from watcher.progress_display import shown

        with shown(app.progress, terminal=False, stream=sys.stdout, log_every_s=app.config.progress_log_interval_s):
            return daemon.run()
    finally:
        server.stop()
        notifier.close(timeout=10)


def _metrics_server(app: App, metrics: Metrics, daemon: Daemon) -> MetricsServer:
    """The metrics and health listener, bound but not serving yet; raises UsageError when the address is taken."""
    from watcher.metrics import MetricsServer

    try:
        return MetricsServer(app.config.metrics_host, app.config.metrics_port, metrics.registry,
                             daemon.health, daemon.status, daemon.request_refresh)
    except OSError as exc:
        raise UsageError(f"WATCHER_METRICS_ADDRESS={app.config.metrics_host}:{app.config.metrics_port}: "
                         f"cannot listen: {exc.strerror}") from exc


def cmd_prune(app: App, args: argparse.Namespace) -> int:
    """Applies retention now; returns 0 when forget and prune succeeded."""
    from watcher.retention import apply_retention

    targets, _ = select_targets(app, ())
    ctx = app.job_context()
    check_repository(ctx, init=False)
    result = apply_retention(ctx, targets)
    _ask_daemon_to_refresh(app)
    if not result.ok:
        print(f"prune FAILED: {result.error}")
        return EXIT_FAILED
    print(f"pruned: {result.snapshots_removed} snapshot(s) forgotten in {result.duration_s:.1f}s")
    return EXIT_OK


def cmd_ack(app: App, args: argparse.Namespace) -> int:
    """Tags the newest snapshot of every flagged history of TARGET (or of --database) as acknowledged; returns
    0 when each was tagged (or nothing was flagged), 1 when restic failed. Raises UsageError when TARGET or
    the database has no snapshot of this host."""
    from watcher.anomaly import describe, judge_all

    ctx = app.job_context()
    check_repository(ctx, init=False)
    snapshots = app.repository.snapshots(host=ctx.host, container=args.target, include_globals=True)
    verdicts = judge_all(snapshots, app.config.shrink_threshold)
    known = sorted(database for _, database in verdicts)
    if not verdicts:
        raise UsageError(f"{args.target}: no snapshots of that target from host {ctx.host} (`backup-watcher "
                         "snapshots` lists them; WATCHER_HOST names the host)")
    if args.database is not None and args.database not in known:
        raise UsageError(f"{args.target}: no history of database {args.database!r}; it has {', '.join(known)}")
    chosen = [(database, verdict) for (_, database), verdict in sorted(verdicts.items())
              if verdict.flagged and args.database in (None, database)]
    if not chosen:
        print(f"nothing to acknowledge: no shrunken dump is flagged for {args.target}"
              + (f" {args.database}" if args.database else ""))
        return EXIT_OK
    code = EXIT_OK
    for database, verdict in chosen:
        if not _acknowledge(app, ctx, args.target, database, verdict.snapshot_id or ""):
            code = EXIT_FAILED
            continue
        print(f"acknowledged {describe(database, verdict)}: it is the new normal of {args.target} {database}")
    _ask_daemon_to_refresh(app)
    return code


def _acknowledge(app: App, ctx: JobContext, target: str, database: str, snapshot_id: str) -> bool:
    """Adds the acknowledgement tag to one snapshot; returns whether restic did, printing why not."""
    from watcher import commands
    from watcher.retention import PRUNE_TIMEOUT_SECONDS, deletion_refused, step_problem

    argv = commands.with_lock_wait(commands.restic_add_tag(app.repository.binary, snapshot_id, commands.ACK_TAG),
                                   ctx.bounds.lock_retry_s)
    done = app.repository.run(argv, timeout=PRUNE_TIMEOUT_SECONDS + ctx.bounds.lock_retry_s, cancel=app.cancel)
    # restic wrote the tagged copy before the refusal (and exits 0): the original stays, and with it the flag.
    problem = (ack_refused_problem(target, database, ctx.host) if deletion_refused(done)
               else step_problem(done, ctx.bounds.lock_retry_s))
    if problem is not None:
        print(f"ack FAILED for {target} {database}: {problem}")
        return False
    log.info("size_anomaly_acknowledged", target=target, database=database, snapshot_id=snapshot_id[:8])
    return True


def ack_refused_problem(target: str, database: str, host: str) -> str:
    """Why `ack` could not acknowledge with append-only credentials, and where to run it instead."""
    return ("the repository refused to delete (HTTP 403 Forbidden): these are append-only credentials, and "
            "acknowledging rewrites the snapshot (restic tag writes it anew and deletes the old one). The dump "
            "stays flagged and nothing was removed (a tagged copy was left beside it). Run `backup-watcher ack "
            f"{target} --database {database}` where the credentials may delete, such as on the maintenance host "
            f"that prunes, with WATCHER_HOST={host}")


def _daemon_address(app: App) -> tuple[str, int]:
    """(host, port) of this host's daemon (WATCHER_METRICS_ADDRESS, a wildcard read as loopback)."""
    host = app.config.metrics_host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - reaching our own wildcard listener
        host = "127.0.0.1"
    return host, app.config.metrics_port


def _host_port(host: str, port: int) -> str:
    """HOST:PORT as a URL or a Host header writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _daemon_url(app: App, path: str) -> str:
    """The URL of `path` on this host's daemon (see _daemon_address)."""
    return f"http://{_host_port(*_daemon_address(app))}{path}"


def _daemon_status(app: App) -> list[dict[str, object]] | None:
    """The running daemon's status rows, or None when no daemon answers."""
    import urllib.request

    try:
        with urllib.request.urlopen(_daemon_url(app, "/status"), timeout=5) as response:  # noqa: S310 - http://
            rows = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return rows if isinstance(rows, list) else None


def _ask_daemon_to_refresh(app: App) -> None:
    """Tells a daemon on this host that the repository changed, so that its status and metrics follow at once
    instead of at its next reconcile; no daemon, no harm. One bare HTTP/1.0 request on a socket: urllib.request
    (http.client, email, ssl) would cost every one-shot backup about 15 ms of CPU for one empty POST."""
    host, port = _daemon_address(app)
    request = f"POST /refresh HTTP/1.0\r\nHost: {_host_port(host, port)}\r\nContent-Length: 0\r\n\r\n".encode()
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(request)
            status_line = status_line_of(conn.recv)
    except OSError as exc:
        log.debug("daemon_not_told", reason=str(exc))
        return
    if status_line.split(" ", 2)[1:2] != ["202"]:
        log.debug("daemon_not_told", reason=f"it answered {status_line[:100]!r}")


def status_line_of(recv: Callable[[int], bytes], limit: int = 256, within_s: float = 2.0,
                   clock: Callable[[], float] = time.monotonic) -> str:
    """The first line of an HTTP answer read with `recv` (a socket's, each read bounded by its timeout): at most
    `limit` bytes, without its CRLF, however the answer's bytes are split among reads. No read starts after
    `within_s` seconds: a peer that sends a byte at a time cannot hold a one-shot command. Raises what `recv`
    raises, and TimeoutError when the line did not come in time."""
    head = b""
    deadline = clock() + within_s
    while b"\r\n" not in head and len(head) < limit:
        if clock() > deadline:
            raise TimeoutError(f"the daemon's answer did not come within {within_s:g} s")
        data = recv(limit - len(head))
        if not data:
            break
        head += data
    return head.split(b"\r\n", 1)[0].decode("latin-1")


def cmd_status(app: App, args: argparse.Namespace) -> int:
    from watcher.clock import SystemClock
    from watcher.daemon import survey
    from watcher.status import render_table, status_rows

    rows = _daemon_status(app)
    source = "daemon"
    if rows is None:
        # No daemon answers: show what Docker and the repository say, as the daemon would see it.
        source = "survey (no daemon answered on WATCHER_METRICS_ADDRESS)"
        ctx = app.job_context()
        app.repository.version()
        clock = SystemClock()
        rows = status_rows(survey(app.docker, ctx, app.rules(), clock, app.config.timezone), clock.now())
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(rows))
        print(f"\n{len(rows)} target(s); source: {source}", file=sys.stderr)
    return EXIT_OK


def cmd_copy(app: App, args: argparse.Namespace) -> int:
    """Brings every copy up to date now (only the snapshots of the containers named, if any); returns 0 when
    every copy succeeded. Raises UsageError when no copy is configured or a name has no snapshot."""
    from watcher.copyjob import CopyTarget, run_copy

    if not app.config.copies:
        raise UsageError("copy: no copy is configured: name them in WATCHER_COPY_TO (README, Copies)")
    ctx = app.job_context()
    check_repository(ctx, init=False)
    only = frozenset(args.targets) if args.targets else None
    if only is not None:
        known = {snap.container for snap in ctx.repository.snapshots(host=ctx.host, include_globals=True)}
        if unknown := sorted(only - known):
            raise UsageError(f"{', '.join(unknown)}: no snapshots of that name from host {ctx.host} in the primary "
                             "repository (`backup-watcher snapshots` lists them)")
    with app.showing_progress():
        results = [run_copy(ctx, CopyTarget.of(spec, app.repository, app.config.restic_env),
                            init=app.config.init_repository, only=only) for spec in app.config.copies]
    for result in results:
        if result.ok:
            print(f"ok      {result.copy}: {len(result.copied)} snapshot(s) copied, {result.forgotten} forgotten "
                  f"by its retention, in {result.duration_s:.1f}s")
        else:
            print(f"FAILED  {result.copy}: {result.error}")
    return EXIT_OK if all(result.ok for result in results) else EXIT_FAILED


def read_from_copy(app: App, name: str) -> None:
    """Points `app` at the copy `name` instead of the primary repository (--from); raises UsageError when there
    is no copy of that name."""
    from watcher.copyjob import CopyTarget

    spec = next((spec for spec in app.config.copies if spec.name == name.lower()), None)
    if spec is None:
        names = ", ".join(spec.name for spec in app.config.copies) or "none"
        raise UsageError(f"--from {name}: no copy of that name (WATCHER_COPY_TO names: {names})")
    app.repository = CopyTarget.of(spec, app.repository, app.config.restic_env).repository


COMMANDS = {
    "run": cmd_run,
    "copy": cmd_copy,
    "prune": cmd_prune,
    "ack": cmd_ack,
    "status": cmd_status,
    "backup": cmd_backup,
    "snapshots": cmd_snapshots,
    "restore": cmd_restore,
    "check-config": cmd_check_config,
    "drill": cmd_drill,
}


def _page_configuration_errors(problems: list[str], environ: Mapping[str, str]) -> None:
    """A daemon that cannot start tells its Apprise targets why, if those at least are valid."""
    from alerting.notify import Notifier, url_secret_parts
    from alerting.notify import validate as validate_apprise

    unused: list[str] = []
    given = SETTINGS["WATCHER_APPRISE_URLS"].read(environ, unused) or ()
    urls = [url for url in given if not validate_apprise([url], None)]
    config_path = SETTINGS["WATCHER_APPRISE_CONFIG"].read(environ, unused)
    if config_path and validate_apprise([], config_path):
        config_path = None
    if not urls and not config_path:
        return
    secrets = [part for url in urls for part in url_secret_parts(url)]
    # The page's own log line (notification_sent or _failed) goes to stdout as the daemon's lines do, in their
    # format: left unconfigured, structlog would print it in its console style, the one non-JSON line of a
    # JSON log. A format or level that is itself among the errors falls back to the default.
    log_format = SETTINGS["WATCHER_LOG_FORMAT"].read(environ, unused) or "json"
    log_level = SETTINGS["WATCHER_LOG_LEVEL"].read(environ, unused) or "info"
    logs.configure(log_format, log_level, stream=sys.stdout, mask=Masker(secrets))
    notifier = Notifier(urls, config_path, mask=Masker(secrets), timeout_s=20)
    _page_startup_failure(notifier, startup_alert(problems, "configuration of backup-watcher"), environ)


def startup_pages(environ: Mapping[str, str]) -> StartupPages:
    """The marker of this watcher's failed starts (watcher.startup_page)."""
    from watcher.startup_page import StartupPages, marker_path

    return StartupPages(marker_path(environ), time.time)


def _page_startup_failure(notifier: Notifier, alert: Alert, environ: Mapping[str, str]) -> None:
    """Delivers a failed start's alert unless a failed start of the same cause paged it lately (a restart policy
    starts a failing watcher again and again: watcher.startup_page)."""
    pages = startup_pages(environ)
    if pages.due(alert.body):
        pages.paged(alert.body, delivered=notifier.deliver_now(alert))
    else:
        # Plain words on stderr: before the configuration is read, no log format is set.
        print(f"backup-watcher: not paged again: an earlier start failed the same way and was paged (marker "
              f"{pages.path}); another cause pages at once, this one again after 24 h", file=sys.stderr)


def startup_alert(problems: Sequence[str], what: str = "backup-watcher did not start") -> Alert:
    """The alert of a daemon that did not start, listing why."""
    from alerting.policy import ADVICE, Alert, Concern, Kind

    body = "\n".join(f"- {problem}" for problem in problems)
    return Alert(Kind.FAILED, "backup-watcher", Concern.CONFIG, f"[backup-watcher] FAILED: {what}",
                 f"backup-watcher did not start:\n{body}\n\nWhat to do: {ADVICE[Concern.CONFIG]}")


def _interrupt_on_signals(app: App) -> None:
    """Ctrl-C or SIGTERM ends a one-shot command's jobs, not only its main thread.

    Jobs run on worker threads and their processes in sessions of their own: without the cancel
    event they would run on (and a backup still write its snapshot) after the command said
    "interrupted".
    """
    def interrupt(signum: int, _frame: object) -> None:
        app.cancel.set()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)


def secret_flag_problem(argv: Sequence[str]) -> str | None:
    """Why a command line that gives a secret as a flag (`--restic-password VALUE`) is refused, or None.

    argparse would refuse it too, but in its own words: `invalid choice: 'VALUE'` or `unrecognized
    arguments: --restic-password VALUE`, the secret itself on stderr (the container's log) and no word of
    where a secret goes instead. This message names the flag only.
    """
    secrets = [name for name, row in SETTINGS.items() if row.secret] + list(RESTIC_SECRET_VARIABLES)
    by_flag = {flag_name(name): name for name in secrets}
    known: set[str] | None = None
    for arg in argv:
        if arg == "--":
            break
        flag = arg.partition("=")[0]
        # A copy's password (README, Copies; a copy's name may hold _, its flag a -) or another secret by its
        # variable's flag name.
        copy = re.fullmatch(r"--copy-([a-z0-9][a-z0-9_-]*)-password", flag, re.IGNORECASE)
        name = (f"WATCHER_COPY_{copy.group(1).upper().replace('-', '_')}_PASSWORD" if copy is not None
                else by_flag.get(flag))
        shortened = [by_flag[full] for full in by_flag if full.startswith(flag)] if flag.startswith("--") else []
        if name is None and shortened and len(flag) >= 6:
            # Shortened (--restic-pass): argparse takes no abbreviation, and would echo the value it then finds.
            # Not what may be short for another flag (--restic-re: --restic-repository too) than a secret's _FILE.
            known = _option_strings() if known is None else known
            if all(option.removesuffix("-file") in by_flag for option in known if option.startswith(flag)):
                name = shortened[0]
        if name is None:
            continue
        instead = f"set {name}_FILE to the path of a file that holds it (readable by the watcher only)"
        if f"{name}_FILE" in FLAG_VARIABLES:
            instead += f", or give that path as {flag_name(name + '_FILE')} PATH"
        return (f"{flag}: secrets are never flags (argv is readable by every user of the host, and the value is "
                f"not shown here): {instead}; if the value was a real secret, change it, as it has been visible "
                f"in the process list")
    return None


def _option_strings() -> set[str]:
    """Every option string the parser and its commands' parsers know."""
    found: set[str] = set()
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            found.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit code (0 ok, 1 a job failed, 2 usage or configuration)."""
    if (problem := secret_flag_problem(sys.argv[1:] if argv is None else argv)) is not None:
        print(f"backup-watcher: {problem}", file=sys.stderr)
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    environ = with_flags(os.environ, settings_given(args))
    try:
        config = load_config(environ)
    except ConfigError as exc:
        print("backup-watcher: configuration errors:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        if args.command == "run":
            _page_configuration_errors(exc.problems, environ)
        return EXIT_USAGE
    # The daemon logs to stdout (SPEC §9); one-shot commands keep stdout for their result.
    logs.configure(config.log_format, config.log_level, stream=sys.stdout if args.command == "run" else sys.stderr,
                   mask=Masker(config.secrets))
    return _run_command(config, args)


def _run_command(config: Config, args: argparse.Namespace) -> int:
    """Wires the objects and runs the command; returns its exit code, 2 for a usage, Docker or restic error."""
    app: App | None = None
    try:
        if args.command == "restore" and (problem := restore_usage_problem(args)) is not None:
            raise UsageError(problem)
        app = build_app(config)
        if getattr(args, "from_copy", None):
            read_from_copy(app, args.from_copy)
        if args.command != "run":  # the daemon handles its signals itself
            _interrupt_on_signals(app)
        return COMMANDS[args.command](app, args)
    except (UsageError, DockerUnavailable, ResticError) as exc:
        masker = app.masker if app is not None else Masker(config.secrets)
        print(f"backup-watcher: {masker(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("backup-watcher: interrupted", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if app is not None:
            app.docker.close()
