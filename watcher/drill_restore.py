"""The restore of a PostgreSQL drill: a snapshot restored into the drill container as a recovery on a
fresh host does (`restore --host`). The roles the dump names that the container lacks (its entrypoint
creates only POSTGRES_USER) are created first from the globals snapshot of the same pass; a role the
globals lack too makes the drill restore without owners and grants (`drill_without_owners`).
"""

from __future__ import annotations

import structlog

from watcher import commands, dbproperties, roles
from watcher.drill_checks import ExpectedProperties
from watcher.drill_container import DRILL_TIMEOUT_SECONDS, DrillContainer, run_pipeline_checked
from watcher.jobs import JobError
from watcher.progress import first_writer
from watcher.restic import Snapshot

# The drill's own logger, whichever of its modules writes the line.
log = structlog.get_logger("watcher.drill")


class DrillRestore:
    """Restores snapshots into one drill container, with the roles they need."""

    def __init__(self, container: DrillContainer) -> None:
        self.container = container
        self.ctx = container.ctx

    def restore(self, snapshot: Snapshot, globals_snapshot: Snapshot | None) -> ExpectedProperties:
        """Restores the snapshot into the drill container as a recovery on a fresh host does: the roles
        its objects and grants name are created from the globals snapshot of the same pass, the dump is
        restored with owners and grants, then the database's owner, settings, ACL and comment are set.
        A role that neither the container nor the globals have (globals pruned, or taken before the
        role existed) makes the drill restore without owners and grants (`drill_without_owners`).

        Returns what the restored database must then show; raises JobError.
        """
        container, creds, database = self.container, self.container.creds, snapshot.database
        env = container.pipeline_env()
        try:
            props = dbproperties.read_properties(
                restic=self.ctx.repository.binary, snapshot_id=snapshot.id, database=database,
                container_id=container.container_id, user=creds.user, env=env, masker=container.masker,
                timeout=DRILL_TIMEOUT_SECONDS, cancel=self.ctx.cancel)
        except dbproperties.PropertiesUnreadable as exc:
            raise JobError(f"restore of snapshot {snapshot.short_id} failed: {exc}") from exc
        have = self._roles_from_globals(props.roles, globals_snapshot)
        missing = sorted(props.roles - have)
        if missing:
            log.info("drill_without_owners", snapshot_id=snapshot.short_id, database=database,
                     missing_roles=missing[:20],
                     globals_snapshot=globals_snapshot.short_id if globals_snapshot else None)
        restorer = commands.exec_helper(container.container_id,
                                        commands.pg_restore_command(database, keep_owners=not missing),
                                        stdin=True, env_values=commands.pg_env(creds.user, database))
        dump = commands.restic_dump(self.ctx.repository.binary, snapshot.id, database)
        with self.ctx.progress.track("drill", snapshot.container, database, total=snapshot.bytes) as tracker:
            done = run_pipeline_checked(self.ctx, [dump, restorer], env, container.masker,
                                        on_tick=first_writer(tracker))
        if done is not None:
            raise JobError(f"restore of snapshot {snapshot.short_id} failed: {done}")
        try:
            script = props.script(database, existing_roles=have)
        except ValueError as exc:
            raise JobError(str(exc)) from exc
        if script:
            container.query("BEGIN;\n" + script + "COMMIT;\n")
        owner = props.owner if props.owner in have else creds.user
        table_owners = {table: (owner_ if not missing else creds.user) for table, owner_ in props.table_owners.items()}
        return ExpectedProperties(owner, tuple(props.setting_names()), table_owners)

    def _roles_from_globals(self, needed: set[str], globals_snapshot: Snapshot | None) -> set[str]:
        """Creates the `needed` roles that the drill container lacks and the globals snapshot has (with
        their attributes, passwords, memberships and settings, as `restore --host` does); returns the
        roles the container then has. Raises JobError when the globals cannot be read or applied: a
        fresh-host recovery from this pass would fail the same way."""
        container = self.container
        have = set(container.query("SELECT rolname FROM pg_roles;\n").split("\n")) - {""}
        if globals_snapshot is None or needed <= have:
            return have
        maker = roles.RoleMaker(self.ctx.docker_host, self.ctx.repository, container.masker, self.ctx.bounds,
                                self.ctx.cancel)
        try:
            globals_ = maker.read_globals(globals_snapshot)
            plan = roles.plan_roles(needed & (have | set(globals_.roles)), have, globals_,
                                    source=f"globals snapshot {globals_snapshot.short_id}")
            maker.create(plan, container.container_id, f"drill of {globals_snapshot.container}", container.creds)
        except roles.RoleError as exc:
            raise JobError(f"creating the roles from globals snapshot {globals_snapshot.short_id} failed: "
                           f"{exc}") from exc
        return have | set(plan.create)
