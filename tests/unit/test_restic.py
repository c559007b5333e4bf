"""Parsing what restic prints (watcher.restic): timestamps, version, `snapshots --json`."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from watcher.execute import Completed, Masker
from watcher.restic import (
    Repository,
    Snapshot,
    local_permission_problem,
    parse_snapshots,
    parse_time,
    parse_version,
    refused_retry,
    refused_retry_problem,
)


@pytest.mark.parametrize(("raw", "expected"), [
    ("2026-01-02T03:04:05.123456789Z", datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
    ("2026-01-02T03:04:05.123456789+02:00", datetime(2026, 1, 2, 1, 4, 5, 123456, tzinfo=UTC)),
    ("2026-01-02T03:04:05.5-07:00", datetime(2026, 1, 2, 10, 4, 5, 500000, tzinfo=UTC)),
    ("2026-01-02T03:04:05.12345+01:00", datetime(2026, 1, 2, 2, 4, 5, 123450, tzinfo=UTC)),
    ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2026-01-02T00:30:00+02:00", datetime(2026, 1, 1, 22, 30, tzinfo=UTC)),
    ("2026-01-02T03:04:05.000000001Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
])
def test_parse_time(raw: str, expected: datetime) -> None:
    parsed = parse_time(raw)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("raw", ["", "yesterday", "2026-01-02", "2026-01-02 03:04:05Z", "2026-01-02T03:04Z"])
def test_parse_time_rejects(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_time(raw)


@pytest.mark.parametrize(("output", "expected"), [
    ("restic 0.18.0 compiled with go1.24.1 on linux/amd64\n", (0, 18, 0)),
    ("restic 0.17.3 compiled with go1.23.3 on linux/arm64", (0, 17, 3)),
    ("restic 0.16.5 (v0.16.5-0-gabc) compiled with go1.22 on darwin/arm64", (0, 16, 5)),
    ("restic 1.2.10-dev (compiled manually) compiled with go1.25 on linux/amd64", (1, 2, 10)),
    ("", None),
    ("bash: restic: command not found", None),
])
def test_parse_version(output: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_version(output) == expected


def test_parse_version_compares_as_numbers() -> None:
    assert parse_version("restic 0.9.6 compiled with go1.13") < (0, 17, 0)  # type: ignore[operator]
    assert parse_version("restic 0.18.0 compiled with go1.24") >= (0, 17, 0)  # type: ignore[operator]


def snapshot_json(snap_id: str, time: str, tags: list[str] | None, *, summary: bool = True,
                  hostname: str = "db-host") -> dict[str, object]:
    item: dict[str, object] = {
        "time": time,
        "tree": "5e0f0a3c9d81f2b7e9e4a1b0c6d2f8a7b3c5d9e1f0a2b4c6d8e0f1a3b5c7d9e1",
        "paths": ["/scalr_app.pgdump"],
        "hostname": hostname,
        "username": "root",
        "program_version": "restic 0.18.0",
        "id": snap_id,
        "short_id": snap_id[:8],
    }
    if tags is not None:
        item["tags"] = tags
    if summary:
        item["summary"] = {
            "backup_start": time,
            "backup_end": time,
            "files_new": 1,
            "files_changed": 0,
            "files_unmodified": 0,
            "dirs_new": 0,
            "dirs_changed": 0,
            "dirs_unmodified": 0,
            "data_blobs": 12,
            "tree_blobs": 1,
            "data_added": 1048576,
            "data_added_packed": 524288,
            "total_files_processed": 1,
            "total_bytes_processed": 7340032,
        }
    return item


NEWER = "b" * 64
OLDER = "a" * 64
OLDEST = "c" * 64
FOREIGN = "d" * 64

RESTIC_018_OUTPUT = json.dumps([
    snapshot_json(NEWER, "2026-03-02T03:00:04.481736512+01:00",
                  ["backup-watcher", "container=scalr-app-db", "database=scalr_app"]),
    snapshot_json(FOREIGN, "2026-01-01T00:00:00.1Z", None),  # someone else's snapshot, no tags at all
    snapshot_json("e" * 64, "2026-01-01T00:00:00Z", ["nightly", "manual"]),  # tags, but not ours
    snapshot_json(OLDER, "2026-03-02T01:30:00.000000001Z",
                  ["backup-watcher", "container=scalr-app-db", "database=my%2Cdb%20x"]),
    snapshot_json(OLDEST, "2026-03-01T03:00:00+02:00",
                  ["backup-watcher", "container=scalr-auth-postgres", "database=auth"], summary=False),
]).encode()


def test_parse_snapshots_skips_foreign_and_sorts_oldest_first() -> None:
    snapshots = parse_snapshots(RESTIC_018_OUTPUT)
    assert [snap.id for snap in snapshots] == [OLDEST, OLDER, NEWER]
    # NEWER is 02:00:04Z, OLDER 01:30:00Z: the order follows the instant, not the text of the time
    assert snapshots[1].time < snapshots[2].time


def test_parse_snapshots_fields() -> None:
    by_id = {snap.id: snap for snap in parse_snapshots(RESTIC_018_OUTPUT)}
    newer = by_id[NEWER]
    assert newer == Snapshot(
        id=NEWER, short_id=NEWER[:8], time=datetime(2026, 3, 2, 2, 0, 4, 481736, tzinfo=UTC), host="db-host",
        container="scalr-app-db", database="scalr_app", bytes=7340032,
    )
    assert by_id[OLDER].database == "my,db x"  # tags are decoded
    assert by_id[OLDEST].bytes is None  # no summary (older restic)
    assert by_id[OLDEST].container == "scalr-auth-postgres"


@pytest.mark.parametrize("output", [b"", b"[]", b"null"])
def test_parse_snapshots_empty(output: bytes) -> None:
    assert parse_snapshots(output) == []


def test_parse_snapshots_invalid_json_raises() -> None:
    with pytest.raises(ValueError):
        parse_snapshots(b"Fatal: unable to open repository")


def test_snapshot_missing_short_id_uses_id_prefix() -> None:
    item = snapshot_json(NEWER, "2026-03-02T03:00:00Z", ["backup-watcher", "container=c", "database=d"])
    del item["short_id"]
    snap = Snapshot.from_json(item)
    assert snap is not None
    assert snap.short_id == NEWER[:8]


def test_snapshot_with_only_a_container_tag_is_not_ours() -> None:
    item = snapshot_json(NEWER, "2026-03-02T03:00:00Z", ["container=c"])
    assert Snapshot.from_json(item) is None


def test_globals_snapshots_are_listed_only_when_asked_for() -> None:
    output = json.dumps([
        snapshot_json(NEWER, "2026-03-02T03:00:00Z", ["backup-watcher", "container=c", "database=d"]),
        snapshot_json(OLDER, "2026-03-02T02:59:59Z", ["backup-watcher", "container=c", "globals"]),
        snapshot_json(OLDEST, "2026-03-02T02:00:00Z", ["backup-watcher", "container=c", "database=globals"]),
    ]).encode()
    assert [s.database for s in parse_snapshots(output)] == ["globals", "d"]
    with_globals = parse_snapshots(output, include_globals=True)
    assert [(s.database, s.globals) for s in with_globals] == [("globals", False), ("(globals)", True), ("d", False)]


def test_a_retried_upload_refused_by_the_backend_is_named_as_a_broken_connection() -> None:
    # What restic printed when rest-server was killed after storing a pack and before answering (CI, stop 25).
    restic_said = (
        'Save(<data/889a8f6a3c>) returned error, retrying after 576.756687ms: Post "http://127.0.0.1:34899/r/data/'
        '889a8f6a3c163de3": EOF\n'
        'Save(<data/cfe1bc02cb>) returned error, retrying after 1.373201787s: dial tcp: connection refused\n'
        "Save(<data/cfe1bc02cb>) operation successful after 4 retries\n"
        "Save(<data/889a8f6a3c>) failed: unexpected HTTP response (403): 403 Forbidden\n"
        "Fatal: unable to save snapshot: unexpected HTTP response (403): 403 Forbidden")
    assert refused_retry(restic_said) == "data"
    problem = refused_retry_problem(restic_said)
    assert problem is not None and "connection to the repository broke" in problem
    assert "the next run uploads it anew" in problem


def test_a_refusal_from_the_start_is_a_permission_not_a_broken_connection() -> None:
    first_try = "Save(<data/889a8f6a3c>) failed: unexpected HTTP response (403): 403 Forbidden"
    assert refused_retry_problem(first_try) is None
    other_retried = "Save(<data/aaaa>) returned error, retrying after 1s: EOF\n" + first_try
    assert refused_retry_problem(other_retried) is None
    # Retried after a 403 of its own (a restic that retries refusals): append-only or read-only credentials.
    refused_each_time = ("Save(<data/889a8f6a3c>) returned error, retrying after 1s: unexpected HTTP response "
                         "(403): 403 Forbidden\n" + first_try)
    assert refused_retry_problem(refused_each_time) is None


@pytest.mark.parametrize(("kind", "said"), [
    ("snapshot", "the snapshot is most likely in the repository"),
    ("lock", "`restic unlock` removes it"),
    ("index", "the next run uploads it anew"),
])
def test_what_a_refused_retry_left_depends_on_the_file(kind: str, said: str) -> None:
    restic_said = (f"Save(<{kind}/5e1f0a>) returned error, retrying after 1s: read: connection reset by peer\n"
                   f"Save(<{kind}/5e1f0a>) failed: unexpected HTTP response (403): 403 Forbidden")
    assert refused_retry(restic_said) == kind
    problem = refused_retry_problem(restic_said)
    assert problem is not None and said in problem


def test_permission_denied_on_a_path_repository_says_whom_to_give_it_to() -> None:
    # A repository directory made by root (mkdir, or `restic init` as root) refuses the image's uid 10001.
    said = "Fatal: create repository at /repo failed: Fatal: unable to open repository at /repo: mkdir /repo/data: "\
           "permission denied"
    problem = local_permission_problem("/repo", said)
    assert problem is not None
    assert f"uid {os.getuid()}" in problem and f"chown -R {os.getuid()}:{os.getgid()}" in problem
    assert "/repo" in problem
    assert local_permission_problem("local:/srv/restic", "stat /srv/restic/config: permission denied") is not None


@pytest.mark.parametrize(("repository", "said"), [
    ("/repo", "Fatal: wrong password or no key found"),
    ("sftp:backup@host:/srv/restic", "ssh: Permission denied (publickey)"),
    ("s3:https://s3.example.com/bucket", "Access Denied: permission denied"),
])
def test_other_failures_get_no_ownership_advice(repository: str, said: str) -> None:
    assert local_permission_problem(repository, said) is None


def test_a_copys_path_repository_gets_the_ownership_advice_too() -> None:
    # A copy's Repository is labelled by its name; the advice goes by where restic is told the repository is.
    copy = Repository("restic", {"RESTIC_REPOSITORY": "/srv/offsite"}, Masker(), "copy offsite (/srv/offsite)")
    done = Completed(argv=(("restic", "snapshots"),), returncodes=(1,),
                     stderr_tail="Fatal: unable to open config file: stat /srv/offsite/config: permission denied")
    message = copy.failure("opening the repository", done)
    assert message.startswith("opening the repository copy offsite (/srv/offsite) failed:")
    assert f"chown -R {os.getuid()}:{os.getgid()}" in message


def test_a_copys_source_refused_gets_no_advice_naming_the_copy() -> None:
    # restic copy reads the primary (RESTIC_FROM_REPOSITORY): its path refused says nothing of the copy's.
    said = "Fatal: unable to open config file: stat /srv/restic/config: permission denied"
    assert local_permission_problem("/srv/offsite", said) is None
    assert local_permission_problem("/srv/restic/", said) is not None
