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

With `--stall-timeout S` (dumps) a stream that moves nothing for S seconds ends the program with
status 124 and a sentence saying which side was silent (see `watcher.stall`).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

from watcher import stall
from watcher.handoff import Destination, HandOffError, RestartDump, delivered, destination_for, restarting

STREAM_STDIN, STREAM_STDOUT, STREAM_STDERR = 0, 1, 2
HEADER = struct.Struct(">BxxxI")
READ_CHUNK = 1 << 20
# A read of a dump's stream that finds less than this lets the stream gather for GATHER_S (_read_frames).
GATHER_BYTES = 1 << 18
GATHER_S = 0.002
# The partial frame at the end of the read buffer is moved to its front when less room than this is left.
COMPACT_BELOW = GATHER_BYTES
EXIT_ENGINE_ERROR = 125
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
ABORTED = "the wait for the exec was ended (its stream closed) before the command finished"


SEAL_VARIABLE = "BW_END_SEAL"


def random_token() -> str:
    """32 hex digits from the kernel's random source: secrets.token_hex's, without importing secrets (its hmac
    and OpenSSL cost every helper about 5 ms of CPU at start)."""
    return os.urandom(16).hex()


def sealed_command(cmd: Sequence[str]) -> tuple[str, ...]:
    """`cmd` run by sh, its stdout followed by $BW_END_SEAL only if it exits 0 (its status otherwise)."""
    return ("sh", "-c", f'"$@" && printf %s "${SEAL_VARIABLE}"', "sh", *cmd)


class SealedOutput:
    """Passes a stream on but for its last len(seal) bytes, which must be the seal at the end.

    Pieces may be memoryviews of a buffer that is reused once `feed` returns: what is held back is copied.
    """

    def __init__(self, seal: bytes, write: Callable[[memoryview | bytes], object]) -> None:
        self._seal = seal
        self._write = write
        self._held = b""

    def feed(self, data: bytes | memoryview) -> None:
        """Takes the next piece of the stream; writes what cannot be part of the seal."""
        for piece in self.pass_on([data]):
            self._write(piece)

    def pass_on(self, pieces: list[memoryview | bytes]) -> list[memoryview | bytes]:
        """Takes the next pieces of the stream; returns, in order, the part of the stream that can be written
        now: what was held back before and the pieces, but for their last len(seal) bytes (held, copied)."""
        keep = len(self._seal)
        out: list[memoryview | bytes] = [self._held, *pieces] if self._held else list(pieces)
        tail: list[bytes] = []
        need = keep
        while need and out:
            last = out.pop()
            if len(last) <= need:
                tail.append(bytes(last))
                need -= len(last)
            else:
                cut = len(last) - need
                tail.append(bytes(last[cut:]))
                out.append(memoryview(last)[:cut])
                need = 0
        self._held = b"".join(reversed(tail))
        return out

    def sealed(self) -> bool:
        """True when the stream so far ends with the seal (which was not passed on)."""
        return self._held == self._seal


class GatheredWrites:
    """Output gathered from one read of the exec stream and written to its destination with one writev.

    The exec stream comes in frames of a few KiB (about 20,000 for a 230 MB dump): a write per frame, and
    the seal's held-back bytes written apart, cost two system calls per frame, most of the helper's CPU; the
    end mark is held back once per flush too, not per frame. Pieces are appended to `pieces` (its append is
    the sink of the stream) and may be views of the read buffer: `flush` must run before that buffer is read
    into again.
    """

    def __init__(self, destination: Destination, sealer: SealedOutput | None = None) -> None:
        self._destination = destination
        self._sealer = sealer
        self.pieces: list[memoryview | bytes] = []

    def flush(self) -> None:
        """Writes every piece appended to `pieces`, in order (held back from the end: the seal, when there is
        a sealer), and forgets them; raises as Destination.write."""
        pieces: list[memoryview | bytes] = list(self.pieces)
        self.pieces.clear()  # the same list: its append is the stream's sink
        if self._sealer is not None:
            pieces = self._sealer.pass_on(pieces)
        self._destination.write(pieces)


