"""Which roles a dump needs, what a globals snapshot holds, and which roles a restore creates."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta

import pytest

from tests.unit.entries_kit import PG_RESTORE_CUT_SHORT, RESTIC_CUT_OFF, FakePipeline
from watcher import commands, dbproperties
from watcher.commands import GLOBALS_DATABASE
from watcher.config import Bounds
from watcher.dbproperties import KnownProperties
from watcher.execute import Masker
from watcher.restic import Repository, Snapshot
from watcher.roles import NeededRoles, RoleError, RoleMaker, globals_for, parse_globals, plan_roles, statements

HASH = "SCRAM-SHA-256$4096:lk+yc/7mAtgJ6vz9hNKZKA==$gMTi:pwq5"
GLOBALS_17 = f"""--
-- PostgreSQL database cluster dump
--

\\restrict ZCIWC2afgpjRfM0RQOiRbiaywLc0o

SET default_transaction_read_only = off;

SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

--
-- Roles
--

CREATE ROLE app;
ALTER ROLE app WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS PASSWORD '{HASH}';
CREATE ROLE owner;
ALTER ROLE owner WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS;
CREATE ROLE "Odd; Name";
ALTER ROLE "Odd; Name" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS;
COMMENT ON ROLE "Odd; Name" IS 'two
lines; with a semicolon';
CREATE ROLE rouser;
ALTER ROLE rouser WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS PASSWORD 'md5abc';
CREATE ROLE lonely;
ALTER ROLE lonely WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS;

--
-- User Configurations
--

--
-- User Config "rouser"
--

ALTER ROLE rouser SET statement_timeout TO '5s';

--
-- Role memberships
--

GRANT owner TO rouser WITH INHERIT TRUE GRANTED BY app;
GRANT pg_read_all_data TO "Odd; Name" GRANTED BY app;

CREATE TABLESPACE fast OWNER app LOCATION '/mnt/fast';

