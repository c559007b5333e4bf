"""discover() and ContainerInfo.from_inspect (SPEC §5): selection, opt-in/out, labels, credentials."""

from __future__ import annotations

import re
from typing import Any

import pytest

from watcher.config import ConfigError, Retention, load_config
from watcher.discovery import ContainerInfo, DiscoveryRules, Rejected, Target, discover, parse_engine_time

RULES = DiscoveryRules(patterns=("scalr-*-db", "scalr-auth-postgres"), schedule="0 3 * * *",
                       retention=Retention(30, 4, 6))
PG_ENV = {"POSTGRES_USER": "scalr", "POSTGRES_PASSWORD": "pg-secret", "POSTGRES_DB": "scalr_app"}


def container(name: str = "scalr-app-db", labels: dict[str, str] | None = None,
              env: dict[str, str] | None = None) -> ContainerInfo:
    return ContainerInfo(id="c0ffee" + name, name=name, image="postgres:16", labels=labels or {},
                         env=PG_ENV if env is None else env)


def target_of(info: ContainerInfo, rules: DiscoveryRules = RULES) -> Target:
    result = discover(info, rules)
    assert isinstance(result, Target), result
    return result


def rejected_of(info: ContainerInfo) -> Rejected:
    result = discover(info, RULES)
    assert isinstance(result, Rejected), result
    return result


def names_label(problem: str, label: str) -> bool:
    return re.search(rf"{re.escape(label)}(?![\w.-])", problem) is not None


# --- selection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scalr-app-db", "scalr-billing-db", "scalr-auth-postgres"])
def test_name_matching_a_pattern_is_a_target(name: str) -> None:
    target = target_of(container(name))
    assert target.name == name
    assert target.container_id == "c0ffee" + name
    assert target.image == "postgres:16"
    assert target.schedule == "0 3 * * *"
    assert target.retention == Retention(30, 4, 6)
    assert target.drill is True


@pytest.mark.parametrize("name", ["postgres", "scalr-app-db-replica", "my-scalr-app-db",
                                  "scalr-auth-postgres2", "SCALR-APP-DB"])
def test_non_matching_name_is_ignored(name: str) -> None:
    assert discover(container(name), RULES) is None


def test_opt_in_label_selects_a_non_matching_name() -> None:
    target = target_of(container("billing-postgres", {"backup-watcher.enable": "true"}))
    assert target.name == "billing-postgres"


@pytest.mark.parametrize("value", ["true", "TRUE", " yes ", "1", "on"])
def test_opt_in_spellings(value: str) -> None:
    assert isinstance(discover(container("other", {"backup-watcher.enable": value}), RULES), Target)


@pytest.mark.parametrize("value", ["false", "False", "no", "0", "off"])
def test_opt_out_label_on_a_matching_name(value: str) -> None:
    assert discover(container("scalr-app-db", {"backup-watcher.enable": value}), RULES) is None


def test_opt_out_wins_over_other_bad_labels() -> None:
    info = container("scalr-app-db", {"backup-watcher.enable": "false", "backup-watcher.keep-daily": "abc"})
    assert discover(info, RULES) is None


@pytest.mark.parametrize("labels", [
    {"backup-watcher.role": "drill"},
    {"backup-watcher.role": "drill", "backup-watcher.enable": "true"},
    {"backup-watcher.role": "drill", "backup-watcher.keep-daily": "abc"},
])
def test_drill_containers_are_never_targets(labels: dict[str, str]) -> None:
    assert discover(container("scalr-app-db", labels), RULES) is None


def test_no_patterns_means_only_opt_in() -> None:
    rules = DiscoveryRules(patterns=())
    assert discover(container("scalr-app-db"), rules) is None
    assert isinstance(discover(container("scalr-app-db", {"backup-watcher.enable": "true"}), rules), Target)


def test_other_labels_do_not_matter() -> None:
    info = container("scalr-app-db", {"com.docker.compose.project": "scalr",
                                      "backup-watcherx.enable": "false"})
    assert isinstance(discover(info, RULES), Target)


