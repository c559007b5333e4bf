"""The one runner: every child process of the watcher and every command inside a container.

Policy kept in one place:
- every run has a bound (`timeout`, required) and ends early when `cancel` is set;
- a local run gets its own process group so a timeout or a cancellation ends the whole pipeline
  (restic and the dump helper it started, `restic dump | pg_restore`), SIGTERM then SIGKILL;
- a command inside a container (`run_in_container`) runs over the engine's exec API; its wait ends
  on timeout or cancel by closing the hijacked exec socket, which ends the command's stream;
- stderr is kept as a bounded tail of lines, masked of secrets here and nowhere else;
- exit codes are returned, never guessed: `ok` only when every process exited 0, nothing interrupted
  the run and the exec stream (if any) arrived whole.

No other module starts a process or calls the exec client (`watcher.dockerexec`); the exec helper
program (`python -m watcher.dockerexec`) is started through this runner like any other process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from watcher import dockerexec

Command = tuple[str, ...]
STDERR_TAIL_LINES = 40
MASK_MIN_LENGTH, MASK_ALWAYS_LENGTH = 6, 12
TERMINATE_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.05
# How often a running pipeline's on_tick is called (progress sampling).
TICK_SECONDS = 1.0
# An exec aborted while the engine still answers its start (bounded by the client's own 30 s) is
# not waited for longer than this: the run is reported as timed out or cancelled at once.
ABORT_JOIN_SECONDS = 2.0
# The longest line of stderr kept whole; the rest of a longer line is dropped (a bounded tail).
MAX_LINE_BYTES = 16384
# pg_restore follows the error of a statement that failed with the whole statement ("Command was: " and its
# further lines), and libpq's error may quote a line of it ("LINE 3: ...", then a caret). A dump's statements
# can hold passwords that no masker knows (CREATE USER MAPPING ... OPTIONS (password '...'), CREATE
# SUBSCRIPTION ... CONNECTION '... password=...'): they are left out of the tail, the error itself stays.
# A quoted line is left out only from pg_restore's stream: psql's names the table of a lock wait
# (jobs.lock_wait_problem), in the watcher's own queries.
ECHOED_STATEMENT = "Command was: "
STATEMENT_NOT_SHOWN = ECHOED_STATEMENT + "(not shown: a dump's statement may hold passwords)"
# Lines that end an echoed statement: the next message of pg_restore or of the exec helper.
_OWN_LINE_PREFIXES = ("pg_restore: ", "pg_dump: ", "backup-watcher: ")


def maskable(secret: str) -> bool:
    """Whether `secret` can be told apart from the words of a message: 12 characters or more, or 6 or more
    with one that is not a lowercase letter. Masking `password` or `wrong` would rewrite restic's own "wrong
    password"; such secrets are kept out of messages at the source, as every secret is (README, Secrets)."""
    if len(secret) >= MASK_ALWAYS_LENGTH:
        return True
    return len(secret) >= MASK_MIN_LENGTH and not (secret.isalpha() and secret.islower())


class Masker:
    """Replaces every exact occurrence of a known secret in a text with '***' (secrets that look like words
    are left alone, see `maskable`)."""

    def __init__(self, secrets: Iterable[str | None] = (), *, statement_quotes: bool = True) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s and maskable(s)}, key=len, reverse=True)
        # False for a program fed a script that holds secrets: PostgreSQL quotes a failed statement's line
        # ("LINE 1: ...") cut to about 60 characters around the error, which can cut a password hash in two,
        # and a part of a secret is no secret it knows (_LineTail leaves such lines out).
        self.statement_quotes = statement_quotes

    def with_secrets(self, secrets: Iterable[str | None], *, statement_quotes: bool | None = None) -> Masker:
        """Returns a new Masker that also masks `secrets` (and keeps or leaves out statement quotes as this one,
        unless `statement_quotes` says otherwise)."""
        keep = self.statement_quotes if statement_quotes is None else statement_quotes
        return Masker([*self._secrets, *secrets], statement_quotes=keep)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class ExecError(Exception):
    """The Docker engine could not be reached or refused to run a command; the message is masked."""


