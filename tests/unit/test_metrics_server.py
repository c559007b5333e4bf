"""The daemon's HTTP server (watcher.metrics.MetricsServer) bounds every wait on a client's connection: a client
that connects and never sends a whole request must not hold a handler thread and its socket for ever."""

from __future__ import annotations

import select
import socket
import time

import pytest
from prometheus_client import CollectorRegistry

import watcher.metrics
from watcher.metrics import REQUEST_TIMEOUT_SECONDS, MetricsServer, _Handler


def test_a_connection_waits_within_the_request_bound() -> None:
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok\n"), lambda: [])
    ours, client = socket.socketpair()
    try:
        # A whole request is there already: the handler answers it at once, on the connection it was given.
        client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        _Handler(ours, ("127.0.0.1", 0), server)
        # None would wait for ever on a silent client; the reads share one deadline, so what is left of it.
        timeout = ours.gettimeout()
        assert timeout is not None and 0 < timeout <= REQUEST_TIMEOUT_SECONDS
        assert client.recv(4096).startswith(b"HTTP/1.0 200 ")
    finally:
        ours.close()
        client.close()
        server.server_close()


def test_a_client_that_sends_a_byte_now_and_then_is_cut_off_at_the_request_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Handler, "timeout", 0.5)
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok\n"), lambda: [])
    server.start()
    started = time.monotonic()
    try:
        # A byte every 0.1 s, each read's own bound (0.5 s) never reached; 60 bytes take 6 s.
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as client, \
                pytest.raises(OSError):
            for byte in b"GET /healthz HTTP/1.0\r\nX-Slow: " + b"x" * 60:
                client.sendall(bytes([byte]))
                time.sleep(0.1)
                if select.select([client], [], [], 0)[0] and not client.recv(1):
                    raise ConnectionResetError("closed by the server")
        assert time.monotonic() - started < 5, "cut off long before the slow request could end"
    finally:
        server.stop()


def test_a_whole_request_is_answered_within_the_bound_however_it_is_split() -> None:
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok\n"), lambda: [])
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as client:
            for piece in (b"GET /hea", b"lthz HTTP/1.0\r", b"\n\r\n"):
                client.sendall(piece)
                time.sleep(0.05)
            assert client.recv(4096).startswith(b"HTTP/1.0 200 ")
    finally:
        server.stop()


def test_connections_beyond_the_cap_are_closed_unanswered_and_their_slots_come_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher.metrics, "MAX_CONNECTIONS", 2)
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok\n"), lambda: [])
    server.start()
    address = ("127.0.0.1", server.server_address[1])
    try:
        silent = [socket.create_connection(address, timeout=10) for _ in range(2)]  # each holds a handler thread
        time.sleep(0.2)  # let the server accept both before the third
        with socket.create_connection(address, timeout=10) as third:
            assert third.recv(1) == b""  # closed by the server at once, not left waiting for a request
        for client in silent:
            client.close()

        def answered() -> bool:
            with socket.create_connection(address, timeout=10) as client:
                client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                return client.recv(4096).startswith(b"HTTP/1.0 200 ")

        deadline = time.monotonic() + 10
        while not answered():  # the silent ones' threads end when their clients close
            assert time.monotonic() < deadline, "the slots never came back"
            time.sleep(0.1)
    finally:
        server.stop()
