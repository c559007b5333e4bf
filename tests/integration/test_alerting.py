"""Alerts through real Apprise to a JSON webhook and an SMTP server on 127.0.0.1.

End to end, once each: a failing backup, a stale snapshot, bad labels, an unreachable endpoint, and
every kind of alert arriving with its Apprise type (failure, success, warning). The alert policy
itself (one page per failure, one per recovery, reminders, stale absorbed into a failing backup, the
summary at start, the event stream) is tested on a fake clock in tests/unit (test_alert_policy,
test_outcomes).
"""

from __future__ import annotations

import email
import email.header
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from alerting.notify import Notifier
from alerting.policy import Alert, AlertPolicy, Concern, Observation, startup_summary
from tests.integration.conftest import (
    DaemonProcess,
    PgContainer,
    Repo,
    StartDaemon,
    StartPg,
    Webhook,
    docker,
    event_time,
    free_port,
    wait_for,
)

pytestmark = [pytest.mark.engine, pytest.mark.slow]
# Names of this run's containers: sessions beside this one on a shared engine use their own.
RUN = uuid.uuid4().hex[:6]

HOOK_PASSWORD = "hook-s3cret-pw-42"
HOOK_TOKEN = "Tok3nInThePathOfTheWebhook0123"
DB_PASSWORD = "alert-db-pw 'x' $(y)"


class Mailbox:
    """An SMTP server (aiosmtpd) that keeps every message."""

    def __init__(self) -> None:
        messages = self.messages = []  # type: list[email.message.Message]

        class Handler:
            async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
                messages.append(email.message_from_bytes(envelope.content))  # type: ignore[attr-defined]
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()
        self.url = f"mailto://127.0.0.1:{self.port}?from=watcher@example.com&to=ops@example.com"

    def subjects(self) -> list[str]:
        return [str(email.header.make_header(email.header.decode_header(m["Subject"]))) for m in self.messages]

    def bodies(self) -> str:
        texts = []
        for message in self.messages:
            for part in message.walk():
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes):
                    texts.append(payload.decode(errors="replace"))
        return "\n".join(texts)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    """The shared JSON endpoint with a password and a token in its URL: secrets that must never leak."""
    hook = Webhook(user="watcher", password=HOOK_PASSWORD, path=HOOK_TOKEN)
    yield hook
    hook.close()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    yield box
    box.controller.stop()


def _fail_three_times_then_recover(daemon: DaemonProcess, db: PgContainer) -> None:
    """Every backup fails until the dump role exists. Each start of the container backs it up at once
    (it has no snapshot yet): the first at the daemon's start, two more by restarting it."""
    for failures in (1, 2, 3):
        def failed_often_enough(n: int = failures) -> bool:
            # The database's failures: its globals fail beside it, each run.
            return len(daemon.events("backup_failed", target=db.name, database=db.database)) >= n

        wait_for(failed_often_enough, 60, f"failed run {failures}", interval=0.5)
        if failures < 3:
            docker("restart", "-t", "1", db.name)
    db.psql("CREATE ROLE dumper LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO dumper;")
    docker("restart", "-t", "1", db.name)
    wait_for(lambda: daemon.events("backup_succeeded", target=db.name), 60, "the first success", interval=0.5)


def _more_checks(daemon: DaemonProcess, count: int = 3) -> None:
    """Waits until the daemon has judged staleness and reconciled `count` more times."""
    checks, reconciles = len(daemon.events("health_checked")), len(daemon.events("reconciled", reason="periodic"))
    wait_for(lambda: len(daemon.events("health_checked")) >= checks + count and len(
        daemon.events("reconciled", reason="periodic")) >= reconciles + count, 60, f"{count} more checks", interval=0.5)


