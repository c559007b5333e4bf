"""Command lines built by watcher.commands (SPEC §6): exact argv, tags, file names, no secrets in argv."""

from __future__ import annotations

import sys
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from watcher import commands
from watcher.config import Retention

NAMES = [
    "app",
    "my,db",
    "a/b",
    "100%",
    "two words",
    "tab\there",
    "straße",
    "数据库",
    "key=value",
    "a=b,c=d",
    "../etc/passwd",
    "%2F",
    "plus+sign",
    "'quoted\"",
    "😀",
]


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_round_trip(name: str) -> None:
    encoded = commands.encode_name(name)
    assert commands.decode_name(encoded) == name
    assert not any(char in encoded for char in ", /\t")
    assert encoded.isascii()


def test_encode_is_injective_on_tricky_pairs() -> None:
    assert commands.encode_name("a%2Cb") != commands.encode_name("a,b")
    assert commands.encode_name("a b") != commands.encode_name("a+b")


def test_plain_names_stay_readable() -> None:
    assert commands.encode_name("scalr_app-1.0") == "scalr_app-1.0"


@pytest.mark.parametrize("name", NAMES)
def test_dump_filename_is_flat(name: str) -> None:
    filename = commands.dump_filename(name)
    assert "/" not in filename
    assert filename.endswith(".pgdump")


def test_dump_filename_is_constant_per_database() -> None:
    assert commands.dump_filename("app") == "app.pgdump"
    assert commands.dump_filename("app") == commands.dump_filename("app")
    assert commands.dump_filename("a/b") != commands.dump_filename("a_b")


def test_snapshot_tags() -> None:
    assert commands.snapshot_tags("scalr-app-db", "scalr_app") == (
        "backup-watcher", "container=scalr-app-db", "database=scalr_app",
    )


def test_snapshot_tags_never_hold_a_comma() -> None:
    # restic splits --tag values on ',', so a database name with one must not break the tag.
    tags = commands.snapshot_tags("scalr-app-db", "a,b")
    assert all("," not in tag for tag in tags)
    assert tags[2] == "database=a%2Cb"


def test_restic_backup_exact() -> None:
    source = ("python", "-m", "watcher.dockerexec", "--container", "abc", "--", "pg_dump")
    argv = commands.restic_backup("restic", host="db-host", container="scalr-app-db", database="scalr_app",
                                  source=source)
    assert argv == (
        "restic", "backup", "--json", "--host", "db-host", "--stdin-filename", "scalr_app.pgdump",
        "--tag", "backup-watcher", "--tag", "container=scalr-app-db", "--tag", "database=scalr_app",
        "--stdin-from-command", "--",
        "python", "-m", "watcher.dockerexec", "--container", "abc", "--", "pg_dump",
    )


def test_restic_backup_with_its_snapshot_time_in_utc_whole_seconds() -> None:
    berlin = datetime(2026, 11, 22, 4, 5, 6, 987654, tzinfo=ZoneInfo("Europe/Berlin"))
    argv = commands.restic_backup("restic", host="h", container="c", database="d", source=("true",),
                                  snapshot_time=berlin)
    assert argv[argv.index("--time") + 1] == "2026-11-22 03:05:06"
    assert argv.index("--time") < argv.index("--stdin-from-command"), "restic options stay before the command"
    assert commands.RESTIC_TIME_ENV == {"TZ": "UTC"}


def test_restic_backup_encodes_odd_database_names() -> None:
    argv = commands.restic_backup("/usr/bin/restic", host="h", container="c", database="my db/x",
                                  source=("true",))
    assert argv[argv.index("--stdin-filename") + 1] == "my%20db%2Fx.pgdump"
    assert "database=my%20db%2Fx" in argv


def test_restic_snapshots() -> None:
    assert commands.restic_snapshots("restic") == (
        "restic", "--no-lock", "snapshots", "--json", "--tag", "backup-watcher",
    )
    assert commands.restic_snapshots("restic", host="h1", container="scalr-app-db", database="a,b") == (
        "restic", "--no-lock", "snapshots", "--json", "--tag",
        "backup-watcher,container=scalr-app-db,database=a%2Cb", "--host", "h1",
    )


def test_restic_dump() -> None:
    argv = commands.restic_dump("restic", "1a2b3c4d", "a/b")
    assert argv == ("restic", "dump", "1a2b3c4d", "/a%2Fb.pgdump")


def test_the_database_entries_pipeline_dumps_into_pg_restore_create_schema_only_in_the_container() -> None:
    helper = (sys.executable, "-m", "watcher.dockerexec", "--container", "c0ffee", "--stdin")
    listing = ("--", "pg_restore", "--create", "--schema-only", "--file=-")
    assert commands.database_entries_pipeline("restic", "1a2b3c4d", "a/b", "c0ffee") == (
        ("restic", "dump", "1a2b3c4d", "/a%2Fb.pgdump"), (*helper, *listing))
    # A user's libpq environment, none of it secret (writing text, pg_restore connects to no server).
    assert commands.database_entries_pipeline("restic", "1a2b3c4d", "a/b", "c0ffee", "backup")[1] == (
        *helper, "--env", "PGUSER=backup", "--env", "PGDATABASE=postgres", "--env", "PGAPPNAME=backup-watcher",
        *listing)


