"""Masker and run_pipeline (watcher.execute), with real local `sh` processes (no Docker, no restic)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from watcher.execute import (
    EXIT_UNKNOWN,
    STATEMENT_NOT_SHOWN,
    STDERR_TAIL_LINES,
    Completed,
    Masker,
    _LineTail,
    run,
    run_pipeline,
)

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
NO_SECRETS = Masker()
# Every run has a bound; this one is never reached by the commands that are not about timeouts.
BOUND = 30.0


def sh(script: str) -> tuple[str, ...]:
    return ("sh", "-c", script)


def alive(pid: int) -> bool:
    """True if `pid` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pid: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


# --- Masker -------------------------------------------------------------------------------------


def test_masker_masks_every_occurrence() -> None:
    masker = Masker(["hunter22", "tok-abc"])
    assert masker("pw=hunter22 again hunter22, token tok-abc") == "pw=*** again ***, token ***"


def test_masker_longest_secret_first() -> None:
    masker = Masker(["abc-12", "abc-12-xyz"])
    assert masker("x abc-12-xyz y abc-12") == "x *** y ***"
    # the order given does not matter
    assert Masker(["abc-12-xyz", "abc-12"])("abc-12-xyz") == "***"


def test_masker_ignores_short_and_empty_secrets() -> None:
    masker = Masker(["ab", "", None, "x", "a1-b2"])
    assert masker("ab x cab a1-b2") == "ab x cab a1-b2"
    assert Masker(["a1-b2c"])("a1-b2c") == "***"


@pytest.mark.parametrize("secret", ["wrong", "password", "nokeyfound"])
def test_masker_never_rewrites_words_with_a_secret_that_looks_like_one(secret: str) -> None:
    message = "Fatal: wrong password or no key found"
    assert Masker([secret])(message) == message


@pytest.mark.parametrize(("secret", "masked"), [("longpassphrase", True), ("Password", True), ("passw0rd", True),
                                                ("hunter", False), ("hunt3r", True), ("h3r", False)])
def test_which_secrets_are_masked(secret: str, masked: bool) -> None:
    assert (Masker([secret])(f"x {secret} y") == "x *** y") is masked


def test_masker_with_secrets_adds_without_changing_the_original() -> None:
    base = Masker(["repo-password"])
    more = base.with_secrets(["pg-password", None])
    assert more("repo-password pg-password") == "*** ***"
    assert base("repo-password pg-password") == "*** pg-password"


# --- run / run_pipeline: exit codes and output ---------------------------------------------------


def test_exit_code_and_stdout() -> None:
    done = run(sh("echo hello; exit 3"), env=ENV, masker=NO_SECRETS, timeout=BOUND)
    assert done.returncodes == (3,)
    assert done.returncode == 3
    assert done.stdout == b"hello\n"
    assert not done.ok
    assert not done.timed_out
    assert not done.cancelled


def test_success_is_ok() -> None:
    done = run(("true",), env=ENV, masker=NO_SECRETS, timeout=BOUND)
    assert done.ok
    assert done.returncode == 0


def test_pipeline_passes_data_and_reports_every_exit_code() -> None:
    done = run_pipeline([sh("printf 'a\\nb\\nc\\n'; exit 0"), sh("wc -l; exit 4")], env=ENV,
                        masker=NO_SECRETS, timeout=BOUND)
    assert done.returncodes == (0, 4)
    assert done.returncode == 4
    assert done.stdout.strip() == b"3"
    assert not done.ok


def test_pipeline_first_nonzero_code_wins() -> None:
    done = run_pipeline([sh("cat >/dev/null; exit 0"), sh("cat >/dev/null; exit 0")], env=ENV,
                        masker=NO_SECRETS, timeout=BOUND)
    assert done.ok
    assert done.returncodes == (0, 0)


def test_pipeline_streams_large_output() -> None:
    done = run_pipeline([sh("head -c 5000000 /dev/zero"), ("wc", "-c")], env=ENV, masker=NO_SECRETS,
                        timeout=20)
    assert done.ok
    assert done.stdout.strip() == b"5000000"


def test_stdin_is_fed_to_the_first_member() -> None:
    payload = b"line one\nline two\n" * 5000
    done = run(sh("cat"), env=ENV, masker=NO_SECRETS, stdin=payload, timeout=20)
    assert done.ok
    assert done.stdout == payload


def test_no_stdin_means_empty_stdin() -> None:
    done = run(sh("cat; echo end"), env=ENV, masker=NO_SECRETS, timeout=10)
    assert done.stdout == b"end\n"


