"""The progress board as live lines on a terminal: one line per running job (target, database, bytes, rate,
elapsed; percent and time left where the size is known), drawn by tqdm: a small, long-kept library with no
dependencies of its own that does the cursor work (rich would do it too, with colours, but brings four packages
for what one line per job needs). Log lines written meanwhile go above the lines, not through them.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from typing import Never, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from watcher.progress import JobProgress, ProgressBoard

DRAW_SECONDS = 0.5


def logs_above_the_lines() -> AbstractContextManager[None]:
    """Routes log lines written while the `with` block runs above the drawn lines, not through them."""
    return logging_redirect_tqdm()


class TerminalLines:
    """One tqdm line per running job, kept in step with the board every DRAW_SECONDS."""

    def __init__(self, board: ProgressBoard, stream: TextIO) -> None:
        self.board = board
        self.stream = stream
        self.bars: dict[int, tqdm[Never]] = {}

    def run(self, stop: threading.Event) -> None:
        """Draws until `stop` is set, then removes every line."""
        try:
            while not stop.wait(DRAW_SECONDS):
                self.draw()
        finally:
            for bar in self.bars.values():
                self._close(bar)
            self.bars.clear()

    def draw(self) -> None:
        """Adds lines for new jobs, moves the others, removes those of jobs that ended."""
        running = {job.job_id: job for job in self.board.running()}
        for job_id in [known for known in self.bars if known not in running]:
            self._close(self.bars.pop(job_id))
        for job_id, job in running.items():
            if job_id not in self.bars:  # (a tqdm without a total has no truth value)
                self.bars[job_id] = self._new_bar(job)
            bar = self.bars[job_id]
            if job.total is not None and job.bytes_done > job.total:
                bar.total = None  # an estimate (the last snapshot's size) that this dump outgrew
            elif job.total != bar.total and bar.total is not None:
                bar.total = job.total
            bar.update(job.bytes_done - bar.n)

    def _close(self, bar: tqdm[Never]) -> None:
        bar.close()
        # A closed line is blanked, but the cursor stays at its end: what follows starts at column 0.
        self.stream.write("\r")
        self.stream.flush()

    def _new_bar(self, job: JobProgress) -> tqdm[Never]:
        bar: tqdm[Never] = tqdm(total=job.total, initial=job.bytes_done, desc=f"{job.kind} {job.target}/{job.database}",
                               unit="B", unit_scale=True, unit_divisor=1024, leave=False, file=self.stream,
                               dynamic_ncols=True, mininterval=0, miniters=1, smoothing=0.3)
        # Elapsed time and the average rate count from the job's start, not from its line's.
        bar.start_t -= job.elapsed_s(time.monotonic())
        return bar
