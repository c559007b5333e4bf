"""load_config and its helpers (SPEC §4): defaults, NAME_FILE secrets, all problems at once, masking."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from watcher.config import SETTINGS, Config, ConfigError, Retention, effective_config, load_config
from watcher.execute import Masker
from watcher.settings import Shown, mask_url, parse_address, rows, split_list, unreadable, validate_pattern

PASSWORD = "correct-horse-battery"
BASE = {"RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": "/srv/restic"}


def env(**extra: str) -> dict[str, str]:
    return {**BASE, **extra}


def problems_of(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(environ)
    return caught.value.problems


def names_variable(problem: str, name: str) -> bool:
    """True when `name` appears in `problem` as a whole variable name (not as a prefix of a longer one)."""
    return re.search(rf"(?<![A-Z_]){re.escape(name)}(?![A-Z_])", problem) is not None


def assert_named(problems: list[str], name: str) -> None:
    assert any(names_variable(p, name) for p in problems), f"{name} not named in {problems}"


# --- defaults -----------------------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(BASE)
    assert config.schedule == "0 3 * * *"
    assert config.timezone == "UTC"
    assert config.container_patterns == ("scalr-*-db", "scalr-auth-postgres")
    assert config.retention == Retention(daily=30, weekly=4, monthly=6)
    assert config.concurrency == 2
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 9810)
    assert config.drill_schedule == "0 5 1 * *"
    assert config.log_format == "json"
    assert config.log_level == "info"
    assert config.init_repository is False
    assert config.apprise_urls == ()
    assert config.host is None
    assert config.restic_binary == "restic"


def test_blank_values_mean_default() -> None:
    config = load_config(env(WATCHER_SCHEDULE="  ", WATCHER_KEEP_DAILY="", WATCHER_CONCURRENCY=" ",
                             WATCHER_METRICS_ADDRESS="", WATCHER_TIMEZONE=""))
    assert config.schedule == "0 3 * * *"
    assert config.retention.daily == 30
    assert config.concurrency == 2
    assert config.metrics_port == 9810
    assert config.timezone == "UTC"


def test_explicit_values_are_used() -> None:
    config = load_config(env(
        WATCHER_SCHEDULE="15 1 * * 0", WATCHER_TIMEZONE="Europe/Berlin",
        WATCHER_CONTAINER_PATTERNS="app-*-db, billing-db", WATCHER_KEEP_DAILY="7", WATCHER_KEEP_WEEKLY="0",
        WATCHER_KEEP_MONTHLY="12", WATCHER_CONCURRENCY="5", WATCHER_METRICS_ADDRESS="127.0.0.1:9999",
        WATCHER_DRILL_SCHEDULE="", WATCHER_LOG_FORMAT="Console", WATCHER_LOG_LEVEL="DEBUG",
        WATCHER_INIT_REPOSITORY="true", WATCHER_HOST="db-host-1",
    ))
    assert config.schedule == "15 1 * * 0"
    assert config.timezone == "Europe/Berlin"
    assert config.container_patterns == ("app-*-db", "billing-db")
    assert config.retention == Retention(7, 0, 12)
    assert config.concurrency == 5
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", 9999)
    assert config.drill_schedule is None  # empty disables the drill
    assert config.log_format == "console"
    assert config.log_level == "debug"
    assert config.init_repository is True
    assert config.host == "db-host-1"


# --- every problem at once ----------------------------------------------------------------------


def test_every_problem_is_reported_together() -> None:
    bad = {
        "RESTIC_REPOSITORY": "/srv/restic",  # RESTIC_PASSWORD missing
        "DOCKER_HOST": "ftp://docker",
        "WATCHER_SCHEDULE": "0 3 * *",
        "WATCHER_DRILL_SCHEDULE": "99 5 1 * *",
        "WATCHER_TIMEZONE": "Mars/Olympus_Mons",
        "WATCHER_CONTAINER_PATTERNS": "scalr-*-db,bad/name",
        "WATCHER_KEEP_DAILY": "abc",
        "WATCHER_KEEP_WEEKLY": "-1",
        "WATCHER_KEEP_MONTHLY": "1.5",
        "WATCHER_CONCURRENCY": "0",
        "WATCHER_METRICS_ADDRESS": "localhost",
        "WATCHER_LOG_FORMAT": "xml",
        "WATCHER_LOG_LEVEL": "loud",
    }
    problems = problems_of(bad)
    for name in [
        "RESTIC_PASSWORD", "DOCKER_HOST", "WATCHER_SCHEDULE", "WATCHER_DRILL_SCHEDULE", "WATCHER_TIMEZONE",
        "WATCHER_CONTAINER_PATTERNS", "WATCHER_KEEP_DAILY", "WATCHER_KEEP_WEEKLY", "WATCHER_KEEP_MONTHLY",
        "WATCHER_CONCURRENCY", "WATCHER_METRICS_ADDRESS", "WATCHER_LOG_FORMAT", "WATCHER_LOG_LEVEL",
    ]:
        assert_named(problems, name)
    assert len(problems) >= 13


def test_error_message_lists_one_problem_per_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env(WATCHER_TIMEZONE="Nowhere/Land", WATCHER_CONCURRENCY="x"))
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert lines == caught.value.problems


def test_bad_init_repository_value_is_an_error() -> None:
    problems = problems_of(env(WATCHER_INIT_REPOSITORY="maybe"))
    assert_named(problems, "WATCHER_INIT_REPOSITORY")


def test_pruning_is_on_unless_turned_off() -> None:
    assert load_config(BASE).prune is True
    assert load_config(env(WATCHER_PRUNE="false")).prune is False
    assert effective_config(load_config(env(WATCHER_PRUNE="no")))["WATCHER_PRUNE"] == "false"
    assert problems_of(env(WATCHER_PRUNE="never")) == ["WATCHER_PRUNE='never': must be true or false"]


def test_retention_all_zero_is_refused() -> None:
    problems = problems_of(env(WATCHER_KEEP_DAILY="0", WATCHER_KEEP_WEEKLY="0", WATCHER_KEEP_MONTHLY="0"))
    assert any("WATCHER_KEEP_DAILY" in p for p in problems)


def test_missing_repository_is_an_error() -> None:
    problems = problems_of({"RESTIC_PASSWORD": PASSWORD})
    assert_named(problems, "RESTIC_REPOSITORY")


def test_missing_apprise_config_file(tmp_path: Path) -> None:
    problems = problems_of(env(WATCHER_APPRISE_CONFIG=str(tmp_path / "apprise.yml")))
    assert_named(problems, "WATCHER_APPRISE_CONFIG")


def test_missing_apprise_config_file_does_not_hide_bad_urls(tmp_path: Path) -> None:
    problems = problems_of(env(WATCHER_APPRISE_CONFIG=str(tmp_path / "apprise.yml"),
                               WATCHER_APPRISE_URLS="nosuchscheme://x"))
    assert_named(problems, "WATCHER_APPRISE_CONFIG")
    assert_named(problems, "WATCHER_APPRISE_URLS")


def test_ssh_docker_host_is_refused_with_the_reason() -> None:
    problems = problems_of(env(DOCKER_HOST="ssh://admin@db-host"))
    assert_named(problems, "DOCKER_HOST")
    assert any("ssh:// is not supported" in p for p in problems)


# --- the repository password --------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_missing_restic_password_names_it(value: str | None) -> None:
    environ = {"RESTIC_REPOSITORY": "/srv/restic"}
    if value is not None:
        environ["RESTIC_PASSWORD"] = value
    problems = problems_of(environ)
    assert_named(problems, "RESTIC_PASSWORD")


def test_password_command_is_enough() -> None:
    config = load_config({"RESTIC_REPOSITORY": "/srv/restic", "RESTIC_PASSWORD_COMMAND": "pass show restic"})
    assert effective_config(config)["RESTIC_PASSWORD"] == "*** (from RESTIC_PASSWORD_COMMAND)"


def test_password_file_is_read_and_kept_for_masking(tmp_path: Path) -> None:
    secret_file = tmp_path / "restic-password"
    secret_file.write_text("from-the-file-pw\n", encoding="utf-8")
    config = load_config({"RESTIC_REPOSITORY": "/srv/restic", "RESTIC_PASSWORD_FILE": str(secret_file)})
    assert "from-the-file-pw" in config.secrets  # trailing newline stripped
    # restic reads RESTIC_PASSWORD_FILE itself; the value is not copied into its environment.
    assert config.restic_env["RESTIC_PASSWORD_FILE"] == str(secret_file)
    assert "from-the-file-pw" not in config.restic_env.values()
    assert effective_config(config)["RESTIC_PASSWORD"] == "*** (from RESTIC_PASSWORD_FILE)"


def test_password_and_password_file_both_set(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("other-password", encoding="utf-8")
    problems = problems_of(env(RESTIC_PASSWORD_FILE=str(secret_file)))
    both = [p for p in problems if "RESTIC_PASSWORD_FILE" in p]
    assert both
    assert not any(PASSWORD in p or "other-password" in p for p in problems)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_password_file_names_the_variable(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nope" if kind == "missing" else tmp_path
    problems = problems_of({"RESTIC_REPOSITORY": "/srv/restic", "RESTIC_PASSWORD_FILE": str(path)})
    assert_named(problems, "RESTIC_PASSWORD_FILE")


def test_refused_password_file_says_whom_it_must_be_readable_by(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The image runs as uid 10001: a secret root wrote and did not chown is refused (root itself reads any
    # file, so the refusal is simulated); the problem names the file, the uid and the fix, never the content.
    path = tmp_path / "restic_password"
    path.write_text(PASSWORD, encoding="utf-8")

    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    problems = problems_of({"RESTIC_REPOSITORY": "/srv/restic", "RESTIC_PASSWORD_FILE": str(path)})
    (problem,) = [p for p in problems if "RESTIC_PASSWORD_FILE" in p]
    assert f"cannot read {path}: Permission denied" in problem
    assert f"uid {os.getuid()}" in problem and f"chown {os.getuid()}:{os.getgid()}" in problem
    assert PASSWORD not in problem


def test_missing_file_gets_no_ownership_advice(tmp_path: Path) -> None:
    problem = unreadable(str(tmp_path / "nope"), FileNotFoundError(2, "No such file or directory"))
    assert problem == f"cannot read {tmp_path / 'nope'}: No such file or directory"


def test_empty_password_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "pw"
    empty.write_text("\n", encoding="utf-8")
    problems = problems_of({"RESTIC_REPOSITORY": "/srv/restic", "RESTIC_PASSWORD_FILE": str(empty)})
    assert_named(problems, "RESTIC_PASSWORD_FILE")


# --- other NAME_FILE secrets ----------------------------------------------------------------------


def test_backend_secret_file_is_read_into_restic_env(tmp_path: Path) -> None:
    key_file = tmp_path / "aws"
    key_file.write_text("AKIA-very-secret-key\r\n", encoding="utf-8")
    config = load_config(env(AWS_SECRET_ACCESS_KEY_FILE=str(key_file)))
    assert config.restic_env["AWS_SECRET_ACCESS_KEY"] == "AKIA-very-secret-key"
    assert "AWS_SECRET_ACCESS_KEY_FILE" not in config.restic_env
    assert "AKIA-very-secret-key" in config.secrets


def test_backend_secret_and_file_both_set(tmp_path: Path) -> None:
    key_file = tmp_path / "aws"
    key_file.write_text("from-file", encoding="utf-8")
    problems = problems_of(env(AWS_SECRET_ACCESS_KEY="inline-key", AWS_SECRET_ACCESS_KEY_FILE=str(key_file)))
    assert any("AWS_SECRET_ACCESS_KEY" in p and "AWS_SECRET_ACCESS_KEY_FILE" in p for p in problems)
    assert not any("inline-key" in p or "from-file" in p for p in problems)


def test_unreadable_backend_secret_file_names_it(tmp_path: Path) -> None:
    problems = problems_of(env(B2_ACCOUNT_KEY_FILE=str(tmp_path / "missing")))
    assert_named(problems, "B2_ACCOUNT_KEY_FILE")


def test_apprise_urls_file(tmp_path: Path) -> None:
    urls = tmp_path / "apprise"
    urls.write_text("tgram://123456:bot-token/987\nmailto://user:mailpw@example.com\n", encoding="utf-8")
    config = load_config(env(WATCHER_APPRISE_URLS_FILE=str(urls)))
    assert config.apprise_urls == ("tgram://123456:bot-token/987", "mailto://user:mailpw@example.com")
    assert set(config.apprise_urls) <= set(config.secrets)


def test_apprise_urls_and_file_both_set(tmp_path: Path) -> None:
    urls = tmp_path / "apprise"
    urls.write_text("json://hook.example/x", encoding="utf-8")
    problems = problems_of(env(WATCHER_APPRISE_URLS="json://other/y", WATCHER_APPRISE_URLS_FILE=str(urls)))
    assert_named(problems, "WATCHER_APPRISE_URLS_FILE")


def test_unreadable_apprise_urls_file(tmp_path: Path) -> None:
    problems = problems_of(env(WATCHER_APPRISE_URLS_FILE=str(tmp_path / "missing")))
    assert_named(problems, "WATCHER_APPRISE_URLS_FILE")


# --- patterns, time zone, cron, address -----------------------------------------------------------


@pytest.mark.parametrize("pattern", ["bad/name", "scalr-[ab-db", "db;rm", "scalr-*-db\\x"])
def test_bad_pattern_names_variable_and_pattern(pattern: str) -> None:
    problems = problems_of(env(WATCHER_CONTAINER_PATTERNS=f"scalr-*-db,{pattern}"))
    hits = [p for p in problems if "WATCHER_CONTAINER_PATTERNS" in p]
    assert len(hits) == 1
    assert pattern in hits[0] or repr(pattern) in hits[0]


def test_several_bad_patterns_are_each_reported() -> None:
    problems = problems_of(env(WATCHER_CONTAINER_PATTERNS="a/b,c[d,ok-*"))
    hits = [p for p in problems if "WATCHER_CONTAINER_PATTERNS" in p]
    assert len(hits) == 2
    assert any("a/b" in p for p in hits)
    assert any("c[d" in p for p in hits)


def test_pattern_list_separators() -> None:
    config = load_config(env(WATCHER_CONTAINER_PATTERNS=" app-db ,, other-*-db,"))
    assert config.container_patterns == ("app-db", "other-*-db")


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Europe/Berlinn", "../../etc/passwd", "UTC+2",
                                  "Europe", "America/" + "x" * 300])
def test_bad_timezone(zone: str) -> None:
    problems = problems_of(env(WATCHER_TIMEZONE=zone))
    assert_named(problems, "WATCHER_TIMEZONE")


@pytest.mark.parametrize("schedule", ["0 3 * *", "0 3 * * * *", "61 3 * * *", "0 25 * * *", "every day",
                                      "@daily"])
def test_bad_schedule(schedule: str) -> None:
    problems = problems_of(env(WATCHER_SCHEDULE=schedule))
    assert_named(problems, "WATCHER_SCHEDULE")
    assert not any(names_variable(p, "WATCHER_DRILL_SCHEDULE") for p in problems)


def test_bad_drill_schedule() -> None:
    problems = problems_of(env(WATCHER_DRILL_SCHEDULE="0 5 32 * *"))
    assert_named(problems, "WATCHER_DRILL_SCHEDULE")


def test_metrics_address_forms() -> None:
    assert (load_config(env(WATCHER_METRICS_ADDRESS=":9100")).metrics_host,
            load_config(env(WATCHER_METRICS_ADDRESS=":9100")).metrics_port) == ("0.0.0.0", 9100)
    v6 = load_config(env(WATCHER_METRICS_ADDRESS="[::1]:9810"))
    assert (v6.metrics_host, v6.metrics_port) == ("::1", 9810)


@pytest.mark.parametrize("raw", ["9810", "host:", "host:0", "host:65536", "host:http", "host:-1"])
def test_parse_address_rejects(raw: str) -> None:
    assert parse_address(raw) is None


@pytest.mark.parametrize(("raw", "expected"), [
    ("0.0.0.0:9810", ("0.0.0.0", 9810)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    (":65535", ("0.0.0.0", 65535)),
    ("[::]:9810", ("::", 9810)),
    ("metrics.local:8080", ("metrics.local", 8080)),
])
def test_parse_address_accepts(raw: str, expected: tuple[str, int]) -> None:
    assert parse_address(raw) == expected


# --- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("a,b", ["a", "b"]),
    ("a b\tc\nd", ["a", "b", "c", "d"]),
    (" , a ,, b , ", ["a", "b"]),
    ("", []),
    ("   ", []),
    ("json://h/x, mailto://u:p@h", ["json://h/x", "mailto://u:p@h"]),
])
def test_split_list(raw: str, expected: list[str]) -> None:
    assert split_list(raw) == expected


@pytest.mark.parametrize("pattern", ["scalr-*-db", "scalr-auth-postgres", "db-?", "db-[0-9]", "db-[!x]*",
                                     "a_b.c"])
def test_validate_pattern_accepts(pattern: str) -> None:
    assert validate_pattern(pattern) is None


@pytest.mark.parametrize("pattern", ["my db", "a/b", "db-[0-9", "db-[[a]]", "", "db$", "ü-db"])
def test_validate_pattern_rejects(pattern: str) -> None:
    why = validate_pattern(pattern)
    assert isinstance(why, str)
    assert why


@pytest.mark.parametrize(("url", "expected"), [
    ("rest:https://user:s3cret@host/repo", "rest:https://user:***@host/repo"),
    ("rest:https://user:p%40ss@host:8000/repo", "rest:https://user:***@host:8000/repo"),
    ("rest:http://:token@host/", "rest:http://:***@host/"),
    ("s3:https://s3.example.com/bucket", "s3:https://s3.example.com/bucket"),
    ("sftp:backup@host:/srv/restic", "sftp:backup@host:/srv/restic"),
    ("/srv/restic", "/srv/restic"),
])
def test_mask_url(url: str, expected: str) -> None:
    assert mask_url(url) == expected


def test_mask_url_password_with_at_sign() -> None:
    assert mask_url("rest:https://user:p@ssw0rd@host/repo") == "rest:https://user:***@host/repo"


# --- effective_config never shows a secret ------------------------------------------------------


def test_effective_config_masks_every_secret(tmp_path: Path) -> None:
    aws = tmp_path / "aws"
    aws.write_text("aws-secret-value", encoding="utf-8")
    config = load_config({
        "RESTIC_PASSWORD": PASSWORD,
        "RESTIC_REPOSITORY": "rest:https://user:s3cret@host/repo",
        "AWS_SECRET_ACCESS_KEY_FILE": str(aws),
        "WATCHER_APPRISE_URLS": "tgram://123456:bot-token-xyz/987 mailto://me:mail-pw@example.com",
    })
    shown = effective_config(config)
    text = repr(shown) + repr(config)
    for secret in (PASSWORD, "s3cret", "bot-token-xyz", "mail-pw", "aws-secret-value", "tgram://"):
        assert secret not in text
    assert shown["RESTIC_REPOSITORY"] == "rest:https://user:***@host/repo"
    assert shown["WATCHER_APPRISE_URLS"] == "*** (2 values from WATCHER_APPRISE_URLS)"
    assert shown["RESTIC_PASSWORD"] == "*** (from RESTIC_PASSWORD)"


def test_config_secrets_let_a_masker_hide_them() -> None:
    config = load_config({
        "RESTIC_PASSWORD": PASSWORD,
        "RESTIC_REPOSITORY": "rest:https://user:s3cret@host/repo",
        "WATCHER_APPRISE_URLS": "json://hooks.example/abc-token",
    })
    masker = Masker(config.secrets)
    line = f"Fatal: {PASSWORD} s3cret json://hooks.example/abc-token"
    masked = masker(line)
    assert PASSWORD not in masked
    assert "s3cret" not in masked
    assert "abc-token" not in masked


def test_restic_env_keeps_restic_variables_and_drops_watcher_ones() -> None:
    config = load_config(env(RESTIC_CACHE_DIR="/cache", WATCHER_CONCURRENCY="3"))
    assert config.restic_env["RESTIC_PASSWORD"] == PASSWORD
    assert config.restic_env["RESTIC_CACHE_DIR"] == "/cache"
    assert not any(key.startswith("WATCHER_") for key in config.restic_env)


def test_pattern_with_a_blank_is_rejected_not_split() -> None:
    # "scalr *" split on blanks would become "scalr" and "*", and "*" selects every container.
    problems = problems_of(env(WATCHER_CONTAINER_PATTERNS="scalr-*-db, scalr *"))
    assert any("WATCHER_CONTAINER_PATTERNS" in p and "'scalr *'" in p for p in problems)


def test_patterns_are_comma_separated_with_blanks_around_ignored() -> None:
    config = load_config(env(WATCHER_CONTAINER_PATTERNS=" scalr-*-db , other-db "))
    assert config.container_patterns == ("scalr-*-db", "other-db")


# --- the one table of settings ------------------------------------------------------------------


def test_every_config_field_but_the_derived_ones_is_a_row_of_the_table() -> None:
    derived = {"restic_env", "secrets", "secret_sources", "copies"}
    fields = {f.name for f in dataclasses.fields(Config)}
    assert {name for name, _ in rows(Config)} == fields - derived
    assert set(effective_config(load_config(BASE))) == set(SETTINGS)


def test_every_secret_of_the_table_is_shown_masked_and_kept_out_of_repr() -> None:
    secrets = {name for name, row in SETTINGS.items() if row.secret}
    assert secrets == {"RESTIC_PASSWORD", "WATCHER_APPRISE_URLS"}
    assert all(SETTINGS[name].shown is Shown.MASKED for name in secrets)
    config = load_config(env(WATCHER_APPRISE_URLS="json://hooks.example/some-long-hook-token"))
    assert PASSWORD not in repr(config) and "some-long-hook-token" not in repr(config)


@pytest.mark.parametrize("name", [name for name, row in SETTINGS.items() if row.default])
def test_every_default_reads_back_from_what_is_shown(name: str) -> None:
    """check-config's print-out of a default is itself a valid value that means the same."""
    row = SETTINGS[name]
    problems: list[str] = []
    value = row.read({}, problems)
    assert not problems
    again = row.read({name: row.kind.format(value)}, problems)
    assert (again, problems) == (value, [])


