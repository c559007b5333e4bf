"""Shrunken dumps (SPEC §11): the verdicts from sizes and tags, what retention spares, how the daemon's
inventory follows new snapshots and listings, and what the outcomes log, export and page.

Snapshots are plain values; restic, Docker and PostgreSQL are not involved (tests/integration/test_shrink.py
runs the whole of it for real).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from alerting.policy import Concern, Kind, Severity
from tests.unit.daemon_kit import T0, NoDocker, World, container, make_entry, make_target
from watcher import commands
from watcher.anomaly import SizeVerdict, flagged_histories, follow, judge_all, shrunk
from watcher.clock import FakeClock
from watcher.config import ConfigError, Retention, load_config
from watcher.daemon.inventory import Inventory, size_changes
from watcher.daemon.messages import Removed, SizeJudged
from watcher.discovery import DiscoveryRules
from watcher.execute import Masker
from watcher.restic import Snapshot, parse_snapshots
from watcher.retention import ForgetScope, forget_scopes

NAME = "scalr-app-db"
GLOBALS = commands.GLOBALS_DATABASE


def snap(size: int | None, day: int, database: str = "app", *, acked: bool = False, name: str = NAME) -> Snapshot:
    at = T0 + timedelta(days=day)
    return Snapshot(f"{name}-{database}-{day}-{acked}", "short", at, "test-host", name, database, size,
                    globals=database == GLOBALS, acked=acked)


def verdict_of(*snapshots: Snapshot, threshold: float = 0.5) -> SizeVerdict:
    (verdict,) = judge_all(snapshots, threshold).values()
    return verdict


def test_shrunk_is_below_the_threshold_share_of_the_reference_and_never_for_unknown_sizes() -> None:
    assert shrunk(49, 100, 0.5) and not shrunk(50, 100, 0.5) and not shrunk(1000, 100, 0.5)
    assert not shrunk(None, 100, 0.5) and not shrunk(10, None, 0.5) and not shrunk(0, 0, 0.5)


def test_a_90_percent_shrink_is_flagged_against_the_previous_dump() -> None:
    verdict = verdict_of(snap(1000, 0), snap(1000, 1), snap(100, 2))
    assert verdict.flagged and verdict.size == 100 and verdict.reference == 1000 and verdict.ratio == 0.1
    assert verdict.snapshot_id == f"{NAME}-app-2-False" and verdict.at == T0 + timedelta(days=2)


def test_the_first_dump_and_dumps_that_grow_or_shrink_a_little_are_normal() -> None:
    assert not verdict_of(snap(10, 0)).flagged
    assert not verdict_of(snap(1000, 0), snap(600, 1), snap(400, 2)).flagged, "each step is above half"
    assert not verdict_of(snap(1000, 0), snap(None, 1)).flagged


def test_small_dumps_after_a_shrink_stay_flagged_until_one_of_normal_size_follows() -> None:
    assert verdict_of(snap(1000, 0), snap(100, 1), snap(110, 2)).flagged, "compared with the last normal dump"
    cleared = verdict_of(snap(1000, 0), snap(100, 1), snap(900, 2))
    assert not cleared.flagged and cleared.reference == 900


def test_an_acknowledged_dump_is_the_new_normal_and_later_dumps_are_compared_with_it() -> None:
    assert not verdict_of(snap(1000, 0), snap(100, 1, acked=True)).flagged
    assert not verdict_of(snap(1000, 0), snap(100, 1, acked=True), snap(90, 2)).flagged
    again = verdict_of(snap(1000, 0), snap(100, 1, acked=True), snap(10, 2))
    assert again.flagged and again.reference == 100


def test_an_acknowledged_copy_beside_its_original_leaves_the_flag_on_the_original() -> None:
    # `ack` with append-only credentials writes the tagged copy but cannot remove the original: it failed,
    # and the dump stays flagged, the original named, until the ack runs where the credentials may delete.
    original, acked = snap(100, 1), replace(snap(100, 1, acked=True), id="copy")
    for order in ((original, acked), (acked, original)):
        verdict = verdict_of(snap(1000, 0), *order)
        assert verdict.flagged and verdict.snapshot_id == original.id
    # Run again there, it leaves two acknowledged copies (retention keeps one of them): the flag is gone.
    assert not verdict_of(snap(1000, 0), acked, replace(acked, id="second-copy")).flagged


def test_histories_are_judged_apart_globals_included() -> None:
    snapshots = [snap(1000, 0), snap(100, 1), snap(4000, 0, GLOBALS), snap(4000, 1, GLOBALS),
                 snap(50, 0, "other"), snap(50, 1, "other", name="scalr-b-db")]
    assert set(flagged_histories(snapshots, 0.5)) == {(NAME, "app")}
    assert set(flagged_histories([*snapshots, snap(100, 2, GLOBALS)], 0.5)) == {(NAME, "app"), (NAME, GLOBALS)}


def test_a_listing_gives_each_snapshot_its_size_and_acknowledgement() -> None:
    listing = (b'[{"id": "aa", "time": "2026-11-21T03:00:00Z", "hostname": "h", "tags": ["backup-watcher", '
               b'"container=c", "database=app", "size-anomaly-ack"], "summary": {"total_bytes_processed": 42}},'
               b'{"id": "bb", "time": "2026-11-22T03:00:00Z", "hostname": "h", "tags": ["backup-watcher", '
               b'"container=c", "globals"]}]')
    first, second = parse_snapshots(listing, include_globals=True)
    assert (first.bytes, first.acked) == (42, True) and (second.bytes, second.acked, second.globals) == (None, False,
                                                                                                          True)


# --- retention ------------------------------------------------------------------------------------------
def test_retention_forgets_by_container_when_nothing_is_flagged() -> None:
    targets = [make_target(NAME), make_target("scalr-b-db")]
    scopes = forget_scopes(targets, [snap(1000, 0), snap(900, 1)], 0.5)
    assert scopes == [ForgetScope(Retention(), [NAME, "scalr-b-db"], {})]


def test_retention_spares_a_flagged_history_and_forgets_among_the_containers_others() -> None:
    targets = [make_target(NAME), make_target("scalr-b-db")]
    snapshots = [snap(1000, 0), snap(100, 1), snap(9, 0, GLOBALS), snap(9, 1, GLOBALS), snap(5, 0, "b")]
    (scope,) = forget_scopes(targets, snapshots, 0.5)
    assert scope.containers == [NAME, "scalr-b-db"] and scope.histories == {NAME: {GLOBALS, "b"}}
    argv = commands.restic_forget("restic", host="h", containers=scope.containers, retention=scope.retention,
                                  histories=scope.histories, group_by=scope.group_by)
    assert argv[argv.index("--group-by") + 1] == "host,tags"
    filters = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--tag"]
    assert filters == [f"backup-watcher,container={NAME},globals", f"backup-watcher,container={NAME},database=b",
                       "backup-watcher,container=scalr-b-db"]


def test_retention_leaves_out_a_container_whose_every_history_is_flagged_and_a_class_left_empty() -> None:
    snapshots = [snap(1000, 0), snap(100, 1)]
    assert forget_scopes([make_target(NAME)], snapshots, 0.5) == []
    with pytest.raises(ValueError, match="without a tag filter"):
        commands.restic_forget("restic", host="h", containers=[NAME], retention=Retention(), histories={NAME: set()})


def test_an_acknowledged_history_is_forgotten_on_its_own_grouped_by_host_so_its_tag_makes_no_group() -> None:
    snapshots = [snap(1000, 0), snap(100, 1, acked=True), snap(90, 2), snap(9, 0, GLOBALS)]
    assert forget_scopes([make_target(NAME)], snapshots, 0.5) == [
        ForgetScope(Retention(), [NAME], {NAME: {GLOBALS}}),
        ForgetScope(Retention(), [NAME], {NAME: {"app"}}, group_by="host")]
    # Its only history acknowledged: the container has no call of its own.
    assert forget_scopes([make_target(NAME)], snapshots[:3], 0.5) == [
        ForgetScope(Retention(), [NAME], {NAME: {"app"}}, group_by="host")]


def test_the_ack_command_tags_one_snapshot() -> None:
    assert commands.restic_add_tag("restic", "abc123", commands.ACK_TAG) == (
        "restic", "tag", "--add", "size-anomaly-ack", "abc123")


# --- the setting --------------------------------------------------------------------------------------------
BASE = {"RESTIC_REPOSITORY": "/r", "RESTIC_PASSWORD": "pw-123456789"}


def test_the_threshold_defaults_to_a_half_and_takes_a_fraction() -> None:
    assert load_config(BASE).shrink_threshold == 0.5
    assert load_config({**BASE, "WATCHER_SHRINK_THRESHOLD": "0.2"}).shrink_threshold == 0.2


@pytest.mark.parametrize("raw", ["0", "1", "1.5", "-0.1", "half"])
def test_a_threshold_outside_0_and_1_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as failed:
        load_config({**BASE, "WATCHER_SHRINK_THRESHOLD": raw})
    (problem,) = failed.value.problems
    assert problem.startswith("WATCHER_SHRINK_THRESHOLD") and "between 0 and 1" in problem


# --- the daemon: inventory and outcomes ---------------------------------------------------------------------
def test_new_snapshots_follow_the_known_verdict_and_older_ones_change_nothing() -> None:
    known = judge_all([snap(1000, 0)], 0.5)
    changed = size_changes(known, [snap(100, 1)], 0.5, complete=False)
    assert changed[(NAME, "app")].flagged
    assert size_changes(changed, [snap(5, 0)], 0.5, complete=False) == {}


def test_a_listing_judges_anew_unless_the_daemon_knows_a_newer_snapshot() -> None:
    known = {(NAME, "app"): follow(follow(SizeVerdict(), snap(1000, 0), 0.5), snap(100, 1), 0.5)}
    acked = size_changes(known, [snap(1000, 0), snap(100, 1, acked=True)], 0.5, complete=True)
    assert not acked[(NAME, "app")].flagged, "an ack shows in the next listing"
    assert size_changes(known, [snap(1000, 0)], 0.5, complete=True) == {}, "a listing older than the backup"


def _inventory(world: World) -> Inventory:
    return Inventory(NoDocker(), DiscoveryRules(("scalr-*-db",), "0 3 * * *", Retention()), world.registry,
                     FakeClock(T0), "UTC", Masker(), shrink_threshold=0.5)


def test_a_shrunken_dump_is_logged_exported_and_paged_once_as_a_warning_and_a_normal_one_clears_it() -> None:
    world = World()
    found = _inventory(world)
    found.load([snap(1000, 0)])
    assert found.judge_sizes([snap(1000, 0)], complete=True, at_start=True) == [], "nothing flagged: no change"
    world.registry.register(make_entry(NAME))

    with capture_logs() as logged:
        for change in found.judge_sizes([snap(100, 1)], complete=False):
            world.outcomes.noted(change)
    (line,) = [entry for entry in logged if entry["event"] == "backup_size_anomaly"]
    assert (line["target"], line["database"], line["bytes"], line["reference_bytes"], line["ratio"]) == (
        NAME, "app", 100, 1000, 0.1)
    assert world.sample("backup_watcher_size_anomaly", target=NAME, database="app") == 1
    (alert,) = world.pages.sent
    assert alert.kind is Kind.FAILED and alert.concern is Concern.SIZE and alert.severity is Severity.WARNING
    assert "10% of the previous normal dump (1000 bytes)" in alert.body and "backup-watcher ack" in alert.body

    for change in found.judge_sizes([snap(120, 2)], complete=False):  # still small: no new page
        world.outcomes.noted(change)
    assert len(world.pages.sent) == 1
    for change in found.judge_sizes([snap(950, 3)], complete=False):
        world.outcomes.noted(change)
    assert world.sample("backup_watcher_size_anomaly", target=NAME, database="app") == 0
    assert [a.kind for a in world.pages.sent] == [Kind.FAILED, Kind.RECOVERED]
    assert world.pages.sent[1].severity is Severity.SUCCESS


def test_an_ack_seen_in_a_listing_clears_the_flag_and_the_series_goes_with_the_target() -> None:
    world = World()
    found = _inventory(world)
    history = [snap(1000, 0), snap(100, 1)]
    found.load(history)
    for change in found.judge_sizes(history, complete=True, at_start=True):
        world.outcomes.noted(change)
    found.register(container(NAME))
    assert world.sample("backup_watcher_size_anomaly", target=NAME, database="app") == 1
    with capture_logs() as logged:
        for change in found.judge_sizes([snap(1000, 0), replace(snap(100, 1, acked=True), id="new")], complete=True):
            world.outcomes.noted(change)
    assert world.sample("backup_watcher_size_anomaly", target=NAME, database="app") == 0
    (cleared,) = [entry for entry in logged if entry["event"] == "size_anomaly_cleared"]
    assert "acknowledged" in str(cleared["reason"])
    world.outcomes.noted(Removed(f"{NAME}-id", NAME, destroyed=True))
    world.registry.remove(f"{NAME}-id")
    assert world.sample("backup_watcher_size_anomaly", target=NAME, database="app") is None


def test_a_history_flagged_before_a_restart_is_exported_but_not_paged_again() -> None:
    world = World()
    found = _inventory(world)
    found.load([snap(1000, 0), snap(100, 1)])
    changes = found.judge_sizes([snap(1000, 0), snap(100, 1)], complete=True, at_start=True)
    assert [type(change) for change in changes] == [SizeJudged]
    for change in changes:
        world.outcomes.noted(change)
    assert world.pages.sent == []
    # It stays one incident: a later normal dump sends the recovery.
    for change in found.judge_sizes([snap(1000, 2)], complete=False):
        world.outcomes.noted(change)
    assert [a.kind for a in world.pages.sent] == [Kind.RECOVERED]