def test_restic_forget_groups_per_history_with_its_keeps() -> None:
    argv = commands.restic_forget("restic", host="db-host", containers=["scalr-b-db", "scalr-app-db"],
                                  retention=Retention(daily=7, weekly=0, monthly=12))
    assert argv == (
        "restic", "forget", "--json", "--host", "db-host",
        "--tag", "backup-watcher,container=scalr-app-db",
        "--tag", "backup-watcher,container=scalr-b-db",
        "--group-by", "host,tags",
        "--keep-daily", "7", "--keep-weekly", "0", "--keep-monthly", "12",
    )


def test_restic_forget_never_prunes_itself_and_uses_the_keeps() -> None:
    argv = commands.restic_forget("restic", host="h", containers=["c"], retention=Retention())
    assert "--prune" not in argv
    assert argv[argv.index("--keep-daily") + 1] == "30"
    assert argv[argv.index("--keep-weekly") + 1] == "4"
    assert argv[argv.index("--keep-monthly") + 1] == "6"


def test_retention_and_lock_commands() -> None:
    assert commands.restic_prune("r") == ("r", "prune")
    assert commands.restic_unlock("r") == ("r", "unlock")
    assert commands.restic_retag("r", host="h", old_name="a-db", new_name="b-db") == (
        "r", "tag", "--host", "h", "--tag", "backup-watcher,container=a-db",
        "--add", "container=b-db", "--remove", "container=a-db",
    )
    assert commands.with_lock_wait(("r", "prune"), 1800.0) == ("r", "--retry-lock", "1800s", "prune")
    # restic reads Go durations: whole seconds, never an exponent; a fraction waits the second out.
    assert commands.with_lock_wait(("r", "prune"), 1.5)[1:3] == ("--retry-lock", "2s")
    assert commands.with_lock_wait(("r", "prune"), 7 * 86400.0)[1:3] == ("--retry-lock", "604800s")


def test_small_restic_commands() -> None:
    assert commands.restic_version("r") == ("r", "version")
    assert commands.restic_cat_config("r") == ("r", "--no-lock", "cat", "config")
    assert commands.restic_init("r") == ("r", "init")


def test_exec_helper_exact() -> None:
    argv = commands.exec_helper("abc123", ("pg_dump", "--format=custom"), env_names=["PGPASSWORD"],
                                env_values={"PGUSER": "scalr", "PGDATABASE": "app"}, stdin=True)
    assert argv == (
        sys.executable, "-m", "watcher.dockerexec", "--container", "abc123", "--stdin",
        "--env", "PGUSER=scalr", "--env", "PGDATABASE=app", "--env", "PGPASSWORD",
        "--", "pg_dump", "--format=custom",
    )


def test_exec_helper_without_stdin_or_env() -> None:
    argv = commands.exec_helper("abc", ("true",))
    assert argv == (sys.executable, "-m", "watcher.dockerexec", "--container", "abc", "--", "true")


def test_backup_argv_never_holds_the_password() -> None:
    password = "pg-Sup3r-secret"
    source = commands.exec_helper("abc", commands.pg_dump_command(300.0), env_names=["PGPASSWORD"],
                                  env_values=commands.pg_env("scalr", "app"))
    argv = commands.restic_backup("restic", host="h", container="scalr-app-db", database="app", source=source)
    assert not any(password in arg for arg in argv)
    assert "PGPASSWORD" in argv  # by name only
    assert not any(arg.startswith("PGPASSWORD=") for arg in argv)


def test_pg_dump_command() -> None:
    assert commands.pg_dump_command(300.0) == (
        "pg_dump", "--format=custom", "--compress=0", "--no-password", "--lock-wait-timeout=300000")
    argv = commands.pg_dump_command(0.5)
    assert argv[-1] == "--lock-wait-timeout=500"
    assert argv[0] == "pg_dump"
    assert "--format=custom" in argv
    assert "--compress=0" in argv
    assert "--no-password" in argv
    # no database name, role or connection string in argv: they come from PGUSER/PGDATABASE
    assert all(arg.startswith("--") for arg in argv[1:])
    assert not any(arg.startswith(("--dbname", "--username", "--file", "-d", "-U", "-f")) for arg in argv[1:])


def test_pg_env() -> None:
    assert commands.pg_env("scalr", "a=b") == {
        "PGUSER": "scalr", "PGDATABASE": "a=b", "PGAPPNAME": "backup-watcher",
    }


def test_live_query_env_bounds_every_lock_wait_and_statement() -> None:
    assert commands.live_query_env("scalr", "app", lock_wait_s=3.0, statement_s=600.0) == {
        "PGUSER": "scalr", "PGDATABASE": "app", "PGAPPNAME": "backup-watcher",
        "PGOPTIONS": "-c lock_timeout=3000 -c statement_timeout=600000",
    }


