"""The copy job (SPEC §12): bring one copy up to date with the primary repository, then apply its retention.

One run: open the copy (initialised on first use with the primary's chunker parameters, when
WATCHER_INIT_REPOSITORY allows, so that copied data deduplicates), list this host's snapshots in both,
`restic copy` the ones the copy lacks (`watcher.copies.missing`; streamed one by one, `restic dump | restic
backup`, where the two repositories' backend variables clash), then forget by the copy's own keeps and
prune it, unless WATCHER_COPY_<NAME>_PRUNE=false (an append-only copy). Never raises: every outcome is a
CopyResult.

Environments: every restic process on the copy alone gets the copy's environment only
(`watcher.copyconfig.copy_env`); `restic copy` and `init --copy-chunker-params`, which open both, get the
copy's plus the primary's under restic's RESTIC_FROM_* names (`transfer_env`). No secret reaches argv.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from watcher import commands, engines
from watcher.config import Retention
from watcher.copies import History, HistoryProgress, missing, progress
from watcher.copyconfig import CopySpec, copy_env, transfer_env
from watcher.execute import Completed
from watcher.jobs import JobContext
from watcher.progress import CopyOutput, first_writer
from watcher.restic import EXIT_NO_REPOSITORY, EXIT_WRONG_PASSWORD, Repository, ResticError, Snapshot
from watcher.retention import PRUNE_TIMEOUT_SECONDS, count_removed, step_problem
from watcher.settings import mask_url

log = structlog.get_logger("watcher.copies")


@dataclass(frozen=True)
class CopyResult:
    """What one run of a copy did: the snapshots it copied, each history's progress as it left it (None when the
    copy could not even be listed), and why it failed, if it did."""

    copy: str
    ok: bool
    run_id: str
    duration_s: float
    copied: tuple[Snapshot, ...] = ()
    progress: Mapping[History, HistoryProgress] | None = None
    error: str | None = None
    forgotten: int = 0
    initialised: bool = False


@dataclass
class CopyTarget:
    """One copy as jobs use it: its settings and the restic runners of its two environments."""

    spec: CopySpec
    repository: Repository  # the copy alone
    transfer: Repository  # the copy, with the primary as restic's source (RESTIC_FROM_*)
    store: Repository  # the copy alone, reading --time as UTC (the backup of a streamed copy)
    label: str = field(default="")

    @classmethod
    def of(cls, spec: CopySpec, primary: Repository, restic_env: Mapping[str, str]) -> CopyTarget:
        """The runners of `spec`, with the primary's binary and masker (which masks every copy's secrets too)."""
        label = f"copy {spec.name} ({mask_url(spec.repository)})"
        alone = copy_env(restic_env, spec)
        return cls(spec, Repository(primary.binary, alone, primary.masker, label),
                   Repository(primary.binary, {**transfer_env(restic_env, spec), **commands.RESTIC_COPY_PROGRESS_ENV},
                              primary.masker, label),
                   Repository(primary.binary, {**alone, **commands.RESTIC_TIME_ENV}, primary.masker, label), label)


class CopyFailed(Exception):
    """A step of a copy run failed; the message is masked and names the copy and the step."""


def _open(ctx: JobContext, target: CopyTarget, init: bool) -> bool:
    """Opens the copy within its open bound (a backend that is down fails here, not after restic's 15 minutes
    of retries); initialises it when it does not exist and `init`. Returns True when initialised now; raises
    CopyFailed."""
    bound = target.spec.open_timeout_s
    done = target.repository.run(commands.restic_cat_config(target.repository.binary), timeout=bound,
                                 cancel=ctx.cancel)
    if done.ok:
        return False
    if done.returncode == EXIT_NO_REPOSITORY and init:
        # A streamed copy's data all enters by `restic backup`, chunked by its own parameters: plain init.
        runner, argv = ((target.repository, commands.restic_init(target.repository.binary)) if target.spec.streamed
                        else (target.transfer, commands.restic_init_copy_chunker_params(target.repository.binary)))
        created = runner.run(argv, timeout=max(bound, 300.0), cancel=ctx.cancel)
        if not created.ok:
            raise CopyFailed(target.repository.failure("initialising", created))
        return True
    if done.timed_out:
        raise CopyFailed(f"opening {target.label} failed: no answer within {bound:.0f}s "
                         f"({target.spec.prefix}OPEN_TIMEOUT); is its backend up?")
    if done.returncode == EXIT_WRONG_PASSWORD:
        raise CopyFailed(f"opening {target.label} failed: wrong password (check {target.spec.prefix}PASSWORD / "
                         f"{target.spec.prefix}PASSWORD_FILE: it is not this copy's password)")
    if done.returncode == EXIT_NO_REPOSITORY:
        raise CopyFailed(f"{target.label} does not exist: create it with `restic init --copy-chunker-params "
                         "--from-repo PRIMARY`, or set WATCHER_INIT_REPOSITORY=true")
    raise CopyFailed(target.repository.failure("opening", done))


def copy_problem(ctx: JobContext, target: CopyTarget, *, init: bool) -> str | None:
    """Why the copy cannot be opened (masked), or None when it opens, or does not exist yet and `init` allows
    creating it at its first run (check-config: nothing is created here)."""
    done = target.repository.run(commands.restic_cat_config(target.repository.binary),
                                 timeout=target.spec.open_timeout_s, cancel=ctx.cancel)
    if done.ok or (done.returncode == EXIT_NO_REPOSITORY and init):
        return None
    try:
        _open(ctx, target, init=False)
    except CopyFailed as exc:
        return ctx.masker(str(exc))
    return None


def _listings(ctx: JobContext, target: CopyTarget,
              only: frozenset[str] | None) -> tuple[list[Snapshot], list[Snapshot]]:
    """This host's snapshots (globals included) in the primary and in the copy, of the containers `only` names
    (None: of every container); raises CopyFailed."""
    try:
        primary = ctx.repository.snapshots(host=ctx.host, include_globals=True)
        copy = target.repository.snapshots(host=ctx.host, include_globals=True,
                                           timeout=max(target.spec.open_timeout_s, 60.0))
    except ResticError as exc:
        raise CopyFailed(str(exc)) from exc
    if only is not None:
        primary = [snap for snap in primary if snap.container in only]
    return primary, copy


def _transfer(ctx: JobContext, target: CopyTarget, todo: list[Snapshot]) -> None:
    """`restic copy` of `todo` from the primary into the copy (streamed one by one where `restic copy` cannot
    carry both repositories' credentials), on the progress board as one job (its size: the snapshots' sizes);
    raises CopyFailed."""
    total = sum(snapshot.bytes or 0 for snapshot in todo)
    with ctx.progress.track("copy", target.spec.name, f"{len(todo)} snapshot(s)", total=total or None) as tracker:
        if target.spec.streamed:
            before = 0
            for snapshot in todo:
                _stream(ctx, target, snapshot, first_writer(tracker, before))
                before += snapshot.bytes or 0
            return
        argv = commands.with_lock_wait(commands.restic_copy(target.repository.binary, [s.id for s in todo]),
                                       ctx.bounds.lock_retry_s)
        output = CopyOutput({snapshot.id: snapshot.bytes or 0 for snapshot in todo}, tracker)
        done = target.transfer.run(argv, timeout=ctx.bounds.dump_s + ctx.bounds.lock_retry_s, cancel=ctx.cancel,
                                   on_stdout_line=output.line)
    if not done.ok:
        raise CopyFailed(target.repository.failure("copying snapshots to", done))


def _poke(fifo: Path, flags: int) -> None:
    """Opens and closes one end of the FIFO without waiting: the process blocked opening (or using) the other
    end then goes on, to an end of stream (a reader) or a broken pipe (a writer)."""
    with contextlib.suppress(OSError):  # ENXIO: no reader has opened its end yet
        os.close(os.open(fifo, flags | os.O_NONBLOCK))


def _both(fifo: Path, dump: Callable[[], Completed], store: Callable[[], Completed]) -> tuple[Completed, Completed]:
    """Runs the dump into the FIFO and the backup out of it side by side, each bounded by its own run; when one
    ends while the other still waits on the FIFO for it, the FIFO's other end is poked so that it ends too (a
    short stream fails the relay: the copy keeps nothing)."""
    results: dict[str, Completed] = {}
    dumping = threading.Thread(target=lambda: results.update(dumped=dump()), name="copy-dump")
    storing = threading.Thread(target=lambda: results.update(stored=store()), name="copy-store")
    dumping.start()
    storing.start()
    while dumping.is_alive() or storing.is_alive():
        if not dumping.is_alive() and not results["dumped"].ok:
            _poke(fifo, os.O_WRONLY)
        elif not storing.is_alive():
            _poke(fifo, os.O_RDONLY)
        dumping.join(0.1)
        storing.join(0.1 if not dumping.is_alive() else 0)
    return results["dumped"], results["stored"]


def stored_as(snapshot: Snapshot) -> tuple[str, tuple[str, ...]]:
    """The file path and tags a snapshot is stored under: as restic listed them, or else (a snapshot not read
    from a listing) as its engine writes them. A copy that dropped the engine tag or the engine's file suffix
    would be restored as a PostgreSQL dump (SPEC §13)."""
    if snapshot.path is not None and snapshot.tags:
        return snapshot.path, snapshot.tags
    if snapshot.globals:
        return "/" + commands.GLOBALS_FILENAME, commands.globals_tags(snapshot.container, snapshot.engine)
    suffix = engines.engine_named(snapshot.engine).dump_suffix
    return ("/" + commands.dump_filename(snapshot.database, suffix),
            commands.snapshot_tags(snapshot.container, snapshot.database, snapshot.engine))


def _stream(ctx: JobContext, target: CopyTarget, snapshot: Snapshot,
            on_tick: Callable[[Sequence[int]], None] | None = None) -> None:
    """One snapshot streamed from the primary into the copy: `restic dump` into a FIFO with the primary's
    environment, `restic backup --stdin-from-command` of the relay (watcher.copyrelay) with the copy's, keeping
    the snapshot's host, tags, file name and time; `on_tick` samples the dump (progress). Raises CopyFailed."""
    if snapshot.bytes is None:
        raise CopyFailed(f"snapshot {snapshot.short_id} of {snapshot.container}/{snapshot.database} states no "
                         "size (made by restic < 0.17?): it cannot be streamed with its integrity checked")
    binary, timeout = target.repository.binary, ctx.bounds.dump_s + ctx.bounds.lock_retry_s
    path, tags = stored_as(snapshot)
    with tempfile.TemporaryDirectory(prefix="backup-watcher-copy-") as private:  # mode 0700
        fifo = Path(private, "stream")
        os.mkfifo(fifo, 0o600)
        backup = commands.with_lock_wait(commands.restic_backup_copied(
            binary, host=snapshot.host, path=path, tags=tags,
            source=commands.copy_relay(str(fifo), snapshot.bytes), snapshot_time=snapshot.time),
            ctx.bounds.lock_retry_s)
        dump = commands.restic_dump_into(binary, snapshot.id, path, str(fifo))
        dumped, stored = _both(fifo, lambda: ctx.repository.run(dump, timeout=timeout, cancel=ctx.cancel,
                                                                on_tick=on_tick),
                               lambda: target.store.run(backup, timeout=timeout, cancel=ctx.cancel))
    what = f"snapshot {snapshot.short_id} of {snapshot.container}/{snapshot.database}"
    if not dumped.ok:
        raise CopyFailed(ctx.repository.failure(f"dumping {what} for {target.label} from", dumped))
    if not stored.ok:
        raise CopyFailed(f"streaming {what} into {target.label}: {target.repository.failure('storing', stored)}")


