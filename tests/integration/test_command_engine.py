"""engine=command (SPEC §13) with Redis from Debian's packages: the dump command's stdout is the backup,
through the same integrity gate; restore pipes it into the destination's restore command, or says that it
has none."""

from __future__ import annotations

import pytest

from tests.integration.conftest import (
    DaemonProcess,
    Repo,
    StartDaemon,
    docker,
    run_watcher,
    wait_for,
)
from tests.integration.mariadb_kit import RESTORE, StartMariaDB, StartRedis
from tests.integration.mariadb_kit import redis_contents as _contents

pytestmark = pytest.mark.engine

DUMP = "redis-cli --rdb - 2>/dev/null"
def test_redis_backed_up_and_restored_into_a_fresh_container(start_redis: StartRedis, repo: Repo,
                                                             watcher_env: dict[str, str]) -> None:
    source = start_redis("bwt-e18-redis-src", {"backup-watcher.engine": "command",
                                               "backup-watcher.dump-command": DUMP})
    script = "".join(f"SET key:{i} 'value {i} ✓ with spaces'\n" for i in range(500))
    docker("exec", "-i", source, "redis-cli", input=script.encode())
    docker("exec", source, "redis-cli", "set", "binary", "\x01\x02 end")
    before = _contents(source)
    assert before[0] == 501

    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": source}
    backup = run_watcher(["backup"], env)
    assert backup.returncode == 0, backup.stdout + backup.stderr
    snapshots = repo.snapshots_of(source)
    assert [s["paths"] for s in snapshots] == [["/stdout.dump"]]
    assert "engine=command" in snapshots[0]["tags"]
    assert repo.globals_of(source) == []

    fresh = start_redis("bwt-e18-redis-new", {"backup-watcher.enable": "false",
                                              "backup-watcher.restore-command": RESTORE})
    assert _contents(fresh)[0] == 0
    restore = run_watcher(["restore", source, "latest", "--into", fresh, "--yes"], env)
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert _contents(fresh) == before


def test_a_dump_command_that_fails_leaves_no_snapshot(start_redis: StartRedis, repo: Repo,
                                                      watcher_env: dict[str, str]) -> None:
    # The whole RDB reaches stdout, then the command exits 3: the exit status decides.
    name = start_redis("bwt-e18-redis-fails", {"backup-watcher.dump-command": f"{DUMP}; exit 3"})
    docker("exec", name, "redis-cli", "set", "a", "1")
    backup = run_watcher(["backup"], {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name})
    assert backup.returncode == 1, backup.stdout + backup.stderr
    assert "no snapshot was written" in backup.stdout and "status 3" in backup.stdout, backup.stdout
    assert repo.snapshots_of(name) == []


def test_a_redis_caught_by_a_pattern_without_an_engine_label_fails_at_once_saying_what_to_set(
        start_redis: StartRedis, repo: Repo, watcher_env: dict[str, str]) -> None:
    """Taken for PostgreSQL (the default engine) and just started: the wait for its server would last the whole
    WATCHER_READY_TIMEOUT for a pg_isready that does not exist; it must fail at once, naming the labels."""
    name = start_redis("bwt-e18-redis-unlabelled", {})
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name, "WATCHER_READY_TIMEOUT": "10m"}
    backup = run_watcher(["backup"], env, timeout=120)
    assert backup.returncode == 1, backup.stdout + backup.stderr
    assert f"pg_isready could not be started in {name}" in backup.stdout, backup.stdout
    assert "backup-watcher.engine=mariadb" in backup.stdout and "engine=command" in backup.stdout
    assert "did not accept connections within" not in backup.stdout
    assert repo.snapshots_of(name) == []


def test_restore_says_clearly_when_no_restore_command_is_defined(start_redis: StartRedis, repo: Repo,
                                                                 watcher_env: dict[str, str]) -> None:
    name = start_redis("bwt-e18-redis-norestore", {"backup-watcher.dump-command": DUMP})
    docker("exec", name, "redis-cli", "set", "kept", "yes")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": name}
    assert run_watcher(["backup"], env).returncode == 0
    docker("exec", name, "redis-cli", "set", "kept", "changed")
    changed = _contents(name)
    restore = run_watcher(["restore", name, "latest", "--yes"], env)
    assert restore.returncode == 1, restore.stdout + restore.stderr
    assert "defines no restore command (label backup-watcher.restore-command" in restore.stderr, restore.stderr
    assert "nothing was changed" in restore.stderr
    assert _contents(name) == changed


def test_the_daemon_backs_up_mariadb_and_redis_with_the_engine_in_metrics(
        start_redis: StartRedis, start_mariadb: StartMariaDB, start_daemon: StartDaemon, repo: Repo,
        watcher_env: dict[str, str]) -> None:
    redis = start_redis("bwt-e18-daemon-redis", {"backup-watcher.dump-command": DUMP})
    maria = start_mariadb("bwt-e18-daemon-maria").name
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "bwt-e18-daemon-*", "WATCHER_SCHEDULE": "* * * * *"}
    daemon: DaemonProcess = start_daemon(env)
    wait_for(lambda: daemon.events("backup_succeeded", target=redis) and daemon.events(
        "backup_succeeded", target=maria, database="shop"), 150, "a backup of each")
    wait_for(lambda: 'database="stdout",engine="command",target="bwt-e18-daemon-redis"' in daemon.metrics()
             and 'database="shop",engine="mariadb",target="bwt-e18-daemon-maria"' in daemon.metrics(), 30,
             "the engine label on the last success series")
    assert daemon.stop() == 0
