"""The MariaDB users step of a restore: reading `mariadb-dump --system=users` and planning which accounts to
create (SPEC §10, §13), on the dump MariaDB 11.8 writes."""

from __future__ import annotations

from watcher.engines.mariadb_restore import without_statement_excerpt
from watcher.engines.mariadb_users import (
    drop_script,
    parse_existing,
    parse_user_globals,
    plan_users,
    statements,
    users_sentence,
)

HASH = "*ACDF6C0E2DF0DB7715BCCCA8D349D8284F9C0874"
ROOT_HASH = "*79D0CF9A6A052105DA1E1181406C34FC87AAC89D"
DUMP = f"""/*M!999999\\- enable the sandbox mode */
-- MariaDB dump 10.19-11.8.3-MariaDB, for debian-linux-gnu (x86_64)
/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;
/*M!100616 SET @OLD_NOTE_VERBOSITY=@@NOTE_VERBOSITY, NOTE_VERBOSITY=0 */;
CREATE USER `mariadb.sys`@`localhost` ACCOUNT LOCK PASSWORD EXPIRE;
CREATE USER `root`@`%` IDENTIFIED BY PASSWORD '{ROOT_HASH}';
CREATE USER `app`@`%` IDENTIFIED BY PASSWORD '{HASH}';
CREATE USER `o'neil;x`@`localhost` IDENTIFIED VIA ed25519 USING 'ed;hash\\'q';
SELECT COALESCE(CURRENT_ROLE(),'NONE') into @current_role;
CREATE ROLE IF NOT EXISTS mariadb_dump_import_role;
GRANT mariadb_dump_import_role TO CURRENT_USER();
SET ROLE mariadb_dump_import_role;
/*!80001 CREATE ROLE 'reader' */;
/*M!100005 CREATE ROLE 'reader' WITH ADMIN mariadb_dump_import_role */;
/*M!100005 GRANT 'reader' TO 'root'@'localhost' WITH ADMIN OPTION */;
GRANT ALL PRIVILEGES ON *.* TO `root`@`%` IDENTIFIED BY PASSWORD '{ROOT_HASH}' WITH GRANT OPTION;
GRANT PROXY ON ``@`%` TO `root`@`%` WITH GRANT OPTION;
GRANT `reader` TO `app`@`%`;
GRANT USAGE ON *.* TO `app`@`%` IDENTIFIED BY PASSWORD '{HASH}';
GRANT ALL PRIVILEGES ON `shop`.* TO `app`@`%`;
GRANT INSERT ON `shop`.`t` TO `app`@`%`;
GRANT EXECUTE ON PROCEDURE `wiki`.`tidy` TO `app`@`%`;
/*M!100005 SET DEFAULT ROLE 'reader' FOR 'app'@'%' */;
/*!80001 ALTER USER 'app'@'%' DEFAULT ROLE 'reader' */;
GRANT USAGE ON *.* TO `reader`;
GRANT SELECT ON `shop`.* TO `reader`;
GRANT SELECT ON `wiki`.* TO `o'neil;x`@`localhost`;
SET ROLE NONE;
DROP ROLE mariadb_dump_import_role;
/*M!100203 EXECUTE IMMEDIATE CONCAT('SET ROLE ', @current_role) */;
"""
EXISTING = {("root", "%"), ("root", "localhost"), ("mariadb.sys", "localhost")}


def test_statements_follow_what_mariadb_runs() -> None:
    found = statements(DUMP)
    assert "CREATE ROLE 'reader' WITH ADMIN mariadb_dump_import_role" in found
    assert not any("80001" in s or "ALTER USER" in s or "OLD_CHARACTER_SET" in s for s in found)
    assert "CREATE USER `o'neil;x`@`localhost` IDENTIFIED VIA ed25519 USING 'ed;hash\\'q'" in found


