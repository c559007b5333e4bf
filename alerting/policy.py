"""The alert policy: a pure state machine per (subject, concern) that decides when a person is paged.

First failure → one FAILED alert; further failures → nothing (or one REMINDER after a long
interval); first success after failures → one RECOVERED notice; successes → nothing. A stale
snapshot is not paged separately while the same target's backups are already failing: that is
one incident, and it was paged once. No I/O here: `transition` is a function of its inputs.

Every alert carries a severity, Apprise's notification type (`severity`): failure for FAILED, success
for RECOVERED, warning for a REMINDER and for concerns that are warnings in themselves (a stale snapshot).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta


class Concern(enum.StrEnum):
    """What an alert is about."""

    BACKUP = "backup"
    STALE = "stale"
    PRUNE = "prune"
    DRILL = "drill"
    LABEL = "label"
    EVENTS = "events"
    CONFIG = "config"
    SIZE = "size"  # a dump far smaller than the previous one (a shrunken dump, SPEC §11)
    COPY = "copy"  # a copy to a further repository (subject: the copy's name) is behind


class Kind(enum.StrEnum):
    """What an alert says."""

    FAILED = "failed"
    REMINDER = "reminder"
    RECOVERED = "recovered"


class Severity(enum.StrEnum):
    """The type Apprise gives a notification (the values of apprise.NotifyType), by which Slack, ntfy,
    Pushover and others colour and prioritise it."""

    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"


# Concerns whose failure is a warning: a snapshot growing old, a dump that shrank (kept, and its history
# spared by retention), or a copy that lags is a reason to look, not a failed job.
WARNING_CONCERNS = frozenset({Concern.STALE, Concern.SIZE, Concern.COPY})


def severity(kind: Kind, concern: Concern) -> Severity:
    """Returns the Apprise type of an alert: success for a recovery, warning for a reminder (already
    paged as a failure) or a warning concern, failure otherwise."""
    if kind is Kind.RECOVERED:
        return Severity.SUCCESS
    if kind is Kind.REMINDER or concern in WARNING_CONCERNS:
        return Severity.WARNING
    return Severity.FAILURE


ADVICE = {
    Concern.BACKUP: "Check the error above; `backup-watcher status` shows every target, and "
                    "`backup-watcher backup TARGET` retries now. The next scheduled attempt runs by itself.",
    Concern.STALE: "No new snapshot within 1.5x the schedule interval. Check that the container runs and that "
                   "the watcher is backing it up (`backup-watcher status`).",
    Concern.PRUNE: "Retention could not be applied; the repository keeps growing until it is. Check the error "
                   "and run `backup-watcher prune` once it is fixed.",
    Concern.DRILL: "The latest snapshot did not restore cleanly: backups may not be usable. Check the error and "
                   "run `backup-watcher drill TARGET`.",
    Concern.LABEL: "The container is NOT being backed up until its backup-watcher.* labels are fixed.",
    Concern.EVENTS: "The watcher cannot follow the Docker event stream: new or renamed containers are only found "
                    "by periodic reconciliation. Check DOCKER_HOST or the socket proxy.",
    Concern.CONFIG: "The watcher did not start. Fix the configuration and restart it.",
    Concern.SIZE: "The dump was kept, and retention forgets nothing of its history until a dump of normal size "
                  "follows. Check whether data was lost (`backup-watcher restore TARGET --into OTHER` restores an "
                  "older snapshot beside it); if the smaller size is right, `backup-watcher ack TARGET --database "
                  "DB` accepts it and retention goes on as usual.",
    Concern.COPY: "The copy lacks snapshots the primary repository holds, for longer than 1.5x the schedule "
                  "interval: is its backend reachable, its password right? The watcher keeps retrying; "
                  "`backup-watcher copy` runs it now and says why it fails.",
}


@dataclass(frozen=True)
class Observation:
    """One outcome the watcher saw: subject (a target name, or 'repository', 'docker'), concern, ok or not."""

    subject: str
    concern: Concern
    ok: bool
    at: datetime
    detail: str = ""


@dataclass(frozen=True)
class AlertState:
    """Where one (subject, concern) stands."""

    failing: bool = False
    since: datetime | None = None
    failures: int = 0
    last_notified: datetime | None = None  # None while failing: it was never paged (absorbed)


@dataclass(frozen=True)
class Alert:
    """A notification to deliver."""

    kind: Kind
    subject: str
    concern: Concern
    title: str
    body: str

    @property
    def severity(self) -> Severity:
        """The Apprise type it is delivered with."""
        return severity(self.kind, self.concern)


def _title(kind: Kind, subject: str, concern: Concern) -> str:
    if concern is Concern.COPY:
        state = "caught up" if kind is Kind.RECOVERED else "is behind"
        return f"[backup-watcher] {kind.value.upper()}: copy {subject} {state}"
    what = {
        Concern.BACKUP: "backup", Concern.STALE: "snapshot stale", Concern.PRUNE: "retention",
        Concern.DRILL: "restore drill", Concern.LABEL: "labels", Concern.EVENTS: "Docker event stream",
        Concern.CONFIG: "configuration", Concern.SIZE: "dump size",
    }[concern]
    return f"[backup-watcher] {kind.value.upper()}: {what} of {subject}"


def _last_lines(text: str, count: int = 12) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-count:])


def transition(state: AlertState | None, observation: Observation, *,
               reminder_after: timedelta | None = None) -> tuple[AlertState, Alert | None]:
    """Returns the next state of one (subject, concern) and the alert to send, if any."""
    state = state or AlertState()
    subject, concern, now = observation.subject, observation.concern, observation.at
    if observation.ok:
        if not state.failing:
            return state, None
        if state.last_notified is None:
            # Never paged (absorbed into another incident): nothing to announce either.
            return AlertState(), None
        duration = f" after {state.failures} failure(s) since {state.since:%Y-%m-%d %H:%M} UTC" if state.since else ""
        body = f"{subject}: {concern.value} is healthy again{duration}."
        if observation.detail:
            body += f"\n\n{_last_lines(observation.detail)}"
        return AlertState(), Alert(Kind.RECOVERED, subject, concern, _title(Kind.RECOVERED, subject, concern), body)

    failures = state.failures + 1
    if not state.failing:
        body = (f"{subject}: {concern.value} failed at {now:%Y-%m-%d %H:%M:%S} UTC.\n\n"
                f"{_last_lines(observation.detail) or '(no detail)'}\n\nWhat to do: {ADVICE[concern]}")
        new_state = AlertState(failing=True, since=now, failures=failures, last_notified=now)
        return new_state, Alert(Kind.FAILED, subject, concern, _title(Kind.FAILED, subject, concern), body)
    if reminder_after is not None and state.last_notified is not None and now - state.last_notified >= reminder_after:
        body = (f"{subject}: {concern.value} still failing ({failures} times since "
                f"{state.since:%Y-%m-%d %H:%M} UTC).\n\n{_last_lines(observation.detail) or '(no detail)'}\n\n"
                f"What to do: {ADVICE[concern]}")
        return replace(state, failures=failures, last_notified=now), Alert(
            Kind.REMINDER, subject, concern, _title(Kind.REMINDER, subject, concern), body)
    return replace(state, failures=failures), None


class AlertPolicy:
    """The states of every (subject, concern), advanced by observations; not thread-safe by design
    (the daemon's loop thread is its only caller)."""

    def __init__(self, reminder_after: timedelta | None = None) -> None:
        self.reminder_after = reminder_after
        self._states: dict[tuple[str, Concern], AlertState] = {}

    def observe(self, observation: Observation) -> Alert | None:
        """Advances one (subject, concern); returns the alert to send, if any.

        A stale-snapshot failure of a subject whose backups are already failing is absorbed: it is
        the same incident, already paged.
        """
        key = (observation.subject, observation.concern)
        if (observation.concern is Concern.STALE and not observation.ok
                and self.is_failing(observation.subject, Concern.BACKUP) and not self.is_failing(*key)):
            self._states[key] = AlertState(failing=True, since=observation.at, failures=1, last_notified=None)
            return None
        state, alert = transition(self._states.get(key), observation, reminder_after=self.reminder_after)
        self._states[key] = state
        return alert

    def is_failing(self, subject: str, concern: Concern) -> bool:
        """Whether that (subject, concern) is in its failing state."""
        state = self._states.get((subject, concern))
        return state is not None and state.failing

    def assume_failing(self, subject: str, concern: Concern, since: datetime) -> None:
        """Marks a (subject, concern) as failing and already paged (state derived after a restart)."""
        self._states[(subject, concern)] = AlertState(failing=True, since=since, failures=1, last_notified=since)

    def forget(self, subject: str) -> None:
        """Drops every state of a subject that no longer exists."""
        for key in [key for key in self._states if key[0] == subject]:
            del self._states[key]

    def rename(self, old: str, new: str) -> None:
        """Carries a subject's states over to its new name."""
        for key in [key for key in self._states if key[0] == old]:
            self._states[(new, key[1])] = self._states.pop(key)


def startup_summary(host: str, stale: Sequence[tuple[str, str]], at: datetime) -> Alert:
    """One notice, sent once at start, for the targets whose newest snapshot is already stale.

    Their per-target states start as failing-and-paged (so a restart during an incident does not page
    every target again); this one notice makes sure a person hears of them at least once.
    """
    lines = "\n".join(f"- {name}: {detail}" for name, detail in stale)
    body = (f"backup-watcher started on {host} at {at:%Y-%m-%d %H:%M:%S} UTC. {len(stale)} target(s) have no "
            f"snapshot newer than 1.5x their schedule interval; they are being backed up now (a stopped container once "
            f"it runs again: start it, or remove it if it is gone for good):\n{lines}\n\n"
            "You will get a RECOVERED notice for each once its backup succeeds.")
    return Alert(Kind.FAILED, host, Concern.STALE,
                 f"[backup-watcher] {len(stale)} target(s) without a recent snapshot on {host}", body)
