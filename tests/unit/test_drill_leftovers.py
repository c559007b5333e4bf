"""Which drill containers are leftovers: the owner label, and the judgement (pure, with this machine's /proc)."""

from __future__ import annotations

import os
import subprocess

from watcher.docker_source import ListedContainer
from watcher.drill_leftovers import (
    LEFTOVER_AGE_SECONDS,
    OWNER_LABEL,
    Owner,
    drill_labels,
    leftover_reason,
    parse_owner,
    pid_namespace,
    process_start,
    this_process,
)

HERE = ("watcher-a1b2", "4026532100")
NOW = 2_000_000_000.0


def test_the_owner_label_reads_back_including_a_host_name_with_slashes_or_digits() -> None:
    owner = Owner("host/with/slash", "4026532100", 4242, "987654")
    assert parse_owner(owner.label()) == owner
    assert parse_owner(Owner("12345", "1", 7, "0").label()) == Owner("12345", "1", 7, "0")
    for broken in (None, "", "host/1/2", "host/x/2/3", "/1/2/3", "host/1/2/x", "host/1//3"):
        assert parse_owner(broken) is None, broken


def test_this_process_names_itself_so_that_it_counts_as_running() -> None:
    me = this_process()
    assert me.pid == os.getpid()
    assert me.started == process_start(os.getpid()) and me.started.isdigit()
    assert me.namespace == pid_namespace() != "0"
    labels = drill_labels("db", "host-a", me)
    assert parse_owner(labels[OWNER_LABEL]) == me
    assert labels["backup-watcher.role"] == "drill" and labels["backup-watcher.drill-host"] == "host-a"
    assert leftover_reason(me.label(), NOW, NOW, me.place(), lambda o: process_start(o.pid) == o.started) is None


def test_an_ended_process_has_no_start_time() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert process_start(child.pid) is None


def test_an_owner_here_is_judged_by_whether_it_still_runs_whatever_the_age() -> None:
    owner = Owner(*HERE, 77, "5000").label()
    assert leftover_reason(owner, NOW - 3 * LEFTOVER_AGE_SECONDS, NOW, HERE, lambda _: True) is None
    reason = leftover_reason(owner, NOW - 5, NOW, HERE, lambda _: False)
    assert reason == "the watcher process that made it (77) has ended"


def test_an_owner_elsewhere_is_a_leftover_only_past_the_longest_drill() -> None:
    # Same host name, other PID namespace (a container on the host's network): not looked at in /proc.
    for place in (("other-host", HERE[1]), (HERE[0], "4026531836")):
        owner = Owner(*place, 77, "5000").label()
        def never_asked(_: Owner) -> bool:
            raise AssertionError("an owner elsewhere cannot be looked at here")
        assert leftover_reason(owner, NOW - LEFTOVER_AGE_SECONDS + 60, NOW, HERE, never_asked) is None
        reason = leftover_reason(owner, NOW - LEFTOVER_AGE_SECONDS - 3600, NOW, HERE, never_asked)
        assert reason is not None and f"by a watcher on {place[0]}" in reason and "38 h ago" in reason


def test_a_container_without_an_owner_is_a_leftover_as_before_owners_were_recorded() -> None:
    for label in (None, "garbage"):
        assert leftover_reason(label, NOW, NOW, HERE, lambda _: True) == "it names no owner (made by an older watcher)"


def test_a_listed_container_reads_labels_and_creation_time() -> None:
    item: dict[str, object] = {"Id": "abc", "Names": ["/bw-drill-1"], "Labels": {OWNER_LABEL: "h/1/2/3"},
                               "Created": 1700000000}
    assert ListedContainer.of(item) == ListedContainer("abc", "bw-drill-1", {OWNER_LABEL: "h/1/2/3"}, 1.7e9)
    assert ListedContainer.of({"Id": "x", "Names": None, "Labels": None}) == ListedContainer("x", "", {}, 0.0)