class DockerExecError(Exception):
    """The engine could not be reached or answered with an error; the exec's outcome is unknown."""


class DockerRefused(DockerExecError):
    """The engine answered a request with an error status (`status`: 404 for a container it does not know)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ExecOutcome(NamedTuple):
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
        hint = socket_hint(parsed.path, exc) if parsed.scheme == "unix" else ""
        raise DockerExecError(f"cannot reach the Docker engine at DOCKER_HOST={docker_host}: {exc}{hint}") from exc
    raise DockerExecError(scheme_problem(docker_host) or f"DOCKER_HOST={docker_host}: no such endpoint")


def socket_hint(path: str, exc: OSError) -> str:
    """What fixes a refused or missing Docker socket `path` (an empty string for other failures): in the
    image, which runs as uid 10001, the socket's group or the socket's mount is what is usually missing."""
    if isinstance(exc, PermissionError):
        try:
            group = str(os.stat(path).st_gid)
        except OSError:
            group = f'"$(stat -c %g {path})"'
        return (f" (this process, uid {os.getuid()} with groups {sorted({os.getgid(), *os.getgroups()})}, may not "
                f"use the socket: give it the socket's group, e.g. `docker run --group-add {group}`, or point "
                "DOCKER_HOST at a socket proxy)")
    if isinstance(exc, FileNotFoundError):
        return (f" (there is no socket at {path}: mount the engine's socket there, e.g. `docker run -v "
                "/var/run/docker.sock:/var/run/docker.sock`, or set DOCKER_HOST)")
    return ""


def scheme_problem(docker_host: str) -> str | None:
    """Why this client cannot speak to DOCKER_HOST `docker_host` (its scheme), or None when it can."""
    scheme = urllib.parse.urlsplit(docker_host).scheme
    if scheme in ("unix", "tcp", "http"):
        return None
    return (f"DOCKER_HOST={docker_host}: scheme {scheme!r} is not supported (use unix:// or tcp://, e.g. "
            "through a socket proxy)")


def api_call(docker_host: str, method: str, path: str, body: object | None = None, timeout: float = 30.0) -> object:
    """Sends one Engine API request (a connection of its own) and returns its decoded JSON body (None for an
    empty one); raises DockerRefused for an error status, DockerExecError when the engine cannot be reached.

    HTTP/1.1 spoken here rather than through http.client, whose import (the email package) cost every exec
    helper, one per dump, about a quarter of its start-up. Each socket operation waits at most `timeout`.
    """
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", "Host: docker", "Connection: close", f"Content-Length: {len(payload)}"]
    if body is not None:
        head.append("Content-Type: application/json")
    sock = _connect(docker_host, timeout)
    try:
        sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
        status, data = _read_response(sock)
    except (OSError, ValueError) as exc:
        raise DockerExecError(f"Docker engine at {docker_host} failed on {method} {path}: {exc}") from exc
    finally:
        sock.close()
    if status >= 300:
        message = data.decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            message = str(json.loads(message).get("message", message))
        endpoint = path.split("?", maxsplit=1)[0]
        raise DockerRefused(f"Docker engine refused {method} {endpoint}: {status} {message}", status)
    return json.loads(data) if data.strip() else None


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Reads one HTTP response from `sock`; returns (status, body). Raises OSError, ValueError (not HTTP, or
    the connection ended before the answer was whole)."""
    received = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return _whole_at_end(bytes(received))
        received += chunk
        answer = http_response(bytes(received))
        if answer is not None:
            return answer


