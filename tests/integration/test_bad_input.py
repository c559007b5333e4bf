"""Bad input gets a clear error naming the culprit, and one bad container does not stop the others."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import PgContainer, Repo, run_watcher

pytestmark = pytest.mark.engine
StartPg = Callable[..., PgContainer]


def test_bad_label_disables_only_that_container(start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    good = start_pg("scalr-good-db", "15")
    bad = start_pg("scalr-bad-db", "15", labels={"backup-watcher.keep-daily": "lots",
                                                 "backup-watcher.schedule": "every day"})
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "scalr-*-db"}
    done = run_watcher(["backup"], env)
    assert done.returncode == 1
    assert "backup-watcher.keep-daily='lots'" in done.stdout
    assert "backup-watcher.schedule='every day'" in done.stdout
    assert len(repo.snapshots_of(good.name)) == 1
    assert repo.snapshots_of(bad.name) == []


def test_bad_pattern_is_named(watcher_env: dict[str, str]) -> None:
    done = run_watcher(["backup"], {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "scalr-*-db,scalr/db,x[1"})
    assert done.returncode == 2
    assert "WATCHER_CONTAINER_PATTERNS: pattern 'scalr/db' may hold only" in done.stderr
    assert "WATCHER_CONTAINER_PATTERNS: pattern 'x[1' has an unclosed '['" in done.stderr


def test_missing_password_is_named(watcher_env: dict[str, str]) -> None:
    env = {k: v for k, v in watcher_env.items() if k != "RESTIC_PASSWORD"}
    done = run_watcher(["backup"], env)
    assert done.returncode == 2
    assert "RESTIC_PASSWORD" in done.stderr and "missing" in done.stderr


def test_every_configuration_problem_is_reported_at_once(watcher_env: dict[str, str]) -> None:
    env = {k: v for k, v in watcher_env.items() if k != "RESTIC_PASSWORD"}
    env.update({"WATCHER_SCHEDULE": "61 * * * *", "WATCHER_CONCURRENCY": "zero", "WATCHER_TIMEZONE": "Mars/Olympus",
                "WATCHER_KEEP_DAILY": "-3"})
    done = run_watcher(["check-config"], env)
    assert done.returncode == 2
    for name in ("RESTIC_PASSWORD", "WATCHER_SCHEDULE", "WATCHER_CONCURRENCY", "WATCHER_TIMEZONE",
                 "WATCHER_KEEP_DAILY"):
        assert name in done.stderr, name


def test_unreachable_docker_host_is_named(watcher_env: dict[str, str], tmp_path: Path) -> None:
    socket_path = tmp_path / "nothing-here.sock"
    env = {**watcher_env, "DOCKER_HOST": f"unix://{socket_path}"}
    done = run_watcher(["backup"], env, timeout=120)
    assert done.returncode == 2
    assert f"DOCKER_HOST=unix://{socket_path}" in done.stderr
    checked = run_watcher(["check-config"], env, timeout=120)
    assert checked.returncode == 2
    assert f"DOCKER_HOST=unix://{socket_path}" in checked.stderr


def test_missing_repository_without_init_is_named(start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db = start_pg("scalr-norepo-db", "15")
    env = {**watcher_env, "WATCHER_INIT_REPOSITORY": "false", "WATCHER_CONTAINER_PATTERNS": db.name}
    done = run_watcher(["backup"], env)
    assert done.returncode == 2
    assert str(repo.path) in done.stderr and "does not exist" in done.stderr
    assert "WATCHER_INIT_REPOSITORY=true" in done.stderr
    assert not repo.path.exists(), "nothing may be created without WATCHER_INIT_REPOSITORY"


def test_wrong_repository_password_is_named(start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db = start_pg("scalr-wrongpw-db", "15")
    repo.restic("init")
    env = {**watcher_env, "RESTIC_PASSWORD": "not the password", "WATCHER_CONTAINER_PATTERNS": db.name}
    done = run_watcher(["backup"], env)
    assert done.returncode == 2
    assert "wrong password" in done.stderr


def test_old_restic_is_refused_with_both_versions(watcher_env: dict[str, str]) -> None:
    # Debian bookworm's own restic, which the test ground unpacks beside 0.18.
    old = os.path.join(os.environ["BW_TESTGROUND"], "bin", "restic-0.14")
    done = run_watcher(["snapshots"], {**watcher_env, "WATCHER_RESTIC_BINARY": old})
    assert done.returncode == 2
    assert "restic 0.14.0" in done.stderr and ">= 0.17.0" in done.stderr


def test_check_config_masks_secrets(repo: Repo, watcher_env: dict[str, str], tmp_path: Path) -> None:
    apprise_file = tmp_path / "apprise"
    apprise_file.write_text("json://127.0.0.1:9/hook?token=apprise-token-123\n")
    env = {**watcher_env, "WATCHER_APPRISE_URLS_FILE": str(apprise_file)}
    done = run_watcher(["check-config"], env)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "WATCHER_SCHEDULE=0 3 * * *" in output
    assert repo.password not in output and "apprise-token-123" not in output
    assert "RESTIC_PASSWORD=***" in output
