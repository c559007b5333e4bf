"""Target freshness (watcher.registry): which snapshot time staleness and catch-up are judged by."""

from __future__ import annotations

from datetime import UTC, datetime

from watcher.registry import DatabaseState, judged_snapshot_time

OLD = datetime(2026, 1, 1, 3, tzinfo=UTC)
NEW = datetime(2026, 11, 21, 3, tzinfo=UTC)


def test_named_databases_are_judged_by_the_least_recent() -> None:
    databases = {"app": DatabaseState(last_snapshot=NEW), "billing": DatabaseState(last_snapshot=OLD)}
    assert judged_snapshot_time(False, databases) == OLD


def test_a_named_database_without_a_snapshot_makes_the_target_unbacked() -> None:
    databases = {"app": DatabaseState(last_snapshot=NEW), "billing": DatabaseState()}
    assert judged_snapshot_time(False, databases) is None
    assert judged_snapshot_time(False, {}) is None


def test_all_databases_is_judged_by_the_newest() -> None:
    # A database dropped in January keeps its history (and its cache entry): it must not keep the
    # target stale while every existing database is backed up daily.
    databases = {"app": DatabaseState(last_snapshot=NEW), "dropped": DatabaseState(last_snapshot=OLD),
                 "created": DatabaseState()}
    assert judged_snapshot_time(True, databases) == NEW
    assert judged_snapshot_time(True, {"created": DatabaseState()}) is None
    assert judged_snapshot_time(True, {}) is None
