"""Engines (SPEC §13): discovery's choice of engine, MariaDB credentials from the env contract, the
MariaDB and command engines' in-container commands (no secret in them), snapshot tags."""

from __future__ import annotations

import json

import pytest

from watcher import engines
from watcher.config import Retention
from watcher.discovery import ContainerInfo, DiscoveryRules, Rejected, Target, discover
from watcher.engines.command import shell_command
from watcher.engines.mariadb import (
    MariaDBEngine,
    client_command,
    dump_arguments,
    dump_command,
    probe_verdict,
    user_databases,
)
from watcher.engines.mariadb_drill import InsertCounter, ready_probe_sql
from watcher.engines.mariadb_restore import (
    Objects,
    move_aside_script,
    move_back_script,
    parse_objects,
    quote_string,
    suffixed,
)
from watcher.restic import parse_snapshots

RULES = DiscoveryRules(patterns=("shop-*",), retention=Retention(7, 4, 6))
SECRET = "it's $(a) \"secret\""
MARIADB_ENV = {"MARIADB_ROOT_PASSWORD": SECRET, "MARIADB_DATABASE": "shop", "MARIADB_USER": "app",
               "MARIADB_PASSWORD": "app-secret"}


def target_of(env: dict[str, str], labels: dict[str, str] | None = None) -> Target:
    found = discover(ContainerInfo("id1", "shop-db", "mariadb:11", labels or {}, env), RULES)
    assert isinstance(found, Target), found
    return found


def rejected_of(env: dict[str, str], labels: dict[str, str]) -> Rejected:
    found = discover(ContainerInfo("id1", "shop-db", "mariadb:11", labels, env), RULES)
    assert isinstance(found, Rejected), found
    return found


@pytest.mark.parametrize(("env", "engine"), [
    ({"POSTGRES_PASSWORD": "x"}, "postgres"),
    (MARIADB_ENV, "mariadb"),
    ({"MYSQL_ROOT_PASSWORD": "x", "MYSQL_DATABASE": "d"}, "mysql"),
    ({"PATH": "/bin"}, "postgres"),  # as before engines: a matching name without any contract
])
def test_the_env_contract_decides_the_engine(env: dict[str, str], engine: str) -> None:
    assert target_of(env).engine == engine


def test_the_engine_label_overrides_the_env() -> None:
    assert target_of(MARIADB_ENV, {"backup-watcher.engine": "mysql"}).engine == "mysql"


def test_mariadb_dumps_as_root_with_the_password_variable_and_the_env_database() -> None:
    target = target_of(MARIADB_ENV)
    assert (target.credentials.user, target.credentials.password_env) == ("root", "MARIADB_ROOT_PASSWORD")
    assert target.credentials.password == SECRET  # known, so that every message masks it
    assert target.databases == ("shop",)


def test_mariadb_password_file_and_app_user() -> None:
    target = target_of({"MARIADB_USER": "app", "MARIADB_PASSWORD_FILE": "/run/secrets/pw", "MARIADB_DATABASE": "s"})
    assert (target.credentials.user, target.credentials.password_env) == ("app", "MARIADB_PASSWORD")
    assert target.credentials.password is None  # in a file inside the container: never read out


def test_mariadb_without_a_database_backs_up_all() -> None:
    assert target_of({"MYSQL_ROOT_PASSWORD": "x"}).all_databases


def test_system_schemas_and_scratch_copies_are_no_databases() -> None:
    listing = "information_schema\nmysql\nperformance_schema\nshop\nshop_bw_restore\nsys\nwiki\n"
    assert user_databases(listing) == ["shop", "wiki"]


def test_no_secret_reaches_a_mariadb_command() -> None:
    target = target_of(MARIADB_ENV)
    argv = MariaDBEngine().client(target, ("mariadb-dump", "mysqldump"), dump_arguments("root", "shop"))
    assert SECRET not in json.dumps(argv)
    assert argv[:2] == ("sh", "-c") and argv[4:7] == ("MARIADB_ROOT_PASSWORD", "mariadb-dump", "mysqldump")
    for option in ("--single-transaction", "--routines", "--events", "--triggers"):
        assert option in argv
    assert client_command(None, ("a", "b"), ())[4] == ""


def test_the_mariadb_dump_carries_its_lock_wait_bound_in_whole_seconds_and_no_secret() -> None:
    argv = dump_command("MARIADB_ROOT_PASSWORD", ("mariadb-dump", "mysqldump"), ("mariadb", "mysql"), "root", 2.5,
                        dump_arguments("root", "shop"))
    assert argv[4:11] == ("MARIADB_ROOT_PASSWORD", "mariadb-dump", "mysqldump", "3", "mariadb", "mysql", "root")
    assert argv[11:] == dump_arguments("root", "shop")
    assert dump_command(None, ("a", "b"), ("c", "d"), "u", 0.2, ())[7] == "1"
    assert SECRET not in json.dumps(argv)


