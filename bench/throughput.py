"""1a / 1b, throughput: the watcher's one-shot backup of the big database against the bare pipeline
(`pg_dump -Fc -Z0 | restic backup --stdin`) and against pg_dump alone into /dev/null."""

from __future__ import annotations

from collections.abc import Callable

from bench.common import (
    MB,
    Report,
    Row,
    X,
    fmt_mb,
    fmt_ratio,
    fmt_s,
    median,
    repetitions,
    rounded,
    say_rep,
    timed,
    verdict,
)
from bench.data import BIG_DB
from bench.pipelines import Backup, bare_backup, dump_only, watcher_backup
from bench.world import Repo, World
from tests.kit import PgContainer

ROWS = [
    Row("1a", "Throughput: backup of the big database, watcher vs bare `pg_dump -Fc -Z0 | restic backup --stdin`",
        goal=f"≤ 1.05{X}"),
    Row("1b", "Throughput: watcher vs `pg_dump -Fc -Z0 > /dev/null` (the physical limit)", goal="— (info)"),
]
KINDS = ["watcher", "bare", "dump"]


def run(world: World, report: Report, big: PgContainer, reps: int) -> Repo:
    """Measures 1a and 1b; returns a repository holding exactly one watcher snapshot of the big
    database (day 1 of the storage benchmark)."""
    runs: dict[str, list[Backup]] = {kind: [] for kind in KINDS}
    kept: Repo | None = None
    for rep, kind in repetitions(KINDS, reps):
        if kind == "dump":
            result = dump_only(big.name, BIG_DB)
        else:
            repo = world.new_repo(f"tp-{kind}-{rep}")
            if kind == "watcher":
                result = watcher_backup(world, repo, big.name, [big.name], expect_ok=1)
            else:
                result = bare_backup(repo, big.name, BIG_DB)
            if kind == "watcher" and kept is None:
                kept = repo
            else:
                repo.remove()
        runs[kind].append(result)
        say_rep("throughput", rep, reps, kind, result.seconds)
    if kept is None:
        raise RuntimeError("throughput: no watcher backup ran (--reps must be at least 1)")
    report_rows(world, report, runs, reps)
    report_phases(report, runs["watcher"], kept)
    return kept


def report_rows(world: World, report: Report, runs: dict[str, list[Backup]], reps: int) -> None:
    w, b, d = (median(r.seconds for r in runs[k]) for k in KINDS)
    size = runs["watcher"][0].bytes_processed or runs["bare"][0].bytes_processed
    rate: Callable[[float], str] = (lambda s: f"{size / s / MB:.0f} MB/s") if size else (lambda s: "")
    n = f"median of {reps}" if reps > 1 else "1 run"
    r1a = report.row("1a")
    r1a.watcher = f"{fmt_s(w)} ({rate(w)})"
    r1a.reference = f"{fmt_s(b)} ({rate(b)})"
    r1a.ratio = fmt_ratio(w / b)
    r1a.verdict = verdict(w / b <= 1.05)
    r1b = report.row("1b")
    r1b.watcher = f"{fmt_s(w)}"
    r1b.reference = f"{fmt_s(d)} ({rate(d)}); bare pipeline {fmt_ratio(b / d)}"
    r1b.ratio = fmt_ratio(w / d)
    r1b.verdict = "info"
    report.detail(f"1. Throughput ({n}, order rotated each repetition, a fresh repository per backup): "
                  f"dump {fmt_mb(size)} of a {fmt_mb(world.big_size)} database; "
                  f"watcher {rounded(r.seconds for r in runs['watcher'])} s, "
                  f"bare {rounded(r.seconds for r in runs['bare'])} s, "
                  f"pg_dump alone {rounded(r.seconds for r in runs['dump'])} s.")


def report_phases(report: Report, watcher_runs: list[Backup], kept: Repo) -> None:
    phases = {k: median(r.phases.get(k, 0.0) for r in watcher_runs) for k in watcher_runs[0].phases}
    if phases:
        breakdown = "; ".join(f"{k}: {fmt_s(v)}" for k, v in phases.items())
        report.detail(f"1. Watcher phases (median): {breakdown}. One restic repository open (`restic cat config`: "
                      f"key derivation) costs {fmt_s(repo_open_seconds(kept))} here; the watcher's one-shot "
                      f"backup opens the repository twice (the check, beside the backup, then the backup's own), "
                      f"the bare pipeline once.")


def repo_open_seconds(repo: Repo) -> float:
    """Median wall time of `restic cat config` (process start, key derivation, config) over 3 runs."""
    return median(timed(lambda: repo.restic("--no-lock", "cat", "config"))[0] for _ in range(3))
