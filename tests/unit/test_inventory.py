"""The inventory's registration on a fake clock: first runs (catch-up), renames, labels, databases=all.

Containers are plain ContainerInfo values handed to `Inventory.register`; Docker is never asked.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from tests.unit.daemon_kit import T0, NoDocker, container
from watcher.clock import FakeClock
from watcher.config import Retention
from watcher.daemon.inventory import Inventory, known_databases, newest_by_database
from watcher.daemon.messages import LabelsJudged, Registered, Removed, Renamed
from watcher.discovery import ContainerInfo, DiscoveryRules
from watcher.execute import Masker
from watcher.registry import DatabaseState, Registry
from watcher.restic import Snapshot

NAME = "scalr-app-db"
ID = f"{NAME}-id"


def snap(database: str, at: datetime, container_name: str = NAME) -> Snapshot:
    return Snapshot(f"{container_name}-{database}-{at:%H%M}", "short", at, "test-host", container_name, database, 1)


def inventory(now: datetime = T0, schedule: str = "0 3 * * *",
              snapshots: tuple[Snapshot, ...] = ()) -> tuple[Inventory, Registry, FakeClock]:
    registry, clock = Registry(), FakeClock(now)
    found = Inventory(NoDocker(), DiscoveryRules(("scalr-*-db",), schedule, Retention()), registry, clock, "UTC",
                      Masker())
    found.load(snapshots)
    return found, registry, clock


def test_a_new_target_without_a_snapshot_is_backed_up_at_once() -> None:
    found, registry, _ = inventory(now=T0 + timedelta(hours=5))
    changes = found.register(container())
    entry = registry.get(ID)
    assert entry is not None and entry.next_run == T0 + timedelta(hours=5) and entry.interval_s == 86400
    assert changes == [LabelsJudged(NAME, None), Registered(entry, T0 + timedelta(hours=5))]


def test_a_target_backed_up_since_its_last_slot_waits_for_its_next_slot() -> None:
    found, registry, _ = inventory(now=T0 + timedelta(hours=5), snapshots=(snap("app", T0 + timedelta(minutes=1)),))
    found.register(container())
    entry = registry.get(ID)
    assert entry is not None and entry.next_run == T0 + timedelta(days=1)
    assert entry.databases["app"].last_snapshot == T0 + timedelta(minutes=1)


def test_a_slot_missed_while_the_watcher_was_down_is_caught_up_at_once() -> None:
    # The newest snapshot is older than the slot before now (03:00 today): catch up now, not tomorrow.
    found, registry, _ = inventory(now=T0 + timedelta(hours=5), snapshots=(snap("app", T0 - timedelta(hours=20)),))
    found.register(container())
    assert registry.get(ID).next_run == T0 + timedelta(hours=5)  # type: ignore[union-attr]


def test_a_container_restarted_after_missing_a_slot_is_caught_up() -> None:
    found, registry, clock = inventory(schedule="* * * * *", snapshots=(snap("app", T0),))
    found.register(container())
    assert registry.get(ID).next_run == T0 + timedelta(minutes=1)  # type: ignore[union-attr]
    assert found.stopped(ID) == [] and registry.get(ID).state == "stopped"  # type: ignore[union-attr]
    clock.advance(150)
    found.register(container())
    entry = registry.get(ID)
    assert entry is not None and not entry.stopped and entry.next_run == T0 + timedelta(seconds=150)


def test_an_unchanged_running_target_is_left_as_it_is() -> None:
    found, registry, clock = inventory()
    found.register(container())
    before = registry.get(ID)
    clock.advance(3600)
    assert found.register(container()) == [LabelsJudged(NAME, None)]
    assert registry.get(ID) == before


def test_bad_labels_make_an_invalid_entry_until_they_are_fixed() -> None:
    found, registry, _ = inventory()
    changes = found.register(container(labels={"backup-watcher.keep-daily": "lots"}))
    entry = registry.get(ID)
    assert entry is not None and entry.state == "invalid" and entry.target is None
    assert isinstance(changes[0], LabelsJudged) and "keep-daily='lots'" in str(changes[0].problem)
    changes = found.register(container(labels={"backup-watcher.keep-daily": "3"}))
    assert changes[0] == LabelsJudged(NAME, None) and isinstance(changes[1], Registered)
    assert registry.get(ID).target.retention.daily == 3  # type: ignore[union-attr]


def test_a_container_no_longer_selected_leaves_the_registry_without_being_destroyed() -> None:
    found, registry, _ = inventory()
    found.register(container())
    assert found.register(container(labels={"backup-watcher.enable": "false"})) == [Removed(ID, NAME, False)]
    assert registry.get(ID) is None
    assert found.register(container("other-app", container_id="x")) == []


def test_a_rename_moves_the_entry_and_its_history_under_the_new_name() -> None:
    found, registry, clock = inventory(snapshots=(snap("app", T0 + timedelta(minutes=1)),))
    found.register(container())
    clock.advance(60)
    changes = found.register(container("scalr-new-db", container_id=ID), old_name=NAME)
    assert changes[:2] == [LabelsJudged("scalr-new-db", None), Renamed(ID, NAME, "scalr-new-db")]
    entry = registry.get(ID)
    assert entry is not None and entry.name == "scalr-new-db" and entry.target is not None
    assert entry.target.name == "scalr-new-db"
    # The renamed target keeps its snapshot: it is not backed up again before its next slot.
    assert entry.databases["app"].last_snapshot == T0 + timedelta(minutes=1)
    assert entry.next_run == T0 + timedelta(days=1)
    # A rename seen only as a changed name (a missed event) is a rename too.
    changes = found.register(container("scalr-third-db", container_id=ID))
    assert Renamed(ID, "scalr-new-db", "scalr-third-db") in changes


def test_newer_snapshots_are_taken_for_the_targets_databases_only() -> None:
    found, registry, _ = inventory(snapshots=(snap("app", T0),))
    found.register(container())
    found.take_snapshots([snap("app", T0 - timedelta(days=1)), snap("other", T0 + timedelta(hours=1))])
    entry = registry.get(ID)
    assert entry is not None and entry.databases["app"].last_snapshot == T0 and "other" not in entry.databases
    found.take_snapshots([snap("app", T0 + timedelta(hours=2))])
    assert registry.get(ID).databases["app"].last_snapshot == T0 + timedelta(hours=2)  # type: ignore[union-attr]


def test_newest_by_database() -> None:
    newest = newest_by_database([snap("app", T0), snap("app", T0 + timedelta(days=1)), snap("b", T0)])
    assert newest[(NAME, "app")].time == T0 + timedelta(days=1) and len(newest) == 2


@pytest.mark.parametrize(("newest_at", "extra_at", "kept"), [
    # A pass of the 03:00 slot: the databases backed up since that slot.
    (T0 + timedelta(seconds=50), T0 + timedelta(seconds=5), True),
    (T0 + timedelta(seconds=50), T0, True),
    (T0 + timedelta(seconds=50), T0 - timedelta(seconds=1), False),  # a pass before: dropped since
    (T0 + timedelta(seconds=50), T0 - timedelta(days=30), False),
    # A catch-up pass at 02:00 (between slots): everything since the slot before it, yesterday 03:00.
    (T0 - timedelta(hours=1), T0 - timedelta(hours=1, seconds=30), True),
    (T0 - timedelta(hours=1), T0 - timedelta(hours=23), True),
    (T0 - timedelta(hours=1), T0 - timedelta(hours=24, seconds=1), False),
])
def test_all_databases_after_a_restart_are_those_of_the_latest_pass(newest_at: datetime, extra_at: datetime,
                                                                     kept: bool) -> None:
    found, registry, _ = inventory(now=T0 + timedelta(hours=1), snapshots=(snap("app", newest_at),
                                                                           snap("extra", extra_at)))
    found.register(container(labels={"backup-watcher.databases": "all"}))
    entry = registry.get(ID)
    assert entry is not None and entry.databases["app"].last_snapshot == newest_at
    assert ("extra" in entry.databases) is kept


def test_named_databases_are_those_named_whatever_the_repository_holds() -> None:
    found, registry, _ = inventory(snapshots=(snap("app", T0), snap("old", T0)))
    found.register(container(labels={"backup-watcher.databases": "app,billing"}))
    entry = registry.get(ID)
    assert entry is not None and sorted(entry.databases) == ["app", "billing"]
    assert entry.databases["billing"].last_snapshot is None and entry.next_run == T0, "billing has no snapshot yet"
    assert entry.target is not None
    assert known_databases(entry.target, {}, "UTC") == {"app": DatabaseState(), "billing": DatabaseState()}


def test_a_targets_globals_are_judged_like_a_database_once_the_repository_has_them() -> None:
    globals_name = "(globals)"
    found, registry, _ = inventory(snapshots=(snap("app", T0), snap(globals_name, T0 - timedelta(days=2))))
    found.register(container())
    entry = registry.get(ID)
    assert entry is not None and sorted(entry.databases) == [globals_name, "app"]
    # Stale globals make the target's freshness that of its globals (each history must be fresh).
    assert entry.judged_snapshot == T0 - timedelta(days=2)
    found.take_snapshots([snap(globals_name, T0 + timedelta(hours=1))])
    assert registry.get(ID).databases[globals_name].last_snapshot == T0 + timedelta(hours=1)  # type: ignore[union-attr]
    # A repository from before globals were kept: the target is judged by its databases alone.
    older, registry, _ = inventory(snapshots=(snap("app", T0),))
    older.register(container())
    assert sorted(registry.get(ID).databases) == ["app"]  # type: ignore[union-attr]


class ListedDocker:
    """Docker as a reconcile sees it: a full listing (stopped containers included) and inspect."""

    def __init__(self, *containers: ContainerInfo) -> None:
        self.containers = {info.id: info for info in containers}
        self.inspected: list[str] = []

    def inspect(self, container: str) -> ContainerInfo | None:
        self.inspected.append(container)
        return self.containers.get(container)

    def list_all(self) -> list[tuple[str, str, bool]]:
        return [(info.id, info.name, info.running) for info in self.containers.values()]


def test_a_selected_container_found_stopped_at_start_is_a_stopped_target_judged_for_staleness() -> None:
    # A database container that did not come back after a reboot: before, a daemon (re)started then never
    # registered it, so no stale alert, no summary at start and no metrics series said a word of it.
    from watcher.daemon.outcomes import staleness

    docker = ListedDocker(container(running=False), container("web", running=False))
    registry, clock = Registry(), FakeClock(T0 + timedelta(days=3))
    found = Inventory(docker, DiscoveryRules(("scalr-*-db",), "0 3 * * *", Retention()), registry, clock, "UTC",
                      Masker())
    found.load((snap("app", T0),))
    changes = found.reconcile("start")
    assert changes is not None
    entry = registry.get(ID)
    assert entry is not None and entry.state == "stopped" and entry.databases["app"].last_snapshot == T0
    registered = [change for change in changes if isinstance(change, Registered)]
    assert [change.entry for change in registered] == [entry], "the start's summary judges the stopped entry"
    stale, detail = staleness(entry, clock.now())
    assert stale and "the container is stopped" in detail
    assert registry.get("web-id") is None, "an unselected stopped container stays out"
    docker.inspected.clear()
    assert found.reconcile("periodic") == [] and docker.inspected == [], "each is inspected once, not per reconcile"


def test_a_stopped_target_renamed_follows_its_name_so_a_newcomer_under_the_old_one_is_told_apart() -> None:
    # The upgrade by hand: `docker stop db; docker rename db db-old; docker run --name db ...`. The stopped
    # container kept its old name in the registry, so two entries bore the name (one history, one metrics series,
    # one alert state), and `docker rm db-old` then removed the name of the newcomer's series and alert state.
    from watcher.events import ContainerEvent

    old, new = container(running=False), container(container_id="new-id")
    renamed = ContainerInfo(old.id, "scalr-app-old-db", old.image, old.labels, old.env, running=False)
    docker = ListedDocker(renamed, new)
    registry, clock = Registry(), FakeClock(T0)
    found = Inventory(docker, DiscoveryRules(("scalr-*-db",), "0 3 * * *", Retention()), registry, clock, "UTC",
                      Masker())
    found.load((snap("app", T0 - timedelta(hours=2)),))
    found.register(container())
    found.stopped(ID)
    changes = found.event(ContainerEvent("rename", ID, renamed.name, old_name=NAME))
    assert Renamed(ID, NAME, renamed.name) in changes
    entry = registry.get(ID)
    assert entry is not None and entry.name == renamed.name and entry.stopped
    assert [change.entry for change in changes if isinstance(change, Registered)] == [entry]
    found.event(ContainerEvent("start", "new-id", NAME))
    assert sorted(e.name for e in registry.view()) == [NAME, renamed.name]
    docker.inspected.clear()
    assert found.reconcile("periodic") == [] and docker.inspected == [], "nothing left to follow"
    assert found.event(ContainerEvent("destroy", ID, renamed.name)) == [Removed(ID, renamed.name, destroyed=True)]
