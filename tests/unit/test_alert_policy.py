"""The alert policy, transition by transition (pure: no Apprise, no clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from alerting.notify import Notifier, url_secret_parts, validate
from alerting.policy import (
    ADVICE,
    AlertPolicy,
    AlertState,
    Concern,
    Kind,
    Observation,
    Severity,
    severity,
    startup_summary,
    transition,
)
from watcher.cli import startup_alert

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def obs(ok: bool, minutes: int = 0, detail: str = "", subject: str = "scalr-app-db",
        concern: Concern = Concern.BACKUP) -> Observation:
    return Observation(subject, concern, ok, T0 + timedelta(minutes=minutes), detail)


def test_ok_when_ok_sends_nothing() -> None:
    state, alert = transition(None, obs(True))
    assert alert is None and not state.failing


def test_first_failure_sends_one_failed_alert_with_last_lines_and_advice() -> None:
    detail = "\n".join(f"line {i}" for i in range(30)) + "\npg_dump: error: permission denied for table secret"
    state, alert = transition(None, obs(False, detail=detail))
    assert alert is not None and alert.kind is Kind.FAILED
    assert state.failing and state.failures == 1 and state.since == T0
    assert "permission denied for table secret" in alert.body
    assert "line 0\n" not in alert.body, "only the last lines of the error"
    assert "What to do:" in alert.body
    assert alert.title == "[backup-watcher] FAILED: backup of scalr-app-db"


def test_repeated_failures_send_nothing_without_reminders() -> None:
    state, _ = transition(None, obs(False))
    for minute in range(1, 100):
        state, alert = transition(state, obs(False, minute * 60))
        assert alert is None
    assert state.failures == 100


def test_reminder_after_the_interval_then_quiet_again() -> None:
    state, _ = transition(None, obs(False), reminder_after=timedelta(hours=24))
    state, alert = transition(state, obs(False, 60 * 23), reminder_after=timedelta(hours=24))
    assert alert is None
    state, alert = transition(state, obs(False, 60 * 24), reminder_after=timedelta(hours=24))
    assert alert is not None and alert.kind is Kind.REMINDER and "still failing (3 times" in alert.body
    state, alert = transition(state, obs(False, 60 * 25), reminder_after=timedelta(hours=24))
    assert alert is None


def test_first_success_after_failures_sends_one_recovery_then_nothing() -> None:
    state, _ = transition(None, obs(False))
    state, _ = transition(state, obs(False, 1))
    state, _ = transition(state, obs(False, 2))
    state, alert = transition(state, obs(True, 3))
    assert alert is not None and alert.kind is Kind.RECOVERED
    assert "after 3 failure(s)" in alert.body
    assert state == AlertState()
    state, alert = transition(state, obs(True, 4))
    assert alert is None


def test_fail_recover_fail_pages_again() -> None:
    policy = AlertPolicy()
    kinds = [policy.observe(obs(ok, i)) for i, ok in enumerate([False, False, True, False, True])]
    assert [a.kind if a else None for a in kinds] == [Kind.FAILED, None, Kind.RECOVERED, Kind.FAILED, Kind.RECOVERED]


@pytest.mark.parametrize("concern", [c for c in Concern if c is not Concern.COPY])
def test_every_concern_has_a_title_and_advice(concern: Concern) -> None:
    _, alert = transition(None, obs(False, concern=concern, subject="x"))
    assert alert is not None
    assert alert.title.startswith("[backup-watcher] FAILED: ") and alert.title.endswith(" of x")
    assert "What to do:" in alert.body and ADVICE[concern] in alert.body


def test_subjects_and_concerns_are_independent() -> None:
    policy = AlertPolicy()
    assert policy.observe(obs(False, subject="a")) is not None
    assert policy.observe(obs(False, subject="b")) is not None
    assert policy.observe(obs(False, subject="a", concern=Concern.PRUNE)) is not None
    assert policy.observe(obs(False, subject="a")) is None


def test_stale_while_backups_already_fail_is_the_same_incident() -> None:
    policy = AlertPolicy()
    assert policy.observe(obs(False)) is not None
    assert policy.observe(obs(False, 2, concern=Concern.STALE)) is None
    assert policy.is_failing("scalr-app-db", Concern.STALE)
    recovered = policy.observe(obs(True, 3))
    assert recovered is not None and recovered.kind is Kind.RECOVERED
    # The stale state, never paged, recovers silently: one incident, one recovery notice.
    assert policy.observe(obs(True, 4, concern=Concern.STALE)) is None
    assert not policy.is_failing("scalr-app-db", Concern.STALE)


def test_stale_alone_pages_once() -> None:
    policy = AlertPolicy()
    assert policy.observe(obs(False, concern=Concern.STALE)) is not None
    assert policy.observe(obs(False, 1, concern=Concern.STALE)) is None


def test_assumed_failing_after_restart_does_not_page_again_but_recovers() -> None:
    policy = AlertPolicy()
    policy.assume_failing("scalr-app-db", Concern.BACKUP, T0)
    assert policy.observe(obs(False, 1)) is None
    recovered = policy.observe(obs(True, 2))
    assert recovered is not None and recovered.kind is Kind.RECOVERED


def test_forget_and_rename() -> None:
    policy = AlertPolicy()
    policy.observe(obs(False, subject="old"))
    policy.rename("old", "new")
    assert policy.is_failing("new", Concern.BACKUP) and not policy.is_failing("old", Concern.BACKUP)
    policy.forget("new")
    assert not policy.is_failing("new", Concern.BACKUP)
    assert policy.observe(obs(False, subject="new")) is not None


def test_startup_summary_lists_each_stale_target() -> None:
    alert = startup_summary("db-host", [("a-db", "3 days old"), ("b-db", "no snapshot yet")], T0)
    assert "2 target(s)" in alert.title and "db-host" in alert.title
    assert "- a-db: 3 days old" in alert.body and "- b-db: no snapshot yet" in alert.body


def _alerts_of(concern: Concern) -> dict[Kind, Severity]:
    """The severity of each kind of alert one (subject, concern) sends: failed, a reminder, recovered."""
    policy = AlertPolicy(reminder_after=timedelta(hours=24))
    alerts = [policy.observe(obs(ok, minutes, concern=concern)) for ok, minutes in
              ((False, 0), (False, 60 * 24), (True, 60 * 25))]
    return {alert.kind: alert.severity for alert in alerts if alert is not None}


@pytest.mark.parametrize("concern", [c for c in Concern if c not in (Concern.STALE, Concern.SIZE, Concern.COPY)])
def test_a_failure_is_typed_failure_its_reminder_warning_its_recovery_success(concern: Concern) -> None:
    assert _alerts_of(concern) == {Kind.FAILED: Severity.FAILURE, Kind.REMINDER: Severity.WARNING,
                                   Kind.RECOVERED: Severity.SUCCESS}


@pytest.mark.parametrize("concern", [Concern.STALE, Concern.SIZE])
def test_a_stale_snapshot_or_a_shrunken_dump_is_a_warning_and_its_recovery_a_success(concern: Concern) -> None:
    assert _alerts_of(concern) == {Kind.FAILED: Severity.WARNING, Kind.REMINDER: Severity.WARNING,
                                   Kind.RECOVERED: Severity.SUCCESS}
    assert startup_summary("db-host", [("a-db", "3 days old")], T0).severity is Severity.WARNING


def test_a_lagging_copy_is_paged_once_as_behind_a_warning_and_once_when_it_caught_up() -> None:
    policy = AlertPolicy(reminder_after=timedelta(hours=24))
    alerts = [policy.observe(obs(ok, minutes, concern=Concern.COPY, subject="offsite"))
              for ok, minutes in ((False, 0), (False, 1), (False, 2), (True, 3), (True, 4))]
    sent = [alert for alert in alerts if alert is not None]
    assert [(a.kind, a.title, a.severity) for a in sent] == [
        (Kind.FAILED, "[backup-watcher] FAILED: copy offsite is behind", Severity.WARNING),
        (Kind.RECOVERED, "[backup-watcher] RECOVERED: copy offsite caught up", Severity.SUCCESS)]
    assert ADVICE[Concern.COPY] in sent[0].body


def test_a_configuration_error_at_start_is_a_failure() -> None:
    assert startup_alert(["WATCHER_SCHEDULE='x': bad"]).severity is Severity.FAILURE


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("concern", list(Concern))
def test_every_severity_is_an_apprise_notify_type(kind: Kind, concern: Concern) -> None:
    from apprise import NotifyType

    assert severity(kind, concern).value in {notify_type.value for notify_type in NotifyType}


def test_url_secret_parts_cover_password_query_and_path_tokens() -> None:
    parts = url_secret_parts("json://user:hunter2pw@hooks.local:8080/T0123456789ABCDEFGH/x?token=abcdef123")
    assert "hunter2pw" in parts and "abcdef123" in parts and "T0123456789ABCDEFGH" in parts


def test_validate_names_bad_urls_by_position_and_scheme_only() -> None:
    problems = validate(["json://127.0.0.1:9/ok", "jsn://secret-token-here@x", "not a url"], None)
    assert len(problems) == 2
    assert "entry #2 (scheme 'jsn')" in problems[0] and "secret-token-here" not in problems[0]
    assert "entry #3" in problems[1]


def test_a_notifier_without_targets_delivers_nothing_and_counts_nothing() -> None:
    """A startup failure of a watcher with no WATCHER_APPRISE_URLS: no attempt, so no Apprise error ("There
    are no service(s) to notify"), no notification_failed warning, no failed delivery in the metrics."""
    counted: list[bool] = []
    notifier = Notifier([], None, mask=lambda text: text, on_result=counted.append)
    assert not notifier.enabled
    assert notifier.deliver_now(startup_alert(["cannot reach the Docker engine"])) is False
    assert counted == []
