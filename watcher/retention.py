"""Retention: forget by the configured keeps, per (container, database) history, then prune.

Runs only while no backup runs (the daemon serializes it), so it never competes with one for the
repository's exclusive lock; stale locks left by a crashed restic are cleared first. A host whose
credentials may not delete (append-only) cannot apply retention: restic's refusals are turned into one
sentence that says so (and `restic forget`, which exits 0 when it could not remove a snapshot, fails).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from watcher import commands
from watcher.anomaly import flagged_histories
from watcher.config import Retention
from watcher.discovery import Target
from watcher.execute import Completed
from watcher.jobs import JobContext
from watcher.restic import ResticError, Snapshot, repository_lock_problem, restic_error_text

log = structlog.get_logger("watcher.retention")
# How long forget or prune may run once it holds the lock (its wait for the lock, WATCHER_LOCK_RETRY, comes on top).
PRUNE_TIMEOUT_SECONDS = 6 * 3600.0
APPEND_ONLY_PROBLEM = (
    "the repository refused to delete (HTTP 403 Forbidden): these are append-only credentials (such as a "
    "rest-server started with --append-only), which can back up but not forget or prune. Run "
    "`backup-watcher prune` on the maintenance host whose credentials may delete, and set WATCHER_PRUNE=false "
    "on this host so that its daemon does not try")
# restic's line for a deletion the backend refused: "Remove(<snapshot/3edbef8ae2>) failed: unexpected HTTP
# response (403): 403 Forbidden" (rest-server --append-only); an S3 policy without DeleteObject answers 403 too.
_REFUSED_DELETION = re.compile(r"^Remove\(<[^>]*>\) failed: .*(\(403\)|Forbidden|Access Denied)", re.MULTILINE)


@dataclass(frozen=True)
class PruneResult:
    """What one retention run did."""

    ok: bool
    run_id: str
    duration_s: float
    snapshots_removed: int = 0
    error: str | None = None
    repository_size: int | None = None
    repository_snapshots: int | None = None


def retention_classes(targets: Sequence[Target]) -> dict[Retention, list[str]]:
    """Groups target names by their retention, so one forget call serves each class."""
    classes: dict[Retention, list[str]] = {}
    for target in targets:
        classes.setdefault(target.retention, []).append(target.name)
    return classes


def count_removed(forget_output: str) -> int:
    """How many snapshots `restic forget --json` removed."""
    removed = 0
    for raw_line in forget_output.splitlines():
        line = raw_line.strip()
        if not line.startswith("["):
            continue
        try:
            groups = json.loads(line)
        except ValueError:
            continue
        for group in groups if isinstance(groups, list) else []:
            removed += len(group.get("remove") or []) if isinstance(group, dict) else 0
    return removed


def step_problem(done: Completed, lock_retry_s: float) -> str | None:
    """Returns why a forget or prune step did not do its work (masked, readable), or None when it did.

    A deletion the backend refused (append-only credentials) is named as such whatever restic's exit;
    `restic forget` exits 0 when it could not remove a snapshot, so its stderr is read too. A lock it
    waited for in vain names the bound, `lock_retry_s` (WATCHER_LOCK_RETRY), before restic's words.
    """
    if deletion_refused(done):
        return APPEND_ONLY_PROBLEM
    detail = restic_error_text(done.stderr_tail.splitlines())
    if not done.ok:
        hint = repository_lock_problem(done.returncode, detail, lock_retry_s)
        return "\n".join(part for part in (hint, detail) if part) or done.describe_failure()
    if "unable to remove" in done.stderr_tail:
        return f"some snapshots could not be removed: {detail}"
    return None


def deletion_refused(done: Completed) -> bool:
    """Whether the backend refused restic a deletion (append-only credentials), whatever restic's exit."""
    return _REFUSED_DELETION.search(done.stderr_tail) is not None


def clear_stale_locks(ctx: JobContext) -> None:
    """Removes locks of restic processes that no longer exist (never a live one); logs, never raises."""
    done = ctx.repository.run(commands.restic_unlock(ctx.repository.binary), timeout=300, cancel=ctx.cancel)
    if not done.ok:
        log.warning("unlock_failed", error=done.describe_failure())


@dataclass(frozen=True)
class ForgetScope:
    """One `restic forget` call: containers with one retention, narrowed to some of their histories where
    `histories` says so (commands.restic_forget), grouped by `group_by`."""

    retention: Retention
    containers: list[str]
    histories: dict[str, set[str]]
    group_by: str = commands.GROUP_BY_HISTORY


