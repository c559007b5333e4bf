"""Prometheus metrics (SPEC §7) and the HTTP endpoint that serves them with /healthz and /status.

Everything is defined once against an injected CollectorRegistry. Per-target gauges are rendered
at scrape time from the target registry's cached view, so a scrape never runs restic or calls
Docker, snapshot ages are always current, and a destroyed target's series simply stop. Counters
and histograms keep their totals and are removed explicitly when a target is destroyed.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from watcher.progress import ProgressBoard
from watcher.registry import STATES, DatabaseState, Registry

PREFIX = "backup_watcher_"
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
# A client's whole request is read within this long, and each write waits at most this long: a client that
# connects and sends no whole request (a scanner, a peer gone without a FIN, one that sends a byte now and
# then) would otherwise hold its handler thread and socket for ever. Generous against a scrape: the answer
# is made in memory, never by restic or Docker.
REQUEST_TIMEOUT_SECONDS = 30.0
# Connections served at once; Prometheus, a healthcheck and an operator's curl need a few.
MAX_CONNECTIONS = 32
# Of them, these only a peer on the loopback takes: the image's healthcheck and a one-shot command in the
# container (`status`, the refresh) are answered while a flood from the network holds all the others (a
# healthcheck closed unanswered three times in a row is an unhealthy container, which Swarm replaces).
LOOPBACK_RESERVE = 4


def is_loopback(client_address: Any) -> bool:
    """Whether a connection's peer address is on the loopback (127.0.0.0/8, ::1, ::ffff:127.x)."""
    try:
        address = ipaddress.ip_address(str(client_address[0]))
    except (ValueError, IndexError, TypeError):
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