def test_three_failures_then_success_page_once_and_recover_once(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str], webhook: Webhook,
        mailbox: Mailbox) -> None:
    # The dump role does not exist yet: every backup fails until it is created. The slot is half a day
    # away: only the test starts backups (a failed one is retried after 5 minutes at the soonest).
    db: PgContainer = start_pg(f"bwt-alert{RUN}-db", "17", password=DB_PASSWORD,
                               labels={"backup-watcher.user": "dumper"})
    db.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) AS g;")
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": db.name,
           "WATCHER_SCHEDULE": f"0 {(datetime.now(UTC).hour + 12) % 24} * * *",
           "WATCHER_RECONCILE_INTERVAL": "5", "WATCHER_LOG_LEVEL": "debug",
           "WATCHER_APPRISE_URLS": f"{webhook.url} {mailbox.url}"}
    daemon: DaemonProcess = start_daemon(env)
    _fail_three_times_then_recover(daemon, db)
    wait_for(lambda: len(webhook.received) >= 2 and len(mailbox.messages) >= 2, 30, "both notices", interval=0.5)
    # Nothing more may follow: the prune of the pass that recovered, stale checks, reconciles.
    recovered = event_time(daemon.events("backup_succeeded", target=db.name)[-1])
    wait_for(lambda: [p for p in daemon.events("prune_succeeded") if event_time(p) > recovered], 30, "the prune",
             interval=0.5)
    _more_checks(daemon)
    assert daemon.stop() == 0

    for titles in (webhook.titles(), mailbox.subjects()):
        assert titles == [f"[backup-watcher] FAILED: backup of {db.name}",
                          f"[backup-watcher] RECOVERED: backup of {db.name}"], titles
    assert [item["type"] for item in webhook.received] == ["failure", "success"]
    failure_text = str(webhook.received[0]["message"])
    assert 'role "dumper" does not exist' in failure_text and "What to do:" in failure_text
    assert "after 3 failure(s)" in str(webhook.received[1]["message"])
    assert 'role "dumper" does not exist' in mailbox.bodies()

    # No secret in any alert or log line.
    everything = json.dumps(webhook.received) + mailbox.bodies() + "\n".join(mailbox.subjects())
    everything += daemon.log_path.read_text()
    for secret in (DB_PASSWORD, repo.password, HOOK_PASSWORD, HOOK_TOKEN):
        assert secret not in everything, secret
    assert "notification_sent" in daemon.log_path.read_text()


def test_bad_label_and_stale_snapshot_alert_once_and_unreachable_endpoint_changes_nothing(
        start_pg: StartPg, start_daemon: StartDaemon, repo: Repo, watcher_env: dict[str, str],
        webhook: Webhook) -> None:
    good: PgContainer = start_pg(f"bwt-stale{RUN}-db", "15")
    bad: PgContainer = start_pg(f"bwt-badlabel{RUN}-db", "15", labels={"backup-watcher.keep-daily": "lots"})
    unreachable = f"json://127.0.0.1:{free_port()}/nobody-listens"
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": f"{good.name},{bad.name}",
           "WATCHER_SCHEDULE": "* * * * *", "WATCHER_RECONCILE_INTERVAL": "5", "WATCHER_LOG_LEVEL": "debug",
           "WATCHER_APPRISE_URLS": f"{webhook.url},{unreachable}"}
    daemon: DaemonProcess = start_daemon(env)
    # The healthy target is backed up although one endpoint is unreachable.
    # (Its database's: the pass's last dump, after its globals.)
    wait_for(lambda: daemon.events("backup_succeeded", target=good.name, database=good.database), 60,
             "the healthy backup")
    wait_for(lambda: daemon.events("notification_failed"), 60, "the failed delivery to be logged")
    assert 'backup_watcher_notifications_total{result="failure"}' in daemon.metrics()

    # Stopped after its backup: its newest snapshot grows stale (limit 1.5 x 60 s).
    docker("stop", "-t", "2", good.name)
    wait_for(lambda: any("snapshot stale of" in t for t in webhook.titles()), 150, "the stale alert", interval=1)
    _more_checks(daemon)  # several more stale checks and reconciliations
    assert daemon.stop() == 0

    titles = webhook.titles()
    assert titles.count(f"[backup-watcher] FAILED: labels of {bad.name}") == 1, titles
    assert titles.count(f"[backup-watcher] FAILED: snapshot stale of {good.name}") == 1, titles
    assert webhook.types()[f"[backup-watcher] FAILED: snapshot stale of {good.name}"] == "warning"
    assert webhook.types()[f"[backup-watcher] FAILED: labels of {bad.name}"] == "failure"
    label_text = next(str(m["message"]) for m in webhook.received if "labels of" in str(m["title"]))
    assert "backup-watcher.keep-daily='lots'" in label_text
    assert len(daemon.events("label_invalid", target=bad.name)) == 1
    assert repo.snapshots_of(bad.name) == []


