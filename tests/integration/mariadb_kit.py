"""MariaDB and Redis containers for the engine tests: the test ground's images (Debian's MariaDB with the
official image's env contract, Debian's Redis), started with --network none, passwords passed by name
(never in our argv), on the test engine or another one (`docker_host`)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kit import docker, wait_for

MARIADB_IMAGES = {"bookworm": "backup-watcher-test/mariadb:bookworm",
                  "trixie": "backup-watcher-test/mariadb:trixie"}
TEST_LABEL = "backup-watcher-test.owner=pytest"
# Quotes, a command substitution and a backslash: a password that breaks any careless quoting.
NASTY_PASSWORD = "it's \"quoted\" $(touch /tmp/pwned) `id` \\ end ✓"


@dataclass
class MariaContainer:
    """A running MariaDB container of the test engine."""

    name: str
    password: str
    docker_host: str | None = None  # another engine than $DOCKER_HOST's (a second "host")

    @property
    def engine_env(self) -> dict[str, str]:
        """The environment that points the docker CLI at the container's engine."""
        return {"DOCKER_HOST": self.docker_host} if self.docker_host else {}

    def sql(self, script: str, database: str = "", check: bool = True) -> str:
        """Runs `script` as root in the container (password read from the container's env), returns the
        tab-separated output without column names."""
        argv = ["exec", "-i", self.name, "sh", "-c",
                'MYSQL_PWD=$MARIADB_ROOT_PASSWORD; [ -n "$MYSQL_PWD" ] || '
                'MYSQL_PWD=$(cat "$MARIADB_ROOT_PASSWORD_FILE"); export MYSQL_PWD; '
                'exec mariadb -uroot --default-character-set=utf8mb4 --batch --skip-column-names "$@"', "sh"]
        if database:
            argv.append(database)
        done = docker(*argv, input=script.encode(), check=False, timeout=300, env=self.engine_env)
        if check and done.returncode != 0:
            raise AssertionError(f"mariadb in {self.name} failed: {done.stderr}")
        return done.stdout.strip()

    def ready(self) -> bool:
        """Whether the final server (not the entrypoint's temporary one) answers."""
        on = self.engine_env
        running = docker("inspect", "--format", "{{.State.Running}}", self.name, check=False, env=on).stdout.strip()
        if running != "true":
            logs = docker("logs", self.name, check=False, env=on).stderr[-2000:]
            raise AssertionError(f"{self.name} stopped: {logs}")
        probe = docker("exec", self.name, "sh", "-c", "test -S /run/mysqld/mysqld.sock && ! test -S "
                       "/run/mysqld/init.sock", check=False, env=on)
        return probe.returncode == 0 and self.sql("SELECT 1", check=False) == "1"


# The application's own user (not the env contract's: a fresh container would make that one itself), with a
# role as its default, rights on the database and on one table: restore must create them from the globals.
APP_PASSWORD = "app pw 'q' \"dq\" $(touch /tmp/x) ✓"
APP_USERS = f"""
CREATE TABLE items (id int PRIMARY KEY, name varchar(50)) ENGINE=InnoDB;
INSERT INTO items SELECT seq, CONCAT('item ', seq) FROM seq_1_to_300;
CREATE ROLE auditor;
GRANT SELECT ON shop.* TO auditor;
CREATE USER 'app'@'%' IDENTIFIED BY '{APP_PASSWORD.replace("'", "''")}';
GRANT INSERT, UPDATE ON shop.* TO 'app'@'%';
GRANT DELETE ON shop.items TO 'app'@'%';
GRANT auditor TO 'app'@'%';
SET DEFAULT ROLE auditor FOR 'app'@'%';
"""
ITEMS = "SELECT COUNT(*), MD5(GROUP_CONCAT(CONCAT(id, name) ORDER BY id)) FROM items"


def app_login(db: MariaContainer, password: str, sql: str) -> tuple[int, str]:
    """The app user logs in to shop with `password` (passed by name) and runs `sql`."""
    done = docker("exec", "-e", "MYSQL_PWD", db.name, "mariadb", "-uapp", "--batch", "--skip-column-names", "shop",
                  "-e", sql, check=False, env={"MYSQL_PWD": password, **db.engine_env})
    return done.returncode, (done.stdout + done.stderr).strip()