# --- bad labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "value"), [
    ("backup-watcher.enable", "maybe"),
    ("backup-watcher.keep-daily", "-1"),
    ("backup-watcher.keep-daily", "abc"),
    ("backup-watcher.keep-weekly", "1.5"),
    ("backup-watcher.keep-monthly", ""),
    ("backup-watcher.schedule", "0 3 * *"),
    ("backup-watcher.schedule", "0 3 * * * *"),
    ("backup-watcher.schedule", "0 24 * * *"),
    ("backup-watcher.schedule", "0 3 30 2 *"),
    ("backup-watcher.databases", ",,"),
    ("backup-watcher.databases", ""),
    ("backup-watcher.databases", "app,,billing"),
    ("backup-watcher.drill", "sometimes"),
    ("backup-watcher.user", "  "),
    ("backup-watcher.schedul", "0 4 * * *"),
])
def test_bad_label_rejects_naming_it(label: str, value: str) -> None:
    result = rejected_of(container("scalr-app-db", {label: value}))
    assert result.name == "scalr-app-db"
    assert result.container_id == "c0ffeescalr-app-db"
    assert len(result.problems) == 1
    assert names_label(result.problems[0], label), result.problems
    assert names_label(result.reason, label)


def test_unknown_label_is_not_confused_with_the_known_one() -> None:
    result = rejected_of(container("scalr-app-db", {"backup-watcher.schedul": "0 4 * * *"}))
    assert names_label(result.problems[0], "backup-watcher.schedul")
    assert not names_label(result.problems[0].split(":")[0], "backup-watcher.schedule")


def test_bad_opt_in_on_a_non_matching_name_is_rejected_not_ignored() -> None:
    result = rejected_of(container("billing-postgres", {"backup-watcher.enable": "maybe"}))
    assert names_label(result.reason, "backup-watcher.enable")


def test_several_bad_labels_are_all_named() -> None:
    labels = {
        "backup-watcher.enable": "maybe",
        "backup-watcher.keep-daily": "-1",
        "backup-watcher.keep-weekly": "abc",
        "backup-watcher.schedule": "0 3 * *",
        "backup-watcher.databases": ",,",
        "backup-watcher.schedul": "x",
    }
    result = rejected_of(container("scalr-app-db", labels))
    assert len(result.problems) == len(labels)
    for label in labels:
        assert sum(names_label(p, label) for p in result.problems) == 1, (label, result.problems)


def test_all_zero_label_retention_is_rejected() -> None:
    labels = {"backup-watcher.keep-daily": "0", "backup-watcher.keep-weekly": "0",
              "backup-watcher.keep-monthly": "0"}
    result = rejected_of(container("scalr-app-db", labels))
    assert "keep" in result.reason


def test_rejection_never_shows_the_database_password() -> None:
    result = rejected_of(container("scalr-app-db", {"backup-watcher.keep-daily": "abc"}))
    assert "pg-secret" not in result.reason


# --- databases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["all", "ALL", " all "])
def test_databases_all(value: str) -> None:
    target = target_of(container(labels={"backup-watcher.databases": value}))
    assert target.databases == ()
    assert target.all_databases is True


def test_databases_list_is_trimmed_and_deduplicated() -> None:
    target = target_of(container(labels={"backup-watcher.databases": " app , billing,app"}))
    assert target.databases == ("app", "billing")
    assert target.all_databases is False


@pytest.mark.parametrize(("env", "database"), [
    ({"POSTGRES_USER": "scalr", "POSTGRES_DB": "scalr_app"}, "scalr_app"),
    ({"POSTGRES_USER": "scalr"}, "scalr"),
    ({"POSTGRES_USER": "scalr", "POSTGRES_DB": ""}, "scalr"),
    ({}, "postgres"),
    ({"POSTGRES_DB": "only_db"}, "only_db"),
])
def test_default_database(env: dict[str, str], database: str) -> None:
    target = target_of(container(env=env))
    assert target.databases == (database,)
    assert target.credentials.database == database


