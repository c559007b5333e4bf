"""Scripts that hold password hashes say why they failed without a cut piece of a hash: the roles script's psql
runs with statement quotes left out (watcher.roles), the MariaDB users script's syntax error without its
excerpt (watcher.engines.mariadb_restore). The helpers have their own tests; these hold the wiring."""

from __future__ import annotations

from typing import Any, cast

import pytest

import watcher.engines.mariadb_restore as mariadb_restore
import watcher.roles as roles
from watcher.config import Bounds
from watcher.discovery import Credentials
from watcher.execute import Completed, Masker
from watcher.restic import Repository

HASH = "*A4B6157319038724E3560894F7F932C8886EBFCF"
VERIFIER = "SCRAM-SHA-256$4096:c2FsdA==$YWJjZGVmZ2hpamtsbW5vcA==:MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHk="


def test_the_roles_script_runs_with_statement_quotes_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    maskers: list[Masker] = []

    def run_in_container(*_args: Any, masker: Masker, **_kwargs: Any) -> Completed:
        maskers.append(masker)
        return Completed(argv=(("psql",),), returncodes=(0,))

    monkeypatch.setattr(roles, "run_in_container", run_in_container)
    maker = roles.RoleMaker("unix:///nonexistent.sock", cast(Repository, None), Masker(), Bounds())
    plan = roles.RolePlan(create=("app",), keep=(), script=f"CREATE ROLE app PASSWORD '{VERIFIER}';\n",
                          hashes=(VERIFIER,))
    maker.create(plan, "c0ffee", "scalr-app-db", Credentials(user="postgres", database="postgres", password="pw-1"))
    assert [m.statement_quotes for m in maskers] == [False]


def test_a_users_scripts_syntax_error_names_no_part_of_a_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    said = ("ERROR 1064 (42000) at line 3: You have an error in your SQL syntax; check the manual that corresponds to "
            f"your MariaDB server version for the right syntax to use near 'IDENTIFIED VIA x USING '{HASH[:20]}' "
            "at line 1")
    monkeypatch.setattr(mariadb_restore, "run_in_container",
                        lambda *_args, **_kwargs: Completed(argv=(("mariadb",),), returncodes=(1,), stderr_tail=said))
    restorer = mariadb_restore.MariaDBRestorer("unix:///nonexistent.sock", cast(Repository, None), Masker(), "mariadb")
    creds = Credentials(user="root", database="mysql", password="pw-1", password_env="MARIADB_ROOT_PASSWORD")
    with pytest.raises(mariadb_restore.MariaDBRestoreError) as failed:
        restorer.sql("c0ffee", creds, f"CREATE USER x IDENTIFIED VIA x USING '{HASH}';\n", secrets=[HASH])
    assert HASH[:20] not in str(failed.value) and "ERROR 1064 (42000) at line 3" in str(failed.value)
