"""The daemon's parts together on a fake clock, second by second: inventory → scheduler → book → outcomes.

Jobs "run" for a set number of seconds and end with the result the test chooses, as the loop would
see them end: passes over cron slots, concurrency, the prune between passes, catch-up, retries and
the hold on a renamed container's old name play out in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tests.unit.daemon_kit import T0, NoDocker, World, backup_result, container
from watcher.config import Retention
from watcher.daemon.inventory import Inventory
from watcher.daemon.messages import BackupFinished, JobFinished, PruneFinished, RetagFinished
from watcher.daemon.running import BackupJob, Book, DrillJob, Job, PruneJob, RefreshJob, RetagJob
from watcher.daemon.scheduler import View, plan
from watcher.discovery import ContainerInfo, DiscoveryRules
from watcher.execute import Masker
from watcher.restic import Snapshot
from watcher.retention import PruneResult


@dataclass
class Ran:
    """One job as it ran."""

    job: Job
    start: datetime
    end: datetime
    ok: bool = True

    @property
    def name(self) -> str:
        return self.job.target.name if isinstance(self.job, BackupJob) else type(self.job).__name__

    @property
    def container_id(self) -> str | None:
        return self.job.container_id if isinstance(self.job, BackupJob | RetagJob) else None


@dataclass
class Simulation:
    """The loop's wiring of the parts, driven by a fake clock instead of a queue."""

    schedule: str = "* * * * *"
    concurrency: int = 2
    seconds: int = 10  # how long each job runs
    world: World = field(default_factory=World)
    book: Book = field(default_factory=Book)
    ran: list[Ran] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)  # targets whose backups fail
    blocked: set[str] = field(default_factory=set)  # targets whose backups do not end
    prune: bool = True  # WATCHER_PRUNE

    def __post_init__(self) -> None:
        rules = DiscoveryRules(("*-db",), self.schedule, Retention())
        self.inventory = Inventory(NoDocker(), rules, self.world.registry, self.world.clock, "UTC", Masker())

    @property
    def now(self) -> datetime:
        return self.world.clock.now()

    def register(self, info: ContainerInfo, old_name: str | None = None) -> None:
        for change in self.inventory.register(info, old_name):
            self.book = self.book.noted(change)
            self.world.outcomes.noted(change)

    def running(self) -> list[Ran]:
        return [r for r in self.ran if r.end > self.now]

    def tick(self) -> None:
        """One second: jobs that end now report, then the plan starts what is due."""
        self.world.clock.advance(1)
        for ran in [r for r in self.ran if r.end == self.now]:
            self._finish(ran)
        view = View(self.world.registry.view(), self.concurrency, "UTC", prune=self.prune)
        for job in plan(view, self.book, self.now):
            self.book = self.book.started(job)
            if isinstance(job, BackupJob | RetagJob):
                self.world.registry.mark_running(job.container_id)
            blocked = isinstance(job, BackupJob) and job.target.name in self.blocked
            ran = Ran(job, self.now, self.now + (timedelta(days=999) if blocked else timedelta(seconds=self.seconds)))
            ran.ok = not (isinstance(job, BackupJob) and job.target.name in self.failing)
            self.ran.append(ran)

    def release(self, name: str) -> None:
        """A blocked backup of `name` ends now."""
        self.blocked.discard(name)
        for ran in self.running():
            if ran.name == name:
                ran.end = self.now + timedelta(seconds=1)

    def run_for(self, seconds: int) -> None:
        for _ in range(seconds):
            self.tick()

    def _finish(self, ran: Ran) -> None:
        message = self._finished(ran)
        self.book = self.book.finished(message)
        self.inventory.take_snapshots(self.world.outcomes.job_finished(message))

    def _finished(self, ran: Ran) -> JobFinished:
        job = ran.job
        if isinstance(job, BackupJob):
            result = backup_result(ok=ran.ok, at=ran.start, target=job.target.name)
            snaps = (Snapshot("s" * 16, "s" * 8, ran.start, "test-host", job.target.name, "app", 1),) if ran.ok else ()
            return BackupFinished(job.container_id, (result,), snaps)
        if isinstance(job, RetagJob):
            return RetagFinished(job.container_id, job.renames)
        assert isinstance(job, PruneJob), job
        return PruneFinished(PruneResult(True, "p", 1.0, 0, None))

    def backups(self, name: str) -> list[Ran]:
        return [r for r in self.ran if r.name == name]