def test_the_accounts_grants_and_hashes_of_the_globals() -> None:
    parsed = parse_user_globals(DUMP)
    assert list(parsed.accounts) == [("mariadb.sys", "localhost"), ("root", "%"), ("app", "%"),
                                     ("o'neil;x", "localhost"), ("reader", "")]
    assert parsed.accounts[("reader", "")] == ["CREATE ROLE 'reader'"]
    assert {HASH, ROOT_HASH, "ed;hash'q"} <= set(parsed.hashes)
    by_statement = {g.statement: g for g in parsed.grants}
    assert by_statement["GRANT INSERT ON `shop`.`t` TO `app`@`%`"].database == "shop"
    assert by_statement["GRANT EXECUTE ON PROCEDURE `wiki`.`tidy` TO `app`@`%`"].database == "wiki"
    shop_grant = by_statement["GRANT ALL PRIVILEGES ON `shop`.* TO `app`@`%`"]
    assert shop_grant.database is None and shop_grant.on == "shop"
    assert by_statement["GRANT `reader` TO `app`@`%`"].role == ("reader", "")
    assert not any("mariadb_dump_import_role" in g.statement for g in parsed.grants)


def test_a_restore_creates_the_users_of_its_database_with_their_roles_and_alters_no_existing_one() -> None:
    plan = plan_users({"shop"}, EXISTING, parse_user_globals(DUMP))
    assert plan.create == (("app", "%"), ("reader", ""))
    assert plan.keep == ()  # root's grants are global ones: none names shop
    lines = plan.script.splitlines()
    # Roles first, then the app user, its grants (not root's, which exists), its default role last.
    assert lines[0] == "CREATE ROLE 'reader';" and lines[1].startswith("CREATE USER `app`@`%`")
    assert "GRANT `reader` TO `app`@`%`;" in lines and "GRANT SELECT ON `shop`.* TO `reader`;" in lines
    assert lines[-1] == "SET DEFAULT ROLE 'reader' FOR 'app'@'%';"
    assert not any("root" in line for line in lines)
    # The table grant needs the table: after the restore; the procedure's database is not restored here.
    assert plan.after == "GRANT INSERT ON `shop`.`t` TO `app`@`%`;\n" and plan.left_out == 1
    assert HASH in plan.hashes
    assert users_sentence(plan, future=True) == (
        "Users will be created from the old host's globals: app@%, reader; none of them exists already; "
        "1 grant(s) on objects of databases not restored here are left out.")


def test_whole_host_recovery_creates_every_missing_account() -> None:
    plan = plan_users({"shop", "wiki"}, EXISTING, parse_user_globals(DUMP), every_account=True)
    assert set(plan.create) == {("app", "%"), ("reader", ""), ("o'neil;x", "localhost")}
    assert set(plan.keep) == {("root", "%"), ("mariadb.sys", "localhost")}
    assert "GRANT EXECUTE ON PROCEDURE `wiki`.`tidy` TO `app`@`%`;" in plan.after and plan.left_out == 0
    assert drop_script([("o'neil;x", "localhost"), ("reader", "")]) == (
        "DROP USER IF EXISTS 'o\\'neil;x'@'localhost';\nDROP ROLE IF EXISTS 'reader';\n")


def test_nothing_to_create_when_the_users_exist_or_there_are_no_globals() -> None:
    parsed = parse_user_globals(DUMP)
    everyone = set(parsed.accounts)
    plan = plan_users({"shop"}, everyone, parsed)
    assert plan.create == () and plan.script == "" and plan.after == ""
    assert users_sentence(plan, future=True) == "Users the databases' grants name: kept (exist already): app@%, reader."
    assert plan_users({"shop"}, EXISTING, None).create == ()
    assert parse_existing("root\t%\nreader\t\n") == {("root", "%"), ("reader", "")}


def test_a_syntax_errors_excerpt_of_a_users_script_is_not_shown() -> None:
    # The excerpt ends inside a hash (80 characters), where the masker, which knows whole hashes, cannot see it.
    hash_ = "*A4B6157319038724E3560894F7F932C8886EBFCF"
    message = ("ERROR 1064 (42000) at line 3: You have an error in your SQL syntax; check the manual that corresponds "
               f"to your MariaDB server version for the right syntax to use near 'IDENTIFIED VIA x USING "
               f"'{hash_[:20]}' at line 1")
    shown = without_statement_excerpt(message)
    assert hash_[:20] not in shown
    assert shown.startswith("ERROR 1064 (42000) at line 3: You have an error in your SQL syntax")
    assert shown.endswith("near (the statement is not shown: it may hold a password hash) at line 1")
    assert without_statement_excerpt("ERROR 1045 (28000): Access denied") == "ERROR 1045 (28000): Access denied"