def _whole_at_end(data: bytes) -> tuple[int, bytes]:
    """The response in `data`, the whole of what came before the connection closed; raises ValueError when
    that is not a whole response (a body without length or chunks ends with the connection)."""
    answer = http_response(data)
    if answer is not None:
        return answer
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"the connection closed after {len(data)} bytes, inside the response header")
    headers = _headers(head)
    if "content-length" in headers or "chunked" in headers.get("transfer-encoding", ""):
        raise ValueError("the connection closed inside the response body")
    return _status(head), rest


def http_response(data: bytes) -> tuple[int, bytes] | None:
    """(status, body) of the HTTP/1.1 response `data` holds, or None while it is not whole yet (or its body ends
    only with the connection). Raises ValueError for what is no HTTP response."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status = _status(head)
    headers = _headers(head)
    if status < 200 or status in (204, 304):
        return status, b""
    if "chunked" in headers.get("transfer-encoding", ""):
        body = _dechunked(rest)
        return None if body is None else (status, body)
    if "content-length" in headers:
        length = int(headers["content-length"])
        return (status, rest[:length]) if len(rest) >= length else None
    return None


def _status(head: bytes) -> int:
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {head[:80]!r}")
    return int(parts[1])


def _headers(head: bytes) -> dict[str, str]:
    """The header fields, names in lower case, values as sent (transfer-encoding's in lower case)."""
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if "transfer-encoding" in fields:
        fields["transfer-encoding"] = fields["transfer-encoding"].lower()
    return fields


def _dechunked(data: bytes) -> bytes | None:
    """The body of a chunked transfer in `data`, or None while its last chunk has not come; raises ValueError."""
    body = bytearray()
    at = 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(data[at:line_end].split(b";", 1)[0].strip(), 16)
        at = line_end + 2
        if size == 0:
            # The last chunk, then trailer fields (none from the engine) and an empty line.
            if data.startswith(b"\r\n", at) or data.find(b"\r\n\r\n", at) >= 0:
                return bytes(body)
            return None
        if len(data) < at + size + 2:
            return None
        body += data[at : at + size]
        at += size + 2


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
    created = api_call(docker_host, "POST", f"/containers/{urllib.parse.quote(container, safe='')}/exec", body)
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
        info = api_call(docker_host, "GET", f"/exec/{exec_id}/json")
        assert isinstance(info, dict)
        if not info.get("Running"):
            code = info.get("ExitCode")
            return int(code) if code is not None else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _pump_stdin(sock: socket.socket, source: Callable[[int], bytes] | int, errors: list[str]) -> None:
    try:
        if isinstance(source, int):
            _pump_fd(sock, source)
        else:
            while chunk := source(READ_CHUNK):
                sock.sendall(chunk)
        # Half-close: the engine closes the process's stdin, the output direction stays open.
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        errors.append(f"writing to the exec's stdin failed: {exc}")


def _pump_fd(sock: socket.socket, fd: int) -> None:
    """Copies file descriptor `fd` to `sock` until its end: in the kernel (splice) where it can be (Linux, `fd`
    a pipe, as `restic dump | helper`), else through one reused buffer; raises OSError."""
    splice = getattr(os, "splice", None)
    if splice is not None:
        moved = 0
        try:
            while count := splice(fd, sock.fileno(), READ_CHUNK):
                moved += count
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL or moved:
                raise
            # EINVAL at once: `fd` is no pipe (a file, a terminal); copy it instead.
    buffer = memoryview(bytearray(READ_CHUNK))
    while count := os.readv(fd, [buffer]):
        sock.sendall(buffer[:count])


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


def _read_frames(sock: socket.socket, buffered: bytes, on_stdout: Callable[[memoryview], object],
                 on_stderr: Callable[[memoryview], object],
                 on_read: Callable[[], object] | None = None, gather_s: float = 0.0) -> tuple[bool, str | None]:
    """Hands every frame of the multiplexed stream to its callback until the stream ends.

    The stream is read into one buffer, reused (recv_into): each payload is handed on as a memoryview of it,
    valid only until `on_read` (called once the frames of each read were handed on, before the buffer is read
    into again) returns; a reader that wants a read's frames together gathers them until `on_read` (writev
    takes them as they are: moving them together would be one more pass over every byte). A frame is handed
    on only once whole.

    With `gather_s`, a read that found less than GATHER_BYTES waits that long before the next: the engine
    sends a dump in frames of a few KiB as it gets them, and a wake-up per frame (31,000 context switches for
    230 MB) was most of the helper's CPU; a few ms gather many frames. A fast stream is read at once (its
    reads are full), and data waits at most `gather_s` in the socket.

    Returns (stream_complete, problem): complete only when it ended on a frame boundary.
    """
    view = memoryview(bytearray(max(READ_CHUNK, len(buffered))))
    view[: len(buffered)] = buffered
    start, filled = 0, len(buffered)
    pause = 0.0
    try:
        while True:
            start, problem = _hand_out(view, start, filled, on_stdout, on_stderr)
            if problem is not None:
                return False, problem
            if on_read is not None:
                on_read()
            view, start, filled = _room_to_read(view, start, filled)
            if pause:
                time.sleep(pause)
            received = sock.recv_into(view[filled:])
            if not received:
                if filled > start:
                    return False, f"exec stream ended inside a frame ({filled - start} bytes of a partial frame)"
                return True, None
            filled += received
            pause = gather_s if received < GATHER_BYTES else 0.0
    except OSError as exc:
        return False, f"exec stream broke: {exc}"


def _hand_out(view: memoryview, start: int, filled: int, on_stdout: Callable[[memoryview], object],
              on_stderr: Callable[[memoryview], object]) -> tuple[int, str | None]:
    """Hands on the whole frames of view[start:filled], each payload as a view of the buffer (an empty one is
    not handed on); returns where the first partial frame starts, and the problem of a frame of an unknown
    stream type (None when there is none)."""
    while filled - start >= HEADER.size:
        kind, size = HEADER.unpack_from(view, start)
        end = start + HEADER.size + size
        if end > filled:
            break
        if kind == STREAM_STDOUT:
            if size:
                on_stdout(view[start + HEADER.size : end])
        elif kind == STREAM_STDERR:
            on_stderr(view[start + HEADER.size : end])
        else:
            return start, f"unexpected stream type {kind} in the exec stream"
        start = end
    return start, None


def _room_to_read(view: memoryview, start: int, filled: int) -> tuple[memoryview, int, int]:
    """The buffer, with room to read into after the partial frame view[start:filled]: the partial frame is
    moved to the front once little room is left (rarely: a copy of at most one frame), into a buffer of its
    own when the frame is larger than the buffer; returns (buffer, start, filled)."""
    if len(view) - filled >= COMPACT_BELOW:
        return view, start, filled
    rest = filled - start
    need = len(view)
    if rest >= HEADER.size:
        need = max(need, HEADER.size + HEADER.unpack_from(view, start)[1] + COMPACT_BELOW)
    if need > len(view):
        bigger = memoryview(bytearray(need))
        bigger[:rest] = view[start:filled]
        return bigger, 0, rest
    if rest:
        view[:rest] = bytes(view[start:filled])  # the two ranges may overlap
    return view, 0, rest


def stream_exec(
    docker_host: str,
    container: str,
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: Callable[[int], bytes] | int | None = None,
    on_stdout: Callable[[memoryview], object],
    on_stderr: Callable[[memoryview], object],
    on_read: Callable[[], object] | None = None,
    user: str | None = None,
    abort: ExecAbort | None = None,
    gather: bool = False,
    on_output_end: Callable[[], object] | None = None,
) -> ExecOutcome:
    """Runs `cmd` in `container`, feeding it from `stdin` (a function returning up to n bytes, b"" at the end,
    or a file descriptor, copied to the end without passing through Python objects) and handing its output
    to the callbacks: views of a reused buffer, valid until `on_read` returns (see _read_frames). With
    `gather`, reads wait a little for more of a stream that comes in small pieces (see _read_frames).

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
        stream_complete, problem = _read_frames(sock, buffered, on_stdout, on_stderr, on_read,
                                                gather_s=GATHER_S if gather else 0.0)
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


class ExecArgs(NamedTuple):
    """The program's arguments (`python -m watcher.dockerexec --help` says what each is)."""

    container: str
    stdin: bool
    env: list[str]
    user: str | None
    seal: bool
    stall_timeout: float | None
    handoff_fd: int | None
    cmd: list[str]


def plain_options(argv: Sequence[str], flags: Collection[str], valued: Collection[str]
                  ) -> tuple[dict[str, list[str]], list[str]] | None:
    """`argv` read the way watcher.commands writes a helper's: options by their full names (`flags` alone, each
    of `valued` with a value that does not start with "-" as the next argument), then "--" and the command.

    Returns ({option given: its values in order, none for a flag}, the command), or None for anything else
    (help, an abbreviation, --name=value, an unknown option, no command), which argparse is then left to read
    with its own answers and messages. Why not argparse alone: its import (with gettext) and its parser cost
    each helper a few ms of CPU at start, on every dump (issue 20).
    """
    options: dict[str, list[str]] = {}
    at = 0
    while at < len(argv):
        arg = argv[at]
        if arg == "--":
            command = list(argv[at + 1:])
            return (options, command) if command else None
        if arg in flags:
            options.setdefault(arg, [])
            at += 1
        elif arg in valued and at + 1 < len(argv) and not argv[at + 1].startswith("-"):
            options.setdefault(arg, []).append(argv[at + 1])
            at += 2
        else:
            return None
    return None


def last(options: Mapping[str, list[str]], name: str) -> str | None:
    """The value given last for option `name` (argparse's rule for an option given twice), None if not given."""
    values = options.get(name)
    return values[-1] if values else None


def _parse_args(argv: Sequence[str] | None) -> ExecArgs:
    """The program's arguments, as argparse reads them (see plain_options); exits 2 with argparse's usage and
    message on arguments it refuses, 0 after --help."""
    given = list(sys.argv[1:] if argv is None else argv)
    plain = plain_options(given, flags=("--stdin", "--seal"),
                          valued=("--container", "--env", "--user", "--stall-timeout", "--handoff-fd"))
    if plain is not None:
        options, cmd = plain
        container, stall_timeout, handoff_fd = (last(options, name)
                                                for name in ("--container", "--stall-timeout", "--handoff-fd"))
        # Without --container, or with a number float() or int() refuses, argparse says what is wrong.
        if container is not None:
            with contextlib.suppress(ValueError):
                return ExecArgs(container, "--stdin" in options, options.get("--env", []), last(options, "--user"),
                                "--seal" in options, None if stall_timeout is None else float(stall_timeout),
                                None if handoff_fd is None else int(handoff_fd), cmd)
    return _parsed_by_argparse(given)


def _parsed_by_argparse(argv: list[str]) -> ExecArgs:
    """_parse_args for what plain_options leaves to argparse (imported here only: see plain_options)."""
    import argparse  # noqa: PLC0415 - see plain_options

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
    parser.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                        help="give up when the output moves nothing for this long (see watcher.stall)")
    parser.add_argument("--handoff-fd", type=int, metavar="FD",
                        help="write to the pipe handed over on this inherited listening socket by "
                             "`python -m watcher.handoff` (restic's command), and send it the exit status; "
                             "stdout is then only watched for restic's end")
    parser.add_argument("cmd", nargs="+")
    args = parser.parse_args(argv)
    return ExecArgs(args.container, args.stdin, args.env, args.user, args.seal, args.stall_timeout, args.handoff_fd,
                    args.cmd)


