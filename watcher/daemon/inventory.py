"""The inventory: containers → targets in the registry, by events and by reconciling a full listing.

It registers targets (with their first run: now when a slot was missed, catch-up), follows
renames, stops and destroys, and keeps the newest snapshot of every (container, database) the
repository holds, for the catch-up of targets registered later. Each call returns the changes it
made (`watcher.daemon.messages.Change`); the loop hands them to the book of jobs and to the
outcomes. It is also the `status` command's survey when no daemon answers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Protocol

import structlog

from watcher.anomaly import History, SizeVerdict, follow, judge_all
from watcher.clock import Clock
from watcher.commands import GLOBALS_DATABASE
from watcher.daemon.messages import Change, LabelsJudged, Registered, Removed, Renamed, SizeJudged
from watcher.discovery import ContainerInfo, DiscoveryRules, Rejected, Target, discover
from watcher.docker_source import DockerUnavailable
from watcher.events import ContainerEvent
from watcher.execute import Masker
from watcher.jobs import JobContext
from watcher.registry import DatabaseState, Registry, TargetState, judged_snapshot_time
from watcher.restic import ResticError, Snapshot
from watcher.schedule import first_run, interval_seconds, previous_run

log = structlog.get_logger("watcher.daemon")
Newest = dict[tuple[str, str], Snapshot]  # (container, database) → its newest snapshot


def newest_by_database(snapshots: Iterable[Snapshot]) -> Newest:
    """The newest snapshot of each (container, database)."""
    newest: Newest = {}
    for snap in snapshots:
        key = (snap.container, snap.database)
        if key not in newest or snap.time > newest[key].time:
            newest[key] = snap
    return newest


def known_databases(target: Target, newest: Newest, timezone: str,
                    sizes: dict[History, SizeVerdict] | None = None) -> dict[str, DatabaseState]:
    """The databases of a target being registered, with the newest snapshot of each in the repository.

    For `databases=all`, only those of the latest pass, which began at or after the slot before its
    newest snapshot: an older history is of a database dropped since (or missing for two passes),
    which the next listing would drop again.
    """
    cached = {db: snap for (container, db), snap in newest.items() if container == target.name}
    if target.all_databases and cached:
        cutoff = previous_run(target.schedule, max(snap.time for snap in cached.values()), timezone)
        cached = {db: snap for db, snap in cached.items() if snap.time >= cutoff}
    names = sorted(cached) if target.all_databases else list(target.databases)
    if not target.all_databases and GLOBALS_DATABASE in cached:
        # Judged like a database once the repository has them (a repository from before globals has none).
        names.append(GLOBALS_DATABASE)
    judged = sizes or {}
    return {db: DatabaseState(last_snapshot=cached[db].time if db in cached else None,
                              last_snapshot_id=cached[db].id if db in cached else None,
                              size_anomaly=judged[(target.name, db)].flagged if (target.name, db) in judged else None)
            for db in names}


def size_changes(known: dict[History, SizeVerdict], snapshots: Iterable[Snapshot], threshold: float, *,
                 complete: bool) -> dict[History, SizeVerdict]:
    """The histories whose verdict `snapshots` change, with their new verdicts.

    `complete`: they are a full listing of the host's snapshots (an `ack` rewrote one, a one-shot backup
    added some): each history's verdict is judged anew from it, unless the daemon knows a newer snapshot of
    it than the listing has (a backup that ended while it was listed). Otherwise they are new snapshots
    (a backup's), each following the history's verdict.
    """
    changed: dict[History, SizeVerdict] = {}
    if complete:
        for key, verdict in judge_all(snapshots, threshold).items():
            before = known.get(key)
            stale = before is not None and before.at is not None and verdict.at is not None and verdict.at < before.at
            if not stale and verdict != before:
                changed[key] = verdict
        return changed
    for snap in sorted(snapshots, key=lambda s: s.time):
        key = (snap.container, snap.database)
        before = changed.get(key, known.get(key))
        if before is None or before.at is None or snap.time > before.at:
            changed[key] = follow(before or SizeVerdict(), snap, threshold)
    return changed


class Containers(Protocol):
    """What the inventory asks Docker (watcher.docker_source.DockerSource)."""

    def inspect(self, container: str) -> ContainerInfo | None:
        """One container's facts, None if it does not exist; raises DockerUnavailable."""
        ...

    def list_all(self) -> list[tuple[str, str, bool]]:
        """(id, name, running) of every container; raises DockerUnavailable."""
        ...


class Inventory:
    """Keeps the registry in line with the containers; only the loop's thread calls it."""

    def __init__(self, docker: Containers, rules: DiscoveryRules, registry: Registry, clock: Clock,
                 timezone: str, masker: Masker, shrink_threshold: float = 0.5) -> None:
        self.docker = docker
        self.rules = rules
        self.registry = registry
        self.clock = clock
        self.timezone = timezone
        self.masker = masker
        self._ignored: dict[str, str] = {}  # id → name of containers (running or not) that are not selected
        self._newest: Newest = {}
        self._sizes: dict[History, SizeVerdict] = {}
        self.shrink_threshold = shrink_threshold

    # --- the repository's side ------------------------------------------------------------
    def load(self, snapshots: Iterable[Snapshot]) -> int:
        """Takes the repository's listing as the newest snapshots known; returns how many histories."""
        self._newest = newest_by_database(snapshots)
        return len(self._newest)

    def judge_sizes(self, snapshots: Iterable[Snapshot], *, complete: bool, at_start: bool = False) -> list[Change]:
        """Judges the dumps' sizes (see `size_changes`); records each changed verdict in the registry and
        returns them as changes."""
        changed = size_changes(self._sizes, list(snapshots), self.shrink_threshold, complete=complete)
        by_name = _targets_by_name(self.registry)
        judged: list[Change] = []
        for (container, database), verdict in sorted(changed.items()):
            previous = self._sizes.get((container, database))
            self._sizes[(container, database)] = verdict
            entry = _backing_up(by_name, container, database)
            if entry is not None:
                self.registry.record_size_anomaly(entry.container_id, database, verdict.flagged)
            if verdict.flagged or (previous is not None and previous.flagged):
                judged.append(SizeJudged(container, database, verdict, previous, at_start))
        return judged

    def take_snapshots(self, snapshots: Iterable[Snapshot]) -> None:
        """Takes newer snapshots (never older ones) into the cache and the registry."""
        by_name = _targets_by_name(self.registry)
        for key, snap in newest_by_database(snapshots).items():
            known = self._newest.get(key)
            if known is not None and known.time >= snap.time:
                continue
            self._newest[key] = snap
            container, database = key
            entry = _backing_up(by_name, container, database)
            if entry is not None:
                self.registry.record_snapshot(entry.container_id, database, snap.time, snap.id)

    # --- the containers' side -------------------------------------------------------------
    def event(self, event: ContainerEvent) -> list[Change]:
        """Follows one container event (the stream asks for no other actions than these)."""
        match event.action:
            case "start" | "health_status":
                return self.observe(event.container_id)
            case "rename":
                return self.observe(event.container_id, old_name=event.old_name)
            case "die" | "stop":
                return self.stopped(event.container_id)
            case "destroy":
                return self.destroyed(event.container_id)
            case _:
                return []

    def observe(self, container_id: str, old_name: str | None = None) -> list[Change]:
        """Inspects one container and brings its entry up to date."""
        try:
            info = self.docker.inspect(container_id)
        except DockerUnavailable as exc:
            log.warning("inspect_failed", container_id=container_id[:12], error=str(exc))
            return []
        if info is None:
            return self.destroyed(container_id)
        try:
            if not info.running:
                existing = self.registry.get(container_id)
                if existing is not None and existing.name == info.name:
                    return self.stopped(container_id)
                # Found stopped (not back after a reboot), a selected container is a stopped target whose snapshots'
                # age is judged; renamed while stopped, it follows its name, or a newcomer of the old name (`docker
                # rename db db-old; docker run --name db`) would share it, and lose its state with db-old.
                changes = [*self.register(info, old_name), *self.stopped(container_id)]
                entry = self.registry.get(container_id)
                return [replace(change, entry=entry) if isinstance(change, Registered) and entry is not None
                        else change for change in changes]
            return self.register(info, old_name)
        except Exception as exc:
            # Whatever one container's attributes trip, it must cost that container, not the
            # loop that backs up all the others (and, under a restart policy, a crash loop).
            log.exception("target_registration_failed", target=info.name, container_id=info.id[:12],
                          error=self.masker(f"{type(exc).__name__}: {exc}"))
            return []

    def stopped(self, container_id: str) -> list[Change]:
        """The container stopped: its entry stays, without backups."""
        entry = self.registry.mark_stopped(container_id)
        if entry is not None:
            log.info("target_stopped", target=entry.name)
        return []

    def destroyed(self, container_id: str) -> list[Change]:
        """The container is gone: so is its entry (its snapshots stay in the repository)."""
        self._ignored.pop(container_id, None)
        entry = self.registry.remove(container_id)
        if entry is not None:
            log.info("target_removed", target=entry.name, reason="container destroyed")
        return [Removed(container_id, entry.name if entry is not None else None, destroyed=True)]

    def reconcile(self, reason: str) -> list[Change] | None:
        """Brings the registry in line with a full container list (idempotent by container id);
        returns the changes, or None when the list could not be had."""
        try:
            listing = self.docker.list_all()
        except DockerUnavailable as exc:
            log.warning("reconcile_failed", reason=reason, error=str(exc))
            return None
        changes: list[Change] = []
        seen: set[str] = set()
        for container_id, name, running in listing:
            seen.add(container_id)
            changes += self._compare(container_id, name, running)
        for container_id in self.registry.ids() - seen:
            changes += self.destroyed(container_id)
        for container_id in set(self._ignored) - seen:
            del self._ignored[container_id]
        log.debug("reconciled", reason=reason, containers=len(listing), targets=len(self.registry.ids()))
        return changes

    def _compare(self, container_id: str, name: str, running: bool) -> list[Change]:
        entry = self.registry.get(container_id)
        if entry is None:
            return self.observe(container_id) if self._ignored.get(container_id) != name else []
        if entry.name != name or (running and entry.stopped):
            return self.observe(container_id, old_name=entry.name if entry.name != name else None)
        if not running and not entry.stopped:
            return self.stopped(container_id)
        return []

    # --- registration ---------------------------------------------------------------------
    def register(self, info: ContainerInfo, old_name: str | None = None) -> list[Change]:
        """Brings the entry of one running container in line with its facts (`old_name`: it was renamed)."""
        found = discover(info, self.rules)
        existing = self.registry.get(info.id)
        if existing is not None and old_name is None and existing.name != info.name:
            old_name = existing.name
        if found is None:
            return self._unselected(info, existing)
        self._ignored.pop(info.id, None)
        if isinstance(found, Rejected):
            if existing is None or existing.rejected != found:
                log.error("label_invalid", target=found.name, error=found.reason)
            self.registry.reject(info.id, info.name, found)
            return [LabelsJudged(found.name, found.reason)]
        changes: list[Change] = [LabelsJudged(found.name, None)]
        if old_name is not None and old_name != info.name:
            changes.append(self._rename(info.id, old_name, info.name))
        if (existing is None or existing.target != found or existing.stopped
                or existing.rejected is not None):
            changes.append(self._add(info, found, existing))
        return changes

    def _unselected(self, info: ContainerInfo, existing: TargetState | None) -> list[Change]:
        self._ignored[info.id] = info.name
        if existing is None:
            return []
        self.registry.remove(info.id)
        log.info("target_removed", target=existing.name, reason="no longer selected")
        return [Removed(info.id, existing.name, destroyed=False)]

    def _rename(self, container_id: str, old_name: str, new_name: str) -> Change:
        log.info("target_renamed", target=new_name, old_name=old_name)
        for container, database in list(self._newest):
            if container == old_name:
                self._newest[(new_name, database)] = self._newest.pop((container, database))
        for container, database in list(self._sizes):
            if container == old_name:
                self._sizes[(new_name, database)] = self._sizes.pop((container, database))
        self.registry.rename(container_id, new_name)
        return Renamed(container_id, old_name, new_name)

    def _add(self, info: ContainerInfo, found: Target, existing: TargetState | None) -> Change:
        now = self.clock.now()
        databases = known_databases(found, self._newest, self.timezone, self._sizes)
        when = first_run(found.schedule, self.timezone, judged_snapshot_time(found.all_databases, databases), now)
        entry = self.registry.register(TargetState(
            container_id=info.id, name=info.name, target=found, next_run=when,
            interval_s=interval_seconds(found.schedule, self.timezone, now),
            databases={**databases, **(existing.databases if existing else {})},
            consecutive_failures=existing.consecutive_failures if existing else 0,
            running_job=existing.running_job if existing else False,
            last_error=existing.last_error if existing else None,
            registered_at=existing.registered_at if existing and existing.registered_at else now,
        ))
        log.info("target_registered", target=info.name, container_id=info.id[:12], schedule=found.schedule,
                 next_run=when.isoformat(), catch_up=when == now,
                 databases="all" if found.all_databases else ",".join(found.databases))
        return Registered(entry, now)


def _targets_by_name(registry: Registry) -> dict[str, TargetState]:
    """The registry's selected entries by container name."""
    return {entry.name: entry for entry in registry.view() if entry.target is not None}


def _backing_up(by_name: dict[str, TargetState], container: str, database: str) -> TargetState | None:
    """The target entry named `container` that backs up `database` (its globals always), None when none does."""
    entry = by_name.get(container)
    if entry is None or entry.target is None:
        return None
    target = entry.target
    return entry if target.all_databases or database in target.databases or database == GLOBALS_DATABASE else None


def survey(docker: Containers, ctx: JobContext, rules: DiscoveryRules, clock: Clock,
           timezone: str) -> tuple[TargetState, ...]:
    """What the daemon would know from the repository and a container list, without running anything."""
    registry = Registry()
    inventory = Inventory(docker, rules, registry, clock, timezone, ctx.masker)
    try:
        inventory.load(ctx.repository.snapshots(host=ctx.host, include_globals=True))
    except ResticError as exc:
        log.error("snapshot_listing_failed", error=str(exc))
    inventory.reconcile("survey")
    return registry.view()