def test_environment_is_exactly_what_is_given() -> None:
    done = run(sh('echo "${FOO}-${HOME:-unset}"'), env={**ENV, "FOO": "bar"}, masker=NO_SECRETS, timeout=BOUND)
    assert done.stdout == b"bar-unset\n"


def test_stdout_lines_callback() -> None:
    seen: list[str] = []
    done = run_pipeline([sh("echo one; echo two")], env=ENV, masker=NO_SECRETS, capture_stdout=False,
                        on_stdout_line=seen.append, timeout=BOUND)
    assert done.ok
    assert seen == ["one", "two"]
    assert done.stdout == b""
    assert done.stdout_lines == []


def test_missing_program_raises() -> None:
    with pytest.raises(FileNotFoundError):
        run(("/nonexistent/restic", "version"), env=ENV, masker=NO_SECRETS, timeout=BOUND)


def test_missing_second_program_raises_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        run_pipeline([sh("sleep 30"), ("/nonexistent/pg_restore",)], env=ENV, masker=NO_SECRETS, timeout=BOUND)
    assert time.monotonic() - started < 5


def test_empty_pipeline_is_an_error() -> None:
    with pytest.raises(ValueError):
        run_pipeline([], env=ENV, masker=NO_SECRETS, timeout=BOUND)


# --- stderr tail --------------------------------------------------------------------------------


def test_stderr_tail_is_masked() -> None:
    masker = Masker(["s3cret-pw", "pg-pass"])
    done = run_pipeline(
        [sh("echo 'Fatal: wrong password s3cret-pw' >&2"),
         sh("cat >/dev/null; echo 'auth pg-pass failed' >&2; exit 2")],
        env=ENV, masker=masker, timeout=BOUND,
    )
    assert "s3cret-pw" not in done.stderr_tail
    assert "pg-pass" not in done.stderr_tail
    assert "Fatal: wrong password ***" in done.stderr_tail
    assert "auth *** failed" in done.stderr_tail
    assert "s3cret-pw" not in done.describe_failure()


def test_stderr_lines_callback_is_masked_too() -> None:
    seen: list[str] = []
    run_pipeline([sh("echo 'token=abc123' >&2")], env=ENV, masker=Masker(["abc123"]),
                 on_stderr_line=seen.append, timeout=BOUND)
    assert seen == ["token=***"]


def test_stderr_tail_keeps_the_last_lines() -> None:
    script = 'i=1; while [ $i -le 100 ]; do echo "err $i" >&2; i=$((i+1)); done; exit 1'
    done = run(sh(script), env=ENV, masker=NO_SECRETS, timeout=BOUND)
    lines = done.stderr_tail.splitlines()
    assert len(lines) == STDERR_TAIL_LINES
    assert lines[-1] == "err 100"
    assert lines[0] == f"err {100 - STDERR_TAIL_LINES + 1}"


def test_describe_failure() -> None:
    done = run(sh("echo 'boom' >&2; exit 3"), env=ENV, masker=NO_SECRETS, timeout=BOUND)
    assert done.describe_failure() == "sh failed (exit status 3): boom"
    piped = Completed(argv=(("/usr/bin/restic", "dump"), ("python3", "-m", "x")), returncodes=(0, 1))
    assert piped.describe_failure() == "restic | python3 failed (exit status 0, 1)"


# --- timeouts, failures and cancellation end the whole pipeline ---------------------------------


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "background.pid"
    started = time.monotonic()
    done = run(sh(f"sleep 100 & echo $! > {pid_file}; sleep 100"), env=ENV, masker=NO_SECRETS, timeout=1.0)
    elapsed = time.monotonic() - started
    assert done.timed_out
    assert not done.ok
    assert not done.cancelled
    assert elapsed < 5
    assert done.returncodes[0] != 0
    assert "timed out" in done.describe_failure()
    background = read_pid(pid_file)
    assert wait_gone(background), f"background sleep {background} survived the timeout"


def test_timeout_escalates_to_sigkill_after_the_grace(tmp_path: Path) -> None:
    pid_file = tmp_path / "stubborn.pid"
    started = time.monotonic()
    done = run_pipeline([sh(f"trap '' TERM; sleep 100 & echo $! > {pid_file}; sleep 100")], env=ENV,
                        masker=NO_SECRETS, timeout=1.0, terminate_grace=0.5)
    assert done.timed_out
    assert time.monotonic() - started < 5
    assert done.returncodes == (-9,)
    assert wait_gone(read_pid(pid_file))