@dataclass
class Completed:
    """The end of one command or pipeline: every exit code, stdout (if captured), stderr tail.

    For a command inside a container, an exit code the engine never reported is EXIT_UNKNOWN and
    `problem` says why (a stream that broke or ended inside a frame).
    """

    argv: tuple[Command, ...]
    returncodes: tuple[int, ...]
    stdout: bytes = b""
    stderr_tail: str = ""
    timed_out: bool = False
    cancelled: bool = False
    duration_s: float = 0.0
    stdout_lines: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """True when every process exited 0, nothing interrupted it and its stream arrived whole."""
        return (not self.timed_out and not self.cancelled and self.problem is None
                and all(code == 0 for code in self.returncodes))

    @property
    def returncode(self) -> int:
        """The first non-zero exit code of the pipeline, or 0."""
        return next((code for code in self.returncodes if code != 0), 0)

    def describe_failure(self) -> str:
        """One sentence that says what went wrong, followed by the stderr tail."""
        program = " | ".join(os.path.basename(cmd[0]) for cmd in self.argv)
        if self.timed_out:
            head = f"{program} timed out after {self.duration_s:.0f}s"
        elif self.cancelled:
            head = f"{program} was cancelled"
        elif self.problem is not None:
            head = f"{program} failed: {self.problem}"
        else:
            codes = ", ".join(str(code) for code in self.returncodes)
            head = f"{program} failed (exit status {codes})"
        return f"{head}: {self.stderr_tail}" if self.stderr_tail else head


EXIT_UNKNOWN = dockerexec.EXIT_ENGINE_ERROR


