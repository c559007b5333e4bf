"""A one-shot command tells a daemon on this host that the repository changed: its bare POST /refresh reaches
the daemon's own HTTP server (watcher.metrics), and with no daemon listening nothing happens but a debug line."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest
import structlog.testing
from prometheus_client import CollectorRegistry

from watcher import cli
from watcher.config import load_config
from watcher.metrics import MetricsServer
from watcher.settings import with_flags


def app_for(port: int) -> cli.App:
    """A one-shot command's App whose daemon would listen on loopback `port` (nothing else is reached)."""
    args = cli.build_parser().parse_args(["backup"])
    environ = {"RESTIC_REPOSITORY": "/nonexistent", "RESTIC_PASSWORD": "x", "DOCKER_HOST": "unix:///nonexistent.sock",
               "WATCHER_METRICS_ADDRESS": f"127.0.0.1:{port}"}
    return cli.build_app(load_config(with_flags(environ, cli.settings_given(args))))


def test_the_refresh_request_reaches_the_daemons_server() -> None:
    asked = threading.Event()
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok"), lambda: [], refresh=asked.set)
    server.start()
    try:
        cli._ask_daemon_to_refresh(app_for(server.server_address[1]))
        # The server calls refresh before it answers 202, and the request waited for the answer.
        assert asked.is_set()
    finally:
        server.stop()


def test_no_daemon_is_no_harm() -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with structlog.testing.capture_logs() as logs:
        cli._ask_daemon_to_refresh(app_for(port))  # returns, raises nothing
    assert [entry["event"] for entry in logs] == ["daemon_not_told"]


def test_the_daemons_answer_is_read_whole_however_its_bytes_arrive() -> None:
    def reads(*pieces: bytes) -> Callable[[int], bytes]:
        left = list(pieces)
        return lambda _n: left.pop(0) if left else b""

    answer = b"HTTP/1.0 202 Accepted\r\nContent-Length: 0\r\n\r\n"
    for cut in range(1, len(answer)):
        assert cli.status_line_of(reads(answer[:cut], answer[cut:])) == "HTTP/1.0 202 Accepted"
    assert cli.status_line_of(reads(b"HTTP/1.0 2")) == "HTTP/1.0 2"  # the daemon closed early: what came is the line
    endless = b"x" * 1000
    assert cli.status_line_of(lambda n: endless[:n], limit=10) == "x" * 10  # no line end: at most the limit


def test_a_peer_that_sends_a_byte_at_a_time_is_given_up_on() -> None:
    now = [0.0]

    def drip(_n: int) -> bytes:
        now[0] += 0.5  # each read waits half a second for its byte
        return b"H"

    with pytest.raises(TimeoutError, match="did not come within 2 s"):
        cli.status_line_of(drip, clock=lambda: now[0])
    assert now[0] <= 3.0  # no read started after the bound