def test_failing_first_member_ends_a_blocked_second_member(tmp_path: Path) -> None:
    pid_file = tmp_path / "second.pid"
    started = time.monotonic()
    done = run_pipeline(
        [sh(f"while [ ! -s {pid_file} ]; do sleep 0.02; done; "
            "echo partial; echo 'pg_dump: error: connection lost' >&2; exit 2"),
         sh(f"sleep 100 & echo $! > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; cat >/dev/null; wait")],
        env=ENV, masker=NO_SECRETS, timeout=30,
    )
    assert time.monotonic() - started < 5
    assert done.returncodes[0] == 2
    assert done.returncodes[1] != 0
    assert not done.ok
    assert not done.timed_out
    assert done.returncode == 2
    assert "connection lost" in done.stderr_tail
    assert wait_gone(read_pid(pid_file))


def test_failing_second_member_ends_a_blocked_first_member() -> None:
    started = time.monotonic()
    done = run_pipeline([sh("sleep 100"), sh("exit 5")], env=ENV, masker=NO_SECRETS, timeout=30)
    assert time.monotonic() - started < 5
    assert done.returncodes[1] == 5
    assert done.returncodes[0] != 0
    assert not done.timed_out


def test_cancel_event_ends_the_pipeline(tmp_path: Path) -> None:
    pid_file = tmp_path / "cancelled.pid"
    cancel = threading.Event()

    def cancel_once_running() -> None:
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        cancel.set()

    threading.Thread(target=cancel_once_running, daemon=True).start()
    started = time.monotonic()
    done = run_pipeline([sh(f"sleep 100 & echo $! > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; wait"),
                         sh("cat")], env=ENV, masker=NO_SECRETS, cancel=cancel, timeout=30)
    assert time.monotonic() - started < 5
    assert done.cancelled
    assert not done.timed_out
    assert not done.ok
    assert "cancelled" in done.describe_failure()
    assert wait_gone(read_pid(pid_file))


def test_a_stderr_line_that_says_the_source_gave_up_ends_a_member_that_would_wait_on(tmp_path: Path) -> None:
    # restic retrying a full backend after its source (the exec helper) said the stream stalled.
    pid_file = tmp_path / "retrying.pid"
    seen: list[str] = []
    done = run_pipeline([sh(f"sleep 100 & echo $! > {pid_file}; echo 'retrying: 507' >&2; "
                            "echo 'helper: no data for 3s (the bound is X)' >&2; wait")],
                        env=ENV, masker=NO_SECRETS, timeout=60, on_stderr_line=seen.append,
                        end_on_stderr=lambda line: "(the bound is X)" in line)
    assert not done.timed_out and not done.cancelled and not done.ok
    assert done.returncodes[0] != 0
    assert done.stderr_tail.splitlines() == ["retrying: 507", "helper: no data for 3s (the bound is X)"]
    assert seen == done.stderr_tail.splitlines(), "the lines still reach the caller's own callback"
    assert wait_gone(read_pid(pid_file))


def test_cancel_already_set_before_start() -> None:
    cancel = threading.Event()
    cancel.set()
    started = time.monotonic()
    done = run(sh("sleep 100"), env=ENV, masker=NO_SECRETS, cancel=cancel, timeout=BOUND)
    assert done.cancelled
    assert time.monotonic() - started < 5


# --- what the runner reports for commands inside containers (pure parts) --------------------------


def test_a_secret_split_between_two_pieces_of_a_stream_is_masked_whole() -> None:
    """An exec's stderr arrives in frames of any size: masking is per whole line, never per piece."""
    tail = _LineTail(Masker(["pg-Sup3r-secret"]))
    tail.feed(b"FATAL: password pg-Sup")
    tail.feed(b"3r-secret rejected\nsecond li")
    tail.feed(b"ne")
    tail.finish()
    assert list(tail.lines) == ["FATAL: password *** rejected", "second line"]