class _LineTail:
    """The last lines of a byte stream that arrives in pieces of any size, each line masked whole."""

    def __init__(self, masker: Masker, on_line: Callable[[str], None] | None = None) -> None:
        self._masker = masker
        self._on_line = on_line
        self._partial = b""
        self._in_statement = False  # inside a statement pg_restore echoed (ECHOED_STATEMENT)
        self._after_quote = False  # the line before quoted a statement's line (LINE n: ...)
        self._from_pg_restore = False  # pg_restore wrote to this stream
        self.lines: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def feed(self, data: bytes | memoryview) -> None:
        """Takes the next piece (copied: it may be a view of a buffer reused afterwards); every line it
        completes is masked and kept."""
        *complete, self._partial = (self._partial + data).split(b"\n")
        self._partial = self._partial[:MAX_LINE_BYTES]
        for raw in complete:
            self.add(raw)

    def finish(self) -> None:
        """Keeps the last line when the stream did not end with a newline."""
        if self._partial:
            self.add(self._partial)
            self._partial = b""

    def add(self, raw: bytes) -> None:
        """Keeps one whole line (masked); blank lines and the statements a program echoes are dropped."""
        line = self._shown(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        if line is not None:
            line = self._masker(line)
        if line:
            self.lines.append(line)
            if self._on_line is not None:
                self._on_line(line)

    def _shown(self, text: str) -> str | None:
        """What of one line may be kept: None for a line of an echoed statement (see ECHOED_STATEMENT)."""
        after_quote, self._after_quote = self._after_quote, False
        head, echoed, _statement = text.partition(ECHOED_STATEMENT)
        # PostgreSQL 15+ says it as a detail; 12 to 14 at the line's start; 11 and older indented by four spaces.
        if echoed and (not head.strip() or head.endswith(": detail: ")):
            self._in_statement = True
            return head + STATEMENT_NOT_SHOWN
        if self._in_statement and not text.startswith(_OWN_LINE_PREFIXES):
            return None
        self._in_statement = False
        self._from_pg_restore = self._from_pg_restore or text.startswith("pg_restore: ")
        quotes_hidden = self._from_pg_restore or not self._masker.statement_quotes
        if quotes_hidden and text.startswith("LINE ") and text[5:].partition(":")[0].isdigit():
            self._after_quote = True
            return None
        if after_quote and text.strip() == "^":
            return None
        return text


def _wait_bound(deadline: float, cancel: threading.Event | None) -> tuple[bool, bool]:
    """(timed_out, cancelled) right now for a run that must end by `deadline` or on `cancel`."""
    if time.monotonic() >= deadline:
        return True, False
    return False, cancel is not None and cancel.is_set()


# --- local processes -----------------------------------------------------------------------------


def _keep_lines(stream: Iterable[bytes], tail: _LineTail) -> None:
    for raw in stream:
        tail.add(raw)


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


class _Pipeline:
    """The processes of one run_pipeline call and the threads that read them."""

    def __init__(self, commands: Sequence[Command], env: Mapping[str, str], masker: Masker,
                 on_stderr_line: Callable[[str], None] | None,
                 end_on_stderr: Callable[[str], bool] | None = None, first_fds: Sequence[int] = ()) -> None:
        self.commands = commands
        self.first_fds = tuple(first_fds)
        self.env = dict(env)
        self.masker = masker
        self.ending = threading.Event()
        self.on_stderr_line = on_stderr_line
        if end_on_stderr is not None:
            self.on_stderr_line = self._ending_on(end_on_stderr, on_stderr_line)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tails: list[_LineTail] = []
        self.readers: list[threading.Thread] = []
        self.stdout_chunks: list[bytes] = []
        self.stdout_lines: list[str] = []

    def _ending_on(self, end_on: Callable[[str], bool],
                   then: Callable[[str], None] | None) -> Callable[[str], None]:
        def look(line: str) -> None:
            if end_on(line):
                self.ending.set()
            if then is not None:
                then(line)
        return look

    def start(self, feed_stdin: bool, keep_last_stdout: bool) -> None:
        """Starts every member, stdout of each into stdin of the next; raises OSError (none left running)."""
        try:
            for index, argv in enumerate(self.commands):
                self._start_member(index, argv, feed_stdin, keep_last_stdout)
        except OSError:
            for proc in self.procs:
                _kill_group(proc, signal.SIGKILL)
            raise
        finally:
            # Handed over: only the first member holds them now (a listening socket then refuses once it ends).
            for fd in self.first_fds:
                os.close(fd)

    def _start_member(self, index: int, argv: Command, feed_stdin: bool, keep_last_stdout: bool) -> None:
        is_first, is_last = index == 0, index == len(self.commands) - 1
        if is_first:
            proc_stdin: int | IO[bytes] | None = subprocess.PIPE if feed_stdin else subprocess.DEVNULL
        else:
            proc_stdin = self.procs[-1].stdout
        proc = subprocess.Popen(
            argv,
            stdin=proc_stdin,
            stdout=subprocess.PIPE if (not is_last or keep_last_stdout) else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,
            close_fds=True,
            pass_fds=self.first_fds if is_first else (),
        )
        if not is_first and self.procs[-1].stdout is not None:
            # Only the reader holds the pipe now, so the writer sees EPIPE if the reader dies.
            self.procs[-1].stdout.close()
        self.procs.append(proc)
        tail = _LineTail(self.masker, self.on_stderr_line)
        assert proc.stderr is not None
        stderr = proc.stderr
        reader = threading.Thread(target=_keep_lines, args=(stderr, tail), daemon=True)
        reader.start()
        self.tails.append(tail)
        self.readers.append(reader)

    def feed(self, stdin: bytes) -> None:
        """Writes `stdin` to the first member from a thread of its own, then closes it."""
        target = self.procs[0].stdin
        assert target is not None

        def write() -> None:
            with contextlib.suppress(BrokenPipeError):
                target.write(stdin)
            with contextlib.suppress(BrokenPipeError):
                target.close()

        threading.Thread(target=write, daemon=True).start()

    def read_stdout(self, capture: bool, on_line: Callable[[str], None] | None) -> None:
        """Reads the last member's stdout: whole (capture) or line by line (on_line)."""
        stdout = self.procs[-1].stdout
        if stdout is None:
            return
        if on_line is None and capture:
            reader = threading.Thread(target=lambda: self.stdout_chunks.append(stdout.read()), daemon=True)
        else:
            def each_line() -> None:
                for raw in stdout:
                    line = raw.decode("utf-8", errors="replace").rstrip("\n")
                    if capture:
                        self.stdout_lines.append(line)
                    if on_line is not None:
                        on_line(line)
            reader = threading.Thread(target=each_line, daemon=True)
        reader.start()
        self.readers.append(reader)

    def signal_running(self, sig: int) -> None:
        """Sends `sig` to the process group of every member still running."""
        for proc in self.procs:
            if proc.poll() is None:
                _kill_group(proc, sig)

    def wait(self, deadline: float, cancel: threading.Event | None, grace: float,
             on_tick: Callable[[Sequence[int]], None] | None = None) -> tuple[bool, bool]:
        """Waits until every member has ended; returns (timed_out, cancelled). Calls `on_tick` with the
        members' pids about once every TICK_SECONDS meanwhile.

        On timeout, cancel, one member failing or a stderr line that ends the run (`end_on_stderr`), every
        member gets SIGTERM, then SIGKILL after `grace`.
        """
        timed_out = cancelled = False
        terminated_at: float | None = None
        next_tick = time.monotonic() + TICK_SECONDS
        while True:
            codes = [proc.poll() for proc in self.procs]
            if all(code is not None for code in codes):
                return timed_out, cancelled
            now = time.monotonic()
            if on_tick is not None and now >= next_tick:
                on_tick([proc.pid for proc in self.procs])
                next_tick = now + TICK_SECONDS
            if terminated_at is None:
                timed_out, cancelled = _wait_bound(deadline, cancel)
                if (timed_out or cancelled or self.ending.is_set()
                        or any(code not in (None, 0) for code in codes)):
                    self.signal_running(signal.SIGTERM)
                    terminated_at = now
            elif now - terminated_at >= grace:
                self.signal_running(signal.SIGKILL)
            time.sleep(POLL_SECONDS)

    def end_all(self, grace: float) -> None:
        """Ends every member still running: SIGTERM, then SIGKILL to those left after `grace`."""
        self.signal_running(signal.SIGTERM)
        grace_end = time.monotonic() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, grace_end - time.monotonic()))
            if proc.poll() is None:
                _kill_group(proc, signal.SIGKILL)

    def stderr_tail(self) -> str:
        """The masked stderr lines of every member, the last STDERR_TAIL_LINES of them."""
        for reader in self.readers:
            reader.join(timeout=5)
        lines = [line for tail in self.tails for line in tail.lines]
        return "\n".join(lines[-STDERR_TAIL_LINES:])