def forget_scopes(targets: Sequence[Target], snapshots: Sequence[Snapshot], threshold: float) -> list[ForgetScope]:
    """The forget calls that apply each target's retention to this host's `snapshots`.

    A history whose newest snapshot is a flagged shrunken dump (watcher.anomaly) is spared whole: forget
    would otherwise count the small dump among the keeps and drop the last good ones. A history with an
    acknowledged snapshot is forgotten on its own, grouped by host only: restic groups by tags, and the
    acknowledgement's tag would put that snapshot in a group of its own, kept beside the history's keeps.
    Every other history is forgotten with its container's, one call per retention class.
    """
    flagged = flagged_histories(snapshots, threshold)
    acked = {(snap.container, snap.database) for snap in snapshots if snap.acked} - set(flagged)
    apart = set(flagged) | acked
    histories: dict[str, set[str]] = {}
    for snap in snapshots:
        histories.setdefault(snap.container, set()).add(snap.database)
    scopes = []
    for retention, names in retention_classes(targets).items():
        narrowed = {name: {db for db in histories.get(name, set()) if (name, db) not in apart}
                    for name in names if any(container == name for container, _ in apart)}
        kept = [name for name in names if narrowed.get(name, True)]
        if kept:
            scopes.append(ForgetScope(retention, kept, {name: dbs for name, dbs in narrowed.items() if dbs}))
        scopes += [ForgetScope(retention, [name], {name: {db}}, commands.GROUP_BY_HOST)
                   for name, db in sorted(acked) if name in names]
    return scopes


def _log_spared(snapshots: Sequence[Snapshot], threshold: float, run_id: str) -> None:
    for (container, database), verdict in sorted(flagged_histories(snapshots, threshold).items()):
        log.warning("retention_spared", target=container, database=database, run_id=run_id,
                    snapshot_id=(verdict.snapshot_id or "")[:8], bytes=verdict.size, reference_bytes=verdict.reference,
                    reason="its newest dump is a flagged shrunken dump: nothing of this history is forgotten until "
                           f"a dump of normal size follows or `backup-watcher ack {container} --database {database}`")


def apply_retention(ctx: JobContext, targets: Sequence[Target]) -> PruneResult:
    """Forgets snapshots beyond each target's keeps, sparing histories flagged as shrunken, and prunes the
    repository; never raises."""
    run_id = uuid.uuid4().hex[:12]
    bound = log.bind(run_id=run_id)
    started = time.monotonic()
    bound.info("prune_started", targets=len(targets))
    removed = 0

    def failed(step: str, detail: str) -> PruneResult:
        duration = time.monotonic() - started
        error = f"{step} failed: {detail}"  # the runner's stderr tail, masked there
        bound.error("prune_failed", error=error, duration_s=round(duration, 3))
        return PruneResult(False, run_id, duration, removed, error)

    clear_stale_locks(ctx)
    try:
        snapshots = ctx.repository.snapshots(host=ctx.host, include_globals=True)
    except ResticError as exc:
        return failed("listing the snapshots", str(exc))
    _log_spared(snapshots, ctx.shrink_threshold, run_id)
    for scope in forget_scopes(targets, snapshots, ctx.shrink_threshold):
        argv = commands.with_lock_wait(
            commands.restic_forget(ctx.repository.binary, host=ctx.host, containers=scope.containers,
                                   retention=scope.retention, histories=scope.histories, group_by=scope.group_by),
            ctx.bounds.lock_retry_s)
        done = ctx.repository.run(argv, timeout=PRUNE_TIMEOUT_SECONDS + ctx.bounds.lock_retry_s, cancel=ctx.cancel)
        if (problem := step_problem(done, ctx.bounds.lock_retry_s)) is not None:
            return failed("restic forget", problem)
        removed += count_removed(done.stdout.decode(errors="replace"))
    done = ctx.repository.run(
        commands.with_lock_wait(commands.restic_prune(ctx.repository.binary), ctx.bounds.lock_retry_s),
        timeout=PRUNE_TIMEOUT_SECONDS + ctx.bounds.lock_retry_s, cancel=ctx.cancel)
    if (problem := step_problem(done, ctx.bounds.lock_retry_s)) is not None:
        return failed("restic prune", problem)
    size, count = repository_figures(ctx)
    duration = time.monotonic() - started
    bound.info("prune_succeeded", duration_s=round(duration, 3), snapshots_removed=removed,
               repository_bytes=size, repository_snapshots=count)
    return PruneResult(True, run_id, duration, removed, None, size, count)


def repository_figures(ctx: JobContext) -> tuple[int | None, int | None]:
    """The repository's packed size and snapshot count, or None where restic could not tell."""
    done = ctx.repository.run(commands.restic_stats(ctx.repository.binary), timeout=600, cancel=ctx.cancel)
    if not done.ok:
        log.warning("repository_stats_failed", error=done.describe_failure())
        return None, None
    try:
        stats = json.loads(done.stdout)
    except ValueError:
        return None, None
    size = stats.get("total_size")
    count = stats.get("snapshots_count")
    return (int(size) if isinstance(size, int) else None, int(count) if isinstance(count, int) else None)