def forget_and_prune(ctx: JobContext, target: CopyTarget, copy_snapshots: list[Snapshot]) -> int:
    """Forgets this host's snapshots of the copy beyond the copy's keeps, per history, then prunes it; returns
    how many it forgot. Raises CopyFailed."""
    containers = sorted({snap.container for snap in copy_snapshots})
    if not containers:
        return 0
    repository = target.repository
    forget = commands.restic_forget(repository.binary, host=ctx.host, containers=containers,
                                    retention=Retention(*target.spec.keeps))
    timeout = PRUNE_TIMEOUT_SECONDS + ctx.bounds.lock_retry_s
    done = repository.run(commands.with_lock_wait(forget, ctx.bounds.lock_retry_s), timeout=timeout, cancel=ctx.cancel)
    if (problem := step_problem(done, ctx.bounds.lock_retry_s)) is not None:
        raise CopyFailed(f"restic forget on {target.label} failed: {problem}")
    forgotten = count_removed(done.stdout.decode(errors="replace"))
    done = repository.run(commands.with_lock_wait(commands.restic_prune(repository.binary), ctx.bounds.lock_retry_s),
                          timeout=timeout, cancel=ctx.cancel)
    if (problem := step_problem(done, ctx.bounds.lock_retry_s)) is not None:
        raise CopyFailed(f"restic prune on {target.label} failed: {problem}")
    return forgotten


