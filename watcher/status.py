"""`status`: what every watched container is doing, as rows for JSON and as a table for people."""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from watcher.copies import History, HistoryProgress
from watcher.progress import JobProgress, progress_text
from watcher.registry import TargetState

CopyProgress = Mapping[str, Mapping[History, HistoryProgress]]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _copies(copies: CopyProgress, history: History, now: datetime) -> dict[str, dict[str, object]]:
    """How far each copy has come with one history: its newest snapshot there, and how long the oldest
    snapshot it lacks has waited (0: it holds every one)."""
    found: dict[str, dict[str, object]] = {}
    for name, known in sorted(copies.items()):
        if (state := known.get(history)) is not None:
            found[name] = {"copied": _iso(state.copied), "lag_s": round(state.lag_s(now))}
    return found


def status_rows(entries: Iterable[TargetState], now: datetime, running: Sequence[JobProgress] = (),
                copies: CopyProgress | None = None) -> list[dict[str, object]]:
    """One row per watched container: state, newest snapshot and its age, next run, last error, the jobs
    running on it now with their progress, and per database how far each copy has come (the daemon's)."""
    rows: list[dict[str, object]] = []
    moment = time.monotonic()
    for entry in entries:
        newest = entry.judged_snapshot
        error = entry.rejected.reason if entry.rejected is not None else entry.last_error
        rows.append({
            "target": entry.name,
            "container_id": entry.container_id[:12],
            "state": entry.state,
            "schedule": entry.target.schedule if entry.target else None,
            "last_snapshot": _iso(newest),
            "age_s": round((now - newest).total_seconds()) if newest is not None else None,
            "next_run": _iso(entry.next_run) if entry.target is not None and not entry.stopped else None,
            "consecutive_failures": entry.consecutive_failures,
            # PostgreSQL did not answer: no attempt before then (the next run), SPEC §11.
            "backing_off_until": _iso(entry.next_run) if entry.not_ready_streak and entry.target is not None else None,
            "last_error": error,
            "databases": [
                {"database": name, "last_snapshot": _iso(db.last_snapshot),
                 "snapshot_id": db.last_snapshot_id[:8] if db.last_snapshot_id else None,
                 "last_success": _iso(db.last_success), "last_failure": _iso(db.last_failure),
                 "last_error": db.last_error, "note": db.note,
                 # Its newest dump is a flagged shrunken dump (None: not judged, as by a survey without the daemon).
                 "size_anomaly": db.size_anomaly,
                 "copies": _copies(copies or {}, (entry.name, name), now)}
                for name, db in sorted(entry.databases.items())
            ],
            "running": [job.fields(moment) for job in running if job.target == entry.name],
        })
    return rows


def human_age(seconds: object) -> str:
    """3d4h, 5h12m, 7m, 42s; '-' when unknown."""
    if not isinstance(seconds, int | float):
        return "-"
    value = int(seconds)
    days, rest = divmod(value, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def render_table(rows: Sequence[Mapping[str, object]]) -> str:
    """The rows as an aligned text table (errors by their first line, whole)."""
    header = ("TARGET", "STATE", "LAST SNAPSHOT (UTC)", "AGE", "NEXT RUN (UTC)", "LAST ERROR")
    table = [header]
    for row in rows:
        error = str(row.get("last_error") or "").strip().splitlines()
        table.append((
            str(row["target"]), str(row["state"]),
            str(row.get("last_snapshot") or "-")[:19].replace("T", " "),
            human_age(row.get("age_s")),
            str(row.get("next_run") or "-")[:19].replace("T", " "),
            # Whole: the useful part of a label's error (which field, what to do) comes at its end.
            (error[0] + (" (...)" if len(error) > 1 else "") if error else ""),
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    return "\n".join(lines + _running(rows) + _notes(rows) + _shrunken(rows) + _lagging(rows))


def _running(rows: Sequence[Mapping[str, object]]) -> list[str]:
    """One line per running job, under the table."""
    found = []
    for row in rows:
        jobs = row.get("running")
        for job in jobs if isinstance(jobs, list) else []:
            if isinstance(job, Mapping):
                found.append(f"running: {progress_text(job)}")
    return ([""] if found else []) + found


def _notes(rows: Sequence[Mapping[str, object]]) -> list[str]:
    """One line per database whose last snapshot comes with a note, under the table."""
    notes = []
    for row in rows:
        databases = row.get("databases")
        for db in databases if isinstance(databases, list) else []:
            if isinstance(db, Mapping) and db.get("note"):
                notes.append(f"note: {row['target']} {db['database']}: {db['note']}")
    return ([""] if notes else []) + notes


def _shrunken(rows: Sequence[Mapping[str, object]]) -> list[str]:
    """One line per database whose newest dump is flagged as shrunken, under the table: the page says so, and
    the target's state stays ok (its backups succeed), so without this line `status` showed nothing of it."""
    found = []
    for row in rows:
        databases = row.get("databases")
        for db in databases if isinstance(databases, list) else []:
            if isinstance(db, Mapping) and db.get("size_anomaly"):
                target, database = row["target"], db["database"]
                found.append(f"shrunken: {target} {database}: its newest dump is flagged as far smaller than the "
                             f"one before (WATCHER_SHRINK_THRESHOLD); retention forgets nothing of its history until "
                             f"a dump of normal size follows or `backup-watcher ack {target} --database "
                             f"{shlex.quote(str(database))}`")
    return ([""] if found else []) + found


def _lagging(rows: Sequence[Mapping[str, object]]) -> list[str]:
    """One line per (copy, database) that lacks a snapshot, under the table."""
    found = []
    for row in rows:
        databases = row.get("databases")
        for db in databases if isinstance(databases, list) else []:
            copies = db.get("copies") if isinstance(db, Mapping) else None
            for name, state in sorted(copies.items()) if isinstance(copies, Mapping) else ():
                if isinstance(state, Mapping) and state.get("lag_s"):
                    newest = str(state.get("copied") or "none")[:19].replace("T", " ")
                    found.append(f"copy {name}: {row['target']} {db['database']} lacks snapshots for "
                                 f"{human_age(state['lag_s'])} (newest there: {newest})")
    return ([""] if found else []) + found