def test_effective_configuration_is_valid_input_with_the_same_meaning() -> None:
    config = load_config(env(WATCHER_SCHEDULE="15 1 * * 0", WATCHER_SHUTDOWN_GRACE="90", WATCHER_HOST="h1",
                             WATCHER_METRICS_ADDRESS="[::1]:9811", WATCHER_CONTAINER_PATTERNS="a-*,b"))
    shown = effective_config(config)
    plain = {name: value for name, value in shown.items()
             if SETTINGS[name].shown is Shown.PLAIN and value != SETTINGS[name].unset}
    again = load_config({**BASE, **plain})
    assert again == dataclasses.replace(config, restic_env=again.restic_env)


@pytest.mark.parametrize(("raw", "seconds"), [("90s", 90), ("15m", 900), ("6h", 21600), ("10", 10), ("1.5m", 90),
                                              (" 2M ", 120)])
def test_durations_are_written_with_a_unit_or_in_seconds(raw: str, seconds: float) -> None:
    config = load_config(env(WATCHER_SHUTDOWN_GRACE=raw, WATCHER_RECONCILE_INTERVAL=raw))
    assert (config.shutdown_grace_s, config.reconcile_interval_s) == (seconds, seconds)


def test_duration_defaults_and_how_they_are_shown() -> None:
    config = load_config(BASE)
    assert (config.shutdown_grace_s, config.reconcile_interval_s) == (5, 300)
    shown = effective_config(config)
    assert (shown["WATCHER_SHUTDOWN_GRACE"], shown["WATCHER_RECONCILE_INTERVAL"]) == ("5s", "5m")


