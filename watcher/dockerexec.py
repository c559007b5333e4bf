"""Streams of `docker exec` over the Docker Engine API, with an exit-code verdict you can trust.

Why not docker-py's exec stream: it can drop the first frames (docker/docker-py#3332, bytes that
arrived with the HTTP upgrade response are lost) and turns a broken connection into a clean EOF.
A backup must never take a truncated stream for a whole one, so this module speaks the hijacked
HTTP protocol itself, keeps every byte that follows the response header, checks that the stream
ends on a frame boundary, and then asks the engine for the process's exit code. Only "stream
ended cleanly AND the exec is no longer running AND its exit code is 0" counts as success.

It runs in two ways:
- in process, through `watcher.execute.run_in_container` (the runner: timeout, cancel, masking), for
  small commands (psql queries, readiness probes); nothing else calls this client;
- as a program, `python -m watcher.dockerexec --container ID [--stdin] [--env NAME] -- CMD...`,
  which restic starts with `--stdin-from-command` and which `restore` pipes `restic dump` into.
  Its exit status is the exec's own (or 125 when the engine could not be asked), so restic
  refuses to write a snapshot for anything but a complete, successful dump.

The program takes secret environment values (PGPASSWORD) by name only, from its own
environment, so they never appear in any process's argv nor in Docker events.

With `--seal` (dumps) the command runs as `sh -c '"$@" && printf %s "$SEAL"'`, SEAL a random
value of this run: only a process that exited 0 puts it after its output, and the program passes
on everything but that end mark. A stream the engine ends early but cleanly (a proxy or a
connection dropped between two frames, while the dump runs on and still exits 0) lacks the mark
and fails, instead of becoming a snapshot of half a dump.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

STREAM_STDIN, STREAM_STDOUT, STREAM_STDERR = 0, 1, 2
HEADER = struct.Struct(">BxxxI")
READ_CHUNK = 1 << 20
EXIT_ENGINE_ERROR = 125
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
ABORTED = "the wait for the exec was ended (its stream closed) before the command finished"


SEAL_VARIABLE = "BW_END_SEAL"


def sealed_command(cmd: Sequence[str]) -> tuple[str, ...]:
    """`cmd` run by sh, its stdout followed by $BW_END_SEAL only if it exits 0 (its status otherwise)."""
    return ("sh", "-c", f'"$@" && printf %s "${SEAL_VARIABLE}"', "sh", *cmd)


class SealedOutput:
    """Passes a stream on but for its last len(seal) bytes, which must be the seal at the end."""

    def __init__(self, seal: bytes, write: Callable[[memoryview | bytes], object]) -> None:
        self._seal = seal
        self._write = write
        self._held = b""

    def feed(self, data: bytes) -> None:
        """Takes the next piece of the stream; writes what cannot be part of the seal."""
        keep = len(self._seal)
        if len(data) >= keep:
            if self._held:
                self._write(self._held)
            self._write(memoryview(data)[: len(data) - keep])
            self._held = data[len(data) - keep :]
            return
        joined = self._held + data
        if len(joined) > keep:
            self._write(joined[: len(joined) - keep])
        self._held = joined[-keep:]

    def sealed(self) -> bool:
        """True when the stream so far ends with the seal (which was not passed on)."""
        return self._held == self._seal


class DockerExecError(Exception):
    """The engine could not be reached or answered with an error; the exec's outcome is unknown."""


@dataclass(frozen=True)
class ExecOutcome:
    """What one exec did: its exit code (None if the engine never reported one) and why it failed."""

    exit_code: int | None
    stream_complete: bool
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """True only for a complete stream from a process that exited 0."""
        return self.exit_code == 0 and self.stream_complete and self.problem is None


def _connect(docker_host: str, timeout: float | None) -> socket.socket:
    """Opens a stream socket to DOCKER_HOST (unix:// or tcp://); raises DockerExecError."""
    parsed = urllib.parse.urlsplit(docker_host)
    try:
        if parsed.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(parsed.path)
            return sock
        if parsed.scheme in ("tcp", "http"):
            host = parsed.hostname or "localhost"
            return socket.create_connection((host, parsed.port or 2375), timeout=timeout)
    except OSError as exc:
        raise DockerExecError(f"cannot reach the Docker engine at DOCKER_HOST={docker_host}: {exc}") from exc
    raise DockerExecError(
        f"DOCKER_HOST={docker_host}: scheme {parsed.scheme!r} is not supported for exec streams "
        "(use unix:// or tcp://, e.g. through a socket proxy)"
    )


