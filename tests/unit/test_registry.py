"""The registry: which snapshot time freshness is judged by, and the named transitions of an entry."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.unit.daemon_kit import backup_result, make_entry
from watcher.discovery import Rejected
from watcher.registry import DatabaseState, Registry, judged_snapshot_time

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


def _registry_with_target() -> tuple[Registry, str]:
    registry = Registry()
    entry = make_entry("a-db", databases=("app", "billing"), snapshots={"app": OLD})
    registry.register(entry)
    return registry, entry.container_id


def test_named_transitions_of_a_target() -> None:
    registry, cid = _registry_with_target()
    assert registry.get(cid).state == "ok"  # type: ignore[union-attr]
    registry.mark_running(cid)
    assert registry.get(cid).state == "running"  # type: ignore[union-attr]
    registry.record_results(cid, [backup_result("app", at=NEW), backup_result("billing", ok=False, at=NEW, error="x")],
                            last_error="x", consecutive_failures=2, next_run=NEW)
    entry = registry.get(cid)
    assert entry is not None and entry.state == "failing" and entry.next_run == NEW and entry.last_error == "x"
    assert entry.databases["app"].last_success == NEW and entry.databases["app"].last_snapshot == OLD
    assert entry.databases["billing"].last_failure == NEW and entry.databases["billing"].last_error == "x"
    registry.record_snapshot(cid, "billing", NEW, "snap-b")
    assert registry.get(cid).databases["billing"].last_snapshot_id == "snap-b"  # type: ignore[union-attr]
    registry.rename(cid, "b-db")
    entry = registry.get(cid)
    assert entry is not None and entry.name == "b-db" and entry.target is not None and entry.target.name == "b-db"
    registry.drop_databases(cid, ["billing"])
    assert sorted(registry.get(cid).databases) == ["app"]  # type: ignore[union-attr]


def test_stop_idle_reject_and_remove() -> None:
    registry, cid = _registry_with_target()
    assert registry.mark_stopped(cid) is not None and registry.mark_stopped(cid) is None
    assert registry.get(cid).state == "stopped"  # type: ignore[union-attr]
    registry.mark_running(cid)
    registry.mark_idle(cid)
    assert not registry.get(cid).running_job  # type: ignore[union-attr]
    registry.reject(cid, "a-db", Rejected(cid, "a-db", ("label x: bad",)))
    assert registry.get(cid).state == "invalid"  # type: ignore[union-attr]
    assert registry.remove(cid) is not None and registry.ids() == set()
    registry.mark_running(cid)  # unknown ids change nothing
    assert registry.view() == ()


def test_a_snapshot_note_shows_in_status_until_a_snapshot_without_one() -> None:
    from dataclasses import replace

    from watcher.status import render_table, status_rows
    registry, cid = _registry_with_target()
    note = "roles without password hashes: the dump role may not read pg_authid"
    registry.record_results(cid, [replace(backup_result("(globals)", at=NEW), note=note)], last_error=None,
                            consecutive_failures=0, next_run=NEW)
    rows = status_rows(registry.view(), NEW)
    assert {"database": "(globals)", "note": note}.items() <= rows[0]["databases"][0].items()  # type: ignore[index]
    assert render_table(rows).endswith(f"\n\nnote: a-db (globals): {note}")
    registry.record_results(cid, [backup_result("(globals)", at=NEW)], last_error=None, consecutive_failures=0,
                            next_run=NEW)
    assert "note:" not in render_table(status_rows(registry.view(), NEW))


def test_status_says_how_far_each_copy_has_come_and_names_the_ones_lacking_snapshots() -> None:
    from datetime import timedelta

    from watcher.copies import HistoryProgress
    from watcher.status import render_table, status_rows
    registry, cid = _registry_with_target()
    registry.record_results(cid, [backup_result("app", at=NEW)], last_error=None, consecutive_failures=0,
                            next_run=NEW)
    later = NEW + timedelta(hours=2)
    copies = {"offsite": {("a-db", "app"): HistoryProgress(NEW, None)},
              "vault": {("a-db", "app"): HistoryProgress(NEW - timedelta(days=1), NEW)}}
    rows = status_rows(registry.view(), later, copies=copies)
    app = next(db for db in rows[0]["databases"] if db["database"] == "app")  # type: ignore[attr-defined]
    assert app["copies"] == {"offsite": {"copied": NEW.isoformat(), "lag_s": 0},
                             "vault": {"copied": (NEW - timedelta(days=1)).isoformat(), "lag_s": 7200}}
    table = render_table(rows)
    assert "copy vault: a-db app lacks snapshots for 2h0m" in table and "copy offsite" not in table, table
    assert "copy " not in render_table(status_rows(registry.view(), later))  # one-shot status: no copies known


def test_a_flagged_shrunken_dump_shows_in_status_with_the_way_to_accept_it() -> None:
    # The target's state stays ok (its backups succeed): this line is what `status` shows of the page.
    from watcher.status import render_table, status_rows
    registry, cid = _registry_with_target()
    registry.record_size_anomaly(cid, "app", True)
    registry.record_size_anomaly(cid, "billing", False)
    registry.record_size_anomaly(cid, "(globals)", True)
    rows = status_rows(registry.view(), NEW)
    assert [(db["database"], db["size_anomaly"]) for db in rows[0]["databases"]] == [  # type: ignore[attr-defined]
        ("(globals)", True), ("app", True), ("billing", False)]
    table = render_table(rows)
    assert "shrunken: a-db app: " in table and "`backup-watcher ack a-db --database app`" in table
    assert "`backup-watcher ack a-db --database '(globals)'`" in table, "quoted for the shell"
    assert "billing:" not in table
    registry.record_size_anomaly(cid, "app", False)
    registry.record_size_anomaly(cid, "(globals)", False)
    assert "shrunken:" not in render_table(status_rows(registry.view(), NEW))