@pytest.mark.parametrize("raw", ["soon", "5 minutes", "-5s", "1h30m"])
def test_a_bad_duration_is_named_with_the_forms_accepted(raw: str) -> None:
    problems = problems_of(env(WATCHER_SHUTDOWN_GRACE=raw))
    assert problems == [f"WATCHER_SHUTDOWN_GRACE={raw.strip()!r}: not a duration: write e.g. 90s, 15m, 6h or 1d "
                        "(a plain number is seconds)"]


def test_a_duration_below_its_minimum_says_the_minimum() -> None:
    problems = problems_of(env(WATCHER_RECONCILE_INTERVAL="4s"))
    assert problems == ["WATCHER_RECONCILE_INTERVAL='4s': must be at least 5s"]


@pytest.mark.parametrize(("raw", "expected"), [("", ()), ("  ", ()), (None, ("scalr-*-db", "scalr-auth-postgres"))])
def test_empty_patterns_mean_the_label_only(raw: str | None, expected: tuple[str, ...]) -> None:
    config = load_config(BASE if raw is None else env(WATCHER_CONTAINER_PATTERNS=raw))
    assert config.container_patterns == expected
    if not expected:
        assert effective_config(config)["WATCHER_CONTAINER_PATTERNS"] == "(none: the enable label only)"