\\unrestrict ZCIWC2afgpjRfM0RQOiRbiaywLc0o
"""

SCHEMA = """--
-- Name: s; Type: SCHEMA; Schema: -; Owner: owner
--
CREATE SCHEMA s;
ALTER SCHEMA s OWNER TO owner;
--
-- Name: fn(); Type: FUNCTION; Schema: s; Owner: owner
--
CREATE FUNCTION s.fn() RETURNS void AS $$
GRANT SELECT ON TABLE x TO phantom;
$$ LANGUAGE sql;
--
-- Name: TABLE "we ird"; Type: ACL; Schema: public; Owner: app
--
GRANT INSERT ON TABLE public."we ird" TO "Odd; Name" WITH GRANT OPTION;
REVOKE ALL ON TABLE public."we ird" FROM PUBLIC;
--
-- Name: TABLE t; Type: ACL; Schema: s; Owner: owner
--
GRANT SELECT ON TABLE s.t TO rouser GRANTED BY grantor;
--
-- Name: DEFAULT PRIVILEGES FOR TABLES; Type: DEFAULT ACL; Schema: s; Owner: owner
--
ALTER DEFAULT PRIVILEGES FOR ROLE definer IN SCHEMA s GRANT SELECT ON TABLES TO reader;
--
-- Name: t p; Type: POLICY; Schema: s; Owner: owner
--
CREATE POLICY p ON s.t TO policyrole USING ((id > 0));
"""


def needed(text: str) -> set[str]:
    collector = NeededRoles()
    for line in text.splitlines():
        collector(line)
    return collector.roles


def test_needed_roles_are_owners_grantees_grantors_default_privilege_and_policy_roles() -> None:
    assert needed(SCHEMA) == {"owner", "app", "Odd; Name", "rouser", "grantor", "definer", "reader", "policyrole"}


def test_a_function_body_that_reads_like_a_grant_names_no_role() -> None:
    assert "phantom" not in needed(SCHEMA)


def test_globals_statements_end_at_semicolons_outside_quotes() -> None:
    found = statements(GLOBALS_17)
    assert "COMMENT ON ROLE \"Odd; Name\" IS 'two\nlines; with a semicolon'" in found
    assert not any(s.startswith(("\\", "--")) for s in found)


def test_globals_give_each_role_its_statements_memberships_and_hashes() -> None:
    parsed = parse_globals(GLOBALS_17)
    assert list(parsed.roles) == ["app", "owner", "Odd; Name", "rouser", "lonely"]
    assert parsed.roles["rouser"][-1] == "ALTER ROLE rouser SET statement_timeout TO '5s'"
    assert len(parsed.roles["Odd; Name"]) == 3
    # The grantor goes: the restoring superuser grants.
    assert ("owner", "rouser", "GRANT owner TO rouser WITH INHERIT TRUE") in parsed.memberships
    assert ("pg_read_all_data", "Odd; Name", 'GRANT pg_read_all_data TO "Odd; Name"') in parsed.memberships
    assert sorted(parsed.hashes) == sorted([HASH, "md5abc"])
    assert not any("TABLESPACE" in s for stmts in parsed.roles.values() for s in stmts)


def test_a_needed_role_brings_the_roles_it_is_linked_with_and_never_alters_existing_ones() -> None:
    parsed = parse_globals(GLOBALS_17)
    plan = plan_roles({"owner", "app"}, {"app", "postgres", "pg_read_all_data"}, parsed)
    assert plan.create == ("owner", "rouser")
    assert plan.keep == ("app",)
    assert "CREATE ROLE owner;" in plan.script and "CREATE ROLE rouser;" in plan.script
    assert "ALTER ROLE rouser SET statement_timeout TO '5s';" in plan.script
    assert "GRANT owner TO rouser WITH INHERIT TRUE;" in plan.script
    assert "CREATE ROLE app" not in plan.script and "ALTER ROLE app" not in plan.script
    assert "lonely" not in plan.script
    assert plan.script.index("BEGIN;") < plan.script.index("CREATE ROLE") < plan.script.index("COMMIT;")


def test_every_role_creates_all_missing_roles_of_the_globals() -> None:
    plan = plan_roles({"owner"}, {"app", "pg_read_all_data"}, parse_globals(GLOBALS_17), every_role=True)
    assert plan.create == ("owner", "Odd; Name", "rouser", "lonely")
    assert plan.keep == ("app",), "every role of the globals that exists already is kept as it is"
    assert 'GRANT pg_read_all_data TO "Odd; Name";' in plan.script


def test_a_needed_role_the_globals_lack_is_named() -> None:
    with pytest.raises(RoleError, match="ghost"):
        plan_roles({"owner", "ghost"}, {"app"}, parse_globals(GLOBALS_17))
    with pytest.raises(RoleError, match=r"owner.*no globals snapshot"):
        plan_roles({"owner", "app"}, {"app"}, None)
    assert plan_roles({"app"}, {"app"}, None).create == ()


def snap(kind: str, minutes: int, host: str = "a", container: str = "db") -> Snapshot:
    at = datetime(2026, 11, 1, 3, tzinfo=UTC) + timedelta(minutes=minutes)
    is_globals = kind == "globals"
    return Snapshot(f"{kind}{minutes}{host}", f"{kind}{minutes}", at, host, container,
                    GLOBALS_DATABASE if is_globals else "appdb", 1, globals=is_globals)


def test_the_globals_of_the_same_pass_are_the_newest_at_or_before_the_dump() -> None:
    history = [snap("globals", 0), snap("globals", 60), snap("globals", 120), snap("globals", 50, host="b"),
               snap("globals", 55, container="other")]
    assert globals_for(history, snap("db", 61)) == history[1]
    assert globals_for(history, snap("db", 60)) == history[1]
    # A dump older than every globals snapshot: the oldest after it.
    assert globals_for(history, snap("db", -5)) == history[0]
    assert globals_for(history, snap("db", 5, host="c")) is None


def role_maker(known: KnownProperties | None = None) -> RoleMaker:
    return RoleMaker("unix:///var/run/docker.sock", Repository("restic", {}, Masker(), "/srv/restic"), Masker(),
                     Bounds(), known=known)


DUMP = Snapshot("61a978ddb75d", "61a978dd", datetime(2026, 11, 1, 3, tzinfo=UTC), "a", "db", "appdb", 1)


def test_the_roles_are_read_through_the_same_entries_pipeline_and_check_as_the_properties(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # restic that handles SIGPIPE itself exits 1 saying "broken pipe": after pg_restore's 0, no failure here either.
    pipeline = FakePipeline((1, 0), RESTIC_CUT_OFF)
    monkeypatch.setattr(dbproperties, "run_pipeline", pipeline)
    known = KnownProperties()
    assert role_maker(known).needed_roles(DUMP, "c0ffee") == {
        "owner_r", "app", "reader", "ro", 'x IN DATABASE "My DB"', "default reader", "policy_role"}
    assert pipeline.argv == [commands.database_entries_pipeline("restic", "61a978ddb75d", "appdb", "c0ffee")]
    kept = known.take(DUMP.id)
    assert kept is not None and kept.owner == "owner_r" and len(kept.statements) == 6


def test_roles_read_before_pg_restore_had_everything_fail_naming_pg_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dbproperties, "run_pipeline", FakePipeline((-signal.SIGPIPE, 1), PG_RESTORE_CUT_SHORT))
    with pytest.raises(RoleError, match=r"^reading the roles snapshot 61a978dd needs failed: "
                                        r"pg_restore in the container failed \(exit status 1\)"):
        role_maker(KnownProperties()).needed_roles(DUMP, "c0ffee")
    monkeypatch.setattr(dbproperties, "run_pipeline", FakePipeline((12, 1), "Fatal: wrong password or no key found"))
    with pytest.raises(RoleError, match=r"needs failed: restic dump failed \(exit status 12\): Fatal: wrong password"):
        role_maker().needed_roles(DUMP, "c0ffee")


def test_without_a_restore_to_take_them_the_properties_are_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_reader() -> None:
        raise AssertionError("a PropertiesReader nobody takes the result of")

    monkeypatch.setattr(dbproperties, "run_pipeline", FakePipeline((-signal.SIGPIPE, 0)))
    monkeypatch.setattr(dbproperties, "PropertiesReader", no_reader)
    assert "policy_role" in role_maker().needed_roles(DUMP, "c0ffee")
