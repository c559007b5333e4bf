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
        # None would wait for ever on a silent client; the reads share one deadline, and the answer's writes,
        # once the request was read, have the whole bound.
        assert ours.gettimeout() == REQUEST_TIMEOUT_SECONDS
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
    monkeypatch.setattr(watcher.metrics, "LOOPBACK_RESERVE", 0)
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


def test_a_flood_from_the_network_leaves_the_loopback_its_reserved_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    # The image's healthcheck comes on the loopback: a flood that holds every other slot must not make the
    # container unhealthy. The test's connections all come from 127.0.0.1: those bound to a port of `remote`
    # pass for a network's.
    remote: set[int] = set()
    monkeypatch.setattr(watcher.metrics, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(watcher.metrics, "LOOPBACK_RESERVE", 1)
    monkeypatch.setattr(watcher.metrics, "is_loopback", lambda address: address[1] not in remote)
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok\n"), lambda: [])
    server.start()
    address = ("127.0.0.1", server.server_address[1])

    def from_network() -> socket.socket:
        client = socket.socket()
        client.settimeout(10)
        client.bind(("127.0.0.1", 0))
        remote.add(client.getsockname()[1])
        client.connect(address)
        return client

    def answered() -> bool:
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            return client.recv(4096).startswith(b"HTTP/1.0 200 ")

    try:
        flood = [from_network() for _ in range(2)]  # each holds a handler thread, and all the network's slots
        with from_network() as third:
            assert third.recv(1) == b"", "beyond the network's slots: closed at once"
        assert answered(), "the loopback's reserved slot"
        for client in flood:
            client.close()
        deadline = time.monotonic() + 10
        while True:  # the flood's slots come back: the network is answered again
            with from_network() as client:
                client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                if client.recv(4096).startswith(b"HTTP/1.0 200 "):
                    break
            assert time.monotonic() < deadline, "the network's slots never came back"
            time.sleep(0.1)
    finally:
        server.stop()


def test_loopback_peers_are_told_from_others() -> None:
    from watcher.metrics import is_loopback
    assert is_loopback(("127.0.0.1", 1)) and is_loopback(("127.1.2.3", 1)) and is_loopback(("::1", 1, 0, 0))
    assert is_loopback(("::ffff:127.0.0.1", 1, 0, 0))
    assert not is_loopback(("172.17.0.1", 1)) and not is_loopback(("::ffff:10.0.0.1", 1, 0, 0))
    assert not is_loopback(("", 0)) and not is_loopback(())
