"""Restore: a snapshot back into a container's database, without losing the old one on failure.

The dump is restored into a fresh scratch database first (pg_restore --single-transaction); only
when that succeeded is the old database dropped and the scratch one renamed into its place. A
failed restore leaves the live database exactly as it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from watcher import commands
from watcher.discovery import Credentials
from watcher.dockerexec import DockerExecError, run_exec
from watcher.execute import Masker, run_pipeline
from watcher.restic import Repository, Snapshot

log = structlog.get_logger("watcher.restore")
RESTORE_TIMEOUT_SECONDS = 12 * 3600.0
SCRATCH_SUFFIX = "_bw_restore"
PG_IDENTIFIER_BYTES = 63


class RestoreError(Exception):
    """The restore could not be planned or failed; the message says which step and why."""


def choose_snapshot(snapshots: Sequence[Snapshot], selector: str, database: str | None) -> Snapshot:
    """Picks the snapshot to restore: `latest` or an id prefix, of `database` if given.

    Raises RestoreError naming the choices when the pick is ambiguous or matches nothing.
    """
    if not snapshots:
        raise RestoreError("no snapshots found for this target")
    candidates = list(snapshots)
    if database is not None:
        candidates = [snap for snap in candidates if snap.database == database]
        if not candidates:
            held = ", ".join(sorted({snap.database for snap in snapshots}))
            raise RestoreError(f"no snapshot of database {database!r}; snapshots hold: {held}")
    if selector == "latest":
        databases = sorted({snap.database for snap in candidates})
        if len(databases) > 1:
            raise RestoreError(
                f"snapshots hold several databases ({', '.join(databases)}): choose one with --database"
            )
        return max(candidates, key=lambda snap: snap.time)
    matches = [snap for snap in candidates if snap.id.startswith(selector)]
    if not matches:
        raise RestoreError(f"no snapshot {selector!r} for this target (see `backup-watcher snapshots`)")
    if len(matches) > 1:
        raise RestoreError(f"snapshot id {selector!r} is ambiguous: give more characters")
    return matches[0]


def scratch_name(database: str) -> str:
    """The scratch database a restore goes into before it replaces `database` (<= 63 bytes)."""
    room = PG_IDENTIFIER_BYTES - len(SCRATCH_SUFFIX)
    head = database.encode()[:room].decode(errors="ignore")
    return head + SCRATCH_SUFFIX


@dataclass(frozen=True)
class RestoreResult:
    """What a finished restore did."""

    container: str
    database: str
    snapshot_id: str
    duration_s: float


class Restorer:
    """Restores snapshots into databases of running containers."""

    def __init__(self, docker_host: str, repository: Repository, masker: Masker) -> None:
        self.docker_host = docker_host
        self.repository = repository
        self.masker = masker

    def _psql(self, container: str, creds: Credentials, script: str, variables: dict[str, str]) -> str:
        maintenance = "postgres" if variables.get("db") != "postgres" else "template1"
        env = commands.pg_env(creds.user, maintenance)
        if creds.password:
            env["PGPASSWORD"] = creds.password
        try:
            done = run_exec(self.docker_host, container, commands.psql_script_command(variables),
                            env=env, stdin=script.encode())
        except DockerExecError as exc:
            raise RestoreError(self.masker(str(exc))) from exc
        if not done.outcome.ok:
            stderr = self.masker(done.stderr.decode(errors="replace").strip())
            raise RestoreError(f"psql in {container} failed: {stderr or done.outcome.problem}")
        return done.stdout.decode()

    def restore(self, snapshot: Snapshot, container_id: str, container_name: str, creds: Credentials,
                database: str) -> RestoreResult:
        """Replaces `database` in the container with the snapshot's dump; raises RestoreError.

        The old database is dropped only after the dump restored completely into a scratch database.
        """
        started = time.monotonic()
        masker = self.masker.with_secrets([creds.password])
        scratch = scratch_name(database)
        bound = log.bind(target=container_name, database=database, snapshot_id=snapshot.short_id)
        facts = self._psql(container_id, creds, (
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :'db';\n"
        ), {"db": database}).strip()
        owner = facts or creds.user
        self._psql(container_id, creds, (
            'DROP DATABASE IF EXISTS :"scratch";\n'
            'CREATE DATABASE :"scratch" TEMPLATE template0 OWNER :"owner";\n'
        ), {"scratch": scratch, "owner": owner, "db": database})
        bound.info("restore_started", scratch_database=scratch)

        env = dict(self.repository.env)
        env["DOCKER_HOST"] = self.docker_host
        if creds.password:
            env["PGPASSWORD"] = creds.password
        restorer = commands.exec_helper(
            container_id, commands.pg_restore_command(scratch), stdin=True,
            env_values=commands.pg_env(creds.user, scratch),
            env_names=["PGPASSWORD"] if creds.password else [],
        )
        dump = commands.restic_dump(self.repository.binary, snapshot.id, database)
        done = run_pipeline([dump, restorer], env=env, masker=masker, timeout=RESTORE_TIMEOUT_SECONDS,
                            capture_stdout=False)
        if not done.ok:
            try:
                self._psql(container_id, creds, 'DROP DATABASE IF EXISTS :"scratch";\n',
                           {"scratch": scratch, "db": database})
            except RestoreError as exc:
                bound.warning("restore_cleanup_failed", error=str(exc))
            error = done.describe_failure()
            bound.error("restore_failed", error=error)
            raise RestoreError(f"restore failed; {database!r} was left untouched. {error}")

        self._psql(container_id, creds, (
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') AS db_exists \\gset\n"
            "\\if :db_exists\n"
            'ALTER DATABASE :"db" ALLOW_CONNECTIONS false;\n'
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity\n"
            "  WHERE datname = :'db' AND pid <> pg_backend_pid();\n"
            'DROP DATABASE :"db";\n'
            "\\endif\n"
            'ALTER DATABASE :"scratch" RENAME TO :"db";\n'
        ), {"db": database, "scratch": scratch})
        duration = time.monotonic() - started
        bound.info("restore_succeeded", duration_s=round(duration, 3))
        return RestoreResult(container_name, database, snapshot.id, duration)
