"""The bounds of jobs (WATCHER_LOCK_WAIT_TIMEOUT, _QUERY_TIMEOUT, _READY_TIMEOUT, _DUMP_TIMEOUT, _LOCK_RETRY,
_STALL_TIMEOUT) and the per-container labels backup-watcher.lock-wait-timeout and .stall-timeout: read as
durations, refused with the name and the fix; WATCHER_LOCK_RETRY in every restic command that takes the
repository's lock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.unit.daemon_kit import make_target
from watcher.config import Bounds, ConfigError, effective_config, load_config
from watcher.discovery import ContainerInfo, DiscoveryRules, Rejected, Target, discover
from watcher.execute import Masker
from watcher.jobs import JobContext, _backup_command, _globals_command
from watcher.restic import Repository, repository_lock_problem

BASE = {"RESTIC_REPOSITORY": "/srv/restic", "RESTIC_PASSWORD": "pw-long-enough"}


def test_defaults() -> None:
    assert load_config(BASE).bounds == Bounds(lock_wait_s=300.0, query_s=600.0, ready_s=120.0, dump_s=21600.0,
                                              lock_retry_s=1800.0, stall_s=900.0)


def test_every_bound_is_read_as_a_duration() -> None:
    config = load_config({**BASE, "WATCHER_LOCK_WAIT_TIMEOUT": "3s", "WATCHER_QUERY_TIMEOUT": "90",
                          "WATCHER_READY_TIMEOUT": "15m", "WATCHER_DUMP_TIMEOUT": "1d", "WATCHER_LOCK_RETRY": "2h",
                          "WATCHER_STALL_TIMEOUT": "30m"})
    assert config.bounds == Bounds(lock_wait_s=3.0, query_s=90.0, ready_s=900.0, dump_s=86400.0,
                                   lock_retry_s=7200.0, stall_s=1800.0)


def test_bad_bounds_are_reported_all_at_once_by_name() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({**BASE, "WATCHER_LOCK_WAIT_TIMEOUT": "5 minutes", "WATCHER_DUMP_TIMEOUT": "0",
                     "WATCHER_LOCK_RETRY": "forever", "WATCHER_STALL_TIMEOUT": "0.5s"})
    problems = caught.value.problems
    assert any(p.startswith("WATCHER_LOCK_WAIT_TIMEOUT='5 minutes': ") and "write e.g. 90s, 15m, 6h" in p
               for p in problems), problems
    assert "WATCHER_DUMP_TIMEOUT='0': must be at least 1s" in problems
    assert any(p.startswith("WATCHER_LOCK_RETRY='forever': ") for p in problems), problems
    assert "WATCHER_STALL_TIMEOUT='0.5s': must be at least 1s" in problems


def test_check_config_shows_the_bounds_as_written() -> None:
    shown = effective_config(load_config({**BASE, "WATCHER_LOCK_WAIT_TIMEOUT": "90s"}))
    assert {name: shown[name] for name in ("WATCHER_LOCK_WAIT_TIMEOUT", "WATCHER_QUERY_TIMEOUT",
                                           "WATCHER_READY_TIMEOUT", "WATCHER_DUMP_TIMEOUT", "WATCHER_LOCK_RETRY",
                                           "WATCHER_STALL_TIMEOUT")} == {
        "WATCHER_LOCK_WAIT_TIMEOUT": "90s", "WATCHER_QUERY_TIMEOUT": "10m", "WATCHER_READY_TIMEOUT": "2m",
        "WATCHER_DUMP_TIMEOUT": "6h", "WATCHER_LOCK_RETRY": "30m", "WATCHER_STALL_TIMEOUT": "15m"}


def _container(labels: dict[str, str]) -> ContainerInfo:
    return ContainerInfo(id="c1", name="scalr-app-db", image="postgres:17", labels=labels,
                         env={"POSTGRES_USER": "app"})


def test_the_lock_wait_label_sets_a_containers_own_bound() -> None:
    found = discover(_container({"backup-watcher.lock-wait-timeout": "30s"}), DiscoveryRules(["scalr-*-db"]))
    assert isinstance(found, Target)
    assert found.lock_wait_timeout_s == 30.0
    plain = discover(_container({}), DiscoveryRules(["scalr-*-db"]))
    assert isinstance(plain, Target)
    assert plain.lock_wait_timeout_s is None


@pytest.mark.parametrize("label", ["lock-wait-timeout", "stall-timeout"])
@pytest.mark.parametrize("raw", ["soon", "0s", ""])
def test_a_bad_bound_label_rejects_only_that_container_naming_the_label(label: str, raw: str) -> None:
    found = discover(_container({f"backup-watcher.{label}": raw}), DiscoveryRules(["scalr-*-db"]))
    assert isinstance(found, Rejected)
    assert f"label backup-watcher.{label}" in found.reason


def _stall_bound_of(argv: tuple[str, ...]) -> str:
    helper = argv[argv.index("--stdin-from-command"):]
    assert helper.count("--stall-timeout") == 1, argv
    return helper[helper.index("--stall-timeout") + 1]


def test_a_dump_is_watched_for_stalls_with_the_label_over_the_setting() -> None:
    ctx = JobContext("unix:///var/run/docker.sock", Repository("restic", {}, Masker(), "/srv/restic"), "host-a",
                     Masker(), bounds=load_config({**BASE, "WATCHER_STALL_TIMEOUT": "20m"}).bounds)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert _stall_bound_of(_backup_command(ctx, make_target("scalr-app-db"), "app", at)[0]) == "1200"
    found = discover(_container({"backup-watcher.stall-timeout": "90s"}), DiscoveryRules(["scalr-*-db"]))
    assert isinstance(found, Target) and found.stall_timeout_s == 90.0
    assert _stall_bound_of(_backup_command(ctx, found, "app", at)[0]) == "90"
    assert _stall_bound_of(_globals_command(ctx, found, at, True)[0]) == "90"


def _retry_lock_of(argv: tuple[str, ...]) -> str:
    assert argv.count("--retry-lock") == 1, argv
    return argv[argv.index("--retry-lock") + 1]


def test_a_backup_waits_for_the_repository_lock_up_to_watcher_lock_retry() -> None:
    ctx = JobContext("unix:///var/run/docker.sock", Repository("restic", {}, Masker(), "/srv/restic"), "host-a",
                     Masker(), bounds=load_config({**BASE, "WATCHER_LOCK_RETRY": "45m"}).bounds)
    argv, _ = _backup_command(ctx, make_target(), "app", datetime(2026, 11, 21, 3, 0, tzinfo=UTC))
    assert argv[:2] == ("restic", "--retry-lock") and _retry_lock_of(argv) == "2700s"
    assert "backup" in argv
    default = JobContext("unix:///var/run/docker.sock", ctx.repository, "host-a", Masker())
    assert _retry_lock_of(_backup_command(default, make_target(), "app", datetime.now(UTC))[0]) == "1800s"


def test_a_lock_waited_for_in_vain_names_watcher_lock_retry() -> None:
    restic_said = ("unable to create lock in backend: repository is already locked exclusively by PID 29786 on vm "
                   "by root (UID 0, GID 0)\nlock was created at 2026-11-26 14:48:43 (3.35s ago)")
    problem = repository_lock_problem(11, restic_said, 1800.0)
    assert problem is not None and "after 30m" in problem and "WATCHER_LOCK_RETRY" in problem
    assert repository_lock_problem(1, restic_said, 1800.0) is not None, "restic's words alone are enough"
    assert repository_lock_problem(1, "Fatal: wrong password or no key found", 1800.0) is None


def test_restic_is_asked_for_four_status_lines_a_second_not_sixty() -> None:
    # One line a second is parsed; restic's default of 60 cost the CLI or daemon a wake-up each (issue 20). The
    # rate also bounds how long a restic whose watcher died goes on (its next line meets a closed pipe).
    ctx = JobContext("unix:///var/run/docker.sock", Repository("restic", {"RESTIC_PROGRESS_FPS": "60"}, Masker(),
                                                               "/srv/restic"), "host-a", Masker())
    at = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
    for _argv, env in (_backup_command(ctx, make_target(), "app", at), _globals_command(ctx, make_target(), at, True)):
        assert env["RESTIC_PROGRESS_FPS"] == "4"
