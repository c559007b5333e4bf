"""The Docker event stream's connection (watcher.events): its read has no timeout, an idle stream being normal,
so over tcp:// the kernel must probe it; a peer gone without closing it would otherwise hold the stream for ever."""

from __future__ import annotations

import socket

import requests.adapters

from watcher.events import KEEPALIVE_OPTIONS, events_client


def test_the_event_streams_tcp_connections_are_probed_when_idle() -> None:
    # A version given: nothing is asked of an engine (none listens there).
    client = events_client("tcp://127.0.0.1:9", version="1.41")
    try:
        adapter = client.get_adapter("http://127.0.0.1:9")
        assert isinstance(adapter, requests.adapters.HTTPAdapter)
        options = adapter.poolmanager.connection_pool_kw.get("socket_options", [])
        assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options
        assert set(KEEPALIVE_OPTIONS) <= set(options)
        assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in options, "urllib3's own default stays"
    finally:
        client.close()
