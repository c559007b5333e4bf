"""A PostgreSQL drill's throwaway container as its restore (watcher.drill_restore) and its checks
(watcher.drill_checks) use it: psql run there, and the bound of every step there. `run_pipeline_checked`
runs the `restic dump | …` pipelines of every engine's drill (watcher.engines.mariadb_drill too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from watcher import commands
from watcher.discovery import Credentials
from watcher.execute import Masker, run_in_container, run_pipeline
from watcher.jobs import JobContext, JobError
from watcher.restic import restic_error_text

# No other session is in a drill container, so nothing there waits on a lock: each step (the restore, the
# counts, each property check) is bounded only against a hang. watcher.drill_leftovers sums these bounds.
DRILL_TIMEOUT_SECONDS = 12 * 3600.0


@dataclass(frozen=True)
class DrillContainer:
    """A started drill container: its id, the user and database its entrypoint created (`creds`, no
    password), and `masker`, which knows the drill's random password and the target's password."""

    ctx: JobContext
    container_id: str
    creds: Credentials
    masker: Masker

    def pipeline_env(self) -> dict[str, str]:
        """Returns the environment of a `restic dump | … in the container` pipeline: the repository's,
        and the Docker host the exec helper reaches the container through."""
        return self.ctx.repository.pipeline_env(self.ctx.docker_host)

    def query(self, script: str, variables: dict[str, str] | None = None, database: str = "postgres") -> str:
        """Runs a script in the drill container (no other session there); returns its output, raises JobError."""
        done = run_in_container(self.ctx.docker_host, self.container_id, commands.psql_script_command(variables or {}),
                                env=commands.pg_env(self.creds.user, database), masker=self.ctx.masker,
                                timeout=DRILL_TIMEOUT_SECONDS, cancel=self.ctx.cancel, stdin=script.encode())
        if not done.ok:
            raise JobError(f"psql in the drill container failed: {done.describe_failure()}")
        return done.stdout.decode(errors="replace")


def run_pipeline_checked(ctx: JobContext, argv: list[tuple[str, ...]], env: dict[str, str],
                         masker: Masker, on_stdout_line: Callable[[str], None] | None = None,
                         on_tick: Callable[[Sequence[int]], None] | None = None) -> str | None:
    """Runs a restic-dump pipeline; returns None on success or the readable reason of its failure."""
    done = run_pipeline(argv, env=env, masker=masker,
                        timeout=DRILL_TIMEOUT_SECONDS, cancel=ctx.cancel, capture_stdout=False,
                        on_stdout_line=on_stdout_line, on_tick=on_tick)
    if done.ok:
        return None
    detail = restic_error_text(done.stderr_tail.splitlines())
    head = done.describe_failure().split(":", 1)[0]
    return f"{head}: {detail}" if detail else head
