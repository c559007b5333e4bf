"""Fault 4 of the matrix (SPEC §11): the Docker engine restarted mid-dump, at 10 %, 50 % and 85 % of the stream.

On the second engine (the `second_engine` fixture, a dockerd of the tests' own that may be restarted; the test
engine is shared by every test running beside these). `SecondEngine.restart()` stops dockerd as a service
manager would (SIGTERM: it stops its containers) and starts it again on the same data root and socket.

What the watcher does (README, Faults): the exec stream breaks, the helper cannot learn pg_dump's exit code,
restic writes no snapshot, and a one-shot `backup` exits 1 naming the unreachable engine (a job that already
spent its one wait for PostgreSQL, on a container started minutes ago, does not wait again). Nothing is left
running or locked, `restic check` is clean, and the next run, once the container is back by its restart
policy (`unless-stopped`, as database containers run), adds a complete snapshot. The daemon loses its event
stream, reconnects, and its job, which had not spent its wait yet, waits for PostgreSQL and dumps it again.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    PG_IMAGES,
    TEST_LABEL,
    PgContainer,
    SecondEngine,
    StartDaemon,
    docker,
    wait_for,
    wait_ready,
)
from tests.integration.fault_kit import (
    Source,
    assert_clean,
    assert_clean_and_heals,
    assert_whole,
    dumps,
    start_backup,
    wait_for_point,
    watcher_env,
)
from tests.kit import RestServer

pytestmark = [pytest.mark.engine, pytest.mark.slow]
RUN = uuid.uuid4().hex[:6]
MAJORS = ("17", "15")
# How a dump reports an engine that went away (the exec helper: pg_dump's exit code is the engine's to tell).
ENGINE_GONE = "could not learn the exit code: cannot reach the Docker engine at DOCKER_HOST="

SourceOf = Callable[[str], Source]


@pytest.fixture(scope="module")
def source_of(second_engine: SecondEngine) -> Iterator[SourceOf]:
    """Factory: the module's PostgreSQL container of a major on the second engine (restart policy
    `unless-stopped`), filled and measured on first use; removed when the module ends."""
    made: dict[str, Source] = {}

    def source(major: str) -> Source:
        if major not in made:
            name = f"h16-dockerd{RUN}-pg{major}"
            docker("run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL, "--restart",
                   "unless-stopped", "-e", "POSTGRES_USER=app", "-e", "POSTGRES_DB=appdb", "-e", "POSTGRES_PASSWORD",
                   PG_IMAGES[major], env={"POSTGRES_PASSWORD": "dockerd-db-pw", **second_engine.env})
            wait_ready(name, 90, docker_host=second_engine.host)
            made[major] = Source.filled(PgContainer(name, major, "app", "appdb", "dockerd-db-pw", second_engine.host))
        return made[major]

    yield source
    for each in made.values():
        docker("rm", "-f", "-v", each.db.name, check=False, env=second_engine.env)


def _containers(engine: SecondEngine) -> list[str]:
    return sorted(docker("ps", "-a", "--format", "{{.Names}}", env=engine.env).stdout.split())


def _restart_mid_dump(engine: SecondEngine, source: Source, fraction: float, watcher: subprocess.Popen[Any]) -> None:
    """Restarts the engine once `fraction` of the dump is streamed; returns with the quota lifted."""
    with source.slowed():
        wait_for_point(source, fraction, watcher)
        engine.restart()


def _fresh(source: Source) -> None:
    """Makes sure the container started less than a minute ago (restarting it if not): the job then probes
    PostgreSQL before it dumps (jobs.readiness_plan) and spends its one wait for it there, which makes what a
    broken dump leads to the same in every case."""
    db = source.db
    started = docker("inspect", "--format", "{{.State.StartedAt}}", db.name, env=db.engine_env).stdout.strip()
    if datetime.now(UTC) - datetime.fromisoformat(f"{started[:19]}+00:00") > timedelta(minutes=1):
        docker("restart", db.name, env=db.engine_env)
        wait_ready(db.name, 90, docker_host=db.docker_host)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.85], ids=["10%", "50%", "85%"])
def test_an_engine_restarted_mid_dump_fails_the_one_shot_without_a_snapshot_and_the_next_run_heals(
        fraction: float, source_of: SourceOf, second_engine: SecondEngine, tmp_path: Path) -> None:
    source = source_of(MAJORS[int(fraction * 10) % 2])
    _fresh(source)
    repository = RestServer(tmp_path / "rest").url
    env = watcher_env(repository, source)
    containers = _containers(second_engine)
    backup = start_backup(source, env)
    _restart_mid_dump(second_engine, source, fraction, backup)
    out, err = backup.communicate(timeout=300)
    assert backup.returncode == 1, out + err
    assert f"FAILED  {source.db.name}/appdb: backup failed (restic exit 1); no snapshot was written" in out, out
    assert ENGINE_GONE in out, out
    assert dumps(repository, source.db.name) == []
    assert _containers(second_engine) == containers, "no container left or lost"
    # The container is back by its restart policy: the next run waits for its PostgreSQL and dumps it whole.
    assert_clean_and_heals(source, repository, 0, env)


def test_an_engine_restarted_mid_dump_the_daemon_reconnects_and_backs_the_container_up(
        source_of: SourceOf, second_engine: SecondEngine, start_daemon: StartDaemon, tmp_path: Path) -> None:
    source = source_of(MAJORS[0])
    db = source.db
    repository = RestServer(tmp_path / "rest").url
    # The slot is a year away: the backup at start is the catch-up of a target without a snapshot.
    env = watcher_env(repository, source, WATCHER_SCHEDULE="0 0 1 1 *", WATCHER_DRILL_SCHEDULE="")
    with source.slowed():
        daemon = start_daemon(env)
        wait_for_point(source, 0.5, daemon.proc)
        second_engine.restart()
    wait_for(lambda: daemon.events("backup_succeeded", target=db.name, database=db.database), 180,
             "the backup once the container is back", interval=0.5)
    wait_for(lambda: "backup_watcher_docker_events_connected 1.0" in daemon.metrics(), 60, "the event stream again")
    assert daemon.stop() == 0
    assert daemon.events("event_stream_ended") or daemon.events("event_stream_error")
    assert len(daemon.events("event_stream_connected")) >= 2
    # The daemon's job starts on a probe that just answered, so its one wait is left for the broken dump: it
    # waits for PostgreSQL to be back and dumps again, in the same run (no failure to page).
    broken = daemon.events("postgres_not_ready", target=db.name, database=db.database)
    assert broken and ENGINE_GONE in str(broken[0]["error"]), broken
    assert not daemon.events("backup_failed", target=db.name)
    snapshots = dumps(repository, db.name)
    assert len(snapshots) == 1, snapshots
    assert_whole(repository, snapshots[0], source)
    assert_clean(source, repository)