def exec_env(items: Sequence[str]) -> dict[str, str]:
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


def stall_watchdog(watch: stall.StallWatch | None, program: str) -> contextlib.AbstractContextManager[object]:
    """Nothing without a watch; else a watchdog that ends this program at once, with EXIT_STALLED, when the
    stream stalls (its main thread may be blocked in a write that only the reader could end)."""
    if watch is None:
        return contextlib.nullcontext()

    def give_up() -> None:
        print(f"backup-watcher: {watch.problem(program)}", file=sys.stderr, flush=True)
        os._exit(stall.EXIT_STALLED)

    return stall.Watchdog(watch, give_up, stall.look_interval(watch.bound_s))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of `python -m watcher.dockerexec`; returns the process exit status."""
    args = _parse_args(argv)
    # The copy loop makes no reference cycles; collections would only walk the views and tuples of each read.
    gc.disable()
    env = exec_env(args.env)
    cmd: Sequence[str] = args.cmd
    seal: bytes | None = None
    if args.seal:
        seal = random_token().encode()
        env[SEAL_VARIABLE] = seal.decode()
        cmd = sealed_command(args.cmd)
    # The payload goes from the read buffer to restic's pipe in one writev per read, never through bytes objects.
    destination, handoff = destination_for(args.handoff_fd, sys.stdout.fileno(), args.stall_timeout)
    status = _streamed(args, cmd, env, destination, seal)
    if status == 0:
        status = _finished(destination, args)
    return status if handoff is None else delivered(handoff, status)


def _streamed(args: ExecArgs, cmd: Sequence[str], env: Mapping[str, str], destination: Destination,
              seal: bytes | None) -> int:
    """Runs the exec and streams it to `destination`, anew from its start when an early start had to abandon it
    (handoff.RestartDump); returns the program's exit status for it."""
    while True:
        try:
            return _attempt(args, cmd, env, destination, seal)
        except RestartDump:
            if not restarting(destination, args.cmd[0]):
                return EXIT_ENGINE_ERROR


