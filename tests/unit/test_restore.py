"""Planning a restore (watcher.restore): which snapshot, and the scratch database's name."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from watcher.restic import Snapshot
from watcher.restore import RestoreError, choose_snapshot, scratch_name


def snap(snap_id: str, day: int, database: str = "app", container: str = "scalr-app-db") -> Snapshot:
    return Snapshot(id=snap_id, short_id=snap_id[:8], time=datetime(2026, 3, day, 3, 0, tzinfo=UTC),
                    host="db-host", container=container, database=database, bytes=1000)


ONE_DB = [snap("aaaa1111" + "0" * 56, 1), snap("aaaa2222" + "0" * 56, 3), snap("bbbb3333" + "0" * 56, 2)]
TWO_DBS = [*ONE_DB, snap("cccc4444" + "0" * 56, 4, "billing"), snap("dddd5555" + "0" * 56, 5, "billing")]


def test_latest_is_the_newest_by_time_not_by_position() -> None:
    assert choose_snapshot(ONE_DB, "latest", None).id.startswith("aaaa2222")
    assert choose_snapshot(list(reversed(ONE_DB)), "latest", "app").id.startswith("aaaa2222")


def test_latest_of_a_database() -> None:
    assert choose_snapshot(TWO_DBS, "latest", "app").id.startswith("aaaa2222")
    assert choose_snapshot(TWO_DBS, "latest", "billing").id.startswith("dddd5555")


def test_latest_with_several_databases_needs_database() -> None:
    with pytest.raises(RestoreError) as caught:
        choose_snapshot(TWO_DBS, "latest", None)
    message = str(caught.value)
    assert "app" in message
    assert "billing" in message
    assert "--database" in message


def test_unknown_database_names_the_ones_held() -> None:
    with pytest.raises(RestoreError) as caught:
        choose_snapshot(TWO_DBS, "latest", "ghost")
    message = str(caught.value)
    assert "ghost" in message
    assert "app" in message
    assert "billing" in message


def test_id_prefix() -> None:
    assert choose_snapshot(ONE_DB, "bbbb", None).id.startswith("bbbb3333")
    assert choose_snapshot(ONE_DB, "aaaa1", None).id.startswith("aaaa1111")
    full = ONE_DB[0].id
    assert choose_snapshot(ONE_DB, full, None).id == full


def test_id_prefix_works_across_databases_without_database() -> None:
    assert choose_snapshot(TWO_DBS, "cccc", None).database == "billing"


def test_id_prefix_limited_to_the_database() -> None:
    with pytest.raises(RestoreError):
        choose_snapshot(TWO_DBS, "cccc", "app")


def test_ambiguous_prefix() -> None:
    with pytest.raises(RestoreError) as caught:
        choose_snapshot(ONE_DB, "aaaa", None)
    assert "ambiguous" in str(caught.value)


def test_unknown_prefix() -> None:
    with pytest.raises(RestoreError) as caught:
        choose_snapshot(ONE_DB, "ffff", None)
    assert "ffff" in str(caught.value)


def test_no_snapshots() -> None:
    with pytest.raises(RestoreError):
        choose_snapshot([], "latest", None)


@pytest.mark.parametrize("database", [
    "app",
    "a" * 63,
    "x" * 200,
    "é" * 40,
    "数据库" * 20,
    "😀" * 30,
    "a" * 51 + "é" * 5,
])
def test_scratch_name_fits_a_postgres_identifier(database: str) -> None:
    name = scratch_name(database)
    assert len(name.encode()) <= 63
    assert name.endswith("_bw_restore")
    assert name != database
    name.encode("utf-8", errors="strict")  # never a cut multibyte character
    assert database.startswith(name[: -len("_bw_restore")])


def test_scratch_name_of_a_short_name() -> None:
    assert scratch_name("scalr_app") == "scalr_app_bw_restore"
