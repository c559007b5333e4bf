"""Is a container's own PostgreSQL serving? One probe for restores and drills, whatever runs as PID 1.

Official-style entrypoints first run a temporary server for initdb and the init scripts; it answers on
the local socket but with `listen_addresses = ''`, and it stops when the scripts are done, cutting off
any session in it. The final server listens on TCP (`listen_addresses = '*'` in the official image).
So "serving" means: a session opens and `current_setting('listen_addresses')` is not empty. Nothing
here looks at PID 1: `docker run --init`, compose `init: true`, tini and su-style entrypoints all
leave something else there.

A server that keeps `listen_addresses = ''` for the whole bound is taken as socket-only by design.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from watcher.clock import Clock

# The probe's script for psql_script_command({"db": DATABASE}): two `t`/`f` columns.
PROBE_SQL = ("SELECT current_setting('listen_addresses') <> '', "
             "EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db');\n")
PROBE_INTERVAL_SECONDS = 1.0


def probe_sql(database: str) -> str:
    """PROBE_SQL with the database's name as a literal, for a psql that reads no stdin (`--command`
    takes no variables)."""
    literal = "'" + database.replace("'", "''") + "'"
    return PROBE_SQL.replace(":'db'", literal).strip()


@dataclass(frozen=True)
class Answer:
    """What one probe found: whether the server listens on TCP and whether the database exists."""

    listening: bool
    database_exists: bool


def parse_probe(output: str) -> Answer | None:
    """The Answer in psql's `t|f` output of PROBE_SQL, or None when it is not one."""
    listening, sep, exists = output.strip().partition("|")
    if not sep or listening not in ("t", "f") or exists not in ("t", "f"):
        return None
    return Answer(listening == "t", exists == "t")


class NotServing(Exception):
    """The server did not serve within the bound (or the wait was cancelled); the message says what
    the last probe met."""


def wait_until_serving(probe: Callable[[], Answer | str], *, bound_s: float, clock: Clock,
                       cancel: threading.Event | None = None,
                       interval_s: float = PROBE_INTERVAL_SECONDS) -> Answer:
    """Probes until the final server answers; returns its Answer.

    `probe` returns an Answer or the reason it got none (connection refused, ...). Returns the last
    Answer of a server that answered but never listened on TCP within `bound_s`; raises NotServing
    when nothing answered in time or `cancel` was set.
    """
    deadline = clock.monotonic() + bound_s
    waiter = cancel or threading.Event()
    while True:
        answer = probe()
        expired = clock.monotonic() >= deadline
        if isinstance(answer, Answer) and (answer.listening or expired):
            return answer
        if expired:
            raise NotServing(f"not serving within {bound_s:.0f}s: {answer}")
        if waiter.wait(interval_s):
            raise NotServing("cancelled while waiting for the server")
