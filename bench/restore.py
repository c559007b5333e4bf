"""6, restore: `watcher restore BIG latest --yes` against, by hand, `createdb` + `restic dump SNAPSHOT |
pg_restore` into a fresh database; both results checked by row count."""

from __future__ import annotations

import time

from bench.common import (
    Report,
    Row,
    X,
    bash,
    fmt_ratio,
    fmt_s,
    json_lines,
    median,
    parse_ts,
    repetitions,
    rounded,
    say_rep,
    verdict,
)
from bench.data import BIG_DB, row_count, sql
from bench.world import DB_USER, Repo, World
from tests.kit import PgContainer, run_watcher

ROWS = [
    Row("6", "Restore of the big database: `watcher restore` vs `restic dump | pg_restore` into a fresh database",
        goal=f"≤ 1.2{X}"),
]
KINDS = ["hand", "watcher"]  # repetition 0 starts by hand, then the order alternates

HAND_RESTORE = """
docker exec "$BW_DB" createdb -U "$BW_USER" "$BW_TARGET"
restic dump "$BW_SNAPSHOT" "/$BW_DATABASE.pgdump" | docker exec -i "$BW_DB" pg_restore -U "$BW_USER" -d "$BW_TARGET"
"""


def by_hand(big: PgContainer, repo: Repo, snapshot: str) -> tuple[float, int]:
    """Restores `snapshot` by hand into a fresh database; returns (wall seconds, its rows), then drops it."""
    target = f"{BIG_DB}_hand"
    env = {**repo.command_env(), "BW_DB": big.name, "BW_USER": DB_USER, "BW_TARGET": target,
           "BW_SNAPSHOT": snapshot, "BW_DATABASE": BIG_DB}
    seconds, _ = bash(HAND_RESTORE, env)
    count = row_count(big, target)
    sql(big, f'DROP DATABASE "{target}";', "postgres")
    return seconds, count


def by_watcher(world: World, big: PgContainer, repo: Repo) -> tuple[float, int, tuple[float, float] | None]:
    """`python -m watcher restore BIG latest --yes`; returns (wall seconds, rows after it, and from its
    log (start-up .. restore_started, restore_started .. restore_succeeded) when both lines are there)."""
    env = world.watcher_env(repo, big.name)
    spawned = time.time()
    started = time.monotonic()
    done = run_watcher(["restore", big.name, "latest", "--yes"], env, timeout=12 * 3600)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"watcher restore exited {done.returncode}: {done.stdout} {done.stderr}")
    count = row_count(big)
    marks = {e.get("event"): parse_ts(e["timestamp"]) for e in json_lines(done.stderr) if "timestamp" in e}
    phases = None
    if "restore_started" in marks and "restore_succeeded" in marks:
        phases = (marks["restore_started"] - spawned, marks["restore_succeeded"] - marks["restore_started"])
    return seconds, count, phases


def run(world: World, report: Report, big: PgContainer, repo: Repo, reps: int) -> None:
    """Measures 6 on the latest snapshot of `repo` (the storage benchmark's, after its changes)."""
    snapshot = max(repo.snapshots(), key=lambda s: str(s["time"]))
    snapshot_id = str(snapshot["id"])
    expected = row_count(big)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    phases: list[tuple[float, float]] = []
    for rep, kind in repetitions(KINDS, reps):
        if kind == "hand":
            seconds, count = by_hand(big, repo, snapshot_id)
        else:
            seconds, count, phase = by_watcher(world, big, repo)
            if phase is not None:
                phases.append(phase)
        if count != expected:
            raise RuntimeError(f"{kind} restore gave {count} rows, expected {expected}")
        times[kind].append(seconds)
        say_rep("restore", rep, reps, kind, seconds)
    w, h = median(times["watcher"]), median(times["hand"])
    r = report.row("6")
    r.watcher = fmt_s(w)
    r.reference = fmt_s(h)
    r.ratio = fmt_ratio(w / h)
    r.verdict = verdict(w / h <= 1.2)
    report.detail(f"6. Restore of snapshot {snapshot_id[:8]} ({expected} rows; order alternated): "
                  f"watcher {rounded(times['watcher'])} s (scratch database, then swap), "
                  f"by hand {rounded(times['hand'])} s (createdb + restic dump | pg_restore).")
    if phases:
        report.detail(f"6. Watcher restore phases (median): start-up, snapshot listing, owner query and scratch "
                      f"database {fmt_s(median(p[0] for p in phases))}; restic dump | pg_restore "
                      f"--single-transaction into the scratch database, then drop and rename "
                      f"{fmt_s(median(p[1] for p in phases))}.")
