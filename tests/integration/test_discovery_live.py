"""Discovery against real containers: patterns, labels, awkward passwords, databases=all."""

from __future__ import annotations

import pytest

from tests.integration.conftest import PgContainer, Repo, StartPg, run_watcher

pytestmark = pytest.mark.engine


@pytest.mark.alone  # an opt-in container: every other watcher on the engine would select it
def test_pattern_label_opt_out_and_non_matching(start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    by_pattern = start_pg("scalr-orders-db", "15")
    by_label = start_pg("bwt-labelled-pg", "17", labels={"backup-watcher.enable": "true"})
    opted_out = start_pg("scalr-legacy-db", "15", labels={"backup-watcher.enable": "false"})
    ignored = start_pg("bwt-unrelated-pg", "17")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "scalr-*-db,scalr-auth-postgres"}

    done = run_watcher(["backup"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    backed_up = {s_tag for s in repo.snapshots() for s_tag in s["tags"] if s_tag.startswith("container=")}
    assert backed_up == {f"container={by_pattern.name}", f"container={by_label.name}"}
    assert opted_out.name not in done.stdout and ignored.name not in done.stdout


def test_password_with_quotes_spaces_and_command_substitution(start_pg: StartPg, repo: Repo,
                                                              watcher_env: dict[str, str]) -> None:
    password = """it's a "pass word" $(touch /tmp/pwned) `id` \\ ; & | ✓"""
    db: PgContainer = start_pg("scalr-quotes-db", "17", password=password)
    db.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (42);")
    # Without this the container trusts local connections and the password would never be used.
    db.require_password_locally()
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}

    done = run_watcher(["backup"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(repo.snapshots_of(db.name)) == 1
    dump = repo.restic("dump", "--path", "/appdb.pgdump", "latest", "/appdb.pgdump").stdout
    assert "PGDMP" in dump[:5]
    assert db.psql("SELECT 1", check=False) == "1"


def test_databases_all_gives_one_snapshot_per_database(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("scalr-multi-db", "15", labels={"backup-watcher.databases": "all"})
    db.psql('CREATE DATABASE billing; CREATE DATABASE "odd, name/ü";', database="postgres")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}

    done = run_watcher(["backup"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    databases = sorted(t for s in repo.snapshots_of(db.name) for t in s["tags"] if t.startswith("database="))
    # postgres, appdb, billing and the odd name; never template0/template1.
    assert databases == ["database=appdb", "database=billing", "database=odd%2C%20name%2F%C3%BC",
                         "database=postgres"]
    listed = run_watcher(["snapshots", db.name, "--json"], env)
    assert '"database": "odd, name/\\u00fc"' in listed.stdout


def test_explicit_database_list(start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("scalr-two-db", "17", labels={"backup-watcher.databases": "appdb,reports"})
    db.psql("CREATE DATABASE reports; CREATE DATABASE other;", database="postgres")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    done = run_watcher(["backup"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    databases = sorted(t for s in repo.snapshots_of(db.name) for t in s["tags"] if t.startswith("database="))
    assert databases == ["database=appdb", "database=reports"]


def test_backup_of_named_targets_only(start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    first = start_pg("scalr-first-db", "15")
    second = start_pg("scalr-second-db", "15")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "scalr-*-db"}
    done = run_watcher(["backup", first.name], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(repo.snapshots_of(first.name)) == 1
    assert repo.snapshots_of(second.name) == []

    unknown = run_watcher(["backup", "no-such-container"], env)
    assert unknown.returncode == 2
    assert "no-such-container" in unknown.stderr
