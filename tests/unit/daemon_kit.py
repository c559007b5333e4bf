"""Plain values and real parts for the daemon's unit tests: targets, entries, results, outcomes on a fake clock.

Nothing here talks to Docker, restic or PostgreSQL: the parts under test are pure logic over values.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from alerting.policy import Alert, AlertPolicy, Kind
from watcher.clock import FakeClock
from watcher.config import Retention
from watcher.daemon.outcomes import Outcomes
from watcher.discovery import ContainerInfo, Credentials, Target
from watcher.execute import Masker
from watcher.jobs import BackupResult
from watcher.metrics import Metrics
from watcher.registry import DatabaseState, Registry, TargetState

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)  # a Saturday, 03:00 UTC: the default daily slot
SECRET = "s3cret-db-pw"


def make_target(name: str = "scalr-app-db", *, schedule: str = "0 3 * * *", databases: tuple[str, ...] = ("app",),
                drill: bool = True) -> Target:
    """A target of container id `<name>-id`."""
    return Target(f"{name}-id", name, "postgres:17", Credentials("postgres", "app", SECRET), databases, schedule,
                  Retention(), drill=drill)


def make_entry(name: str = "scalr-app-db", *, next_run: datetime | None = T0, stopped: bool = False,
               schedule: str = "0 3 * * *", databases: tuple[str, ...] = ("app",), drill: bool = True,
               snapshots: dict[str, datetime] | None = None, interval_s: float = 86400.0,
               registered_at: datetime | None = None) -> TargetState:
    """A registered target; `snapshots` gives the newest snapshot time of each database."""
    target = make_target(name, schedule=schedule, databases=databases, drill=drill)
    dbs = {db: DatabaseState(last_snapshot=at, last_snapshot_id=f"{db}-snap") for db, at in (snapshots or {}).items()}
    return TargetState(target.container_id, name, target=target, stopped=stopped, next_run=next_run,
                       interval_s=interval_s, databases=dbs, registered_at=registered_at or T0)


def container(name: str = "scalr-app-db", *, labels: dict[str, str] | None = None, running: bool = True,
              container_id: str | None = None) -> ContainerInfo:
    """A container's facts as `docker inspect` gives them, without Docker."""
    return ContainerInfo(container_id or f"{name}-id", name, "postgres:17", labels or {},
                         {"POSTGRES_PASSWORD": SECRET, "POSTGRES_DB": "app"}, running=running)


def backup_result(database: str = "app", *, ok: bool = True, at: datetime = T0, error: str | None = None,
                  target: str = "scalr-app-db", snapshot_id: str = "0123456789abcdef") -> BackupResult:
    """One database's backup result."""
    if ok:
        return BackupResult(target, database, True, "run1", at, 2.5, snapshot_id=snapshot_id, bytes_processed=1000,
                            bytes_added=100, snapshot_time=at.replace(microsecond=0))
    return BackupResult(target, database, False, "run1", at, 1.5, error=error or "pg_dump: error: boom")


class NoDocker:
    """The inventory's Docker in unit tests: never asked (register() works from the facts it is given)."""

    def inspect(self, container: str) -> ContainerInfo | None:
        raise AssertionError("a unit test asked Docker")

    def list_all(self) -> list[tuple[str, str, bool]]:
        raise AssertionError("a unit test asked Docker")


class Pages:
    """Where the outcomes' alerts go in a test: kept in order, nothing delivered."""

    def __init__(self) -> None:
        self.sent: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.sent.append(alert)

    def titles(self) -> list[str]:
        return [alert.title for alert in self.sent]

    def kinds(self) -> list[Kind]:
        return [alert.kind for alert in self.sent]


@dataclass
class World:
    """Outcomes wired to a real registry, real metrics and a real alert policy, on a fake clock."""

    clock: FakeClock = field(default_factory=lambda: FakeClock(T0))
    registry: Registry = field(default_factory=Registry)
    prometheus: CollectorRegistry = field(default_factory=CollectorRegistry)
    pages: Pages = field(default_factory=Pages)
    cancel: threading.Event = field(default_factory=threading.Event)
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.prometheus, self.registry, version="test",
                               clock=lambda: self.clock.now().timestamp())
        self.outcomes = Outcomes(registry=self.registry, metrics=self.metrics, clock=self.clock,
                                 timezone=self.timezone, policy=AlertPolicy(), masker=Masker([SECRET]),
                                 host="test-host", docker_host="unix:///test.sock", cancel=self.cancel,
                                 notifier=self.pages)
        self.outcomes.stream_changed(True)  # the event stream is up unless a test says otherwise

    def sample(self, name: str, **labels: str) -> float | None:
        """One sample of the metrics, as a scrape would read it."""
        return self.prometheus.get_sample_value(name, labels)
