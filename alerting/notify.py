"""Delivery through Apprise: asynchronous to the jobs, bounded in time and queue, failures only logged.

A notification that cannot be delivered is a warning and a counted failure; it never changes the
outcome of the job it is about, and it never blocks one: `send` only enqueues.
"""

from __future__ import annotations

import queue
import re
import threading
import urllib.parse
from collections.abc import Callable, Sequence

import structlog

from alerting.policy import Alert

log = structlog.get_logger("alerting.notify")
QUEUE_LIMIT = 200
DELIVERY_TIMEOUT_SECONDS = 30.0


def url_secret_parts(url: str) -> list[str]:
    """The parts of an Apprise URL that may be secret: password, query values, long path tokens.

    Used to mask them everywhere; an Apprise URL is a secret as a whole and in its parts.
    """
    parts = [url]
    parsed = urllib.parse.urlsplit(url)
    if parsed.password:
        parts.append(parsed.password)
    for _, value in urllib.parse.parse_qsl(parsed.query):
        if len(value) >= 6:
            parts.append(value)
    # Webhook tokens live in the path (discord://id/token, slack://a/b/c, json://host/path?...).
    parts += [segment for segment in re.split(r"[/@:]", parsed.netloc + parsed.path) if len(segment) >= 16]
    return parts


def scheme_of(url: str) -> str:
    """The scheme of a URL, to name it in an error without revealing anything else."""
    return url.split("://", 1)[0] if "://" in url else "(none)"


def validate(urls: Sequence[str], config_path: str | None) -> list[str]:
    """Returns configuration problems of Apprise targets, naming them by position and scheme only."""
    problems: list[str] = []
    if not urls and not config_path:
        return problems
    import apprise  # 60 ms of imports that a configuration without alerts never needs

    for index, url in enumerate(urls, start=1):
        if not apprise.Apprise().add(url):
            problems.append(f"WATCHER_APPRISE_URLS: entry #{index} (scheme {scheme_of(url)!r}) is not a valid "
                            "Apprise URL")
    if config_path:
        loaded = apprise.AppriseConfig()
        if not loaded.add(config_path):
            problems.append(f"WATCHER_APPRISE_CONFIG={config_path!r}: cannot be read as an Apprise config")
        else:
            servers = apprise.Apprise()
            servers.add(loaded)
            if len(servers) == 0:
                problems.append(f"WATCHER_APPRISE_CONFIG={config_path!r}: defines no valid notification URL")
    return problems


class Notifier:
    """Delivers alerts on a background thread; `send` never blocks and never raises."""

    def __init__(self, urls: Sequence[str], config_path: str | None, *, mask: Callable[[str], str],
                 on_result: Callable[[bool], None] | None = None,
                 timeout_s: float = DELIVERY_TIMEOUT_SECONDS) -> None:
        import apprise  # see validate()

        self._apprise = apprise.Apprise()
        for url in urls:
            self._apprise.add(url)
        if config_path:
            loaded = apprise.AppriseConfig()
            loaded.add(config_path)
            self._apprise.add(loaded)
        self._mask = mask
        self._on_result = on_result
        self._timeout_s = timeout_s
        self._queue: queue.Queue[Alert | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._started = False

    @property
    def enabled(self) -> bool:
        """Whether any notification target is configured."""
        return len(self._apprise) > 0

    def start(self) -> None:
        """Starts the delivery thread."""
        if self.enabled and not self._started:
            self._started = True
            self._thread.start()

    def send(self, alert: Alert) -> None:
        """Queues an alert for delivery; drops it (logged) when the queue is full."""
        if not self.enabled:
            return
        self.start()
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            log.warning("notification_dropped", subject=alert.subject, concern=alert.concern.value,
                        kind=alert.kind.value, reason="queue full")
            self._count(False)

    def deliver_now(self, alert: Alert) -> bool:
        """Delivers one alert synchronously (bounded by the timeout); returns whether it was delivered (False,
        without a word or a count, when no target is configured: nothing was meant to go anywhere)."""
        if not self.enabled:
            return False
        return self._deliver(alert)

    def close(self, timeout: float = 10.0) -> None:
        """Delivers what is queued, waiting at most `timeout` seconds, then stops the thread."""
        if not self._started:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            # Unbounded on purpose: an idle thread waiting for work, never a job. close() ends it with None (a
            # daemon thread, it also ends with the process), and each delivery is bounded by _deliver's join.
            alert = self._queue.get()
            if alert is None:
                return
            self._deliver(alert)

    def _deliver(self, alert: Alert) -> bool:
        outcome: list[bool] = []
        title, body = self._mask(alert.title), self._mask(alert.body)

        def attempt() -> None:
            from apprise import NotifyType  # loaded by __init__ already

            try:
                outcome.append(bool(self._apprise.notify(title=title, body=body,
                                                         notify_type=NotifyType(alert.severity.value))))
            except Exception as exc:
                log.warning("notification_error", error=self._mask(f"{type(exc).__name__}: {exc}"))
                outcome.append(False)

        worker = threading.Thread(target=attempt, name="notify-attempt", daemon=True)
        worker.start()
        worker.join(self._timeout_s)
        delivered = bool(outcome) and outcome[0]
        fields = {"subject": alert.subject, "concern": alert.concern.value, "kind": alert.kind.value,
                  "type": alert.severity.value}
        if delivered:
            log.info("notification_sent", **fields)
        elif not outcome:
            log.warning("notification_failed", reason=f"timed out after {self._timeout_s:.0f}s", **fields)
        else:
            log.warning("notification_failed", reason="at least one target refused or was unreachable", **fields)
        self._count(delivered)
        return delivered

    def _count(self, delivered: bool) -> None:
        if self._on_result is not None:
            self._on_result(delivered)