StartMariaDB = Callable[..., MariaContainer]


@pytest.fixture
def start_mariadb(tmp_path: Path) -> Iterator[StartMariaDB]:
    """Factory: starts a MariaDB container, waits until its final server answers, removes it after.

    `password_file`: the root password in a file mounted into the container (MARIADB_ROOT_PASSWORD_FILE)
    instead of the variable. `docker_host` starts it on another engine (the `second_engine` fixture's).
    """
    started: list[tuple[str, dict[str, str]]] = []

    def start(name: str, suite: str = "bookworm", *, password: str = NASTY_PASSWORD, database: str = "shop",
              labels: dict[str, str] | None = None, password_file: bool = False,
              extra_env: dict[str, str] | None = None, docker_host: str | None = None) -> MariaContainer:
        argv = ["run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL,
                "-e", f"MARIADB_DATABASE={database}"]
        env = dict(extra_env or {})
        if password_file:
            secret = tmp_path / f"{name}.pw"
            secret.write_text(password)
            secret.chmod(0o644)
            argv += ["-v", f"{secret}:/run/secrets/root-pw:ro", "-e", "MARIADB_ROOT_PASSWORD_FILE=/run/secrets/root-pw"]
        else:
            env["MARIADB_ROOT_PASSWORD"] = password
        for key in env:
            argv += ["-e", key]  # by name: the value never reaches our argv
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        on = {"DOCKER_HOST": docker_host} if docker_host else {}
        started.append((name, on))
        docker("rm", "-f", "-v", name, check=False, env=on)
        subprocess.run(["docker", *argv, MARIADB_IMAGES[suite]], check=True, capture_output=True,
                       env={**os.environ, **env, **on})
        container = MariaContainer(name, password, docker_host)
        wait_for(container.ready, 120, f"MariaDB in {name} to serve", interval=0.5)
        return container

    yield start
    for name, on in started:
        docker("rm", "-f", "-v", name, check=False, env=on)


REDIS_IMAGE = "backup-watcher-test/redis:bookworm"
# Redis loads an RDB file only at start or on DEBUG RELOAD: the restore command writes it where the server
# reads it, then reloads it without saving the current data over it first.
RESTORE = "cat > /data/dump.rdb.new && mv /data/dump.rdb.new /data/dump.rdb && redis-cli debug reload nosave"
StartRedis = Callable[..., str]


@pytest.fixture
def start_redis() -> Iterator[StartRedis]:
    """Factory: starts a Redis container (--network none) with labels, on the engine of `docker_host` (default
    $DOCKER_HOST's), waits for PONG, removes it after."""
    started: list[tuple[str, dict[str, str]]] = []

    def start(name: str, labels: dict[str, str], docker_host: str | None = None) -> str:
        on = {"DOCKER_HOST": docker_host} if docker_host else {}
        argv = ["run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL]
        for key, value in labels.items():
            argv += ["--label", f"{key}={value}"]
        started.append((name, on))
        docker("rm", "-f", "-v", name, check=False, env=on)
        docker(*argv, REDIS_IMAGE, "redis-server", "--dir", "/data", "--enable-debug-command", "local", env=on)
        wait_for(lambda: docker("exec", name, "redis-cli", "ping", check=False, env=on).stdout.strip() == "PONG", 60,
                 f"Redis in {name}")
        return name

    yield start
    for name, on in started:
        docker("rm", "-f", "-v", name, check=False, env=on)


def redis_contents(name: str, docker_host: str | None = None) -> tuple[int, str]:
    """The number of keys and Redis's digest of every key and value (DEBUG DIGEST: equal data, equal digest)."""
    on = {"DOCKER_HOST": docker_host} if docker_host else {}
    keys = int(docker("exec", name, "redis-cli", "dbsize", env=on).stdout)
    return keys, docker("exec", name, "redis-cli", "debug", "digest", env=on).stdout.strip()
