"""How far each running job has come: the board every job reports to and every output reads from.

A job (backup, restore, drill, copy) registers on the board while it runs and sets how many bytes of its
stream have passed. The readers sample it at their own low rate, never on the data path: the
terminal's progress lines (watcher/progress_lines.py), the `*_progress` log lines every
WATCHER_PROGRESS_LOG_INTERVAL when not on a terminal, the daemon's `job_*` metrics (rendered at scrape
time, so a finished job's series are gone at once) and `status`.

Where the bytes come from costs next to nothing: a backup parses one of restic's own `--json` status
lines every STATUS_READ_SECONDS (restic writes 4 a second, RESTIC_PROGRESS_FPS; the others are only
matched, not parsed); a restore reads how much `restic dump` has written so far from the kernel's count
(/proc/PID/io), sampled by the runner once a second; a copy counts the snapshots `restic copy` says it saved
and its packs of the current one (a streamed copy: what its `restic dump` wrote, as a restore).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

# How often one of restic's status lines is parsed for the board: plenty for a person and for metrics.
STATUS_READ_SECONDS = 1.0
PROGRESS_LOG_SECONDS = 30.0
KINDS = ("backup", "restore", "drill", "copy")


@dataclass(frozen=True)
class JobProgress:
    """One running job as it stood when read: what it is, since when, how many bytes of how many."""

    job_id: int
    kind: str
    target: str
    database: str
    started_at: datetime
    started: float  # time.monotonic() at the start
    bytes_done: int = 0
    total: int | None = None  # known for a restore (the snapshot's size); a backup's is an estimate

    def elapsed_s(self, now: float) -> float:
        """Seconds since the start (monotonic `now`)."""
        return max(0.0, now - self.started)

    def rate(self, now: float) -> float | None:
        """Bytes per second on average since the start; None in the first second."""
        elapsed = self.elapsed_s(now)
        return self.bytes_done / elapsed if elapsed >= 1.0 else None

    def fraction(self) -> float | None:
        """Share done, 0..1 (an estimate that falls short stays below 1 until the end); None without a total."""
        if not self.total:
            return None
        return min(self.bytes_done / self.total, 0.99)

    def left_s(self, now: float) -> float | None:
        """Seconds left at the average rate so far; None without a total or a rate."""
        rate = self.rate(now)
        if not self.total or not rate:
            return None
        return max(0.0, self.total - self.bytes_done) / rate

    def fields(self, now: float) -> dict[str, object]:
        """What a log line or `status` says about it (JSON-ready)."""
        rate = self.rate(now)
        fraction = self.fraction()
        left = self.left_s(now)
        return {"kind": self.kind, "target": self.target, "database": self.database,
                "started_at": self.started_at.isoformat(), "elapsed_s": round(self.elapsed_s(now), 1),
                "bytes_done": self.bytes_done, "bytes_total": self.total,
                "bytes_per_s": round(rate) if rate is not None else None,
                "percent": round(100 * fraction, 1) if fraction is not None else None,
                "left_s": round(left) if left is not None else None}


class Tracker:
    """A job's handle on the board: it sets the bytes done; reading is the board's."""

    def __init__(self, board: ProgressBoard, job_id: int) -> None:
        self._board = board
        self._job_id = job_id

    def set_bytes(self, done: int) -> None:
        """The job's stream has passed `done` bytes (never goes back)."""
        self._board.set_bytes(self._job_id, done)

    def set_total(self, total: int | None) -> None:
        """The job's size became known."""
        self._board.set_total(self._job_id, total)


