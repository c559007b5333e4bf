"""What the benchmarks share: progress, commands run and timed, repetitions in rotated order, medians
and percentiles, the formats of the figures, and the report (its rows and the markdown table)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

MB = 1_000_000
X = "\u00d7"  # the multiplication sign of the ratios
T0 = time.monotonic()
T = TypeVar("T")


# --- progress, commands, timing -----------------------------------------------------------------
def say(message: str) -> None:
    """Progress on stderr, with the run's elapsed time."""
    print(f"[bench {time.monotonic() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def command(argv: Sequence[str], *, env: dict[str, str] | None = None, input: bytes | None = None,
        check: bool = True, timeout: float = 3600) -> subprocess.CompletedProcess[bytes]:
    """Runs a command to completion, capturing its output (stdin closed unless `input` is given);
    returns the result. Raises RuntimeError with the end of its stderr when it fails and `check`."""
    done = subprocess.run(list(argv), input=input, capture_output=True, env=env or dict(os.environ),
                          timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-3000:]}")
    return done


def timed(call: Callable[[], T]) -> tuple[float, T]:
    """Calls `call`; returns (its wall time in seconds, its result)."""
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


def bash(script: str, env: dict[str, str], timeout: float = 3600) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Runs a bash script (set -euo pipefail); returns (wall seconds, result). Raises RuntimeError when it fails."""
    return timed(lambda: command(["bash", "-c", "set -euo pipefail\n" + script], env=env, timeout=timeout))


def rotated(kinds: Sequence[str], rep: int) -> list[str]:
    """The order of repetition `rep`: `kinds` rotated by one place per repetition, so that no kind
    always runs first (cold caches) or right after the same other one."""
    shift = rep % len(kinds)
    return [*kinds[shift:], *kinds[:shift]]


def repetitions(kinds: Sequence[str], reps: int) -> Iterator[tuple[int, str]]:
    """(repetition, kind) for `reps` repetitions of every kind, each repetition in its rotated order."""
    for rep in range(reps):
        for kind in rotated(kinds, rep):
            yield rep, kind


def say_rep(benchmark: str, rep: int, reps: int, kind: str, seconds: float) -> None:
    say(f"  {benchmark} rep {rep + 1}/{reps} {kind}: {fmt_s(seconds)}")


# --- statistics and formats ---------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 50 values is the largest but none)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


def fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds:.2f} s"


def fmt_mb(size: float) -> str:
    return f"{size / MB:.1f} MB" if size < 10 * MB else f"{size / MB:.0f} MB"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def fmt_ratio(ratio: float, digits: int = 2) -> str:
    return f"{ratio:.{digits}f}{X}"


def rounded(values: Iterable[float]) -> list[float]:
    """Single measurements as the details print them: a list of seconds to 2 decimals."""
    return [round(value, 2) for value in values]


# --- logs ---------------------------------------------------------------------------------------
def parse_ts(raw: str) -> float:
    """An RFC 3339 timestamp (Docker's nanoseconds, structlog's microseconds) as Unix seconds."""
    raw = raw.strip().replace("Z", "+00:00")
    head, _, rest = raw.partition(".")
    if rest:
        digits = "".join(ch for ch in rest if ch.isdigit())
        offset = rest[len(digits):]
        raw = f"{head}.{digits[:6]}{offset}"
    return datetime.fromisoformat(raw).timestamp()


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among `text`'s lines (other lines skipped)."""
    parsed: list[dict[str, Any]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                parsed.append(item)
    return parsed


def restic_summary(stdout: str) -> dict[str, Any]:
    """The summary message of `restic backup --json`'s output ({} when there is none)."""
    for item in json_lines(stdout)[::-1]:
        if item.get("message_type") == "summary":
            return item
    return {}


# --- the report ---------------------------------------------------------------------------------
@dataclass
class Row:
    """One row of the table: each benchmark module declares its rows, filled in as it measures."""

    key: str
    title: str
    watcher: str = "not run"
    reference: str = ""
    ratio: str = "—"
    goal: str = ""
    verdict: str = "not run"


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


@dataclass
class Report:
    """The run's report: facts about the run, the rows (fresh copies of the declared ones), details."""

    rows: list[Row]
    facts: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, declared: Iterable[Row]) -> Report:
        return cls([replace(r) for r in declared])

    def row(self, key: str) -> Row:
        """The row `key`; raises StopIteration when no benchmark declared it."""
        return next(r for r in self.rows if r.key == key)

    def detail(self, text: str) -> None:
        """A line of the details under the table, also shown as progress."""
        self.details.append(text)
        say(text)

    def render(self) -> str:
        """The report as markdown: facts, the table, the details."""
        lines = ["# backup-watcher benchmark", ""]
        lines += [f"- {fact}" for fact in self.facts]
        lines += ["", "| # | benchmark | watcher | compared with | ratio | goal | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            cells = [r.key, r.title, r.watcher, r.reference, r.ratio, r.goal, r.verdict]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines += ["", "Details:", ""]
        lines += [f"- {d}" for d in self.details]
        return "\n".join(lines) + "\n"