# --- credentials --------------------------------------------------------------------------------


def test_credentials_from_postgres_env() -> None:
    creds = target_of(container()).credentials
    assert creds.user == "scalr"
    assert creds.password == "pg-secret"
    assert "pg-secret" not in repr(creds)


def test_the_containers_environment_stays_out_of_repr() -> None:
    info = ContainerInfo.from_inspect({"Id": "c0ffee", "Name": "/scalr-app-db", "State": {"Running": True},
                                       "Config": {"Image": "postgres:16", "Env": ["POSTGRES_PASSWORD=pg-secret",
                                                                                  "APP_API_TOKEN=app-token-42"]}})
    assert info.env["POSTGRES_PASSWORD"] == "pg-secret"
    assert "pg-secret" not in repr(info) and "app-token-42" not in repr(info)


def test_default_user_is_postgres() -> None:
    creds = target_of(container(env={"POSTGRES_PASSWORD": "pw"})).credentials
    assert creds.user == "postgres"
    assert creds.password == "pw"


def test_user_label_overrides_user_and_drops_the_password() -> None:
    creds = target_of(container(labels={"backup-watcher.user": " backup_role "})).credentials
    assert creds.user == "backup_role"
    assert creds.password is None  # POSTGRES_PASSWORD belongs to POSTGRES_USER only
    assert creds.database == "scalr_app"


def test_user_label_naming_postgres_user_keeps_the_password() -> None:
    creds = target_of(container(labels={"backup-watcher.user": "scalr"})).credentials
    assert creds.user == "scalr"
    assert creds.password == "pg-secret"


def test_empty_password_is_no_password() -> None:
    creds = target_of(container(env={"POSTGRES_USER": "u", "POSTGRES_PASSWORD": ""})).credentials
    assert creds.password is None


# --- schedule, retention, drill -----------------------------------------------------------------


def test_schedule_label_overrides_default() -> None:
    assert target_of(container(labels={"backup-watcher.schedule": " 30 1 * * 0 "})).schedule == "30 1 * * 0"


def test_rules_schedule_is_the_default() -> None:
    rules = DiscoveryRules(patterns=("scalr-*-db",), schedule="0 4 * * *")
    assert target_of(container(), rules).schedule == "0 4 * * *"


def test_label_retention_merges_with_defaults() -> None:
    target = target_of(container(labels={"backup-watcher.keep-daily": "7"}))
    assert target.retention == Retention(daily=7, weekly=4, monthly=6)
    target = target_of(container(labels={"backup-watcher.keep-weekly": "0",
                                         "backup-watcher.keep-monthly": "24"}))
    assert target.retention == Retention(daily=30, weekly=0, monthly=24)


def test_label_retention_merges_with_rule_defaults() -> None:
    rules = DiscoveryRules(patterns=("scalr-*-db",), retention=Retention(10, 2, 1))
    target = target_of(container(labels={"backup-watcher.keep-monthly": "3"}), rules)
    assert target.retention == Retention(10, 2, 3)


@pytest.mark.parametrize(("value", "drill"), [("false", False), ("no", False), ("true", True)])
def test_drill_label(value: str, drill: bool) -> None:
    assert target_of(container(labels={"backup-watcher.drill": value})).drill is drill


def test_renamed_keeps_everything_else() -> None:
    target = target_of(container(labels={"backup-watcher.keep-daily": "7"}))
    renamed = target.renamed("scalr-app-db-new")
    assert renamed.name == "scalr-app-db-new"
    assert renamed.retention == target.retention
    assert renamed.credentials == target.credentials


# --- from_inspect -------------------------------------------------------------------------------