def test_a_secret_file_is_shown_as_its_source(tmp_path: Path) -> None:
    urls = tmp_path / "apprise"
    urls.write_text("json://hook.example/x\n", encoding="utf-8")
    shown = effective_config(load_config(env(WATCHER_APPRISE_URLS_FILE=str(urls))))
    assert shown["WATCHER_APPRISE_URLS"] == "*** (1 value from WATCHER_APPRISE_URLS_FILE)"
    assert shown["DOCKER_HOST"] == "unix:///var/run/docker.sock"
    assert shown["WATCHER_DRILL_SCHEDULE"] == "0 5 1 * *"


def test_an_empty_apprise_urls_file_means_no_urls(tmp_path: Path) -> None:
    urls = tmp_path / "apprise"
    urls.write_text("\n", encoding="utf-8")
    assert load_config(env(WATCHER_APPRISE_URLS_FILE=str(urls))).apprise_urls == ()


def test_a_secrets_problem_never_shows_its_value(tmp_path: Path) -> None:
    problems = problems_of(env(WATCHER_APPRISE_URLS="nosuchscheme://user:hunter22@host/token-value"))
    assert_named(problems, "WATCHER_APPRISE_URLS")
    assert not any("hunter22" in p or "token-value" in p for p in problems)


def test_password_with_blanks_is_kept_whole() -> None:
    config = load_config(env(RESTIC_PASSWORD=" pw with blanks "))
    assert config.restic_password == " pw with blanks "
    assert config.restic_env["RESTIC_PASSWORD"] == " pw with blanks "


@pytest.mark.parametrize("name", ["RESTIC_PASSWORD", "WATCHER_APPRISE_URLS", "RESTIC_REPOSITORY"])
def test_a_secret_that_is_no_url_still_loads_and_is_masked(name: str) -> None:
    odd = "rest:http://[user:p4ss-w0rd@host/" if name == "RESTIC_REPOSITORY" else "json://[p4ss-w0rd"
    try:
        config = load_config({**BASE, name: odd})
    except ConfigError as exc:  # refused (not a valid Apprise URL) is fine, crashing is not
        assert "p4ss-w0rd" not in str(exc)
        return
    assert "p4ss-w0rd" not in repr(config) + repr(effective_config(config))