def run_pipeline(
    commands: Sequence[Command],
    *,
    env: Mapping[str, str],
    masker: Masker,
    timeout: float,
    cancel: threading.Event | None = None,
    stdin: bytes | None = None,
    capture_stdout: bool = True,
    on_stdout_line: Callable[[str], None] | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
    on_tick: Callable[[Sequence[int]], None] | None = None,
    terminate_grace: float = TERMINATE_GRACE_SECONDS,
    end_on_stderr: Callable[[str], bool] | None = None,
    first_fds: Sequence[int] = (),
) -> Completed:
    """Runs `commands` as a pipeline (stdout of each into stdin of the next) and waits for it.

    `first_fds` are file descriptors the first member inherits, under the same numbers; they are handed
    over: closed here once the members have started (or failed to).

    `on_tick` is called with the members' pids about once a second while they run (progress is
    read there, off the data path); it must not raise.

    Returns a Completed with every exit code. On timeout or when `cancel` is set, every process of
    the pipeline gets SIGTERM (whole process groups, so grandchildren too), then SIGKILL after
    `terminate_grace`. If one process fails, the others are ended too, so a half-dead pipeline never
    runs on; so does a stderr line (masked) for which `end_on_stderr` returns True (a source that
    gave up, which restic would otherwise outlive while it retries a backend). Raises OSError only
    when a program cannot be started at all.
    """
    if not commands:
        raise ValueError("empty pipeline")
    started = time.monotonic()
    pipeline = _Pipeline(commands, env, masker, on_stderr_line, end_on_stderr, first_fds)
    pipeline.start(stdin is not None, capture_stdout or on_stdout_line is not None)
    if stdin is not None:
        pipeline.feed(stdin)
    pipeline.read_stdout(capture_stdout, on_stdout_line)
    try:
        timed_out, cancelled = pipeline.wait(started + timeout, cancel, terminate_grace, on_tick)
    except BaseException:
        # Ctrl-C (or any error) in the waiting thread: the children run in their own sessions and
        # would go on without us (a restic backup could still write its snapshot). End them all.
        pipeline.end_all(terminate_grace)
        raise
    tail = pipeline.stderr_tail()
    return Completed(
        argv=tuple(tuple(cmd) for cmd in commands),
        returncodes=tuple(proc.returncode for proc in pipeline.procs),
        stdout=b"".join(pipeline.stdout_chunks),
        stderr_tail=tail,
        timed_out=timed_out,
        cancelled=cancelled,
        duration_s=time.monotonic() - started,
        stdout_lines=pipeline.stdout_lines,
    )


