"""Reading a dump's database entries (pg_restore --create --schema-only text) and aiming them elsewhere."""

from __future__ import annotations

import signal

import pytest

from tests.unit.entries_kit import PG_RESTORE_CUT_SHORT, PG_RESTORE_TEXT, RESTIC_CUT_OFF, FakePipeline
from watcher import commands, dbproperties
from watcher.dbproperties import (
    DatabaseProperties,
    KnownProperties,
    PropertiesReader,
    PropertiesUnreadable,
    checked,
    entries_failure,
    read_properties,
    retarget,
    split_statements,
)
from watcher.execute import Completed, Masker


def read(text: str = PG_RESTORE_TEXT) -> PropertiesReader:
    reader = PropertiesReader()
    for line in text.splitlines():
        reader(line)
    return reader


def test_reader_keeps_only_the_database_entries_and_every_role_the_archive_names() -> None:
    props = read().result()
    assert props.database == "My DB"
    assert props.owner == "owner_r"
    assert [s.split(" IS ")[0].split(" SET ")[0] for s in props.statements] == [
        'COMMENT ON DATABASE "My DB"',
        'ALTER DATABASE "My DB"',
        'ALTER DATABASE "My DB"',
        'ALTER ROLE "x IN DATABASE ""My DB""" IN DATABASE "My DB"',
        'REVOKE CONNECT,TEMPORARY ON DATABASE "My DB" FROM PUBLIC;',
        'GRANT CONNECT ON DATABASE "My DB" TO ro;',
    ]
    assert props.statements[0].endswith("-- not a header\ndone';")
    assert props.setting_names() == ["TimeZone", "search_path"]
    assert props.roles == {"owner_r", "app", "reader", "ro", 'x IN DATABASE "My DB"', "default reader",
                           "policy_role"}


def test_script_aims_every_statement_at_the_target_and_never_inside_literals_or_role_names() -> None:
    props = read().result()
    script = props.script("My DB_bw_restore")
    assert script.startswith('ALTER DATABASE "My DB_bw_restore" OWNER TO "owner_r";\n')
    assert "COMMENT ON DATABASE \"My DB_bw_restore\" IS 'see DATABASE \"My DB\";" in script
    assert 'ALTER ROLE "x IN DATABASE ""My DB""" IN DATABASE "My DB_bw_restore" SET work_mem' in script
    assert 'REVOKE CONNECT,TEMPORARY ON DATABASE "My DB_bw_restore" FROM PUBLIC;' in script
    assert 'ON DATABASE "My DB" ' not in script.replace("'see DATABASE \"My DB\";", "")


def test_script_for_a_container_without_the_roles_leaves_out_what_names_them() -> None:
    script = read().result().script("appdb", existing_roles={"app"})
    assert "OWNER TO" not in script and "GRANT CONNECT" not in script and "ALTER ROLE" not in script
    assert "REVOKE CONNECT,TEMPORARY" in script and '"TimeZone"' in script


def test_the_database_name_in_database_properties_is_the_bare_or_quoted_identifier() -> None:
    assert retarget("ALTER DATABASE \"appdb\" SET x TO '1';", "appdb", "n") == "ALTER DATABASE \"n\" SET x TO '1';"
    assert retarget("GRANT CONNECT ON DATABASE appdb TO ro;", "appdb", 'a"b') == \
        'GRANT CONNECT ON DATABASE "a""b" TO ro;'
    with pytest.raises(ValueError, match="does not name database"):
        retarget("COMMENT ON DATABASE other IS 'DATABASE appdb';", "appdb", "n")


def test_split_statements_ignores_semicolons_in_literals_and_identifiers() -> None:
    assert split_statements("--\n\nA 'x;y';\nB \"p;q\";\n--") == ["A 'x;y';", 'B "p;q";']


def test_properties_read_with_the_roles_are_taken_once_by_the_restore_that_follows() -> None:
    # The role plan reads a dump's entries before a restore; the restore takes the properties instead of
    # reading the dump's start again, and once only (a second restore of the snapshot reads them anew).
    known = KnownProperties()
    known.keep("61a978dd", read().result())
    taken = known.take("61a978dd")
    assert taken is not None and checked(taken, "61a978dd").owner == "owner_r"
    assert known.take("61a978dd") is None
    assert known.take("other") is None


