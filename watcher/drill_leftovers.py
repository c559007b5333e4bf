"""Drill containers: their labels, and which of them are leftovers of a watcher process that is gone.

Every drill container carries the host identity (WATCHER_HOST) and its owner: the host name, PID
namespace, process id and process start time of the watcher process that made it. Several processes may drill under one
identity at once (the daemon, and an operator's one-shot `drill` exec'd into its container or run in a
container of its own), so a container of the identity is a leftover only when its owner is known to be
gone:
- an owner in this process's own PID namespace on this host name (the same container, or the same
  machine) is gone when no process with its id and start time exists; both are compared, since a
  container on the host's network takes the host's name but has a PID namespace of its own;
- an owner elsewhere cannot be looked at: its container is a leftover once it is older than any drill
  can take (LEFTOVER_AGE_SECONDS);
- a container without an owner label was made before owners were recorded: a leftover, as before.
Judging is pure (`leftover_reason`); `remove_leftovers` lists, judges and removes, and never raises.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from watcher.discovery import ROLE_LABEL
from watcher.docker_source import DockerSource, DockerUnavailable

log = structlog.get_logger("watcher.drill")
SOURCE_LABEL = "backup-watcher.drill-source"
HOST_LABEL = "backup-watcher.drill-host"
OWNER_LABEL = "backup-watcher.drill-owner"
# A drill's steps in its container are each bounded (readiness 3 min; the restore, the counts and the
# property checks 12 h each, watcher.drill_container): a container of a live drill is never older than this.
LEFTOVER_AGE_SECONDS = 37 * 3600.0


@dataclass(frozen=True)
class Owner:
    """The watcher process that made a drill container."""

    hostname: str
    namespace: str  # the PID namespace's inode number (/proc/self/ns/pid)
    pid: int
    started: str  # the process's start time in clock ticks since boot (/proc/PID/stat field 22)

    def label(self) -> str:
        """The owner label's value: `hostname/namespace/pid/started`."""
        return f"{self.hostname}/{self.namespace}/{self.pid}/{self.started}"

    def place(self) -> tuple[str, str]:
        """Where its pid means something: (host name, PID namespace)."""
        return self.hostname, self.namespace


def parse_owner(value: str | None) -> Owner | None:
    """The Owner an owner label names, or None when there is none or it is not one."""
    parts = (value or "").rsplit("/", 3)
    if len(parts) != 4 or not parts[0] or not all(part.isdigit() for part in parts[1:]):
        return None
    return Owner(parts[0], parts[1], int(parts[2]), parts[3])


def process_start(pid: int | str, proc: str = "/proc") -> str | None:
    """The start time (clock ticks since boot) of process `pid`, or None when there is no such process."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")": fields follow the last ")".
    fields = text[text.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def pid_namespace(proc: str = "/proc") -> str:
    """This process's PID namespace as its inode number ("0" where it cannot be read)."""
    try:
        link = os.readlink(f"{proc}/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "0"
    number = link.rpartition("[")[2].rstrip("]")
    return number if number.isdigit() else "0"


def this_process() -> Owner:
    """The Owner of drill containers this process makes."""
    return Owner(socket.gethostname(), pid_namespace(), os.getpid(), process_start("self") or "0")


def drill_labels(source: str, host: str, owner: Owner) -> dict[str, str]:
    """The labels of a drill container of target `source`, made under identity `host` by `owner`."""
    return {ROLE_LABEL: "drill", SOURCE_LABEL: source, HOST_LABEL: host, OWNER_LABEL: owner.label()}


def leftover_reason(owner_label: str | None, created: float, now: float, here: tuple[str, str],
                    running: Callable[[Owner], bool]) -> str | None:
    """Why a drill container is a leftover, or None when a live drill may still be using it.

    `owner_label` is its owner label (None without one), `created` and `now` are Unix times, `here` is this
    process's Owner.place(), and `running(owner)` tells whether an owner of that place still runs.
    """
    owner = parse_owner(owner_label)
    if owner is None:
        return "it names no owner (made by an older watcher)"
    if owner.place() == here:
        return None if running(owner) else f"the watcher process that made it ({owner.pid}) has ended"
    age = now - created
    if age > LEFTOVER_AGE_SECONDS:
        return (f"it was made {age / 3600:.0f} h ago by a watcher on {owner.hostname}, longer than any drill "
                f"takes")
    return None


def _running(owner: Owner) -> bool:
    return process_start(owner.pid) == owner.started


def remove_leftovers(docker: DockerSource, host: str) -> int:
    """Removes the drill containers of identity `host` (WATCHER_HOST) whose watcher process is gone (see the
    module's docstring); returns how many. Drills of live processes, of this identity or another, are left
    alone. Never raises: a leftover that cannot be removed (e.g. a proxy refusing it) is logged.
    """
    try:
        drills = docker.labelled_containers(f"{ROLE_LABEL}=drill", f"{HOST_LABEL}={host}")
    except DockerUnavailable as exc:
        log.warning("drill_leftover_check_failed", error=str(exc))
        return 0
    here, now, removed = this_process().place(), time.time(), 0
    for drill in drills:
        reason = leftover_reason(drill.labels.get(OWNER_LABEL), drill.created, now, here, _running)
        if reason is None:
            log.info("drill_in_use_left", container=drill.name, owner=drill.labels.get(OWNER_LABEL))
            continue
        try:
            docker.remove(drill.id)
        except DockerUnavailable as exc:
            log.error("drill_leftover_not_removed", container=drill.name, error=str(exc))
            continue
        removed += 1
        log.warning("drill_leftover_removed", container=drill.name, reason=reason)
    return removed