def test_mysql_prefers_mysqldump_and_has_no_globals() -> None:
    mysql = MariaDBEngine("mysql")
    assert mysql.dump_programs[0] == "mysqldump"
    assert not mysql.has_globals(target_of({"MYSQL_ROOT_PASSWORD": "x"}))
    assert MariaDBEngine().has_globals(target_of(MARIADB_ENV))
    assert not MariaDBEngine().has_globals(target_of(MARIADB_ENV, {"backup-watcher.user": "app"}))


def test_command_engine_from_its_label() -> None:
    target = target_of({}, {"backup-watcher.dump-command": "redis-cli --rdb -",
                            "backup-watcher.restore-command": "cat > /data/dump.rdb"})
    assert target.engine == "command"
    assert target.databases == (engines.COMMAND_DATABASE,)
    assert (target.dump_command, target.restore_command) == ("redis-cli --rdb -", "cat > /data/dump.rdb")
    assert shell_command("redis-cli --rdb -") == ("sh", "-c", "redis-cli --rdb -")


@pytest.mark.parametrize(("labels", "culprit"), [
    ({"backup-watcher.engine": "mongodb"}, "backup-watcher.engine='mongodb'"),
    ({"backup-watcher.engine": "command"}, "needs backup-watcher.dump-command"),
    ({"backup-watcher.dump-command": "x", "backup-watcher.databases": "a"}, "backup-watcher.databases"),
    ({"backup-watcher.engine": "mariadb", "backup-watcher.dump-command": "x"}, "backup-watcher.dump-command"),
])
def test_bad_engine_labels_name_the_culprit(labels: dict[str, str], culprit: str) -> None:
    assert culprit in rejected_of(MARIADB_ENV, labels).reason


def test_snapshots_carry_their_engine() -> None:
    item = {"id": "a" * 64, "time": "2026-11-26T03:00:00Z", "hostname": "h",
            "tags": ["backup-watcher", "container=shop-db", "database=shop", "engine=mariadb"]}
    old = {**item, "tags": ["backup-watcher", "container=pg", "database=app"]}
    snaps = parse_snapshots(json.dumps([item, old]).encode())
    assert sorted(snap.engine for snap in snaps) == ["mariadb", "postgres"]


def test_mariadb_swap_scripts_quote_every_name() -> None:
    objects = parse_objects("table\tpeo`ple\ntable\tinvoices\nview\trich\ntrigger\ttrg\nPROCEDURE\tpay\n"
                            "event\tnightly\n")
    assert objects.tables == ("peo`ple", "invoices") and objects.routines == (("PROCEDURE", "pay"),)
    script = move_aside_script("shop", suffixed("shop", "_bw_previous"), objects)
    assert "RENAME TABLE `shop`.`peo``ple` TO `shop_bw_previous`.`peo``ple`, `shop`.`invoices` TO" in script
    assert script.index("DROP TRIGGER `shop`.`trg`") < script.index("RENAME TABLE")
    assert "DROP PROCEDURE `shop`.`pay`;" in script and "DROP EVENT `shop`.`nightly`;" in script
    back = move_back_script("shop", "shop_bw_previous", Objects(tables=("new",)), objects.tables)
    assert "DROP TABLE IF EXISTS `shop`.`new`;" in back and back.endswith("DROP DATABASE `shop_bw_previous`;\n")
    assert len(suffixed("x" * 64, "_bw_restore")) == 64
    assert quote_string("it's \\ ok") == "'it\\'s \\\\ ok'"


def test_drill_counts_one_insert_per_row_and_wants_the_end_line() -> None:
    counter = InsertCounter()
    for line in ["CREATE TABLE `a``b` (x int);", "INSERT INTO `a``b` VALUES (1,'VALUES (2)');",
                 "INSERT INTO `a``b` VALUES (2,'x\\nINSERT INTO `c` VALUES (9)');", "INSERT INTO `c` VALUES (3);"]:
        counter(line)
    assert counter.counts == {"a`b": 2, "c": 1} and not counter.completed
    counter("-- Dump completed")
    assert counter.completed
    assert "@@skip_networking" in ready_probe_sql("it's") and "'it\\'s'" in ready_probe_sql("it's")


def test_mariadb_readiness_tells_the_final_server_from_the_entrypoints_temporary_one() -> None:
    assert probe_verdict(True, "0\n", "") is None
    assert probe_verdict(True, "1\n", "") == "the entrypoint's temporary server is still initialising"
    assert probe_verdict(False, "", "ERROR 2002: Can't connect") == "ERROR 2002: Can't connect"
    assert probe_verdict(False, "", "ERROR 1045 (28000): Access denied for user") is None
