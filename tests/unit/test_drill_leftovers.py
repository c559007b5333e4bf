"""Which drill containers are leftovers: the owner label, and the judgement (pure, with this machine's /proc)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace

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
    running_here,
    this_process,
)

BOOT = "7bc5ca2f-9658-4f54-8b31-5007344966a7"
ME = Owner("watcher-a1b2", BOOT, "4026532100", 10, "100")
NOW = 2_000_000_000.0


def never_asked(_: Owner) -> bool:
    raise AssertionError("only an owner of this very instance is looked at")


def test_the_owner_label_reads_back_including_a_host_name_with_slashes_or_digits() -> None:
    owner = Owner("host/with/slash", BOOT, "4026532100", 4242, "987654")
    assert parse_owner(owner.label()) == owner
    assert parse_owner(Owner("12345", "0", "1", 7, "0").label()) == Owner("12345", "0", "1", 7, "0")
    for broken in (None, "", "host/b/1/2", f"host/{BOOT}/x/2/3", f"/{BOOT}/1/2/3", f"host/{BOOT}/1/2/x",
                   f"host/{BOOT}/1//3", f"host/{BOOT}/1/\u00b2/3", "host/NOT-A-BOOT-ID!/1/2/3"):
        assert parse_owner(broken) is None, broken


def test_this_process_names_itself_so_that_it_counts_as_running() -> None:
    me = this_process()
    assert me.pid == os.getpid()
    assert me.started == process_start(os.getpid()) and me.started.isdigit()
    assert me.namespace == pid_namespace() != "0" and me.boot != "0"
    labels = drill_labels("db", "host-a", me)
    assert parse_owner(labels[OWNER_LABEL]) == me
    assert labels["backup-watcher.role"] == "drill" and labels["backup-watcher.drill-host"] == "host-a"
    assert running_here(me)
    assert leftover_reason(me.label(), NOW, NOW, me, running_here) is None


def test_an_ended_process_is_not_running_and_a_reused_pid_is_not_its_maker() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert process_start(child.pid) is None
    assert not running_here(replace(ME, pid=child.pid))
    assert not running_here(replace(this_process(), started="1"))  # this pid, another start: a reused pid


def test_an_owner_of_this_instance_is_judged_by_whether_it_still_runs_whatever_the_age() -> None:
    owner = replace(ME, pid=77, started="5000").label()
    assert leftover_reason(owner, NOW - 3 * LEFTOVER_AGE_SECONDS, NOW, ME, lambda _: True) is None
    assert leftover_reason(owner, NOW - 5, NOW, ME, lambda _: False) == \
        "the watcher process that made it (77) has ended"


def test_an_earlier_run_of_this_container_or_machine_made_a_leftover_at_once() -> None:
    # A restarted container keeps its host name and gets a new PID namespace; a rebooted machine a new boot id.
    for earlier in (replace(ME, namespace="4026532999"), replace(ME, boot="0f0f0f0f-0000-4000-8000-000000000000")):
        reason = leftover_reason(earlier.label(), NOW - 5, NOW, ME, never_asked)
        assert reason == "the run of this container or machine that made it has ended (restarted since)"


def test_an_owner_elsewhere_or_unreadable_is_a_leftover_only_past_the_longest_drill() -> None:
    for label, maker in ((replace(ME, hostname="other-host").label(), "a watcher on other-host"),
                         ("a-future/label/format", "an unreadable owner")):
        assert leftover_reason(label, NOW - LEFTOVER_AGE_SECONDS + 60, NOW, ME, never_asked) is None
        reason = leftover_reason(label, NOW - LEFTOVER_AGE_SECONDS - 3600, NOW, ME, never_asked)
        assert reason == f"it was made 121 h ago by {maker}, longer than any drill takes"


def test_without_proc_nothing_here_is_looked_at_only_the_age_counts() -> None:
    blind = replace(ME, namespace="0")
    assert leftover_reason(ME.label(), NOW - 60, NOW, blind, never_asked) is None
    assert leftover_reason(ME.label(), NOW - LEFTOVER_AGE_SECONDS - 1, NOW, blind, never_asked) is not None


def test_a_container_without_an_owner_is_a_leftover_as_before_owners_were_recorded() -> None:
    assert leftover_reason(None, NOW, NOW, ME, never_asked) == "it names no owner (made by an older watcher)"


def test_a_listed_container_reads_labels_and_creation_time() -> None:
    item: dict[str, object] = {"Id": "abc", "Names": ["/bw-drill-1"], "Labels": {OWNER_LABEL: "h/1/2/3"},
                               "Created": 1700000000}
    assert ListedContainer.of(item) == ListedContainer("abc", "bw-drill-1", {OWNER_LABEL: "h/1/2/3"}, 1.7e9)
    assert ListedContainer.of({"Id": "x", "Names": None, "Labels": None}) == ListedContainer("x", "", {}, 0.0)