class _SocketHTTPConnection(http.client.HTTPConnection):
    def __init__(self, docker_host: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self._docker_host = docker_host

    def connect(self) -> None:
        self.sock = _connect(self._docker_host, self.timeout)


def _api(docker_host: str, method: str, path: str, body: object | None = None, timeout: float = 30.0) -> object:
    """Sends one Engine API request and returns its decoded JSON body; raises DockerExecError."""
    conn = _SocketHTTPConnection(docker_host, timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
    except OSError as exc:
        raise DockerExecError(f"Docker engine at {docker_host} failed on {method} {path}: {exc}") from exc
    finally:
        conn.close()
    if response.status >= 300:
        message = data.decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            message = str(json.loads(message).get("message", message))
        endpoint = path.split("?", maxsplit=1)[0]
        raise DockerExecError(f"Docker engine refused {method} {endpoint}: {response.status} {message}")
    return json.loads(data) if data.strip() else None


def _create_exec(
    docker_host: str, container: str, cmd: Sequence[str], env: Mapping[str, str], attach_stdin: bool, user: str | None
) -> str:
    body = {
        "AttachStdin": attach_stdin,
        "AttachStdout": True,
        "AttachStderr": True,
        "Tty": False,
        "Cmd": list(cmd),
        "Env": [f"{k}={v}" for k, v in env.items()],
    }
    if user:
        body["User"] = user
    created = _api(docker_host, "POST", f"/containers/{urllib.parse.quote(container, safe='')}/exec", body)
    assert isinstance(created, dict)
    return str(created["Id"])


def _start_hijacked(docker_host: str, exec_id: str, needs_stdin: bool = False) -> tuple[socket.socket, bytes]:
    """Starts the exec on an upgraded connection; returns the socket and stream bytes already read.

    Raises DockerExecError when the connection cannot carry what the exec needs: a proxy that answers
    200 instead of 101 (HAProxy 2.4 to 3.0, haproxy/haproxy#2684) passes the output through but never
    the input, so an exec that reads stdin would wait forever.
    """
    sock = _connect(docker_host, timeout=30.0)
    body = json.dumps({"Detach": False, "Tty": False}).encode()
    request = (
        f"POST /exec/{exec_id}/start HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
        f"Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                raise DockerExecError("Docker engine closed the connection while starting the exec")
            received += chunk
            if len(received) > 65536:
                raise DockerExecError("Docker engine sent an oversized response header")
    except OSError as exc:
        sock.close()
        raise DockerExecError(f"Docker engine failed while starting the exec: {exc}") from exc
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] not in ("101", "200"):
        sock.close()
        raise DockerExecError(f"Docker engine refused to start the exec: {status_line} {rest[:200]!r}")
    if needs_stdin and parts[1] != "101":
        sock.close()
        raise DockerExecError(
            f"DOCKER_HOST={docker_host} did not upgrade the exec connection ({status_line!r} instead of 101): "
            "a proxy in between cannot carry the input a restore or drill streams to pg_restore (HAProxy 2.4 "
            "to 3.0 has this bug). Run restores and drills against the Docker socket itself, or through a "
            "proxy that supports the upgrade."
        )
    # No read timeout from here on: pg_dump may legitimately stay silent for a long time while it
    # waits for a lock; the caller's own timeout ends the whole pipeline instead.
    sock.settimeout(None)
    return sock, rest


def _inspect_exit_code(docker_host: str, exec_id: str, wait_seconds: float) -> int | None:
    """Waits up to wait_seconds for the exec to stop; returns its exit code or None if still running."""
    deadline = time.monotonic() + wait_seconds
    while True:
        info = _api(docker_host, "GET", f"/exec/{exec_id}/json")
        assert isinstance(info, dict)
        if not info.get("Running"):
            code = info.get("ExitCode")
            return int(code) if code is not None else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _pump_stdin(sock: socket.socket, source: Callable[[int], bytes], errors: list[str]) -> None:
    try:
        while chunk := source(READ_CHUNK):
            sock.sendall(chunk)
        # Half-close: the engine closes the process's stdin, the output direction stays open.
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        errors.append(f"writing to the exec's stdin failed: {exc}")


class ExecAbort:
    """Lets another thread end the wait for an exec: closing the hijacked socket ends its stream.

    The engine has no call to stop an exec's process; what ends is the watcher's wait for it (the
    runner then reports the command as timed out or cancelled). Commands on live databases carry
    their own server-side bounds (lock_timeout, statement_timeout), so the process ends as well.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False

    def attach(self, sock: socket.socket) -> bool:
        """Registers the exec's socket; returns False when the exec was aborted before it started."""
        with self._lock:
            if self.aborted:
                return False
            self._sock = sock
            return True

    def abort(self) -> None:
        """Ends the exec's stream now (a blocked read returns at once); safe from any thread."""
        with self._lock:
            self.aborted = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _read_frames(sock: socket.socket, buffered: bytes, on_stdout: Callable[[bytes], object],
                 on_stderr: Callable[[bytes], object]) -> tuple[bool, str | None]:
    """Hands every frame of the multiplexed stream to its callback until the stream ends.

    Returns (stream_complete, problem): complete only when it ended on a frame boundary.
    """
    buf = bytearray(buffered)
    try:
        while True:
            while len(buf) >= HEADER.size:
                kind, size = HEADER.unpack_from(buf)
                if len(buf) < HEADER.size + size:
                    break
                payload = bytes(buf[HEADER.size : HEADER.size + size])
                del buf[: HEADER.size + size]
                if kind == STREAM_STDOUT:
                    on_stdout(payload)
                elif kind == STREAM_STDERR:
                    on_stderr(payload)
                else:
                    return False, f"unexpected stream type {kind} in the exec stream"
            chunk = sock.recv(READ_CHUNK)
            if not chunk:
                if buf:
                    return False, f"exec stream ended inside a frame ({len(buf)} bytes of a partial frame)"
                return True, None
            buf += chunk
    except OSError as exc:
        return False, f"exec stream broke: {exc}"


def stream_exec(
    docker_host: str,
    container: str,
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: Callable[[int], bytes] | None = None,
    on_stdout: Callable[[bytes], object],
    on_stderr: Callable[[bytes], object],
    user: str | None = None,
    abort: ExecAbort | None = None,
    on_output_end: Callable[[], object] | None = None,
) -> ExecOutcome:
    """Runs `cmd` in `container`, feeding it from `stdin` and handing its output to the callbacks.

    Returns an ExecOutcome; `ok` is true only if the multiplexed stream ended on a frame boundary,
    the exec stopped, and its exit code is 0. With `abort`, another thread may end the stream early;
    the outcome then says so and its exit code is unknown. `on_output_end` is called once the output
    has ended (a `stdin` source that waits for more input to give can stop waiting then). Raises
    DockerExecError when the engine cannot be reached or refuses the exec (nothing ran, or its outcome
    is unknown).
    """
    exec_id = _create_exec(docker_host, container, cmd, env or {}, stdin is not None, user)
    sock, buffered = _start_hijacked(docker_host, exec_id, needs_stdin=stdin is not None)
    if abort is not None and not abort.attach(sock):
        sock.close()
        return ExecOutcome(None, False, ABORTED)
    stdin_errors: list[str] = []
    pump: threading.Thread | None = None
    if stdin is not None:
        pump = threading.Thread(target=_pump_stdin, args=(sock, stdin, stdin_errors), daemon=True)
        pump.start()
    try:
        stream_complete, problem = _read_frames(sock, buffered, on_stdout, on_stderr)
        if on_output_end is not None:
            on_output_end()
        if pump is not None and pump.is_alive():
            _stop_feeding_a_finished_exec(docker_host, exec_id, sock)
    finally:
        if pump is not None:
            # Let the pump finish its last write and half-close before the socket goes away; once the
            # process has exited the engine closes the connection, which ends a blocked write.
            pump.join(timeout=30)
        sock.close()
    if abort is not None and abort.aborted:
        return ExecOutcome(None, False, ABORTED)
    return _verdict(docker_host, exec_id, stream_complete, problem, stdin_errors)


def _stop_feeding_a_finished_exec(docker_host: str, exec_id: str, sock: socket.socket) -> None:
    """Ends the feeding of a process that stopped before it read all its input (pg_restore --list reads only
    an archive's head): the engine would go on taking the rest of our input until it ends, a whole dump's
    worth. Shutting the socket down ends the pump's write at once; the exit code stays the verdict."""
    try:
        stopped = _inspect_exit_code(docker_host, exec_id, wait_seconds=2.0) is not None
    except DockerExecError:
        return
    if stopped:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _verdict(docker_host: str, exec_id: str, stream_complete: bool, problem: str | None,
             stdin_errors: list[str]) -> ExecOutcome:
    """The outcome of an exec whose stream has ended: asks the engine for its exit code."""
    try:
        exit_code = _inspect_exit_code(docker_host, exec_id, wait_seconds=10.0)
    except DockerExecError as exc:
        return ExecOutcome(None, stream_complete, problem or f"could not learn the exit code: {exc}")
    if exit_code is None and problem is None:
        problem = "the exec stream ended but the process is still running (connection lost?)"
    if stdin_errors and exit_code not in (None, 0) and problem is None:
        # Only as a detail: the exit code is the verdict. A process that exited 0 did not need the rest
        # of its input; one whose input was cut short fails by itself (pg_restore: unexpected EOF).
        problem = stdin_errors[0]
    return ExecOutcome(exit_code, stream_complete, problem)


def _stdin_reader() -> Callable[[int], bytes]:
    """Reads whatever our stdin has (up to n bytes) without waiting to fill a whole buffer."""
    raw = sys.stdin.buffer
    return lambda size: os.read(raw.fileno(), size)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m watcher.dockerexec")
    parser.add_argument("--container", required=True)
    parser.add_argument("--stdin", action="store_true", help="feed our stdin to the command")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME[=VALUE]",
        help="set NAME in the exec; without =VALUE the value comes from our own environment",
    )
    parser.add_argument("--user")
    parser.add_argument("--seal", action="store_true",
                        help="require the end mark after the command's output (see the module's docstring)")
    parser.add_argument("cmd", nargs="+")
    return parser.parse_args(argv)


def _exec_env(items: Sequence[str]) -> dict[str, str]:
    """NAME=VALUE items as given; a bare NAME takes its value from our own environment (if set)."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    return env


def _exit_status(outcome: ExecOutcome, sealer: SealedOutput | None, program: str, container: str) -> int:
    """The program's exit status for an exec's outcome: 0 only for a whole, sealed, successful run."""
    if outcome.ok and sealer is not None and not sealer.sealed():
        print(f"backup-watcher: {program} in {container}: its output ended without the end mark of a "
              "successful run: the stream was cut short", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    if outcome.ok:
        return 0
    if outcome.problem:
        print(f"backup-watcher: {program} in {container}: {outcome.problem}", file=sys.stderr)
    if outcome.exit_code:
        print(f"backup-watcher: {program} in {container} exited with status {outcome.exit_code}",
              file=sys.stderr)
        return outcome.exit_code if 0 < outcome.exit_code < 256 else 1
    return EXIT_ENGINE_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of `python -m watcher.dockerexec`; returns the process exit status."""
    args = _parse_args(argv)
    env = _exec_env(args.env)
    docker_host = os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    stdout = sys.stdout.buffer
    stderr = sys.stderr.buffer

    def write_err(data: bytes) -> None:
        stderr.write(data)
        stderr.flush()

    cmd: Sequence[str] = args.cmd
    on_stdout: Callable[[bytes], object] = stdout.write
    sealer: SealedOutput | None = None
    if args.seal:
        seal = secrets.token_hex(16)
        env[SEAL_VARIABLE] = seal
        cmd = sealed_command(args.cmd)
        sealer = SealedOutput(seal.encode(), stdout.write)
        on_stdout = sealer.feed
    try:
        outcome = stream_exec(
            docker_host, args.container, cmd, env=env,
            stdin=_stdin_reader() if args.stdin else None,
            on_stdout=on_stdout, on_stderr=write_err, user=args.user,
        )
        stdout.flush()
    except DockerExecError as exc:
        print(f"backup-watcher: {exc}", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    except BrokenPipeError:
        print("backup-watcher: the reader of the exec's output went away", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    return _exit_status(outcome, sealer, args.cmd[0], args.container)


if __name__ == "__main__":
    sys.exit(main())
