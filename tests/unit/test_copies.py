"""Copies (SPEC §12): their configuration, which snapshots a copy lacks, how far it trails, when it runs."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from watcher import commands
from watcher.clock import FakeClock
from watcher.config import ConfigError, effective_copies, load_config
from watcher.copies import (
    CopyTurn,
    HistoryProgress,
    after_backup,
    after_copy,
    behind,
    due_copies,
    first_turn,
    missing,
    progress,
    retry_delay,
    started,
)
from watcher.copyconfig import copy_env, read_env_file, transfer_env
from watcher.copyjob import stored_as
from watcher.copyrelay import relay
from watcher.daemon.messages import CopyFinished
from watcher.daemon.running import Book, CopyJob
from watcher.daemon.scheduler import View, plan
from watcher.restic import Snapshot

T0 = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
PRIMARY = {"RESTIC_PASSWORD": "primary-secret-123", "RESTIC_REPOSITORY": "/srv/restic", "PATH": "/usr/bin"}
OFFSITE = {"WATCHER_COPY_TO": "offsite", "WATCHER_COPY_OFFSITE_REPOSITORY": "rest:http://127.0.0.1:8000/r",
           "WATCHER_COPY_OFFSITE_PASSWORD": "offsite-secret-456"}


def snap(container: str, database: str, hours: float, host: str = "h") -> Snapshot:
    taken = T0 + timedelta(hours=hours)
    return Snapshot(f"{container}{database}{hours}", "x", taken, host, container, database, 10)


# --- configuration ------------------------------------------------------------------------------------------


def test_a_copy_takes_its_own_repository_password_keeps_and_schedule(tmp_path: Path) -> None:
    env_file = tmp_path / "offsite.env"
    env_file.write_text("# the off-site account\nexport RESTIC_REST_USERNAME=bob\n"
                        "RESTIC_REST_PASSWORD='s3cret-rest-pw'\n")
    config = load_config({**PRIMARY, **OFFSITE, "WATCHER_COPY_OFFSITE_KEEP_DAILY": "0",
                          "WATCHER_COPY_OFFSITE_KEEP_WEEKLY": "8", "WATCHER_COPY_OFFSITE_KEEP_MONTHLY": "0",
                          "WATCHER_COPY_OFFSITE_SCHEDULE": "0 4 * * 0", "WATCHER_COPY_OFFSITE_PRUNE": "false",
                          "WATCHER_COPY_OFFSITE_ENV_FILE": str(env_file)})
    (spec,) = config.copies
    assert (spec.name, spec.keeps, spec.schedule, spec.prune) == ("offsite", (0, 8, 0), "0 4 * * 0", False)
    assert spec.backend_env == {"RESTIC_REST_USERNAME": "bob", "RESTIC_REST_PASSWORD": "s3cret-rest-pw"}
    # Both secrets are masked wherever they show up, and never in repr or check-config.
    assert {"offsite-secret-456", "s3cret-rest-pw"} <= set(config.secrets)
    assert "offsite-secret-456" not in repr(config) and "s3cret-rest-pw" not in repr(config)
    shown = effective_copies(config)
    assert shown["WATCHER_COPY_OFFSITE_ENV_FILE"] == "RESTIC_REST_PASSWORD=***, RESTIC_REST_USERNAME=bob"
    assert "secret" not in str(shown)


def test_a_password_in_the_copys_repository_url_stays_out_of_repr() -> None:
    config = load_config({**PRIMARY, **OFFSITE,
                          "WATCHER_COPY_OFFSITE_REPOSITORY": "rest:https://bob:url-secret-789@backup.example/r"})
    assert "url-secret-789" in config.secrets
    # A Config (its copies with it) that lands in a log line or a traceback shows no secret.
    assert "url-secret-789" not in repr(config)
    assert "url-secret-789" not in str(effective_copies(config))


def test_a_copy_keeps_the_primarys_retention_unless_it_has_its_own() -> None:
    config = load_config({**PRIMARY, **OFFSITE, "WATCHER_KEEP_DAILY": "7"})
    assert config.copies[0].keeps == (7, 4, 6)
    assert config.copies[0].schedule is None and config.copies[0].prune


def test_every_problem_of_every_copy_is_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({**PRIMARY, "WATCHER_SCHEDULE": "nonsense", "WATCHER_COPY_TO": "offsite,archive,bad-name",
                     "WATCHER_COPY_OFFSITE_REPOSITORY": "/mnt/x", "WATCHER_COPY_OFFSITE_KEEP_WEEKLY": "many",
                     "WATCHER_COPY_ARCHIVE_PASSWORD": "pw-archive-99", "WATCHER_COPY_ARCHIVE_SCHEDULE": "daily",
                     "WATCHER_COPY_ARCHIV_KEEP_DAILY": "3"})
    text = str(caught.value)
    for culprit in ("WATCHER_SCHEDULE", "copy name 'bad-name'", "WATCHER_COPY_OFFSITE_PASSWORD",
                    "WATCHER_COPY_OFFSITE_KEEP_WEEKLY='many'", "WATCHER_COPY_ARCHIVE_REPOSITORY",
                    "WATCHER_COPY_ARCHIVE_SCHEDULE='daily'", "WATCHER_COPY_ARCHIV_KEEP_DAILY: no copy of that name"):
        assert culprit in text
    assert "pw-archive-99" not in text


def test_a_copy_whose_backend_variables_clash_with_the_primarys_is_streamed(tmp_path: Path) -> None:
    env_file = tmp_path / "b.env"
    env_file.write_text("AWS_ACCESS_KEY_ID=other-account\nAWS_SECRET_ACCESS_KEY=other-secret-key-1\n")
    config = load_config({**PRIMARY, **OFFSITE, "AWS_ACCESS_KEY_ID": "primary-account",
                          "AWS_SECRET_ACCESS_KEY": "primary-secret-key",
                          "WATCHER_COPY_OFFSITE_ENV_FILE": str(env_file)})
    (spec,) = config.copies
    assert spec.streamed and spec.clashes == ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    assert copy_env(config.restic_env, spec)["AWS_ACCESS_KEY_ID"] == "other-account"
    same = load_config({**PRIMARY, **OFFSITE, "AWS_ACCESS_KEY_ID": "other-account",
                        "AWS_SECRET_ACCESS_KEY": "other-secret-key-1", "WATCHER_COPY_OFFSITE_ENV_FILE": str(env_file)})
    assert not same.copies[0].streamed


def test_a_copy_env_file_holds_backend_credentials_only(tmp_path: Path) -> None:
    env_file = tmp_path / "b.env"
    env_file.write_text("RESTIC_PASSWORD=nope\nWATCHER_KEEP_DAILY=1\n")
    with pytest.raises(ConfigError) as caught:
        load_config({**PRIMARY, **OFFSITE, "WATCHER_COPY_OFFSITE_ENV_FILE": str(env_file)})
    text = str(caught.value)
    assert "RESTIC_PASSWORD does not belong there" in text and "WATCHER_KEEP_DAILY does not belong there" in text


def test_an_env_file_line_that_is_no_assignment_is_named(tmp_path: Path) -> None:
    env_file = tmp_path / "c.env"
    env_file.write_text("A=1\nthis is wrong\n")
    with pytest.raises(ValueError, match="line 2 is not KEY=VALUE"):
        read_env_file(str(env_file))


def test_the_copys_processes_see_its_credentials_and_never_the_primarys() -> None:
    config = load_config({**PRIMARY, **OFFSITE, "AWS_SECRET_ACCESS_KEY": "primary-aws-key-1"})
    spec = config.copies[0]
    alone = copy_env(config.restic_env, spec)
    assert alone["RESTIC_REPOSITORY"] == spec.repository and alone["RESTIC_PASSWORD"] == "offsite-secret-456"
    assert "primary-secret-123" not in alone.values() and "AWS_SECRET_ACCESS_KEY" not in alone
    assert alone["PATH"] == "/usr/bin"
    both = transfer_env(config.restic_env, spec)
    assert both["RESTIC_FROM_REPOSITORY"] == "/srv/restic" and both["RESTIC_FROM_PASSWORD"] == "primary-secret-123"
    assert both["RESTIC_PASSWORD"] == "offsite-secret-456" and both["AWS_SECRET_ACCESS_KEY"] == "primary-aws-key-1"


def test_copy_commands_carry_no_secret() -> None:
    assert commands.restic_copy("restic", ["a1", "b2"]) == ("restic", "copy", "a1", "b2")
    assert commands.restic_init_copy_chunker_params("restic") == ("restic", "init", "--copy-chunker-params")
    assert commands.restic_dump_into("restic", "a1", "/app.pgdump", "/tmp/x/stream")[1:] == (
        "-m", "watcher.copyrelay", "--into", "/tmp/x/stream", "--", "restic", "dump", "a1", "/app.pgdump")
    relay = commands.copy_relay("/tmp/x/stream", 42)
    assert relay[1:] == ("-m", "watcher.copyrelay", "/tmp/x/stream", "42")
    assert commands.restic_backup_copied("restic", host="h", path="/globals.sql",
                                         tags=commands.globals_tags("c"), source=relay, snapshot_time=T0) == (
        "restic", "backup", "--json", "--host", "h", "--stdin-filename", "globals.sql", "--tag", "backup-watcher",
        "--tag", "container=c", "--tag", "globals", "--time", "2026-03-01 03:00:00", "--stdin-from-command", "--",
        *relay)


def test_the_relay_passes_a_whole_stream_and_fails_a_short_one() -> None:
    sink = io.BytesIO()
    assert relay(io.BytesIO(b"x" * 3000000), sink, 3000000) is None and sink.getvalue() == b"x" * 3000000
    assert relay(io.BytesIO(b"x" * 10), io.BytesIO(), 11) == (
        "the snapshot's stream ended after 10 of 11 bytes: restic dump from the primary failed")


def test_a_streamed_copy_matches_snapshots_to_the_second() -> None:
    exact = Snapshot("p1", "p1", T0.replace(microsecond=654321), "h", "a", "app", 1)
    streamed = Snapshot("c1", "c1", T0, "h", "a", "app", 1)
    assert missing([exact], [streamed]) == []


# --- which snapshots a copy lacks, and how far it trails ---------------------------------------------------------


def test_a_copy_lacks_every_snapshot_at_first_then_only_the_new_ones() -> None:
    primary = [snap("a", "app", 0), snap("a", "app", 24), snap("a", "(globals)", 24), snap("b", "x", 1)]
    assert missing(primary, []) == sorted(primary, key=lambda s: (s.time, s.container, s.database))
    copied = [snap("a", "app", 0), snap("a", "app", 24), snap("a", "(globals)", 24)]
    assert missing([*primary, snap("a", "app", 48)], copied) == [snap("b", "x", 1), snap("a", "app", 48)]


def test_what_the_copys_retention_forgot_is_not_copied_again() -> None:
    primary = [snap("a", "app", hours) for hours in range(0, 24 * 7, 24)]
    weekly_only = [primary[-1]]  # the copy keeps the newest of the week
    assert missing(primary, weekly_only) == []


def test_lag_counts_from_the_oldest_snapshot_the_copy_lacks() -> None:
    clock = FakeClock(T0)
    primary = [snap("a", "app", 0), snap("a", "app", 1), snap("a", "app", 2)]
    state = progress(primary, primary[:1])[("a", "app")]
    assert state == HistoryProgress(T0, T0 + timedelta(hours=1))
    assert state.lag_s(clock.advance(3 * 3600)) == 2 * 3600
    caught_up = progress(primary, primary)[("a", "app")]
    assert caught_up.lag_s(clock.now()) == 0.0
    assert caught_up.with_new_snapshot(T0 + timedelta(hours=4)).oldest_missing == T0 + timedelta(hours=4)
    assert caught_up.with_new_snapshot(T0 + timedelta(hours=1)) == caught_up  # an older one: held or forgotten


def test_a_copy_is_behind_when_its_newest_copy_is_older_than_1_5_intervals_and_it_lacks_one() -> None:
    clock = FakeClock(T0)
    hourly = 3600.0
    lacking = HistoryProgress(T0, T0 + timedelta(hours=1))
    assert not behind(lacking, hourly, T0, clock.advance(5400))[0]
    late, why = behind(lacking, hourly, T0, clock.advance(1))
    assert late and "oldest snapshot not copied: 2026-03-01 04:00" in why
    # A copy that holds every snapshot is never behind, however old: the primary's staleness is its own alert.
    assert not behind(HistoryProgress(T0, None), hourly, T0, clock.advance(10 * hourly))[0]
    # Nothing copied yet: judged from when copying began.
    assert behind(HistoryProgress(None, T0), hourly, T0 - timedelta(hours=2), T0)[0]


# --- when a copy runs ----------------------------------------------------------------------------------------


def test_a_copy_without_schedule_runs_at_start_and_after_every_pass() -> None:
    clock = FakeClock(T0)
    turn = started(first_turn(clock.now()))
    assert turn.next_at is None
    turn = after_copy(turn, True, None, "UTC", clock.advance(60))
    assert turn == CopyTurn(None, 0)
    turn = after_backup(turn, None, clock.advance(3600))
    assert due_copies({"offsite": turn}, (), clock.now()) == ["offsite"]
    assert due_copies({"offsite": turn}, ("offsite",), clock.now()) == []  # never two runs of one copy


def test_a_failing_copy_backs_off_but_each_pass_is_a_try() -> None:
    clock = FakeClock(T0)
    turn = after_copy(started(first_turn(clock.now())), False, None, "UTC", clock.now())
    assert turn == CopyTurn(T0 + timedelta(seconds=300), 1)
    turn = after_copy(started(turn), False, None, "UTC", clock.set(T0 + timedelta(seconds=300)))
    assert turn.next_at == clock.now() + timedelta(seconds=600) and turn.failures == 2
    assert after_backup(turn, None, clock.advance(60)).next_at == clock.now()
    assert [retry_delay(n) for n in (1, 2, 3, 4, 5, 9)] == [300, 600, 1200, 2400, 3600, 3600]
    assert after_copy(turn, True, None, "UTC", clock.now()).failures == 0


def test_a_scheduled_copy_runs_at_its_slots_not_after_passes() -> None:
    clock = FakeClock(T0)
    weekly = "0 4 * * 0"
    turn = after_copy(started(first_turn(clock.now())), True, weekly, "UTC", clock.now())
    assert turn.next_at == datetime(2026, 3, 1, 4, 0, tzinfo=UTC)
    assert after_backup(turn, weekly, clock.advance(60)) == turn
    failed = after_copy(started(turn), False, weekly, "UTC", clock.set(datetime(2026, 3, 1, 4, 0, tzinfo=UTC)))
    assert failed.next_at == datetime(2026, 3, 1, 4, 5, tzinfo=UTC)


def test_copies_start_outside_the_backup_slots_and_before_the_prune() -> None:
    view = View((), concurrency=1, timezone="UTC", copy_turns={"offsite": CopyTurn(T0), "archive": CopyTurn(None)})
    book = Book(backups=frozenset({"busy-db"}), backed_up_since_prune=True)
    assert plan(view, book, T0) == [CopyJob("offsite")]
    running = Book(backed_up_since_prune=True).started(CopyJob("offsite"))
    assert plan(View((), 1, "UTC"), running, T0) == []  # the prune waits for the copy
    ended = running.finished(CopyFinished("offsite", error="crashed"))
    assert not ended.copies and ended.idle and len(plan(View((), 1, "UTC"), ended, T0)) == 1  # now it prunes
    assert plan(view, Book(prune=True), T0) == []  # nothing starts while the primary is pruned


def test_a_streamed_copy_keeps_the_engine_tag_the_file_suffix_and_the_acknowledgement() -> None:
    listed = Snapshot.from_json({
        "id": "abc", "short_id": "abc", "time": "2026-03-01T03:00:00Z", "hostname": "h", "paths": ["/shop.sql"],
        "tags": ["backup-watcher", "container=c", "database=shop", "engine=mariadb", commands.ACK_TAG]})
    assert listed is not None
    assert stored_as(listed) == ("/shop.sql", ("backup-watcher", "container=c", "database=shop", "engine=mariadb",
                                               commands.ACK_TAG))
    # A snapshot not read from a listing: as its engine writes it.
    for engine, path in (("mariadb", "/shop.sql"), ("command", "/shop.dump"), ("postgres", "/shop.pgdump")):
        made = Snapshot("i", "i", T0, "h", "c", "shop", 1, engine=engine)
        assert stored_as(made) == (path, commands.snapshot_tags("c", "shop", engine))
    made_globals = Snapshot("g", "g", T0, "h", "c", commands.GLOBALS_DATABASE, 1, globals=True, engine="mariadb")
    assert stored_as(made_globals) == ("/globals.sql", ("backup-watcher", "container=c", "globals", "engine=mariadb"))
