"""Whole-host recovery (SPEC §10): `restore --all --host OLD` rebuilds every database OLD backed up, of every
engine.

For each container OLD backed up, the container of the same name on this engine (started by the user,
from the same image and env) receives, first, every role (PostgreSQL) or user (MariaDB) of its globals that
it lacks (from the globals snapshot of the pass of its newest database snapshot; existing ones are never
altered), then the latest snapshot from OLD of each of its databases; an engine=command container receives
its latest snapshot through its restore command. Everything is planned and shown first, with one
confirmation for the whole list; a container that is missing, not ready, whose roles or users cannot be
had, or (engine=command) that defines no restore command is named in the result table with what to do,
never skipped silently, and makes the exit status 1. Each container's work is a watcher.engines.restoring
Step, as for `restore` of one snapshot.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import structlog

from watcher.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, App, UsageError, confirmed_by_typing
from watcher.engines.restoring import Preview, Step, StepFailed, step_for
from watcher.restic import Snapshot

log = structlog.get_logger("watcher.recovery")


@dataclass
class ContainerPlan:
    """One container of the old host: its databases' latest snapshots, and what stands in the way."""

    name: str
    snapshots: list[Snapshot]
    step: Step | None = None
    preview: Preview | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One row of the result table."""

    container: str
    database: str
    snapshot: str
    ok: bool
    detail: str


def latest_by_container(snapshots: list[Snapshot], host: str) -> dict[str, list[Snapshot]]:
    """container → the latest snapshot from `host` of each of its databases (by database name)."""
    latest: dict[tuple[str, str], Snapshot] = {}
    for snap in snapshots:
        key = (snap.container, snap.database)
        if snap.host == host and not snap.globals and (key not in latest or snap.time > latest[key].time):
            latest[key] = snap
    grouped: dict[str, list[Snapshot]] = {}
    for (container, _), snap in sorted(latest.items()):
        grouped.setdefault(container, []).append(snap)
    return grouped


def recover_host(app: App, args: argparse.Namespace) -> int:
    """`restore --all --host OLD [--yes]` (its command line checked by cli.restore_usage_problem); returns 0 when
    every database was restored, 1 when any was not, 2 when not confirmed. Raises UsageError for a host with
    no snapshots, or when there is no terminal to confirm on and no --yes."""
    app.repository.version()
    listed = app.repository.snapshots(include_globals=True)
    grouped = latest_by_container(listed, args.host)
    if not grouped:
        hosts = sorted({s.host for s in listed})
        raise UsageError(f"no snapshots from host {args.host} in the repository; it holds snapshots of host(s) "
                         f"{', '.join(hosts) or 'none'}")
    plans = [_plan(app, name, snaps, listed) for name, snaps in grouped.items()]
    _show(plans, args.host)
    if not any(plan.problem is None for plan in plans):
        return _report([outcome for plan in plans for outcome in _not_done(plan)])
    if not args.yes and not confirmed_by_typing(
            args.host, f"Type the old host's name ({args.host}) to restore all of the above: "):
        print("not confirmed; nothing was changed", file=sys.stderr)
        return EXIT_USAGE
    outcomes: list[Outcome] = []
    with app.showing_progress():
        for plan in plans:
            outcomes += _not_done(plan) if plan.problem is not None else _recover(app, plan)
    return _report(outcomes)


def _plan(app: App, name: str, snapshots: list[Snapshot], listed: list[Snapshot]) -> ContainerPlan:
    """What restoring one container's databases takes; a problem is kept in the plan, never raised."""
    plan = ContainerPlan(name, snapshots)
    try:
        plan.step = step_for(app, name, snapshots, listed, whole_host=True)
        plan.preview = plan.step.prepare()
    except StepFailed as exc:
        plan.problem = app.masker(str(exc))
    return plan


def _show(plans: list[ContainerPlan], host: str) -> None:
    """The whole list, before the one confirmation."""
    print(f"Whole-host recovery of host {host} into the containers of the same names on this engine:",
          file=sys.stderr)
    for plan in plans:
        print(f"  {plan.name}:", file=sys.stderr)
        if plan.problem is not None or plan.preview is None:
            print(f"    CANNOT be restored: {plan.problem}", file=sys.stderr)
            continue
        if plan.preview.accounts:
            print(f"    {plan.preview.accounts}", file=sys.stderr)
        for snap, fate in zip(plan.snapshots, plan.preview.fates, strict=True):
            print(f"    {snap.database!r} from snapshot {snap.short_id} ({snap.time:%Y-%m-%d %H:%M:%S} UTC): {fate}",
                  file=sys.stderr)


def _not_done(plan: ContainerPlan) -> list[Outcome]:
    return [Outcome(plan.name, snap.database, snap.short_id, False, plan.problem or "not restored")
            for snap in plan.snapshots]


def _recover(app: App, plan: ContainerPlan) -> list[Outcome]:
    """Roles or users first, then every database of one container; one outcome per database."""
    assert plan.step is not None
    results = plan.step.run(lambda said: print(f"{plan.name}: {said}", file=sys.stderr))
    return [Outcome(plan.name, r.snapshot.database, r.snapshot.short_id, r.ok, r.detail) for r in results]


def _report(outcomes: list[Outcome]) -> int:
    """The result table on stdout; returns 0 when every database was restored, else 1."""
    rows = [("CONTAINER", "DATABASE", "SNAPSHOT", "RESULT", "DETAIL")]
    rows += [(o.container, o.database, o.snapshot, "ok" if o.ok else "FAILED", o.detail.splitlines()[0] if o.detail
              else "") for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)), row[4]]).rstrip())
    failed = sum(not o.ok for o in outcomes)
    print(f"{len(outcomes) - failed} of {len(outcomes)} database(s) restored", file=sys.stderr)
    if failed:
        log.error("host_recovery_incomplete", restored=len(outcomes) - failed, failed=failed)
    else:
        log.info("host_recovered", restored=len(outcomes), failed=0)
    return EXIT_OK if not failed else EXIT_FAILED