def test_a_bound_is_never_zero_milliseconds() -> None:
    """0 would switch PostgreSQL's timeouts off: the least bound is 1 ms."""
    assert commands.milliseconds(0.0001) == 1
    assert commands.milliseconds(1.5) == 1500


def test_psql_pairs_command_stops_at_the_first_error() -> None:
    assert commands.psql_pairs_command() == (
        "psql", "--no-psqlrc", "--no-password", "--tuples-only", "--no-align", "-v", "ON_ERROR_STOP=1")


@pytest.mark.parametrize(("value", "quoted"), [
    ("app", "'app'"),
    ("it's", "'it\\'s'"),
    ("back\\slash", "'back\\\\slash'"),
    ("\\'", "'\\\\\\''"),
    ("a b=c", "'a b=c'"),
    ("", "''"),
])
def test_conninfo_quote(value: str, quoted: str) -> None:
    assert commands.conninfo_quote(value) == quoted


def test_pg_restore_command() -> None:
    assert commands.pg_restore_command("it's_bw_restore") == (
        "pg_restore", "--no-password", "--single-transaction", "--exit-on-error",
        "--dbname=dbname='it\\'s_bw_restore'",
    )


def test_psql_script_command_passes_variables() -> None:
    argv = commands.psql_script_command({"db": "a=b", "scratch": "x_bw_restore"})
    assert argv[:1] == ("psql",)
    assert "ON_ERROR_STOP=1" in argv
    at = argv.index("db=a=b")
    assert argv[at - 1:at + 1] == ("--set", "db=a=b")
    assert "scratch=x_bw_restore" in argv


def test_list_databases_command_excludes_templates() -> None:
    argv = commands.list_databases_command()
    assert argv[0] == "psql"
    assert "--record-separator-zero" in argv
    sql = argv[-1]
    assert "NOT datistemplate" in sql
    assert "datallowconn" in sql
    # A restore's half-restored scratch copy and the old database it moved aside are no databases
    # of the container's own (LIKE's default escape is the backslash).
    assert "datname NOT LIKE '%\\_bw\\_restore'" in sql
    assert "datname NOT LIKE '%\\_bw\\_previous'" in sql


def test_restic_backup_globals_exact() -> None:
    argv = commands.restic_backup_globals("restic", host="db-host", container="scalr-app-db", source=("true",))
    assert argv == (
        "restic", "backup", "--json", "--host", "db-host", "--stdin-filename", "globals.sql",
        "--tag", "backup-watcher", "--tag", "container=scalr-app-db", "--tag", "globals",
        "--stdin-from-command", "--", "true",
    )
    assert commands.restic_dump_globals("restic", "1a2b") == ("restic", "dump", "1a2b", "/globals.sql")


def test_globals_are_forgotten_with_their_container_as_a_history_of_their_own() -> None:
    # forget selects by container tags (a subset of the globals snapshot's tags) and groups by all tags:
    # the globals history keeps its own daily/weekly/monthly snapshots, apart from every database's.
    argv = commands.restic_forget("restic", host="h", containers=["c"], retention=Retention())
    selector = set(argv[argv.index("--tag") + 1].split(","))
    assert selector <= set(commands.globals_tags("c"))
    assert set(commands.globals_tags("c")) != set(commands.snapshot_tags("c", "globals"))
    assert argv[argv.index("--group-by") + 1] == "host,tags"


def test_pg_dumpall_globals_command() -> None:
    assert commands.pg_dumpall_globals_command() == ("pg_dumpall", "--globals-only", "--no-password")
    assert commands.pg_dumpall_globals_command(role_passwords=False)[-1] == "--no-role-passwords"


def test_snapshots_of_other_engines_say_which_and_postgres_keeps_its_tags() -> None:
    # PostgreSQL's tags stay as they were, so that retention's groups (host, tags) go on unbroken.
    assert commands.snapshot_tags("c", "d") == commands.snapshot_tags("c", "d", "postgres")
    argv = commands.restic_backup("restic", host="h", container="c", database="shop", source=("true",),
                                  engine="mariadb", suffix=".sql")
    assert argv[argv.index("--stdin-filename") + 1] == "shop.sql"
    assert "engine=mariadb" in argv
    assert commands.restic_dump("restic", "1a2b", "shop", ".sql") == ("restic", "dump", "1a2b", "/shop.sql")
    assert "engine=mariadb" in commands.globals_tags("c", "mariadb")


def test_key_ordered_dump_exact() -> None:
    argv = commands.key_ordered_dump("abc123", ("pg_dump", "--format=custom"), env_names=["PGPASSWORD"],
                                     env_values={"PGUSER": "scalr", "PGDATABASE": "app"}, lock_wait_s=2.5)
    assert argv == (
        sys.executable, "-m", "watcher.keydump", "--container", "abc123", "--lock-wait-ms", "2500",
        "--env", "PGUSER=scalr", "--env", "PGDATABASE=app", "--env", "PGPASSWORD",
        "--", "pg_dump", "--format=custom",
    )
