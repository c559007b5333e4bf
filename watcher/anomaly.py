"""Shrunken dumps (SPEC §11): a dump far smaller than its history's last normal one is kept but flagged.

A history is one (container, database) of one host, the container's globals (`(globals)`) being a history of
their own. Its dumps are compared by size, the bytes restic read from the stream (`total_bytes_processed`,
kept in each snapshot's summary), not what deduplication added. Walking a history oldest first, the
reference is the size of its last normal dump: a dump below WATCHER_SHRINK_THRESHOLD x the reference is
flagged and leaves the reference as it was, so a second small dump after a shrink is flagged too; a dump of
normal size, or one the operator acknowledged (`backup-watcher ack`, the tag commands.ACK_TAG), becomes the
reference. A history is flagged while its newest snapshot is.

Nothing is kept in memory that the repository does not hold: the verdict follows from the snapshots' sizes
and tags, so it survives restarts and a maintenance host that prunes (`backup-watcher prune`) judges the
same way as the daemon that made the dumps. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from watcher.restic import Snapshot

History = tuple[str, str]  # (container, database)


@dataclass(frozen=True)
class SizeVerdict:
    """Where one history stands after its newest snapshot.

    `size` is the newest snapshot's byte count (None when restic recorded none); `reference` the size the
    next dump is compared with: the last normal (or acknowledged) one, which for a flagged snapshot is the
    size it fell short of.
    """

    flagged: bool = False
    size: int | None = None
    reference: int | None = None
    snapshot_id: str | None = None
    at: datetime | None = None

    @property
    def ratio(self) -> float | None:
        """The newest size as a fraction of the reference, where both are known."""
        if self.size is None or not self.reference:
            return None
        return self.size / self.reference


def shrunk(size: int | None, reference: int | None, threshold: float) -> bool:
    """Whether a dump of `size` bytes is below `threshold` x `reference` (unknown sizes never are)."""
    return size is not None and reference is not None and reference > 0 and size < threshold * reference


def follow(verdict: SizeVerdict, snapshot: Snapshot, threshold: float) -> SizeVerdict:
    """Returns the verdict once `snapshot`, newer than every snapshot before it, joins the history."""
    if shrunk(snapshot.bytes, verdict.reference, threshold) and not snapshot.acked:
        return SizeVerdict(True, snapshot.bytes, verdict.reference, snapshot.id, snapshot.time)
    reference = snapshot.bytes if snapshot.bytes is not None else verdict.reference
    return SizeVerdict(False, snapshot.bytes, reference, snapshot.id, snapshot.time)


def history_of(snapshot: Snapshot) -> History:
    """The history a snapshot belongs to (its host aside: callers list one host's snapshots)."""
    return snapshot.container, snapshot.database


def judge_all(snapshots: Iterable[Snapshot], threshold: float) -> dict[History, SizeVerdict]:
    """The verdict of every history among `snapshots` (one host's), whatever their order.

    An acknowledged snapshot beside an unacknowledged one of the same history and time does not count: an
    `ack` whose credentials could not remove the snapshot it rewrote (append-only) left both, and failed; the
    original keeps its flag until the acknowledgement is run where the credentials may delete.
    """
    listed = list(snapshots)
    originals = {(history_of(snap), snap.time) for snap in listed if not snap.acked}
    verdicts: dict[History, SizeVerdict] = {}
    for snapshot in sorted(listed, key=lambda snap: snap.time):
        if snapshot.acked and (history_of(snapshot), snapshot.time) in originals:
            continue
        key = history_of(snapshot)
        verdicts[key] = follow(verdicts.get(key, SizeVerdict()), snapshot, threshold)
    return verdicts


def flagged_histories(snapshots: Iterable[Snapshot], threshold: float) -> dict[History, SizeVerdict]:
    """The histories whose newest snapshot is a flagged shrunken dump, with their verdicts."""
    return {key: verdict for key, verdict in judge_all(snapshots, threshold).items() if verdict.flagged}


def describe(database: str, verdict: SizeVerdict) -> str:
    """One line for people: which dump shrank, to what, from what."""
    ratio = verdict.ratio
    share = f"{ratio:.0%}" if ratio is not None else "?"
    return (f"{database}: snapshot {(verdict.snapshot_id or '?')[:8]} is {verdict.size} bytes, {share} of the "
            f"previous normal dump ({verdict.reference} bytes)")
