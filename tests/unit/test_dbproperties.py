"""Reading a dump's database entries (pg_restore --create --schema-only text) and aiming them elsewhere."""

from __future__ import annotations

import pytest

from watcher.dbproperties import (
    DatabaseProperties,
    KnownProperties,
    PropertiesReader,
    PropertiesUnreadable,
    checked,
    retarget,
    split_statements,
)

# The shape of pg_restore 15/17 output (trimmed), with awkward names and literals.
PG_RESTORE_TEXT = '''--
-- PostgreSQL database dump
--

\\restrict abc

SET statement_timeout = 0;

--
-- Name: My DB; Type: DATABASE; Schema: -; Owner: owner_r
--

CREATE DATABASE "My DB" WITH TEMPLATE = template0 ENCODING = 'UTF8';


ALTER DATABASE "My DB" OWNER TO owner_r;

\\unrestrict abc
\\connect -reuse-previous=on "dbname='My DB'"
\\restrict abc

SET statement_timeout = 0;

--
-- Name: DATABASE "My DB"; Type: COMMENT; Schema: -; Owner: owner_r
--

COMMENT ON DATABASE "My DB" IS 'see DATABASE "My DB";
-- not a header
done';


--
-- Name: My DB; Type: DATABASE PROPERTIES; Schema: -; Owner: owner_r
--

ALTER DATABASE "My DB" SET search_path TO 'app', 'public';
ALTER DATABASE "My DB" SET "TimeZone" TO 'Asia/Tokyo';
ALTER ROLE "x IN DATABASE ""My DB""" IN DATABASE "My DB" SET work_mem TO '8MB';


\\unrestrict abc
\\connect -reuse-previous=on "dbname='My DB'"
\\restrict abc

--
-- Name: t; Type: TABLE; Schema: public; Owner: app
--

CREATE TABLE public.t (x integer);


--
-- Name: TABLE t; Type: ACL; Schema: public; Owner: app
--

GRANT SELECT ON TABLE public.t TO reader;


--
-- Name: DEFAULT PRIVILEGES FOR TABLES; Type: DEFAULT ACL; Schema: public; Owner: owner_r
--

ALTER DEFAULT PRIVILEGES FOR ROLE owner_r IN SCHEMA public GRANT SELECT ON TABLES TO "default reader";


--
-- Name: t p; Type: POLICY; Schema: public; Owner: app
--

CREATE POLICY p ON public.t FOR SELECT TO policy_role USING ((x > 0));


--
-- Name: DATABASE "My DB"; Type: ACL; Schema: -; Owner: owner_r
--

REVOKE CONNECT,TEMPORARY ON DATABASE "My DB" FROM PUBLIC;
GRANT CONNECT ON DATABASE "My DB" TO ro;


--
-- PostgreSQL database dump complete
--

\\unrestrict abc
'''


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