def _attempt(args: ExecArgs, cmd: Sequence[str], env: Mapping[str, str], destination: Destination,
             seal: bytes | None) -> int:
    """One run of the exec streamed to `destination`; returns the program's exit status for it, raises
    RestartDump."""
    sealer = SealedOutput(seal, lambda _piece: None) if seal is not None else None  # only its pass_on is used
    out = GatheredWrites(destination, sealer)
    on_read: Callable[[], object] = out.flush
    on_stderr: Callable[[memoryview], object] = write_err
    watch = stall.monotonic_watch(args.stall_timeout) if args.stall_timeout else None
    if watch is not None:
        # Each read counts as progress; the write that may block (restic not taking data) is the flush.
        flush_counted = watch.counting(lambda _read: out.flush())
        on_read, on_stderr = (lambda: flush_counted(None)), watch.counting(on_stderr)
    try:
        with stall_watchdog(watch, args.cmd[0]):
            outcome = stream_exec(
                os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST, args.container, cmd, env=env,
                stdin=sys.stdin.fileno() if args.stdin else None,
                on_stdout=out.pieces.append, on_stderr=on_stderr, on_read=on_read, user=args.user, gather=True,
            )
    except (DockerExecError, HandOffError) as exc:
        print(f"backup-watcher: {exc}", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    except BrokenPipeError:
        print("backup-watcher: the reader of the exec's output went away", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    return _exit_status(outcome, sealer, args.cmd[0], args.container)


def _finished(destination: Destination, args: ExecArgs) -> int:
    """Writes what a whole dump left read ahead (restic may still be opening the repository); returns 0, or
    EXIT_ENGINE_ERROR when restic did not take it."""
    try:
        destination.finish()
    except HandOffError as exc:
        print(f"backup-watcher: {exc}", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    except BrokenPipeError:
        print("backup-watcher: the reader of the exec's output went away", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    return 0


def write_err(data: bytes | memoryview) -> None:
    """Passes a command's stderr on to ours at once (restic shows it, the watcher keeps its tail)."""
    stderr = sys.stderr.buffer
    stderr.write(data)
    stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
