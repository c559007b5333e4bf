"""Showing the progress board to people: live lines on a terminal (watcher.progress_lines), `*_progress` log
lines elsewhere.

Not on a terminal, nothing is drawn: every WATCHER_PROGRESS_LOG_INTERVAL each running job gets one
`<kind>_progress` log line instead, which is also what the daemon writes; tqdm, which draws the lines, is
then not even imported (about 30 ms of CPU at every start of a command run by cron or a script).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

import structlog

from watcher.progress import PROGRESS_LOG_SECONDS, ProgressBoard

log = structlog.get_logger("watcher.progress")


@contextmanager
def shown(board: ProgressBoard, *, terminal: bool, stream: TextIO,
          log_every_s: float = PROGRESS_LOG_SECONDS) -> Iterator[None]:
    """Shows the board while the `with` block runs: live lines on `stream` when `terminal`, else
    `*_progress` log lines every `log_every_s`. The lines are gone when the block ends (the caller
    prints the results)."""
    if terminal:
        from watcher.progress_lines import TerminalLines, logs_above_the_lines  # noqa: PLC0415 - the docstring

        with logs_above_the_lines(), _running(TerminalLines(board, stream).run):
            yield
        return
    with _running(lambda stop: log_progress(board, stop, log_every_s)):
        yield


@contextmanager
def _running(work: Callable[[threading.Event], object]) -> Iterator[None]:
    """Runs `work(stop)` in a thread of its own while the `with` block runs; sets `stop` when it ends and waits
    for the thread (at most 5 s)."""
    stop = threading.Event()
    worker = threading.Thread(target=work, args=(stop,), name="progress", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join(timeout=5)


def log_progress(board: ProgressBoard, stop: threading.Event, every_s: float = PROGRESS_LOG_SECONDS) -> None:
    """Until `stop` is set: every `every_s`, one `<kind>_progress` line per job running that long."""
    while not stop.wait(every_s):
        now = time.monotonic()
        for job in board.running():
            if job.elapsed_s(now) >= every_s:
                log.info(f"{job.kind}_progress", **job.fields(now))
