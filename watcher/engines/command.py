"""`engine=command` behind the Engine interface: any container that can write its backup to stdout.

The label backup-watcher.dump-command runs inside the container as `sh -c LABEL` (its stdout is the
backup) and backup-watcher.restore-command as `sh -c LABEL` with the backup on its stdin. `sh -c`, not a
shlex split: users write what they would type (`redis-cli --rdb - 2>/dev/null`, `cd /data && tar c .`,
pipes and redirections), the integrity gate needs the container's `sh` already, and the label is the
container owner's own: it can run nothing they could not run in their container anyway. In a pipeline only
the last command's exit status counts (POSIX sh has no pipefail): the README says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from watcher import commands, engines
from watcher.execute import Command, ExecError, run_in_container

if TYPE_CHECKING:
    from watcher.discovery import Target
    from watcher.jobs import JobContext

PROBE_TIMEOUT_SECONDS = 30.0


def shell_command(label_value: str) -> Command:
    """The argv that runs a command label's text inside the container."""
    return ("sh", "-c", label_value)


class CommandEngine:
    """The dump command's stdout is one snapshot (database engines.COMMAND_DATABASE); no globals."""

    name = engines.COMMAND
    dump_suffix = ".dump"

    def has_globals(self, target: Target) -> bool:
        """Never: the dump command's output is the whole backup."""
        return False

    def dump_source(self, ctx: JobContext, target: Target, database: str) -> tuple[Command, dict[str, str]]:
        """The dump command through the sealed exec helper: no end mark unless it exits 0."""
        if target.dump_command is None:  # discovery rejects such a target; a bad call must not dump nothing
            raise engines.NotSupported(f"{target.name} has no label backup-watcher.dump-command")
        return commands.exec_helper(target.container_id, shell_command(target.dump_command), seal=True), {}

    def globals_source(self, ctx: JobContext, target: Target, role_passwords: bool) -> tuple[Command, dict[str, str]]:
        """Raises NotSupported: engine=command has no globals."""
        raise engines.NotSupported("engine=command has no globals: its dump command's output is the whole backup")

    def list_databases(self, ctx: JobContext, target: Target) -> list[str]:
        """The one backup engines.COMMAND_DATABASE."""
        return [engines.COMMAND_DATABASE]

    def not_ready_reason(self, ctx: JobContext, target: Target) -> str | None:
        """Whether the container runs commands (it knows no server to ask); raises JobError when the
        container is gone or stopped."""
        from watcher.jobs import raise_if_gone
        try:
            done = run_in_container(ctx.docker_host, target.container_id, ("sh", "-c", "exit 0"), env={},
                                    masker=ctx.masker, timeout=PROBE_TIMEOUT_SECONDS, cancel=ctx.cancel)
        except ExecError as exc:
            return raise_if_gone(target, exc)
        return None if done.ok else done.describe_failure()