class _DeadlineSocketIO(socket.SocketIO):
    """A connection's reads, each waiting at most what is left until `deadline` (time.monotonic)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__(sock, "rb")
        self._deadline = deadline
        self._connection = sock

    def readinto(self, b: Any) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not read in time")
        self._connection.settimeout(left)
        return super().readinto(b)


class TargetCollector(Collector):
    """Renders the per-target gauges from the registry's view at scrape time."""

    def __init__(self, targets: Registry, clock: Callable[[], float] = time.time) -> None:
        self._targets = targets
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        """Yields the gauge families; reads only cached state."""
        now = self._clock()
        # `engine` (SPEC §13) on the per-target gauges: one engine per target, so the rules' and dashboards'
        # joins on (job, instance, target) stay one-to-one.
        per_db = ["target", "database", "engine"]
        success = GaugeMetricFamily(PREFIX + "last_success_timestamp_seconds",
                                    "Unix time of the last successful backup", labels=per_db)
        failure = GaugeMetricFamily(PREFIX + "last_failure_timestamp_seconds",
                                    "Unix time of the last failed backup", labels=per_db)
        snapshot = GaugeMetricFamily(PREFIX + "last_snapshot_timestamp_seconds",
                                     "Unix time of the newest snapshot in the repository", labels=per_db)
        age = GaugeMetricFamily(PREFIX + "snapshot_age_seconds",
                                "Seconds since the newest snapshot in the repository", labels=per_db)
        interval = GaugeMetricFamily(PREFIX + "schedule_interval_seconds",
                                     "Longest gap between two scheduled backups", labels=["target", "engine"])
        next_run = GaugeMetricFamily(PREFIX + "next_run_timestamp_seconds",
                                     "Unix time of the next scheduled backup", labels=["target", "engine"])
        failures = GaugeMetricFamily(PREFIX + "consecutive_failures",
                                     "Backups failed in a row (0 when the last one succeeded)",
                                     labels=["target", "engine"])
        anomaly = GaugeMetricFamily(PREFIX + "size_anomaly",
                                    "1 while the newest dump is a flagged shrunken dump (WATCHER_SHRINK_THRESHOLD)",
                                    labels=["target", "database"])
        states = GaugeMetricFamily(PREFIX + "targets", "Watched containers by state", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        for entry in self._targets.view():
            counts[entry.state] += 1
            if entry.target is None:
                continue
            engine = entry.target.engine
            if entry.interval_s is not None:
                interval.add_metric([entry.name, engine], entry.interval_s)
            if entry.next_run is not None and not entry.stopped:
                next_run.add_metric([entry.name, engine], entry.next_run.timestamp())
            failures.add_metric([entry.name, engine], entry.consecutive_failures)
            for database, db in sorted(entry.databases.items()):
                _add_database_series([entry.name, database, engine], db, now, success=success, failure=failure,
                                     snapshot=snapshot, age=age, anomaly=anomaly)
        for state, count in counts.items():
            states.add_metric([state], count)
        yield from (success, failure, snapshot, age, interval, next_run, failures, anomaly, states)


def _add_database_series(labels: list[str], db: DatabaseState, now: float, *, success: GaugeMetricFamily,
                         failure: GaugeMetricFamily, snapshot: GaugeMetricFamily, age: GaugeMetricFamily,
                         anomaly: GaugeMetricFamily) -> None:
    """Adds one database's samples (`labels`: target, database, engine) to the per-database families, where it
    has a value for them."""
    if db.last_success is not None:
        success.add_metric(labels, db.last_success.timestamp())
    if db.last_failure is not None:
        failure.add_metric(labels, db.last_failure.timestamp())
    if db.last_snapshot is not None:
        snapshot.add_metric(labels, db.last_snapshot.timestamp())
        age.add_metric(labels, max(0.0, now - db.last_snapshot.timestamp()))
    if db.size_anomaly is not None:
        anomaly.add_metric(labels[:2], 1 if db.size_anomaly else 0)  # (target, database): as SPEC §11 names it


class RunningJobCollector(Collector):
    """Renders the running jobs from the progress board at scrape time: a job's series exist while it
    runs and are gone the moment it ends."""

    def __init__(self, board: ProgressBoard) -> None:
        self._board = board

    def collect(self) -> Iterator[Metric]:
        """Yields job_running, job_bytes_done and job_started_timestamp_seconds per running job."""
        labels = ["target", "database", "kind"]
        running = GaugeMetricFamily(PREFIX + "job_running", "1 while a job runs", labels=labels)
        done = GaugeMetricFamily(PREFIX + "job_bytes_done", "Bytes of its stream a running job has passed",
                                 labels=labels)
        started = GaugeMetricFamily(PREFIX + "job_started_timestamp_seconds", "Unix time a running job started",
                                    labels=labels)
        for job in self._board.running():
            values = [job.target, job.database, job.kind]
            running.add_metric(values, 1)
            done.add_metric(values, job.bytes_done)
            started.add_metric(values, job.started_at.timestamp())
        yield from (running, done, started)


# One history of one copy: (copy, target, database, Unix time of the newest snapshot it holds or None, lag in s).
CopyRow = tuple[str, str, str, float | None, float]


class CopyCollector(Collector):
    """Renders the copies' gauges (SPEC §12) at scrape time from the rows its source gives (cached state)."""

    def __init__(self, rows: Callable[[], Iterable[CopyRow]]) -> None:
        self._rows = rows

    def collect(self) -> Iterator[Metric]:
        """Yields the copies' gauge families."""
        labels = ["copy", "target", "database"]
        newest = GaugeMetricFamily(PREFIX + "copy_last_success_timestamp_seconds",
                                   "Unix time of the newest snapshot of the history the copy holds", labels=labels)
        lag = GaugeMetricFamily(PREFIX + "copy_lag_seconds",
                                "Seconds the oldest snapshot the copy lacks has waited (0: it holds every one)",
                                labels=labels)
        for copy, target, database, copied, lag_s in self._rows():
            if copied is not None:
                newest.add_metric([copy, target, database], copied)
            lag.add_metric([copy, target, database], lag_s)
        yield from (newest, lag)


class Metrics:
    """Every metric of the watcher, registered on one CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry, targets: Registry, *, version: str,
                 clock: Callable[[], float] = time.time, progress: ProgressBoard | None = None) -> None:
        self.registry = registry
        # The *_created series double the output and no dashboard or rule reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        per_db = ["target", "database"]
        self.backups = Counter(PREFIX + "backups", "Backups by result", [*per_db, "result"], registry=registry)
        self.backup_duration = Histogram(PREFIX + "backup_duration_seconds", "Duration of one database's backup",
                                         per_db, buckets=DURATION_BUCKETS, registry=registry)
        self.bytes_processed = Counter(PREFIX + "backup_bytes_processed", "Dump bytes read by restic",
                                       per_db, registry=registry)
        self.bytes_added = Counter(PREFIX + "backup_bytes_added", "Bytes added to the repository (packed)",
                                   per_db, registry=registry)
        self.prunes = Counter(PREFIX + "prunes", "Retention runs (forget + prune) by result", ["result"],
                              registry=registry)
        self.prune_last_success = Gauge(PREFIX + "prune_last_success_timestamp_seconds",
                                        "Unix time of the last successful retention run", registry=registry)
        self.drills = Counter(PREFIX + "restore_drills", "Restore drills by result", [*per_db, "result"],
                              registry=registry)
        self.drill_last_success = Gauge(PREFIX + "restore_drill_last_success_timestamp_seconds",
                                        "Unix time of the last successful restore drill", per_db, registry=registry)
        self.drill_duration = Gauge(PREFIX + "restore_drill_duration_seconds", "Duration of the last restore drill",
                                    per_db, registry=registry)
        self.events_connected = Gauge(PREFIX + "docker_events_connected",
                                      "1 while the Docker event stream is connected", registry=registry)
        self.events = Counter(PREFIX + "docker_events", "Docker container events received", ["action"],
                              registry=registry)
        self.repository_size = Gauge(PREFIX + "repository_size_bytes", "Size of the repository's packed data",
                                     registry=registry)
        self.repository_snapshots = Gauge(PREFIX + "repository_snapshots", "Snapshots in the repository",
                                          registry=registry)
        self.notifications = Counter(PREFIX + "notifications", "Alert notifications by result", ["result"],
                                     registry=registry)
        self.build_info = Gauge(PREFIX + "build_info", "Versions of the watcher and of restic",
                                ["version", "restic_version"], registry=registry)
        self.copies = Counter(PREFIX + "copies", "Runs of a copy (SPEC §12) by result", ["copy", "result"],
                              registry=registry)
        for result in ("success", "failure"):
            self.prunes.labels(result)
            self.notifications.labels(result)
        self._version = version
        self._series: dict[str, set[str]] = {}
        self._copy_rows: Callable[[], Iterable[CopyRow]] = tuple
        registry.register(TargetCollector(targets, clock))
        registry.register(RunningJobCollector(progress or ProgressBoard()))
        registry.register(CopyCollector(self._current_copy_rows))

    def _current_copy_rows(self) -> Iterable[CopyRow]:
        return self._copy_rows()

    def watch_copies(self, names: Iterable[str], rows: Callable[[], Iterable[CopyRow]]) -> None:
        """Publishes the copies `names` (their runs counted from 0) and their histories' gauges from `rows`."""
        for name in names:
            for result in ("success", "failure"):
                self.copies.labels(name, result)
        self._copy_rows = rows

    def set_restic_version(self, restic_version: str) -> None:
        """Publishes build_info{version,restic_version} = 1."""
        self.build_info.clear()
        self.build_info.labels(self._version, restic_version).set(1)

    def observe_backup(self, target: str, database: str, ok: bool, duration_s: float,
                       bytes_processed: int, bytes_added: int) -> None:
        """Counts one backup result."""
        self._series.setdefault(target, set()).add(database)
        # Both results exist from the first observation on, so increase() sees the first failure too.
        for result in ("success", "failure"):
            self.backups.labels(target, database, result)
        self.backups.labels(target, database, "success" if ok else "failure").inc()
        self.backup_duration.labels(target, database).observe(duration_s)
        if ok:
            self.bytes_processed.labels(target, database).inc(bytes_processed)
            self.bytes_added.labels(target, database).inc(bytes_added)

    def observe_drill(self, target: str, database: str, ok: bool, duration_s: float, finished_at: float) -> None:
        """Counts one restore drill result."""
        self._series.setdefault(target, set()).add(database)
        for result in ("success", "failure"):
            self.drills.labels(target, database, result)
        self.drills.labels(target, database, "success" if ok else "failure").inc()
        self.drill_duration.labels(target, database).set(duration_s)
        if ok:
            self.drill_last_success.labels(target, database).set(finished_at)

    def forget_target(self, target: str) -> None:
        """Removes every series of a destroyed target, so labels stay bounded."""
        for database in self._series.pop(target, set()):
            self._remove_series(target, database)

    def forget_database(self, target: str, database: str) -> None:
        """Removes the series of one database that is gone from its container."""
        self._series.get(target, set()).discard(database)
        self._remove_series(target, database)

    def _remove_series(self, target: str, database: str) -> None:
        for result in ("success", "failure"):
            for counter in (self.backups, self.drills):
                with contextlib.suppress(KeyError):
                    counter.remove(target, database, result)
        for metric in (self.backup_duration, self.bytes_processed, self.bytes_added,
                       self.drill_last_success, self.drill_duration):
            with contextlib.suppress(KeyError):
                metric.remove(target, database)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    timeout = REQUEST_TIMEOUT_SECONDS  # set on the connection before the request is read (StreamRequestHandler)

    def setup(self) -> None:
        super().setup()
        # A bound per read alone lets a client that sends a byte before each read's bound ends hold the thread:
        # the request's reads share one deadline.
        self.rfile.close()
        deadline = time.monotonic() + (self.timeout or REQUEST_TIMEOUT_SECONDS)
        self.rfile = io.BufferedReader(_DeadlineSocketIO(self.connection, deadline))

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # The request's head is read: the answer's writes get the whole bound of their own, not what the reads
        # left of theirs (a body's reads still keep to the request's deadline: _DeadlineSocketIO).
        self.connection.settimeout(self.timeout)
        return ok

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        elif path == "/healthz":
            healthy, detail = self.server.health()
            self._send(200 if healthy else 503, "text/plain; charset=utf-8", detail.encode())
        elif path == "/status":
            body = json.dumps(self.server.status(), indent=2, default=str).encode()
            self._send(200, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /status\n")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] == "/refresh":
            # A one-shot command changed the repository; the loop lists it (once, however often asked).
            self.server.refresh()
            self._send(202, "text/plain; charset=utf-8", b"the repository will be listed again\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: POST /refresh is the only POST\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Scrapes every 15 s would drown the log; errors still surface through log_error.
        return


class MetricsServer(ThreadingHTTPServer):
    """Serves /metrics, /healthz, /status (and POST /refresh) on a background thread, a thread per connection,
    at most MAX_CONNECTIONS at once (a connection beyond them is closed at once, unanswered)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 health: Callable[[], tuple[bool, str]], status: Callable[[], object],
                 refresh: Callable[[], None] = lambda: None) -> None:
        super().__init__((host, port), _Handler)
        self.registry = registry
        self.health = health
        self.status = status
        self.refresh = refresh
        self._thread = threading.Thread(target=self.serve_forever, name="metrics-http", daemon=True)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        # Taken besides a slot by a peer off the loopback: LOOPBACK_RESERVE slots stay for the loopback.
        self._remote_slots = threading.BoundedSemaphore(max(1, MAX_CONNECTIONS - LOOPBACK_RESERVE))

    def _take_slot(self, client_address: Any) -> bool:
        remote = not is_loopback(client_address)
        if remote and not self._remote_slots.acquire(blocking=False):
            return False
        if self._slots.acquire(blocking=False):
            return True
        if remote:
            self._remote_slots.release()
        return False

    def _give_slot(self, client_address: Any) -> None:
        # The same address as when it was taken: the same kind of slot.
        self._slots.release()
        if not is_loopback(client_address):
            self._remote_slots.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        # The port is often open to a network (0.0.0.0 in the image): a flood of connections, each held up to
        # REQUEST_TIMEOUT_SECONDS, must not become as many threads in the daemon.
        if not self._take_slot(client_address):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._give_slot(client_address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._give_slot(client_address)

    def start(self) -> None:
        """Starts serving in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stops serving (if it started: shutdown() of a server that never served waits for ever) and closes
        the socket."""
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()