def test_configuration_errors_at_start_are_paged_once_per_cause(watcher_env: dict[str, str], webhook: Webhook,
                                                                 tmp_path: Path) -> None:
    # TMPDIR: where the marker of a paged start-up failure is kept (the container's own /tmp in the image).
    env = {**watcher_env, "WATCHER_SCHEDULE": "every night", "WATCHER_APPRISE_URLS": webhook.url,
           "TMPDIR": str(tmp_path)}

    def start(**changed: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "watcher", "run"], env={**env, **changed}, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)

    done = start()
    assert done.returncode == 2
    assert "WATCHER_SCHEDULE" in done.stderr
    assert webhook.titles() == ["[backup-watcher] FAILED: configuration of backup-watcher"]
    assert webhook.received[0]["type"] == "failure"
    assert "WATCHER_SCHEDULE='every night'" in str(webhook.received[0]["message"])
    assert HOOK_PASSWORD not in json.dumps(webhook.received) + done.stderr + done.stdout
    # A restart policy starts it again: the same cause is not paged again, and its log says so.
    again = start()
    assert again.returncode == 2 and "WATCHER_SCHEDULE" in again.stderr
    assert "not paged again: an earlier start failed the same way" in again.stderr
    assert len(webhook.received) == 1
    # Another cause pages at once.
    other = start(WATCHER_SCHEDULE="0 3 * * *", WATCHER_CONCURRENCY="lots")
    assert other.returncode == 2
    assert len(webhook.received) == 2
    assert "WATCHER_CONCURRENCY='lots'" in str(webhook.received[1]["message"])


def test_invalid_apprise_url_is_a_configuration_error_without_its_secret(watcher_env: dict[str, str]) -> None:
    env = {**watcher_env, "WATCHER_APPRISE_URLS": "jsn://user:very-secret-token@host/x"}
    done = subprocess.run([sys.executable, "-m", "watcher", "check-config"], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "WATCHER_APPRISE_URLS: entry #1 (scheme 'jsn')" in done.stderr
    assert "very-secret-token" not in done.stderr + done.stdout



def _every_kind_of_alert() -> list[Alert]:
    """The alerts the policy sends for a backup that fails, is still failing a day later and recovers, a
    stale snapshot and its recovery, and the summary at start of the targets already stale."""
    policy = AlertPolicy(reminder_after=timedelta(hours=24))
    start = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
    seen = [(Concern.BACKUP, False, 0), (Concern.BACKUP, False, 24), (Concern.BACKUP, True, 25),
            (Concern.STALE, False, 26), (Concern.STALE, True, 27)]
    alerts = [policy.observe(Observation("app-db", concern, ok, start + timedelta(hours=hours), "detail"))
              for concern, ok, hours in seen]
    return [*(alert for alert in alerts if alert is not None),
            startup_summary("db-host", [("app-db", "3 days old")], start)]


def test_each_kind_of_alert_arrives_with_its_apprise_type(webhook: Webhook) -> None:
    notifier = Notifier([webhook.url], None, mask=lambda text: text)
    for alert in _every_kind_of_alert():
        assert notifier.deliver_now(alert), alert.title
    assert webhook.types() == {
        "[backup-watcher] FAILED: backup of app-db": "failure",
        "[backup-watcher] REMINDER: backup of app-db": "warning",
        "[backup-watcher] RECOVERED: backup of app-db": "success",
        "[backup-watcher] FAILED: snapshot stale of app-db": "warning",
        "[backup-watcher] RECOVERED: snapshot stale of app-db": "success",
        "[backup-watcher] 1 target(s) without a recent snapshot on db-host": "warning",
    }