def test_a_statement_that_pg_restore_echoes_stays_out_of_the_tail() -> None:
    """pg_restore follows a failed statement's error with the statement, which may hold a password that no
    masker knows (a user mapping's, a subscription's connection string); libpq may quote a line of it too."""
    tail = _LineTail(NO_SECRETS)
    tail.feed(b'pg_restore: error: could not execute query: ERROR:  role "etl" does not exist\n'
              b"Command was: CREATE USER MAPPING FOR etl SERVER warehouse OPTIONS (\n"
              b"    password 'fdw-pw-1',\n"
              b"    \"user\" 'etl'\n"
              b");\n"
              b'pg_restore: error: could not execute query: ERROR:  syntax error at or near "two_phase"\n'
              b"LINE 1: ...CONNECTION 'host=primary password=sub-pw-2' WITH (two_phase...\n"
              b"                                                             ^\n"
              b"pg_restore: detail: Command was: CREATE SUBSCRIPTION s CONNECTION 'password=sub-pw-2'\n"
              b"    PUBLICATION p WITH (connect = false, two_phase = on);\n"
              b"backup-watcher: pg_restore in app-db exited with status 1\n")
    tail.finish()
    assert "fdw-pw-1" not in str(list(tail.lines)) and "sub-pw-2" not in str(list(tail.lines))
    assert list(tail.lines) == [
        'pg_restore: error: could not execute query: ERROR:  role "etl" does not exist',
        STATEMENT_NOT_SHOWN,
        'pg_restore: error: could not execute query: ERROR:  syntax error at or near "two_phase"',
        "pg_restore: detail: " + STATEMENT_NOT_SHOWN,
        "backup-watcher: pg_restore in app-db exited with status 1",
    ]


def test_psqls_quoted_line_stays_in_the_tail() -> None:
    """It names the table whose lock a query of the watcher's own gave up on (jobs.lock_wait_problem)."""
    tail = _LineTail(NO_SECRETS)
    tail.feed(b"ERROR:  canceling statement due to lock timeout\nLINE 1: SELECT 'public.t', EXISTS (SELECT 1)\n")
    assert list(tail.lines) == ["ERROR:  canceling statement due to lock timeout",
                                "LINE 1: SELECT 'public.t', EXISTS (SELECT 1)"]


def test_psqls_quoted_line_of_a_script_that_holds_secrets_is_left_out() -> None:
    """The roles' script: psql cuts the quoted line around the error (as seen from psql 15), here in the middle
    of a password hash that the masker knows only whole."""
    verifier = "SCRAM-SHA-256$4096:c2FsdA==$YWJjZGVmZ2hpamtsbW5vcA==:MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHk="
    tail = _LineTail(Masker([verifier], statement_quotes=False).with_secrets(["db-password-123"]))
    tail.feed(b'ERROR:  unrecognized role option "bogusopt"\n'
              b"LINE 1: ...:MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHk=' BOGUSOPT;\n"
              b"                                                              ^\n"
              b"ERROR:  role \"app\" already exists\n")
    assert list(tail.lines) == ['ERROR:  unrecognized role option "bogusopt"', 'ERROR:  role "app" already exists']


def test_a_line_tail_keeps_only_the_last_lines() -> None:
    tail = _LineTail(NO_SECRETS)
    tail.feed(b"".join(f"line {i}\n".encode() for i in range(100)))
    assert len(tail.lines) == STDERR_TAIL_LINES
    assert tail.lines[-1] == "line 99"


def test_an_exec_whose_stream_broke_is_no_success_even_with_exit_0() -> None:
    done = Completed(argv=(("psql", "-X"),), returncodes=(0,), problem="exec stream ended inside a frame")
    assert not done.ok
    assert done.describe_failure() == "psql failed: exec stream ended inside a frame"


def test_an_exec_with_an_unknown_exit_code_is_no_success() -> None:
    done = Completed(argv=(("pg_isready",),), returncodes=(EXIT_UNKNOWN,))
    assert not done.ok
    assert done.returncode == EXIT_UNKNOWN


def test_a_timed_out_exec_says_so_before_anything_else() -> None:
    done = Completed(argv=(("psql",),), returncodes=(EXIT_UNKNOWN,), timed_out=True, duration_s=40.2,
                     stderr_tail="ERROR:  canceling statement due to lock timeout")
    assert done.describe_failure() == "psql timed out after 40s: ERROR:  canceling statement due to lock timeout"


def test_a_statement_that_an_old_pg_restore_echoes_indented_stays_out_of_the_tail() -> None:
    """pg_restore 11 and older (a target's own, run in its container) indent it: "    Command was: "."""
    tail = _LineTail(NO_SECRETS)
    tail.feed(b"pg_restore: [archiver (db)] Error while PROCESSING TOC:\n"
              b"pg_restore: [archiver (db)] could not execute query: ERROR:  role \"etl\" does not exist\n"
              b"    Command was: CREATE USER MAPPING FOR etl SERVER warehouse OPTIONS (\n"
              b"    password 'fdw-pw-1'\n"
              b");\n"
              b"backup-watcher: pg_restore in app-db exited with status 1\n")
    tail.finish()
    assert "fdw-pw-1" not in str(list(tail.lines))
    assert list(tail.lines)[2:] == ["    " + STATEMENT_NOT_SHOWN,
                                    "backup-watcher: pg_restore in app-db exited with status 1"]