INSPECT: dict[str, Any] = {  # as the engine answers: JSON
    "Id": "8f2c3b7d1e4a5f60718293a4b5c6d7e8f90123456789abcdef0123456789abcd",
    "Created": "2026-01-02T03:04:05.123456789Z",
    "Name": "/scalr-app-db",
    "Image": "sha256:0a1b2c3d",
    "State": {"Status": "running", "Running": True, "Paused": False, "Pid": 4242, "ExitCode": 0,
              "StartedAt": "2026-01-02T03:04:06.987654321Z"},
    "Config": {
        "Hostname": "8f2c3b7d1e4a",
        "Env": [
            "POSTGRES_USER=scalr",
            "POSTGRES_PASSWORD=pa=ss==word",
            "POSTGRES_DB=scalr_app",
            "PGOPTIONS=-c search_path=app,public",
            "EMPTY=",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PGDATA=/var/lib/postgresql/data",
        ],
        "Image": "postgres:16-alpine",
        "Labels": {"backup-watcher.keep-daily": "7", "com.docker.compose.service": "db"},
    },
}


def test_from_inspect() -> None:
    info = ContainerInfo.from_inspect(INSPECT)
    assert info.id == INSPECT["Id"]
    assert info.name == "scalr-app-db"
    assert info.image == "postgres:16-alpine"
    assert info.running is True
    assert info.labels == {"backup-watcher.keep-daily": "7", "com.docker.compose.service": "db"}
    assert info.env["POSTGRES_PASSWORD"] == "pa=ss==word"
    assert info.env["PGOPTIONS"] == "-c search_path=app,public"
    assert info.env["EMPTY"] == ""
    assert info.env["POSTGRES_DB"] == "scalr_app"
    # Nanoseconds from the engine, cut to microseconds: 2026-01-02T03:04:06.987654Z.
    assert info.started_at == 1767323046.987654


def test_from_inspect_feeds_discover() -> None:
    target = target_of(ContainerInfo.from_inspect(INSPECT))
    assert target.credentials.password == "pa=ss==word"
    assert target.databases == ("scalr_app",)
    assert target.retention.daily == 7


def test_from_inspect_stopped_container_with_null_fields() -> None:
    attrs = {"Id": "abc", "Name": "/x", "State": {"Running": False},
             "Config": {"Env": None, "Labels": None, "Image": "postgres:15"}}
    info = ContainerInfo.from_inspect(attrs)
    assert info.running is False
    assert info.env == {}
    assert info.labels == {}
    assert info.image == "postgres:15"
    assert info.started_at is None


@pytest.mark.parametrize("raw", [None, "", "0001-01-01T00:00:00Z", "yesterday", 17])
def test_engine_time_never_or_garbage_is_unknown(raw: object) -> None:
    assert parse_engine_time(raw) is None


def test_engine_time_with_offset() -> None:
    assert parse_engine_time("2026-01-02T04:04:06+01:00") == parse_engine_time("2026-01-02T03:04:06Z") == 1767323046.0


def test_a_restart_changes_the_target() -> None:
    """The daemon re-registers a target whose container restarted (its start time is part of it)."""
    before = target_of(ContainerInfo.from_inspect(INSPECT))
    state = INSPECT["State"]
    assert isinstance(state, dict)
    attrs = {**INSPECT, "State": {**state, "StartedAt": "2026-01-03T00:00:00Z"}}
    after = target_of(ContainerInfo.from_inspect(attrs))
    assert before != after
    assert after.started_at == parse_engine_time("2026-01-03T00:00:00Z")


@pytest.mark.parametrize("value", ["true", "Yes", " ON ", "1", "false", "no", "Off", "0", "maybe", ""])
def test_labels_and_settings_read_yes_and_no_alike(value: str) -> None:
    """backup-watcher.drill and WATCHER_INIT_REPOSITORY take the same spellings, and refuse the same."""
    found = discover(container(labels={"backup-watcher.drill": value}), RULES)
    try:
        setting: bool | None = load_config({"RESTIC_PASSWORD": "pw", "RESTIC_REPOSITORY": "/r",
                                            "WATCHER_INIT_REPOSITORY": value}).init_repository
    except ConfigError:
        setting = None
    label = found.drill if isinstance(found, Target) else None
    if value.strip():
        assert label == setting
    else:
        # A blank setting means its default; a blank label is a mistake on that container.
        assert (label, setting) == (None, False)