def test_passes_one_backup_per_target_and_slot_within_the_concurrency_and_a_prune_between() -> None:
    sim = Simulation(concurrency=2, seconds=10)
    names = [f"pass-{i}-db" for i in range(1, 5)]
    for name in names:
        sim.register(container(name))
    sim.run_for(3 * 60 - 1)  # the catch-up pass at the start, then the slots of 03:01 and 03:02
    for name in names:
        starts = [r.start for r in sim.backups(name)]
        assert len(starts) == 3 and starts[0] < T0 + timedelta(minutes=1), (name, starts)
        assert [s.replace(second=0) for s in starts[1:]] == [T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)]
    for ran in sim.ran:
        overlapping = [r for r in sim.ran if isinstance(r.job, BackupJob) and r.start <= ran.start < r.end]
        assert len(overlapping) <= 2
    prunes = [r for r in sim.ran if isinstance(r.job, PruneJob)]
    assert len(prunes) == 3
    for prune in prunes:
        assert not [r for r in sim.ran if isinstance(r.job, BackupJob) and r.start < prune.end and prune.start < r.end]
    for minute in range(3):
        slot = T0 + timedelta(minutes=minute)
        last = max(r.end for r in sim.ran if isinstance(r.job, BackupJob) and slot <= r.start < slot + timedelta(
            minutes=1))
        assert any(last <= p.start < slot + timedelta(minutes=1) for p in prunes)
    assert not [r for r in sim.ran if isinstance(r.job, DrillJob | RefreshJob)]


def test_with_pruning_off_every_pass_runs_and_no_prune_ever_starts() -> None:
    sim = Simulation(concurrency=2, seconds=10, prune=False)
    for name in ("a-db", "b-db", "c-db"):
        sim.register(container(name))
    sim.run_for(5 * 60 - 1)  # the catch-up pass, then four slots
    assert [len(sim.backups(name)) for name in ("a-db", "b-db", "c-db")] == [5, 5, 5]
    assert all(r.ok for r in sim.ran)
    assert not [r for r in sim.ran if isinstance(r.job, PruneJob)]


def test_a_failed_backup_is_retried_after_its_back_off_not_at_once() -> None:
    sim = Simulation(schedule="0 3 * * *", seconds=5)
    sim.failing.add("app-db")
    sim.register(container("app-db"))
    sim.run_for(30 * 60)
    starts = [r.start - T0 for r in sim.backups("app-db")]
    # Registered with no snapshot: at once; then 5, 10 and 20 minutes after each failure ended.
    assert starts == [timedelta(seconds=1), timedelta(minutes=5, seconds=6), timedelta(minutes=15, seconds=11)]
    sim.failing.clear()
    sim.run_for(40 * 60)
    assert len(sim.backups("app-db")) == 4 and sim.backups("app-db")[-1].ok
    assert [a.kind.value for a in sim.world.pages.sent] == ["failed", "recovered"]
    assert "after 3 failure(s)" in sim.world.pages.sent[1].body


def test_a_rename_waits_for_the_running_backup_and_holds_a_newcomer_under_the_old_name() -> None:
    sim = Simulation()
    sim.register(container("old-db"))
    sim.run_for(60 + 5)  # the first backup, then the 03:01 slot's, which does not end (a lock)
    sim.blocked.add("old-db")
    sim.run_for(60)
    assert sim.running() and sim.running()[0].name == "old-db"
    sim.register(container("renamed-db", container_id="old-db-id"), old_name="old-db")
    sim.register(container("old-db", container_id="newcomer-id"))
    sim.run_for(90)
    assert sim.backups("old-db")[-1].container_id == "old-db-id", "the newcomer waits for the retag"
    assert not [r for r in sim.ran if isinstance(r.job, RetagJob)], "the retag waits for the running backup"
    sim.release("old-db")
    sim.run_for(30)
    retag = next(r for r in sim.ran if isinstance(r.job, RetagJob))
    newcomer = [r for r in sim.backups("old-db") if r.container_id == "newcomer-id"]
    assert retag.job == RetagJob("old-db-id", (("old-db", "renamed-db"),))
    assert newcomer and newcomer[0].start >= retag.end
