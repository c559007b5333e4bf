"""The Docker events subscription: container events into the daemon's queue, reconnecting forever.

docker-py's events generator simply ends, without an exception, when the connection drops; both
an end and an error count as a disconnect, followed by a reconnect with exponential backoff.
After every (re)connect the daemon is asked to reconcile against a full container list, so
events missed while disconnected (or dropped by the engine, which keeps only its last 256 and
drops slow readers) cannot leave the registry wrong. The subscription is opened before that list
is taken, so nothing falls between the two; handlers are idempotent by container id, which makes
any duplicate harmless.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.adapters
import requests.exceptions
import structlog
from urllib3.connection import HTTPConnection

log = structlog.get_logger("watcher.events")
ACTIONS = ("start", "die", "stop", "destroy", "rename", "health_status")
MAX_BACKOFF_SECONDS = 30.0
# An idle event stream is normal (no container changed for hours), so its read has no timeout (docker-py asks
# for none). Over tcp:// a peer that vanished without closing the connection (its host or a NAT on the way
# gone) would leave that read waiting for ever, the stream still counted as connected and never reconnected.
# The kernel probes an idle connection instead: a dead one fails the read within IDLE + COUNT * INTERVAL
# seconds (2 min), and the stream reconnects. A unix socket's peer cannot vanish that way.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 60, 10, 6
KEEPALIVE_OPTIONS = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
)


class _ProbedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections have the kernel probe them when idle (KEEPALIVE_OPTIONS)."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs["socket_options"] = [*HTTPConnection.default_socket_options, *KEEPALIVE_OPTIONS]
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


def events_client(docker_host: str, version: str = "auto") -> docker.APIClient:
    """The Docker API client of the event stream: over tcp:// its connections are probed when idle (see
    KEEPALIVE_OPTIONS). Raises docker.errors.DockerException (`version` auto: the engine is asked for it)."""
    client = docker.APIClient(base_url=docker_host, timeout=30, version=version)
    if str(client.base_url).startswith("http://"):
        client.mount("http://", _ProbedAdapter())
    return client


@dataclass(frozen=True)
class ContainerEvent:
    """One container event: action (without the health detail), container id, names."""

    action: str
    container_id: str
    name: str | None
    old_name: str | None = None

    @classmethod
    def from_docker(cls, raw: dict[str, object]) -> ContainerEvent | None:
        """Builds one from a decoded Docker event; None for events that are not about containers."""
        if raw.get("Type") != "container":
            return None
        actor = raw.get("Actor") or {}
        assert isinstance(actor, dict)
        attributes = actor.get("Attributes") or {}
        action = str(raw.get("Action") or raw.get("status") or "").split(":", 1)[0]
        container_id = str(actor.get("ID") or raw.get("id") or "")
        if not action or not container_id:
            return None
        old_name = attributes.get("oldName")
        return cls(action, container_id, attributes.get("name"),
                   str(old_name).lstrip("/") if old_name else None)


@dataclass(frozen=True)
class StreamConnected:
    """The stream is (re)connected: reconcile now."""


@dataclass(frozen=True)
class StreamDisconnected:
    """The stream ended or failed; it is being reconnected."""


StreamMessage = ContainerEvent | StreamConnected | StreamDisconnected


class EventStream:
    """A background thread that feeds ContainerEvent, StreamConnected and StreamDisconnected to `sink`.

    The thread only puts messages: everything the daemon knows is changed by the daemon's loop.
    """

    def __init__(self, docker_host: str, sink: Callable[[StreamMessage], None]) -> None:
        self._docker_host = docker_host
        self._sink = sink
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: object | None = None
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)

    def start(self) -> None:
        """Starts the subscription thread."""
        self._thread.start()

    def stop(self) -> None:
        """Ends the subscription (closing the open stream, so the thread does not wait for an event)."""
        self._stop.set()
        with self._lock:
            stream = self._stream
        close = getattr(stream, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:
                log.debug("event_stream_close_failed", error=str(exc))
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            client: docker.APIClient | None = None
            connected = False
            try:
                client = events_client(self._docker_host)
                stream = client.events(decode=True, filters={"type": "container", "event": list(ACTIONS)})
                with self._lock:
                    self._stream = stream
                log.info("event_stream_connected", docker_host=self._docker_host)
                self._sink(StreamConnected())
                connected = True
                backoff = 0.5
                for raw in stream:
                    if self._stop.is_set():
                        break
                    event = ContainerEvent.from_docker(raw) if isinstance(raw, dict) else None
                    if event is not None:
                        self._sink(event)
                if not self._stop.is_set():
                    log.warning("event_stream_ended", docker_host=self._docker_host)
            except (docker.errors.DockerException, requests.exceptions.RequestException, OSError, ValueError) as exc:
                if not self._stop.is_set():
                    log.warning("event_stream_error", docker_host=self._docker_host,
                                error=str(exc).split("(Caused by", 1)[0].strip(), retry_in_s=backoff)
            finally:
                with self._lock:
                    self._stream = None
                if connected:
                    self._sink(StreamDisconnected())
                if client is not None:
                    client.close()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
