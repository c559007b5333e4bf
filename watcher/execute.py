"""Runs every child process of the watcher: one command or a pipeline of them.

Policy kept in one place: each run gets its own process group so a timeout or a cancellation
ends the whole pipeline (restic and the dump helper it started, `restic dump | pg_restore`);
stderr is kept as a bounded tail, masked of secrets before anyone sees it; stdout is either
captured or handed line by line to a callback; exit codes are returned, never guessed.
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

Command = tuple[str, ...]
STDERR_TAIL_LINES = 40
MASK_MIN_LENGTH, MASK_ALWAYS_LENGTH = 6, 12
TERMINATE_GRACE_SECONDS = 10.0


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

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s and maskable(s)}, key=len, reverse=True)

    def with_secrets(self, secrets: Iterable[str | None]) -> Masker:
        """Returns a new Masker that also masks `secrets`."""
        return Masker([*self._secrets, *secrets])

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


@dataclass
class Completed:
    """The end of one command or pipeline: every exit code, stdout (if captured), stderr tail."""

    argv: tuple[Command, ...]
    returncodes: tuple[int, ...]
    stdout: bytes = b""
    stderr_tail: str = ""
    timed_out: bool = False
    cancelled: bool = False
    duration_s: float = 0.0
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every process of the pipeline exited 0 and nothing interrupted it."""
        return not self.timed_out and not self.cancelled and all(code == 0 for code in self.returncodes)

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
        else:
            codes = ", ".join(str(code) for code in self.returncodes)
            head = f"{program} failed (exit status {codes})"
        return f"{head}: {self.stderr_tail}" if self.stderr_tail else head


class _TailReader(threading.Thread):
    """Keeps the last lines of a byte stream, masked."""

    def __init__(self, stream: Iterable[bytes], masker: Masker, on_line: Callable[[str], None] | None) -> None:
        super().__init__(daemon=True)
        self._stream = stream
        self._masker = masker
        self._on_line = on_line
        self.lines: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def run(self) -> None:
        for raw in self._stream:
            line = self._masker(raw.decode("utf-8", errors="replace").rstrip("\n"))
            if line:
                self.lines.append(line)
                if self._on_line is not None:
                    self._on_line(line)


class _LineReader(threading.Thread):
    def __init__(self, stream: Iterable[bytes], on_line: Callable[[str], None]) -> None:
        super().__init__(daemon=True)
        self._stream = stream
        self._on_line = on_line

    def run(self) -> None:
        for raw in self._stream:
            self._on_line(raw.decode("utf-8", errors="replace").rstrip("\n"))


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def run_pipeline(
    commands: Sequence[Command],
    *,
    env: Mapping[str, str],
    masker: Masker,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    stdin: bytes | None = None,
    capture_stdout: bool = True,
    on_stdout_line: Callable[[str], None] | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
    terminate_grace: float = TERMINATE_GRACE_SECONDS,
) -> Completed:
    """Runs `commands` as a pipeline (stdout of each into stdin of the next) and waits for it.

    Returns a Completed with every exit code. On timeout or when `cancel` is set, every process of
    the pipeline gets SIGTERM (whole process groups, so grandchildren too), then SIGKILL after
    `terminate_grace`. If one process fails, the others are ended too, so a half-dead pipeline never
    runs on. Raises OSError only when a program cannot be started at all.
    """
    if not commands:
        raise ValueError("empty pipeline")
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    readers: list[_TailReader] = []
    try:
        for index, argv in enumerate(commands):
            is_first, is_last = index == 0, index == len(commands) - 1
            if is_first:
                proc_stdin = subprocess.PIPE if stdin is not None else subprocess.DEVNULL
            else:
                proc_stdin = procs[-1].stdout  # type: ignore[assignment]
            proc = subprocess.Popen(
                argv,
                stdin=proc_stdin,
                stdout=subprocess.PIPE if (not is_last or capture_stdout or on_stdout_line) else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=dict(env),
                start_new_session=True,
                close_fds=True,
            )
            if not is_first and procs[-1].stdout is not None:
                # Only the reader holds the pipe now, so the writer sees EPIPE if the reader dies.
                procs[-1].stdout.close()
            procs.append(proc)
            assert proc.stderr is not None
            reader = _TailReader(proc.stderr, masker, on_stderr_line)
            reader.start()
            readers.append(reader)
    except OSError:
        for proc in procs:
            _kill_group(proc, signal.SIGKILL)
        raise

    if stdin is not None and procs[0].stdin is not None:
        feeder_stdin = procs[0].stdin

        def feed() -> None:
            with contextlib.suppress(BrokenPipeError):
                feeder_stdin.write(stdin)
            with contextlib.suppress(BrokenPipeError):
                feeder_stdin.close()

        threading.Thread(target=feed, daemon=True).start()

    last = procs[-1]
    out_chunks: list[bytes] = []
    stdout_lines: list[str] = []
    out_thread: threading.Thread | None = None
    if last.stdout is not None:
        last_stdout = last.stdout
        if on_stdout_line is not None or not capture_stdout:
            def on_line(line: str) -> None:
                if capture_stdout:
                    stdout_lines.append(line)
                if on_stdout_line is not None:
                    on_stdout_line(line)
            out_thread = _LineReader(last_stdout, on_line)
        else:
            out_thread = threading.Thread(target=lambda: out_chunks.append(last_stdout.read()), daemon=True)
        out_thread.start()

    timed_out = cancelled = False
    deadline = started + timeout if timeout else None
    terminated_at: float | None = None
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            if all(code is not None for code in codes):
                break
            now = time.monotonic()
            failed_member = any(code not in (None, 0) for code in codes)
            if terminated_at is None:
                if deadline is not None and now >= deadline:
                    timed_out = True
                elif cancel is not None and cancel.is_set():
                    cancelled = True
                if timed_out or cancelled or failed_member:
                    for proc in procs:
                        if proc.poll() is None:
                            _kill_group(proc, signal.SIGTERM)
                    terminated_at = now
            elif now - terminated_at >= terminate_grace:
                for proc in procs:
                    if proc.poll() is None:
                        _kill_group(proc, signal.SIGKILL)
            time.sleep(0.05)
    except BaseException:
        # Ctrl-C (or any error) in the waiting thread: the children run in their own sessions and
        # would go on without us (a restic backup could still write its snapshot). End them all.
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc, signal.SIGTERM)
        grace_end = time.monotonic() + terminate_grace
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, grace_end - time.monotonic()))
            if proc.poll() is None:
                _kill_group(proc, signal.SIGKILL)
        raise

    for reader in readers:
        reader.join(timeout=5)
    if out_thread is not None:
        out_thread.join(timeout=5)
    tail_lines: list[str] = []
    for reader in readers:
        tail_lines.extend(reader.lines)
    return Completed(
        argv=tuple(tuple(cmd) for cmd in commands),
        returncodes=tuple(proc.returncode for proc in procs),
        stdout=b"".join(out_chunks),
        stderr_tail="\n".join(tail_lines[-STDERR_TAIL_LINES:]),
        timed_out=timed_out,
        cancelled=cancelled,
        duration_s=time.monotonic() - started,
        stdout_lines=stdout_lines,
    )


def run(
    argv: Command,
    *,
    env: Mapping[str, str],
    masker: Masker,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    stdin: bytes | None = None,
) -> Completed:
    """Runs one command and captures its stdout; see run_pipeline for the policy."""
    return run_pipeline([argv], env=env, masker=masker, timeout=timeout, cancel=cancel, stdin=stdin)
