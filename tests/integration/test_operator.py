"""Operator mistakes end in a clear message that names the culprit and the fix (issue 14)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    PG_IMAGES,
    TEST_LABEL,
    PgContainer,
    Repo,
    StartDaemon,
    StartPg,
    docker,
    free_port,
    run_watcher,
    wait_for,
)

pytestmark = pytest.mark.engine


def _run_daemon_until_exit(env: dict[str, str], limit: float = 30) -> tuple[int, str, float]:
    """Starts `backup-watcher run` and waits for it to exit by itself; returns (code, stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "run"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        _, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        raise AssertionError(f"`run` was still running after {limit}s instead of exiting: {stderr}") from None
    return proc.returncode, stderr, time.monotonic() - started


def _initialised(repo: Repo) -> None:
    repo.path.parent.mkdir(parents=True, exist_ok=True)
    repo.restic("init")


@pytest.mark.parametrize("password", ["wrong", "password"])
def test_run_with_a_wrong_password_exits_2_at_once_with_restic_words_intact(
        repo: Repo, watcher_env: dict[str, str], password: str) -> None:
    _initialised(repo)
    env = {**watcher_env, "RESTIC_PASSWORD": password, "WATCHER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}
    code, stderr, seconds = _run_daemon_until_exit(env)
    assert code == 2
    assert seconds < 10
    # The tool's own words and restic's stay whole, whatever the password's text.
    assert "wrong password or no key found" in stderr
    assert "***" not in stderr
    assert "RESTIC_PASSWORD" in stderr


def test_run_without_a_repository_and_without_init_exits_2_saying_what_to_do(
        repo: Repo, watcher_env: dict[str, str]) -> None:
    env = {**watcher_env, "WATCHER_INIT_REPOSITORY": "false", "WATCHER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}
    code, stderr, seconds = _run_daemon_until_exit(env)
    assert code == 2
    assert seconds < 10
    assert str(repo.path) in stderr
    assert "restic init" in stderr and "WATCHER_INIT_REPOSITORY=true" in stderr


def test_run_with_an_unreachable_docker_host_exits_2_at_once(watcher_env: dict[str, str], tmp_path: Path) -> None:
    socket_path = tmp_path / "no-engine.sock"
    env = {**watcher_env, "DOCKER_HOST": f"unix://{socket_path}", "WATCHER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}
    code, stderr, seconds = _run_daemon_until_exit(env)
    assert code == 2
    assert seconds < 10
    assert f"DOCKER_HOST=unix://{socket_path}" in stderr


@pytest.mark.parametrize("command", [["snapshots"], ["restore", "scalr-some-db", "latest", "--yes"]])
def test_snapshots_and_restore_say_a_wrong_password_in_words(repo: Repo, watcher_env: dict[str, str],
                                                             command: list[str]) -> None:
    _initialised(repo)
    done = run_watcher(command, {**watcher_env, "RESTIC_PASSWORD": "wrong"}, timeout=60)
    assert done.returncode == 2
    assert "wrong password or no key found" in done.stderr
    assert "message_type" not in done.stderr and "{" not in done.stderr
    assert "RESTIC_PASSWORD" in done.stderr


def test_restore_of_an_unknown_target_names_close_ones_and_points_to_snapshots(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("bwt-op-near-db", "15")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    assert run_watcher(["backup"], env).returncode == 0
    done = run_watcher(["restore", "bwt-op-naer-db", "latest", "--yes"], env, timeout=60)
    assert done.returncode == 2
    assert "bwt-op-naer-db" in done.stderr and "no snapshots" in done.stderr
    assert "bwt-op-near-db" in done.stderr  # the close name
    assert "backup-watcher snapshots" in done.stderr


def test_restore_into_a_container_that_just_started_waits_for_it_and_says_created(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("bwt-op-src-db", "15")
    db.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) AS g;")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name}
    assert run_watcher(["backup"], env).returncode == 0
    fresh = "bwt-fresh-into-db"
    docker("rm", "-f", "-v", fresh, check=False)
    # A database name the fresh container does not have: the prompt must not say it will be dropped.
    docker("run", "-d", "--network", "none", "--name", fresh, "--label", TEST_LABEL, "-e", "POSTGRES_USER=app",
           "-e", "POSTGRES_DB=otherdb", "-e", "POSTGRES_PASSWORD=x", PG_IMAGES["15"])
    try:
        done = run_watcher(["restore", db.name, "latest", "--into", fresh, "--yes"], env, timeout=180)
        assert done.returncode == 0, done.stderr
        assert "DROPPED" not in done.stderr
        assert "will be created" in done.stderr
        count = docker("exec", fresh, "psql", "-X", "-At", "-U", "app", "-d", "appdb", "-c",
                       "SELECT count(*) FROM t").stdout.strip()
        assert count == "1000"
    finally:
        docker("rm", "-f", "-v", fresh, check=False)


def test_bad_label_messages_name_the_field_and_the_recreate_step_and_fail_check_config(
        start_pg: StartPg, repo: Repo, watcher_env: dict[str, str]) -> None:
    bad = start_pg("bwt-op-cron-db", "15", labels={"backup-watcher.schedule": "0 25 * * *"})
    good = start_pg("bwt-op-fine-db", "15")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "bwt-op-cron-db,bwt-op-fine-db"}
    checked = run_watcher(["check-config"], env, timeout=60)
    assert checked.returncode == 2
    assert "configuration OK" not in checked.stderr
    assert "bwt-op-cron-db" in checked.stderr
    assert "hour" in checked.stderr and "25" in checked.stderr
    assert "recreate" in checked.stderr
    status = run_watcher(["status"], env, timeout=60)
    row = next(line for line in status.stdout.splitlines() if line.startswith(bad.name))
    assert "hour" in row and "recreate" in row  # not cut before the useful part
    # A one-shot command for another container does not repeat the unrelated container's complaint.
    done = run_watcher(["backup", good.name], env)
    assert done.returncode == 0
    assert "label_invalid" not in done.stderr


def test_settings_flags_work_after_the_command_too_and_restore_help_explains_latest(
        watcher_env: dict[str, str]) -> None:
    done = run_watcher(["check-config", "--log-level", "debug"], watcher_env, timeout=60)
    assert "unrecognized arguments" not in done.stderr
    assert "WATCHER_LOG_LEVEL=debug" in done.stdout
    helped = run_watcher(["restore", "--help"], watcher_env, timeout=60)
    assert "latest" in helped.stdout and "snapshots" in helped.stdout


def test_daemon_sees_snapshots_of_a_one_shot_backup_when_it_ends(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str]) -> None:
    db: PgContainer = start_pg("bwt-op-lag-db", "15")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name, "WATCHER_SCHEDULE": "0 3 1 1 *"}
    daemon = start_daemon(env)
    wait_for(lambda: len(repo.snapshots_of(db.name)) == 1, 120, "the catch-up backup")
    before = (daemon.row(db.name) or {}).get("last_snapshot")
    time.sleep(1.1)  # snapshot times are whole seconds
    one_shot = {**env, "WATCHER_METRICS_ADDRESS": daemon.env["WATCHER_METRICS_ADDRESS"]}
    assert run_watcher(["backup"], one_shot).returncode == 0
    assert len(repo.snapshots_of(db.name)) == 2
    wait_for(lambda: (daemon.row(db.name) or {}).get("last_snapshot") not in (None, before), 10,
             "the daemon to see the one-shot snapshot")
    # Two passes, each a snapshot of the database and one of the container's globals.
    wait_for(lambda: "backup_watcher_repository_snapshots 4.0" in daemon.metrics(), 10,
             "the repository's snapshot count")
