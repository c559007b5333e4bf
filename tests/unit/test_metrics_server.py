"""The daemon's HTTP server (watcher.metrics.MetricsServer) bounds every wait on a client's connection: a client
that connects and never sends a whole request must not hold a handler thread and its socket for ever."""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry

from watcher.metrics import REQUEST_TIMEOUT_SECONDS, MetricsServer, _Handler


def test_a_connection_waits_within_the_request_bound() -> None:
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok\n"), lambda: [])
    ours, client = socket.socketpair()
    try:
        # A whole request is there already: the handler answers it at once, on the connection it was given.
        client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        _Handler(ours, ("127.0.0.1", 0), server)
        assert ours.gettimeout() == REQUEST_TIMEOUT_SECONDS  # None would wait for ever on a silent client
        assert client.recv(4096).startswith(b"HTTP/1.0 200 ")
    finally:
        ours.close()
        client.close()
        server.server_close()
