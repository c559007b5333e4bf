"""Shrunken dumps in the daemon (SPEC §11): a history's changed size verdict → log lines and pages.

The verdicts come from the inventory (watcher.anomaly judges them from the repository's snapshots); the
metric follows from the registry. Only the daemon's loop thread calls it.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from alerting.policy import AlertPolicy, Concern
from watcher.anomaly import SizeVerdict, describe
from watcher.clock import Clock
from watcher.daemon.messages import SizeJudged

log = structlog.get_logger("watcher.daemon")
Alert = Callable[[str, Concern, bool, str], None]  # (subject, concern, ok, detail): Outcomes.alert


class ShrunkenDumps:
    """Which histories of each target are flagged, and what that says to people."""

    def __init__(self, policy: AlertPolicy, clock: Clock, alert: Alert) -> None:
        self.policy = policy
        self.clock = clock
        self._alert = alert
        self._flagged: dict[str, dict[str, SizeVerdict]] = {}  # target → its flagged histories

    def renamed(self, old_name: str, new_name: str) -> None:
        """A target took a new name: its flagged histories follow it."""
        if old_name in self._flagged:
            self._flagged[new_name] = self._flagged.pop(old_name)

    def forget(self, name: str) -> None:
        """A target is gone."""
        self._flagged.pop(name, None)

    def judged(self, judged: SizeJudged) -> None:
        """Logs a dump flagged as shrunken, or a history cleared of it, and pages the target's state: a
        warning while any of its histories is flagged, a recovery once none is. A history flagged before a
        restart was paged by the daemon that saw its dump: it is taken as paged."""
        name, database, verdict, previous = judged.name, judged.database, judged.verdict, judged.previous
        flagged = self._flagged.setdefault(name, {})
        if verdict.flagged:
            flagged[database] = verdict
            if previous is None or previous.snapshot_id != verdict.snapshot_id:
                log.warning("backup_size_anomaly", target=name, database=database,
                            snapshot_id=(verdict.snapshot_id or "")[:8], bytes=verdict.size,
                            reference_bytes=verdict.reference, ratio=round(verdict.ratio or 0.0, 4),
                            at_start=judged.at_start)
        elif previous is not None and previous.flagged:
            flagged.pop(database, None)
            log.info("size_anomaly_cleared", target=name, database=database,
                     snapshot_id=(verdict.snapshot_id or "")[:8], bytes=verdict.size,
                     # `ack` rewrites the flagged snapshot under a new id, with its time.
                     reason="acknowledged (`backup-watcher ack`)" if verdict.at == previous.at
                     else "a dump of normal size")
        else:
            return
        detail = "\n".join(describe(db, v) for db, v in sorted(flagged.items())) or (
            f"{database}: snapshot {(verdict.snapshot_id or '?')[:8]}, {verdict.size} bytes, is of normal size "
            "again or acknowledged")
        if judged.at_start and verdict.flagged:
            self.policy.assume_failing(name, Concern.SIZE, self.clock.now())
        else:
            self._alert(name, Concern.SIZE, not flagged, detail)
