"""The backups being compared: the watcher's one-shot `backup`, the bare shell pipeline it replaces,
and pg_dump alone (the physical limit)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.common import bash, json_lines, parse_ts, restic_summary
from bench.world import DB_USER, HOST, Repo, World
from tests.kit import run_watcher


@dataclass
class Backup:
    seconds: float
    bytes_processed: int = 0
    bytes_added: int = 0
    restic_seconds: float | None = None  # restic's own backup_start..backup_end
    phases: dict[str, float] = field(default_factory=dict)
    per_backup: float = 0.0  # mean duration_s of the watcher's backup_succeeded lines
    job_seconds: dict[str, float] = field(default_factory=dict)  # database → its backup_succeeded duration_s
    per_backup_database: float = 0.0  # the same, of the databases' lines only (not the globals')
    output: str = ""


def watcher_backup(world: World, repo: Repo, patterns: str, targets: Sequence[str] = (),
                   expect_ok: int | None = None, extra_env: dict[str, str] | None = None) -> Backup:
    """Runs `python -m watcher backup [TARGET...]` whole; returns its wall time, and from its JSON log
    (stderr) its bytes and phases. Raises RuntimeError when it fails or backs up other than `expect_ok`."""
    env = world.watcher_env(repo, patterns, **(extra_env or {}))
    spawned = time.time()
    started = time.monotonic()
    done = run_watcher(["backup", *targets], env, timeout=6 * 3600)
    seconds = time.monotonic() - started
    ended = time.time()
    out, err = done.stdout, done.stderr
    # The globals' snapshot of each container is not a database's: expect_ok counts databases.
    oks = [line for line in out.splitlines() if line.startswith("ok ") and "/(globals) " not in line]
    if done.returncode != 0 or (expect_ok is not None and len(oks) != expect_ok):
        raise RuntimeError(f"watcher backup exited {done.returncode} ({len(oks)} ok):\n{out[-3000:]}\n{err[-3000:]}")
    logs = json_lines(err)
    result = Backup(seconds, output=out)
    starts = [parse_ts(e["timestamp"]) for e in logs if e.get("event") == "backup_started"]
    ends = [e for e in logs if e.get("event") == "backup_succeeded"]
    result.bytes_processed = sum(int(e.get("bytes") or 0) for e in ends)
    result.bytes_added = sum(int(e.get("bytes_added") or 0) for e in ends)
    result.job_seconds = {str(e.get("database")): float(e.get("duration_s") or 0) for e in ends}
    if ends:
        result.per_backup = sum(float(e.get("duration_s") or 0) for e in ends) / len(ends)
        databases = [float(e.get("duration_s") or 0) for e in ends if e.get("database") != "(globals)"]
        result.per_backup_database = sum(databases) / max(len(databases), 1)
    if starts and ends:
        first_start = min(starts)
        last_end = max(parse_ts(e["timestamp"]) for e in ends)
        result.phases = {
            "start-up (interpreter, imports, Docker discovery, restic version)":
                first_start - spawned,
            "backups (backup_started .. backup_succeeded)": last_end - first_start,
            "exit": ended - last_end,
        }
    return result


BARE_SCRIPT = """
docker exec "$BW_DB" pg_dump $BW_DUMP_FLAGS -U "$BW_USER" "$BW_DATABASE" \\
    | restic backup --json --stdin --stdin-filename "$BW_DATABASE.pgdump" --host "$BW_HOST" --tag "container=$BW_DB"
"""


def bare_backup(repo: Repo, container: str, database: str, flags: str = "-Fc -Z0") -> Backup:
    """Runs the bare shell pipeline `docker exec DB pg_dump FLAGS | restic backup --stdin`; returns its
    wall time and restic's summary figures. Raises RuntimeError when it fails."""
    env = {**repo.command_env(), "BW_DB": container, "BW_DUMP_FLAGS": flags, "BW_USER": DB_USER,
           "BW_DATABASE": database, "BW_HOST": HOST}
    seconds, done = bash(BARE_SCRIPT, env)
    summary = restic_summary(done.stdout.decode(errors="replace"))
    restic_seconds = None
    if summary.get("backup_start") and summary.get("backup_end"):
        restic_seconds = parse_ts(summary["backup_end"]) - parse_ts(summary["backup_start"])
    return Backup(seconds, int(summary.get("total_bytes_processed") or 0),
                  int(summary.get("data_added_packed") or summary.get("data_added") or 0), restic_seconds)


def dump_only(container: str, database: str) -> Backup:
    """Runs pg_dump alone, into /dev/null: the physical limit of any backup of this database."""
    env = {**os.environ, "BW_DB": container, "BW_USER": DB_USER, "BW_DATABASE": database}
    seconds, _ = bash('docker exec "$BW_DB" pg_dump -Fc -Z0 -U "$BW_USER" "$BW_DATABASE" >/dev/null', env)
    return Backup(seconds)