@dataclass
class ProgressBoard:
    """The jobs running now; thread-safe. Size estimates for backups come from the last snapshot
    of the same history (`expect`), where the caller knows it."""

    clock: Callable[[], float] = time.monotonic
    _running: dict[int, JobProgress] = field(default_factory=dict)
    _estimates: dict[tuple[str, str], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @contextmanager
    def track(self, kind: str, target: str, database: str, total: int | None = None) -> Iterator[Tracker]:
        """Registers a running job for the duration of the `with` block; yields its Tracker."""
        with self._lock:
            job_id = next(self._ids)
            if total is None and kind == "backup":
                total = self._estimates.get((target, database))
            self._running[job_id] = JobProgress(job_id, kind, target, database, datetime.now(UTC), self.clock(),
                                                total=total)
        try:
            yield Tracker(self, job_id)
        finally:
            with self._lock:
                self._running.pop(job_id, None)

    def expect(self, target: str, database: str, size: int | None) -> None:
        """The last snapshot of (target, database) held `size` bytes: the next backup's estimate."""
        if size:
            with self._lock:
                self._estimates[(target, database)] = size

    def set_bytes(self, job_id: int, done: int) -> None:
        """See Tracker.set_bytes."""
        with self._lock:
            job = self._running.get(job_id)
            if job is not None and done > job.bytes_done:
                self._running[job_id] = replace(job, bytes_done=done)

    def set_total(self, job_id: int, total: int | None) -> None:
        """See Tracker.set_total."""
        with self._lock:
            job = self._running.get(job_id)
            if job is not None:
                self._running[job_id] = replace(job, total=total)

    def running(self) -> list[JobProgress]:
        """The running jobs, oldest first."""
        with self._lock:
            return sorted(self._running.values(), key=lambda job: job.job_id)


def restic_status_bytes(line: str) -> int | None:
    """`bytes_done` of one of restic backup's `--json` status lines; None for any other line."""
    if '"status"' not in line:
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("message_type") != "status":
        return None
    done = message.get("bytes_done")
    return done if isinstance(done, int) else None


# `restic copy` has no --json: it says which snapshot it copies, how far in packs, and when it is saved.
_COPY_START = re.compile(r"^snapshot ([0-9a-f]{8,}) of \[")
_COPY_PACKS = re.compile(r"^\[[0-9:]+\]\s+([0-9.]+)%")
_COPY_SAVED = re.compile(r"^snapshot [0-9a-f]{8,} saved$")


class CopyOutput:
    """Reads `restic copy`'s stdout as it comes into the bytes done of the snapshots it copies: those already
    saved in full, plus the current one's share by its packs copied (an estimate: packs are not bytes)."""

    def __init__(self, sizes: Mapping[str, int], tracker: Tracker) -> None:
        self._sizes = {short[:8]: size for short, size in sizes.items()}  # by short id, as restic prints it
        self._tracker = tracker
        self._saved = 0
        self._current = 0

    def line(self, line: str) -> None:
        """One stdout line of `restic copy`; sets the tracker's bytes when it says something about progress."""
        if started := _COPY_START.match(line):
            self._current = self._sizes.get(started.group(1)[:8], 0)
        elif packs := _COPY_PACKS.match(line):
            self._tracker.set_bytes(self._saved + int(self._current * min(float(packs.group(1)), 100.0) / 100))
        elif _COPY_SAVED.match(line):
            self._saved += self._current
            self._current = 0
            self._tracker.set_bytes(self._saved)


def written_bytes(pid: int) -> int | None:
    """How many bytes process `pid` has written so far (its `wchar` in /proc/PID/io); None when it
    cannot be read (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as counters:
            for line in counters:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def human_bytes(count: float) -> str:
    """1.5 GiB, 12.0 MiB, 512 B."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def progress_text(fields: Mapping[str, object]) -> str:
    """One line for people from JobProgress.fields(): 'backup app-db/appdb 1.2 GiB at 45.0 MiB/s, 27s
    (62 %, ~16s left)'."""
    text = f"{fields['kind']} {fields['target']}/{fields['database']} {human_bytes(_number(fields['bytes_done']))}"
    rate, percent, left = fields.get("bytes_per_s"), fields.get("percent"), fields.get("left_s")
    text += f" at {human_bytes(_number(rate))}/s" if rate is not None else ""
    text += f", {_number(fields['elapsed_s']):.0f}s"
    if percent is not None:
        text += f" ({_number(percent):.0f} %" + (f", ~{_number(left):.0f}s left)" if left is not None else ")")
    return text


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def first_writer(tracker: Tracker, before: int = 0) -> Callable[[Sequence[int]], None]:
    """An on_tick for run_pipeline: the bytes written so far by the pipeline's first member (a
    `restic dump`), after `before` bytes of earlier steps, are the job's bytes done."""
    def tick(pids: Sequence[int]) -> None:
        done = written_bytes(pids[0]) if pids else None
        if done is not None:
            tracker.set_bytes(before + done)
    return tick
