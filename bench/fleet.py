"""4a / 4b, the fleet pass: one pass over many small databases by the one-shot `watcher backup` and by
the daemon's catch-up, against a sequential bash loop of the bare pipeline."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import (
    Report,
    Row,
    X,
    bash,
    fmt_mb,
    fmt_ratio,
    fmt_s,
    median,
    parse_ts,
    repetitions,
    rounded,
    say,
    say_rep,
    verdict,
)
from bench.data import FLEET_DB, database_size, fill_database
from bench.pipelines import Backup, watcher_backup
from bench.world import DB_USER, HOST, Daemon, Repo, World, remove_containers, start_pg
from tests.kit import PgContainer, wait_ready

ROWS = [
    Row("4a", "Fleet: one pass over the small databases, one-shot `watcher backup` (default concurrency 2, whole "
        "process) vs sequential shell loop of the bare pipeline", goal=f"≤ 0.8{X}"),
    Row("4b", "Fleet: the same pass by the daemon (`watcher run`, default concurrency 2: first backup started → "
        "last succeeded) vs the same loop", goal=f"≤ 0.8{X}"),
]
KINDS = ["watcher", "daemon", "loop"]

FLEET_LOOP = """
for db in $BW_FLEET; do
    docker exec "$db" pg_dump -Fc -Z0 -U "$BW_USER" "$BW_DATABASE" \\
        | restic backup --json --stdin --stdin-filename "$BW_DATABASE.pgdump" --host "$BW_HOST" \\
            --tag "container=$db" >/dev/null
done
"""


def database_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of databases' backups (each pass also backs up every container's globals)."""
    return [event for event in events if event.get("database") != "(globals)"]


def daemon_pass(world: World, repo: Repo, pattern: str, count: int) -> float:
    """The daemon's own pass: `python -m watcher run` (default concurrency) against an empty repository
    starts a catch-up backup of every target at once; returns first backup_started → last backup_succeeded.
    Raises RuntimeError when a backup fails, the daemon exits or the pass takes over 600 s."""
    daemon = Daemon(world, repo, f"fleet-{repo.path.name}", patterns=pattern, WATCHER_CONCURRENCY="2")
    try:
        deadline = time.monotonic() + 600
        while len(database_events(daemon.log.events("backup_succeeded"))) < count:
            failed = daemon.log.events("backup_failed")
            if failed or daemon.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon pass: {failed[:1]} {daemon.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        starts = [parse_ts(e["timestamp"]) for e in daemon.log.events("backup_started")]
        ends = [parse_ts(e["timestamp"]) for e in daemon.log.events("backup_succeeded")]
        return max(ends) - min(starts)
    finally:
        daemon.stop()


def start_fleet(world: World, count: int, size_bytes: int) -> list[PgContainer]:
    """Starts `count` PostgreSQL containers and fills each to about `size_bytes`; returns them."""
    names = [world.name(f"fleet-{i:02d}") for i in range(count)]
    say(f"4. starting {count} PostgreSQL containers")
    with ThreadPoolExecutor(max_workers=4) as pool:
        dbs = list(pool.map(lambda n: start_pg(world, n, FLEET_DB), names))
        list(pool.map(lambda db: wait_ready(db.name, timeout=180), dbs))
        list(pool.map(lambda db: fill_database(db, size_bytes, quiet=True), dbs))
    return dbs


def run(world: World, report: Report, count: int, size_bytes: int, reps: int) -> None:
    """Measures 4a and 4b over `count` databases of about `size_bytes`, a fresh repository per pass."""
    dbs = start_fleet(world, count, size_bytes)
    names = [db.name for db in dbs]
    db_size = database_size(dbs[0])
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    watcher_runs: list[Backup] = []
    pattern = world.name("fleet-*")
    for rep, kind in repetitions(KINDS, reps):
        repo = world.new_repo(f"fleet-{kind}-{rep}")
        if kind == "watcher":
            result = watcher_backup(world, repo, pattern, expect_ok=count)
            watcher_runs.append(result)
            seconds = result.seconds
        elif kind == "daemon":
            seconds = daemon_pass(world, repo, pattern, count)
        else:
            env = {**repo.command_env(), "BW_FLEET": " ".join(names), "BW_USER": DB_USER,
                   "BW_DATABASE": FLEET_DB, "BW_HOST": HOST}
            seconds, _ = bash(FLEET_LOOP, env)
        if len(repo.snapshots()) != count:
            raise RuntimeError(f"fleet {kind}: expected {count} snapshots")
        repo.remove()
        times[kind].append(seconds)
        say_rep("fleet", rep, reps, kind, seconds)
    report_rows(report, times, watcher_runs, count, db_size)
    remove_containers(world, names)


def report_rows(report: Report, times: dict[str, list[float]], watcher_runs: list[Backup], count: int,
                db_size: int) -> None:
    loop = median(times["loop"])
    for key, kind in (("4a", "watcher"), ("4b", "daemon")):
        seconds = median(times[kind])
        r = report.row(key)
        r.title = r.title.replace("the small databases", f"{count} databases of {fmt_mb(db_size)}")
        r.watcher = fmt_s(seconds)
        r.reference = fmt_s(loop)
        r.ratio = fmt_ratio(seconds / loop)
        r.verdict = verdict(seconds / loop <= 0.8)
    report.detail(f"4. Fleet of {count} {X} {fmt_mb(db_size)} (order rotated, fresh repository each): "
                  + ", ".join(f"{kind} {rounded(times[kind])} s" for kind in KINDS)
                  + f" ({fmt_s(loop / count)} per database in the loop).")
    phases = {k: median(r.phases.get(k, 0.0) for r in watcher_runs) for k in watcher_runs[0].phases}
    per_backup = median(r.per_backup for r in watcher_runs)
    report.detail("4a. One-shot `backup` phases (median): " + "; ".join(f"{k}: {fmt_s(v)}" for k, v in phases.items())
                  + f"; one backup (backup_started .. backup_succeeded, {count} running 2 at a time) took "
                  f"{fmt_s(per_backup)} on average, the loop's {fmt_s(loop / count)} one at a time.")
