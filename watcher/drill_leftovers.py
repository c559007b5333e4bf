"""Drill containers: their labels, and which of them are leftovers of a watcher process that is gone.

Every drill container carries the host identity (WATCHER_HOST) and its owner: the host name, boot id, PID
namespace, process id and process start time of the watcher process that made it. Several processes may drill
under one identity at once (the daemon, and an operator's one-shot `drill` exec'd into its container or run in
a container of its own), so a container of the identity is a leftover only when its owner is known to be
gone:
- an owner of this host name, this boot and this PID namespace (the same container, or the same machine) is
  gone when no process with its id and start time exists (a process /proc does not show, another user's under
  hidepid, counts as running while it exists);
- an owner of this host name in another boot or PID namespace was an earlier run of this container (a
  restarted container keeps its host name and gets a new PID namespace) or of this machine: gone. (A watcher
  container on the host's network shares the host's name: a one-shot run on the host itself beside it would be
  taken for an earlier run; exec it into the container instead.)
- an owner of another host name cannot be looked at: its container is a leftover once it is older than any
  drill can take (LEFTOVER_AGE_SECONDS), as is one whose owner label cannot be read;
- a container without an owner label was made before owners were recorded: a leftover, as before.
Judging is pure (`leftover_reason`); `remove_leftovers` lists, judges and removes, and never raises.
"""

from __future__ import annotations

import os
import re
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
# Each step of a drill in its container is bounded on its own (readiness 3 min; the property and role reads,
# the role creation, the restore, the properties, the dump's counts, the restored counts and two property
# queries 12 h each: watcher.drill_container, watcher.roles), nine steps: 108 h and 3 min at the very most.
LEFTOVER_AGE_SECONDS = 5 * 24 * 3600.0
_DIGITS = re.compile(r"[0-9]+")
_BOOT_ID = re.compile(r"[0-9a-f-]+")


@dataclass(frozen=True)
class Owner:
    """The watcher process that made a drill container."""

    hostname: str
    boot: str  # /proc/sys/kernel/random/boot_id: pids and start times mean nothing across a reboot
    namespace: str  # the PID namespace's inode number (/proc/self/ns/pid)
    pid: int
    started: str  # the process's start time in clock ticks since boot (/proc/PID/stat field 22)

    def label(self) -> str:
        """The owner label's value: `hostname/boot/namespace/pid/started`."""
        return f"{self.hostname}/{self.boot}/{self.namespace}/{self.pid}/{self.started}"

    def instance(self) -> tuple[str, str]:
        """The run of the host (or container) its pid means something in: (boot id, PID namespace)."""
        return self.boot, self.namespace


def parse_owner(value: str | None) -> Owner | None:
    """The Owner an owner label names, or None when it is not one."""
    parts = (value or "").rsplit("/", 4)
    if (len(parts) != 5 or not parts[0] or not _BOOT_ID.fullmatch(parts[1])
            or not all(_DIGITS.fullmatch(part) for part in parts[2:])):
        return None
    return Owner(parts[0], parts[1], parts[2], int(parts[3]), parts[4])


def process_start(pid: int | str, proc: str = "/proc") -> str | None:
    """The start time (clock ticks since boot) of process `pid`, or None when /proc does not show it."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")": fields follow the last ")".
    fields = text[text.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _read_or_zero(path: str, pattern: re.Pattern[str]) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            text = file.read().strip()
    except OSError:
        return "0"
    return text if pattern.fullmatch(text) else "0"


def pid_namespace(proc: str = "/proc") -> str:
    """This process's PID namespace as its inode number ("0" where it cannot be read)."""
    try:
        link = os.readlink(f"{proc}/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "0"
    number = link.rpartition("[")[2].rstrip("]")
    return number if _DIGITS.fullmatch(number) else "0"


def this_process() -> Owner:
    """The Owner of drill containers this process makes."""
    return Owner(socket.gethostname(), _read_or_zero("/proc/sys/kernel/random/boot_id", _BOOT_ID),
                 pid_namespace(), os.getpid(), process_start("self") or "0")


def drill_labels(source: str, host: str, owner: Owner) -> dict[str, str]:
    """The labels of a drill container of target `source`, made under identity `host` by `owner`."""
    return {ROLE_LABEL: "drill", SOURCE_LABEL: source, HOST_LABEL: host, OWNER_LABEL: owner.label()}


def leftover_reason(owner_label: str | None, created: float, now: float, me: Owner,
                    running: Callable[[Owner], bool]) -> str | None:
    """Why a drill container is a leftover, or None when a live drill may still be using it.

    `owner_label` is its owner label (None without one), `created` and `now` are Unix times, `me` is this
    process (this_process()), and `running(owner)` tells whether an owner of this very instance still runs.
    """
    if owner_label is None:
        return "it names no owner (made by an older watcher)"
    owner = parse_owner(owner_label)
    knowable = "0" not in me.instance()  # without /proc, nothing here can be looked at
    if owner is not None and knowable and owner.hostname == me.hostname:
        if owner.instance() != me.instance():
            return "the run of this container or machine that made it has ended (restarted since)"
        return None if running(owner) else f"the watcher process that made it ({owner.pid}) has ended"
    age = now - created
    if age > LEFTOVER_AGE_SECONDS:
        maker = f"a watcher on {owner.hostname}" if owner is not None else "an unreadable owner"
        return f"it was made {age / 3600:.0f} h ago by {maker}, longer than any drill takes"
    return None


def running_here(owner: Owner) -> bool:
    """Whether `owner`, a process of this instance, still runs: its start time where /proc shows it, else
    whether a process of its id exists at all (another user's, hidden by hidepid: kept, to be safe)."""
    started = process_start(owner.pid)
    if started is not None:
        return started == owner.started
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, under another user
    return True


def remove_leftovers(docker: DockerSource, host: str) -> int:
    """Removes the drill containers of identity `host` (WATCHER_HOST) whose watcher process is gone (see the
    module's docstring); returns how many. Drills of live processes, of this identity or another, are left
    alone. Never raises: a leftover that cannot be judged or removed (e.g. a proxy refusing it) is logged.
    """
    try:
        drills = docker.labelled_containers(f"{ROLE_LABEL}=drill", f"{HOST_LABEL}={host}")
    except DockerUnavailable as exc:
        log.warning("drill_leftover_check_failed", error=str(exc))
        return 0
    me, now, removed = this_process(), time.time(), 0
    for drill in drills:
        try:
            reason = leftover_reason(drill.labels.get(OWNER_LABEL), drill.created, now, me, running_here)
            if reason is None:
                log.info("drill_in_use_left", container=drill.name, owner=drill.labels.get(OWNER_LABEL))
                continue
            docker.remove(drill.id)
        except Exception as exc:  # one container's trouble must not stop the start or the drill
            log.error("drill_leftover_not_removed", container=drill.name, error=f"{type(exc).__name__}: {exc}")
            continue
        removed += 1
        log.warning("drill_leftover_removed", container=drill.name, reason=reason)
    return removed
