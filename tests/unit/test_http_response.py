"""The Engine API client's reading of HTTP/1.1 answers (watcher.dockerexec.http_response): whole or not yet;
what it says when the socket cannot be reached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher.dockerexec import DockerExecError, api_call, http_response, socket_hint

CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: Chunked\r\n\r\n"
           b"5\r\n[{\"a\"\r\n6;ext=1\r\n: 1}]\n\r\n0\r\n\r\n")


def test_content_length_body_is_whole_only_when_all_bytes_came() -> None:
    answer = b'HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\n{"Id":"ab"}'
    assert http_response(answer) == (201, b'{"Id":"ab"}')
    assert http_response(answer[:-1]) is None
    assert http_response(answer[:20]) is None  # inside the header


def test_chunked_body_is_joined_and_waits_for_the_last_chunk() -> None:
    assert http_response(CHUNKED) == (200, b'[{"a": 1}]\n')
    for cut in range(CHUNKED.index(b"\r\n\r\n") + 4, len(CHUNKED) - 1):
        assert http_response(CHUNKED[:cut]) is None, cut


def test_no_content_and_error_answers() -> None:
    assert http_response(b"HTTP/1.1 204 No Content\r\n\r\n") == (204, b"")
    refused = b'HTTP/1.1 404 Not Found\r\nContent-Length: 29\r\n\r\n{"message":"No such exec: x"}'
    assert http_response(refused) == (404, b'{"message":"No such exec: x"}')


def test_body_without_length_is_not_whole_before_the_connection_ends() -> None:
    assert http_response(b"HTTP/1.0 200 OK\r\n\r\n{}") is None


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.2\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n"])
def test_what_is_no_http_response_is_refused(garbage: bytes) -> None:
    with pytest.raises(ValueError, match="not an HTTP response"):
        http_response(garbage)


def test_a_missing_socket_says_to_mount_it(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    with pytest.raises(DockerExecError) as caught:
        api_call(f"unix://{path}", "GET", "/version", timeout=5)
    assert f"DOCKER_HOST=unix://{path}" in str(caught.value)
    assert f"there is no socket at {path}" in str(caught.value) and "-v /var/run/docker.sock" in str(caught.value)


def test_a_refused_socket_says_which_group_to_add(tmp_path: Path) -> None:
    # Root connects to any socket, so the refusal is given; the hint names the socket's own group.
    path = tmp_path / "docker.sock"
    path.touch()
    hint = socket_hint(str(path), PermissionError(13, "Permission denied"))
    assert f"uid {os.getuid()}" in hint and f"--group-add {path.stat().st_gid}" in hint
    assert "--group-add \"$(stat -c %g /gone/docker.sock)\"" in socket_hint("/gone/docker.sock",
                                                                             PermissionError(13, "Permission denied"))
    assert socket_hint(str(path), ConnectionRefusedError(111, "Connection refused")) == ""
