"""How a forget or prune step is judged from restic's exit and stderr: a deletion the backend refused
(append-only credentials) is named as such, also where restic exits 0. The texts are restic 0.18's own
against rest-server 0.13 --append-only; tests/integration/test_least_privilege.py runs them for real."""

from __future__ import annotations

from watcher.execute import Completed
from watcher.retention import APPEND_ONLY_PROBLEM, step_problem

FORGET_REFUSED = (
    "Remove(<snapshot/3edbef8ae2>) failed: unexpected HTTP response (403): 403 Forbidden\n"
    "unable to remove snapshot/3edbef8ae20f353954dccbd35f373ba0d47ffd572e0030ce58869daf4e6edd0b from the repository")
PRUNE_REFUSED = (
    "[0:00] 0.00%  0 / 2 old indexes deleted\n"
    "Remove(<index/2677c4fb4b>) failed: unexpected HTTP response (403): 403 Forbidden\n"
    "Fatal: unexpected HTTP response (403): 403 Forbidden")


LOCK_RETRY_S = 1800.0


def done(code: int, stderr: str = "") -> Completed:
    return Completed(argv=(("restic", "forget"),), returncodes=(code,), stderr_tail=stderr)


def test_a_step_that_did_its_work_has_no_problem() -> None:
    assert step_problem(done(0), LOCK_RETRY_S) is None
    assert step_problem(done(0, "Applying Policy: keep 30 daily snapshots"), LOCK_RETRY_S) is None


def test_forget_that_exits_0_but_was_refused_deletion_is_an_append_only_problem() -> None:
    assert step_problem(done(0, FORGET_REFUSED), LOCK_RETRY_S) == APPEND_ONLY_PROBLEM


def test_prune_refused_deletion_is_an_append_only_problem_not_restics_text() -> None:
    problem = step_problem(done(1, PRUNE_REFUSED), LOCK_RETRY_S)
    assert problem == APPEND_ONLY_PROBLEM
    assert "append-only credentials" in problem and "WATCHER_PRUNE=false" in problem
    assert "unexpected HTTP response" not in problem


def test_a_removal_that_failed_otherwise_fails_the_step_with_restics_words() -> None:
    stderr = ("Remove(<snapshot/3edbef8ae2>) failed: connection refused\n"
              "unable to remove snapshot/3edbef8a from the repository")
    problem = step_problem(done(0, stderr), LOCK_RETRY_S)
    assert problem is not None and problem.startswith("some snapshots could not be removed: ")
    assert "connection refused" in problem


def test_a_lock_waited_for_in_vain_names_the_bound_then_restics_words() -> None:
    locked = "Fatal: unable to create lock in backend: repository is already locked exclusively by PID 7 on vm"
    problem = step_problem(done(11, locked), LOCK_RETRY_S)
    assert problem is not None
    assert problem.startswith("restic gave up waiting for the repository lock") and "after 30m" in problem
    assert problem.endswith(locked)


def test_any_other_failure_is_restics_error() -> None:
    wrong = "Fatal: wrong password or no key found"
    assert step_problem(done(1, wrong), LOCK_RETRY_S) == wrong
    assert step_problem(done(1), LOCK_RETRY_S) == "restic failed (exit status 1)"