@dataclass
class _Run:
    """What a run has learnt so far, for its result when a later step fails."""

    initialised: bool = False
    progress: Mapping[History, HistoryProgress] | None = None
    copied: tuple[Snapshot, ...] = ()
    forgotten: int = 0


def _steps(ctx: JobContext, target: CopyTarget, init: bool, only: frozenset[str] | None, run: _Run) -> None:
    """Open, list, copy, forget and prune, noting in `run` what each step found; raises CopyFailed."""
    run.initialised = _open(ctx, target, init)
    primary, copy = _listings(ctx, target, only)
    run.progress = progress(primary, copy)
    todo = missing(primary, copy)
    if todo:
        _transfer(ctx, target, todo)
        copy = [*copy, *todo]
        run.copied = tuple(todo)
        run.progress = progress(primary, copy)
    if target.spec.prune and todo:
        run.forgotten = forget_and_prune(ctx, target, copy)


def run_copy(ctx: JobContext, target: CopyTarget, *, init: bool, only: frozenset[str] | None = None) -> CopyResult:
    """Brings one copy up to date with this host's snapshots (of the containers `only` names; None: all) and
    applies its retention; returns the result, never raises."""
    run_id = uuid.uuid4().hex[:12]
    bound = log.bind(copy=target.spec.name, run_id=run_id)
    started = time.monotonic()
    bound.info("copy_started")
    run = _Run()
    try:
        _steps(ctx, target, init, only, run)
    except CopyFailed as exc:
        duration = time.monotonic() - started
        error = ctx.masker(str(exc))
        bound.error("copy_failed", error=error, duration_s=round(duration, 3))
        return CopyResult(target.spec.name, False, run_id, duration, run.copied, run.progress, error,
                          run.forgotten, run.initialised)
    duration = time.monotonic() - started
    if run.initialised:
        bound.info("copy_repository_initialised", repository=target.label)
    bound.info("copy_succeeded", snapshots_copied=len(run.copied), snapshots_forgotten=run.forgotten,
               method="streamed" if target.spec.streamed else "restic copy", duration_s=round(duration, 3))
    return CopyResult(target.spec.name, True, run_id, duration, run.copied, run.progress, None, run.forgotten,
                      run.initialised)
