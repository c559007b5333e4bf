"""2a / 2b / 2c, storage: the repository's growth for a day's change, the watcher's design (`-Fc -Z0`
into restic, which compresses) against the seed design (`pg_dump -Fc | restic backup --stdin`), the
same amount of change in three places one day after the other on the same repositories."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.common import Report, Row, X, fmt_mb, fmt_ratio, fmt_s
from bench.data import BIG_DB, day_change
from bench.pipelines import Backup, bare_backup, watcher_backup
from bench.world import Repo, World
from tests.kit import PgContainer

ROWS = [
    Row("2a", "Storage: day-2 repository growth, oldest rows deleted and a range of old rows updated (TESTING.md's "
        "reference: the seed design stores its dump again), watcher (-Z0, restic compresses) vs seed design "
        "(`pg_dump -Fc | restic backup --stdin`)", goal="— (info; judged on the realistic 2d)"),
    Row("2b", "Storage: day-2 repository growth, the same change among recent rows (at 80 and 90 % of the table: the "
        "seed design's best case, it keeps its dump up to the first change), watcher vs seed design",
        goal="— (info: where the goal stops holding)"),
    Row("2c", "Storage: day-2 repository growth, change scattered uniformly at random, watcher vs seed design "
        "(a stress case beyond the goal: every restic chunk holds a changed row)",
        goal="— (info: the limit of chunk deduplication)"),
]
PATTERNS = (("2a", "oldest"), ("2b", "recent"), ("2c", "scattered"))


@dataclass
class Design:
    """One design's repository and what `du -sb` and restic's raw-data stats said after each day."""

    repo: Repo
    sizes: list[int] = field(default_factory=list)
    blobs: list[dict[str, Any]] = field(default_factory=list)

    def measure(self) -> None:
        self.sizes.append(self.repo.du())
        self.blobs.append(self.repo.raw_stats())

    def growth(self) -> int:
        return self.sizes[-1] - self.sizes[-2]

    def new_blobs(self) -> int:
        return int(self.blobs[-1].get("total_blob_count", 0)) - int(self.blobs[-2].get("total_blob_count", 0))


def run(world: World, report: Report, big: PgContainer, watcher_repo: Repo | None) -> Repo:
    """Day 1, then the three day changes of `day_change` one after the other, for both designs; returns
    the watcher repository (day 1 is `watcher_repo` when given: the throughput benchmark's)."""
    if watcher_repo is None:
        watcher_repo = world.new_repo("storage-watcher")
        watcher_backup(world, watcher_repo, big.name, [big.name], expect_ok=1)
    watcher, seed = Design(watcher_repo), Design(world.new_repo("storage-seed"))
    seed_day1 = bare_backup(seed.repo, big.name, BIG_DB, flags="-Fc")
    watcher.measure()
    seed.measure()
    report.detail(f"2. Day 1: watcher repository {fmt_mb(watcher.sizes[0])}, seed design repository "
                  f"{fmt_mb(seed.sizes[0])} (its -Fc dump took {fmt_s(seed_day1.seconds)}, "
                  f"{fmt_mb(seed_day1.bytes_processed)}).")
    for key, pattern in PATTERNS:
        change = day_change(big, pattern)
        w = watcher_backup(world, watcher.repo, big.name, [big.name], expect_ok=1)
        s = bare_backup(seed.repo, big.name, BIG_DB, flags="-Fc")
        watcher.measure()
        seed.measure()
        day(report, key, pattern, change, watcher, seed, w, s)
    seed.repo.remove()
    return watcher.repo


def day(report: Report, key: str, pattern: str, change: str, watcher: Design, seed: Design,
        w: Backup, s: Backup) -> None:
    """Fills row `key` and its detail from the day just measured."""
    gw, gs = watcher.growth(), seed.growth()
    r = report.row(key)
    r.watcher = f"+{fmt_mb(gw)} (of {fmt_mb(watcher.sizes[-1])})"
    r.reference = f"+{fmt_mb(gs)} (of {fmt_mb(seed.sizes[-1])})"
    ratio = gw / gs if gs > 0 else float("inf")
    r.ratio = fmt_ratio(ratio, 3 if ratio < 0.1 else 2)
    total_blobs = int(watcher.repo.raw_stats("latest").get("total_blob_count", 0))
    new_blobs = watcher.new_blobs()
    if key == "2a":
        r.verdict = f"info: {'within' if ratio <= 0.1 else 'beyond'} 0.1{X}"
    elif key == "2b":
        # The seed design stores again about the share of its dump after the first change, the
        # watcher about the same few chunks wherever the change falls: the goal holds while the
        # first change lies before 1 - 10 * gw / dump of the table.
        edge = 1 - 10 * gw / max(s.bytes_processed, 1)
        r.verdict = (f"info: {'within' if ratio <= 0.1 else 'beyond'} 0.1{X} here; the seed design stored again "
                     f"{100 * gs / max(s.bytes_processed, 1):.0f} % of its dump, so ≤ 0.1{X} holds while the first "
                     f"change lies in the first {100 * max(edge, 0):.0f} % of the table")
    else:
        # Where the changed rows fall at random, a chunk is stored anew unless none of them is in
        # it: with k changed rows per chunk on average it survives with probability e^-k.
        touched = sum(int(tag.split()[-1]) for tag in change.split(", ") if tag.startswith(("UPDATE", "DELETE")))
        per_chunk = touched / max(total_blobs, 1)
        survive = 100 * math.exp(-per_chunk)
        r.verdict = (f"info: {touched} changed rows over {total_blobs} chunks, {per_chunk:.1f} per chunk; "
                     f"any one-stream dump keeps ≤ e^-{per_chunk:.1f} = {survive:.1f} % of its chunks")
    report.detail(
        f"2. {pattern} change ({change}): watcher +{fmt_mb(gw)} on disk (restic: {fmt_mb(w.bytes_added)} "
        f"added, {new_blobs} new blobs of the {total_blobs} the snapshot references = "
        f"{100 * new_blobs / max(total_blobs, 1):.0f} %, dump {fmt_mb(w.bytes_processed)}); "
        f"seed design +{fmt_mb(gs)} (restic: {fmt_mb(s.bytes_added)} added of a {fmt_mb(s.bytes_processed)} dump)."
    )