def run(
    argv: Command,
    *,
    env: Mapping[str, str],
    masker: Masker,
    timeout: float,
    cancel: threading.Event | None = None,
    stdin: bytes | None = None,
) -> Completed:
    """Runs one command and captures its stdout; see run_pipeline for the policy."""
    return run_pipeline([argv], env=env, masker=masker, timeout=timeout, cancel=cancel, stdin=stdin)


# --- commands inside containers ------------------------------------------------------------------


class _ContainerCall:
    """One exec, run on a thread of its own so that the runner's wait can end before it does."""

    def __init__(self, docker_host: str, container: str, argv: Command, env: Mapping[str, str],
                 stdin: bytes | None, masker: Masker) -> None:
        self.args = (docker_host, container, argv)
        self.env = dict(env)
        self.stdin = stdin
        self.stdout = bytearray()
        self.stderr = _LineTail(masker)
        self.abort = dockerexec.ExecAbort()
        self.outcome: dockerexec.ExecOutcome | None = None
        self.error: dockerexec.DockerExecError | None = None

    def _feeder(self) -> Callable[[int], bytes] | None:
        if self.stdin is None:
            return None
        remaining = [self.stdin]

        def next_piece(_size: int) -> bytes:
            data, remaining[0] = remaining[0], b""
            return data

        return next_piece

    def __call__(self) -> None:
        docker_host, container, argv = self.args
        try:
            self.outcome = dockerexec.stream_exec(
                docker_host, container, argv, env=self.env, stdin=self._feeder(),
                on_stdout=self.stdout.extend, on_stderr=self.stderr.feed, abort=self.abort)
        except dockerexec.DockerExecError as exc:
            self.error = exc
        finally:
            self.stderr.finish()


def _wait_for_thread(worker: threading.Thread, deadline: float, cancel: threading.Event | None) -> tuple[bool, bool]:
    """Waits for `worker` to end, up to `deadline` or `cancel`; returns (timed_out, cancelled)."""
    while worker.is_alive():
        timed_out, cancelled = _wait_bound(deadline, cancel)
        if timed_out or cancelled:
            return timed_out, cancelled
        worker.join(POLL_SECONDS)
    return False, False


def run_in_container(
    docker_host: str,
    container: str,
    argv: Command,
    *,
    env: Mapping[str, str],
    masker: Masker,
    timeout: float,
    cancel: threading.Event | None = None,
    stdin: bytes | None = None,
) -> Completed:
    """Runs a small command inside a container and captures its output (never a dump: see dockerexec).

    Returns a Completed whose `ok` is true only for a whole stream from a process that exited 0. On
    timeout or cancel the exec's socket is closed, which ends the command's stream, and the run is
    reported as timed out or cancelled at once. `env` travels in the exec's own environment, never
    in argv. Raises ExecError (masked) when the engine cannot be reached or refuses the exec.
    """
    started = time.monotonic()
    call = _ContainerCall(docker_host, container, argv, env, stdin, masker)
    worker = threading.Thread(target=call, daemon=True, name=f"exec-{os.path.basename(argv[0])}")
    worker.start()
    try:
        timed_out, cancelled = _wait_for_thread(worker, started + timeout, cancel)
    except BaseException:
        call.abort.abort()
        raise
    if timed_out or cancelled:
        call.abort.abort()
        worker.join(ABORT_JOIN_SECONDS)
    elif call.error is not None:
        raise ExecError(masker(str(call.error))) from call.error
    return _container_completed(call, timed_out, cancelled, time.monotonic() - started, masker)


def _container_completed(call: _ContainerCall, timed_out: bool, cancelled: bool, duration: float,
                         masker: Masker) -> Completed:
    """The Completed of an exec that ended, timed out or was cancelled."""
    outcome = call.outcome
    problem: str | None = None
    if timed_out or cancelled:
        pass  # the interruption is the verdict; the stream was closed on purpose
    elif outcome is None:
        problem = "the exec ended without an outcome"
    elif outcome.problem is not None:
        problem = outcome.problem
    elif not outcome.stream_complete:
        problem = "the exec stream did not arrive whole"
    exit_code = outcome.exit_code if outcome is not None and outcome.exit_code is not None else EXIT_UNKNOWN
    return Completed(
        argv=(tuple(call.args[2]),),
        returncodes=(exit_code,),
        stdout=bytes(call.stdout),
        stderr_tail="\n".join(call.stderr.lines),
        timed_out=timed_out,
        cancelled=cancelled,
        duration_s=duration,
        problem=masker(problem) if problem is not None else None,
    )
