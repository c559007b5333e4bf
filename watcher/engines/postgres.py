"""PostgreSQL behind the Engine interface: it delegates to the functions that have always done it
(watcher.jobs for dumps, globals, listing and readiness; watcher.restore, watcher.drill and watcher.roles
for restores, drills and roles), so that they stay where they are."""

from __future__ import annotations

from typing import TYPE_CHECKING

from watcher import commands, engines

if TYPE_CHECKING:
    from watcher.discovery import Target
    from watcher.execute import Command
    from watcher.jobs import JobContext


class PostgresEngine:
    """pg_dump in custom format, pg_dumpall --globals-only, psql's database list, pg_isready."""

    name = engines.POSTGRES
    dump_suffix = commands.DUMP_SUFFIX

    def has_globals(self, target: Target) -> bool:
        """Always: roles, memberships and role settings."""
        return True

    def dump_source(self, ctx: JobContext, target: Target, database: str) -> tuple[Command, dict[str, str]]:
        """pg_dump through the sealed exec helper, and PGPASSWORD (by name) when known."""
        from watcher import jobs
        return jobs.pg_dump_source(ctx, target, database)

    def globals_source(self, ctx: JobContext, target: Target, role_passwords: bool) -> tuple[Command, dict[str, str]]:
        """pg_dumpall --globals-only through the sealed exec helper."""
        from watcher import jobs
        return jobs.pg_globals_source(ctx, target, role_passwords)

    def list_databases(self, ctx: JobContext, target: Target) -> list[str]:
        """Every non-template database that accepts connections; raises JobError."""
        from watcher import jobs
        return jobs.pg_list_databases(ctx, target)

    def not_ready_reason(self, ctx: JobContext, target: Target) -> str | None:
        """pg_isready once; raises JobError when the container is gone or stopped."""
        from watcher import jobs
        return jobs.pg_not_ready_reason(ctx, target)