def test_properties_without_a_database_entry_are_refused_wherever_they_were_read() -> None:
    with pytest.raises(PropertiesUnreadable, match="holds no DATABASE entry"):
        checked(DatabaseProperties(), "61a978ddb75d")


# --- the one check of `restic dump | pg_restore --create --schema-only` ---------------------------------------
PIPELINE = commands.database_entries_pipeline("restic", "61a978ddb75d", "appdb", "c0ffee")


def ended(dump: int, lister: int, stderr: str = "", *, timed_out: bool = False, cancelled: bool = False) -> Completed:
    return Completed(PIPELINE, (dump, lister), stderr_tail=stderr, timed_out=timed_out, cancelled=cancelled)


def test_entries_are_read_when_both_end_cleanly() -> None:
    assert entries_failure(ended(0, 0)) is None


def test_a_closed_pipe_after_pg_restore_had_everything_is_no_failure() -> None:
    # pg_restore read the table of contents and exited 0; restic, still writing the data, met the closed pipe.
    assert entries_failure(ended(-signal.SIGPIPE, 0)) is None
    assert entries_failure(ended(1, 0, RESTIC_CUT_OFF)) is None


def test_a_closed_pipe_before_pg_restore_had_everything_fails_naming_pg_restore() -> None:
    for dump, stderr in ((-signal.SIGPIPE, PG_RESTORE_CUT_SHORT), (1, RESTIC_CUT_OFF + "\n" + PG_RESTORE_CUT_SHORT)):
        failure = entries_failure(ended(dump, 1, stderr))
        assert failure is not None and failure.startswith("pg_restore in the container failed (exit status 1): ")
        assert "could not read from input file" in failure


def test_a_real_failure_of_restic_or_pg_restore_fails_naming_which() -> None:
    wrong_password = entries_failure(ended(12, 1, "Fatal: wrong password or no key found\n" + PG_RESTORE_CUT_SHORT))
    assert wrong_password is not None and wrong_password.startswith("restic dump failed (exit status 12): Fatal: wrong")
    # A restic error after pg_restore's success is still one: only the closed pipe is forgiven.
    lost_pack = entries_failure(ended(1, 0, "Fatal: cannot dump file: pack 3b1f not found"))
    assert lost_pack is not None and lost_pack.startswith("restic dump failed (exit status 1): Fatal: cannot dump")
    bad_archive = entries_failure(ended(0, 1, "pg_restore: error: input file does not appear to be a valid archive"))
    assert bad_archive is not None and bad_archive.startswith("pg_restore in the container failed (exit status 1)")
    no_engine = entries_failure(ended(-signal.SIGPIPE, 125, "backup-watcher: cannot reach the Docker engine"))
    assert no_engine is not None and no_engine.startswith("pg_restore in the container failed (exit status 125)")


def test_an_interrupted_or_broken_run_fails_whatever_the_exit_codes() -> None:
    for done in (ended(0, 0, timed_out=True), ended(-signal.SIGPIPE, 0, cancelled=True),
                 Completed(PIPELINE, (0, 0), problem="the exec stream did not arrive whole"),
                 Completed(PIPELINE[:1], (0,))):
        assert entries_failure(done) is not None


# --- the one reader, as drill and restore use it ---------------------------------------------------------
def properties_of(pipeline: FakePipeline, monkeypatch: pytest.MonkeyPatch) -> DatabaseProperties:
    monkeypatch.setattr(dbproperties, "run_pipeline", pipeline)
    return read_properties(restic="restic", snapshot_id="61a978ddb75d", database="appdb", container_id="c0ffee",
                           user="backup", env={}, masker=Masker(), timeout=60)


def test_properties_are_read_through_the_entries_pipeline_as_the_exec_user(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = FakePipeline((1, 0), RESTIC_CUT_OFF)
    assert properties_of(pipeline, monkeypatch).owner == "owner_r"
    assert pipeline.argv == [commands.database_entries_pipeline("restic", "61a978ddb75d", "appdb", "c0ffee", "backup")]


def test_properties_read_before_pg_restore_had_everything_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PropertiesUnreadable, match=r"^reading the database entries of snapshot 61a978dd failed: "
                                                   r"pg_restore in the container failed \(exit status 1\)"):
        properties_of(FakePipeline((1, 1), RESTIC_CUT_OFF + "\n" + PG_RESTORE_CUT_SHORT), monkeypatch)
