"""Settings as command-line flags (SPEC §4): the environment's names, a flag winning, no secrets."""

from __future__ import annotations

import pytest

from watcher.cli import build_parser, main, settings_given
from watcher.config import FLAG_VARIABLES, SETTINGS, load_config
from watcher.settings import flag_name, with_flags


def test_flag_names_follow_the_variables() -> None:
    assert flag_name("WATCHER_SCHEDULE") == "--schedule"
    assert flag_name("WATCHER_KEEP_DAILY") == "--keep-daily"
    assert flag_name("DOCKER_HOST") == "--docker-host"
    assert flag_name("RESTIC_PASSWORD_FILE") == "--restic-password-file"


def test_a_flag_wins_over_the_environment_and_the_command_keeps_its_own_options() -> None:
    args = build_parser().parse_args(["--schedule", "0 4 * * *", "--host", "db-host-2", "--keep-daily", "7",
                                      "restore", "scalr-app-db", "--host", "old-host"])
    given = settings_given(args)
    assert args.host == "old-host", "restore's --host (whose snapshots) is not the watcher's identity"
    environ = with_flags({"RESTIC_REPOSITORY": "/srv/restic", "RESTIC_PASSWORD": "pw",
                          "WATCHER_SCHEDULE": "0 3 * * *", "WATCHER_KEEP_DAILY": "30"}, given)
    config = load_config(environ)
    assert (config.schedule, config.host, config.retention.daily) == ("0 4 * * *", "db-host-2", 7)


@pytest.mark.parametrize("secret", ["--restic-password", "--apprise-urls", "--password"])
def test_secrets_are_never_flags(secret: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert not any(variable in ("RESTIC_PASSWORD", "WATCHER_APPRISE_URLS") for variable in FLAG_VARIABLES)
    # Not even as an abbreviation of its _FILE form (--restic-password-file, --apprise-urls-file).
    with pytest.raises(SystemExit):
        build_parser().parse_args([secret, "value", "run"])
    capsys.readouterr()


@pytest.mark.parametrize(("given", "variable", "file_flag"), [
    (["--restic-password", "Hunter2-correct-horse", "run"], "RESTIC_PASSWORD_FILE", "--restic-password-file"),
    (["check-config", "--restic-password=Hunter2-correct-horse"], "RESTIC_PASSWORD_FILE", "--restic-password-file"),
    (["--apprise-urls", "json://u:Hunter2-correct-horse@h/", "run"], "WATCHER_APPRISE_URLS_FILE",
     "--apprise-urls-file"),
    (["backup", "--aws-secret-access-key", "Hunter2-correct-horse"], "AWS_SECRET_ACCESS_KEY_FILE", None),
    (["--copy-offsite-password", "Hunter2-correct-horse", "copy"], "WATCHER_COPY_OFFSITE_PASSWORD_FILE", None),
    # A copy named off_site (WATCHER_COPY_OFF_SITE_*): its flag would be --copy-off-site-password.
    (["--copy-off-site-password", "Hunter2-correct-horse", "copy"], "WATCHER_COPY_OFF_SITE_PASSWORD_FILE", None),
    # Shortened: argparse takes no abbreviation and would echo the value as the command it then finds.
    (["--restic-pass", "Hunter2-correct-horse", "run"], "RESTIC_PASSWORD_FILE", "--restic-password-file"),
    (["status", "--aws-secret=Hunter2-correct-horse"], "AWS_SECRET_ACCESS_KEY_FILE", None),
])
def test_a_secret_given_as_a_flag_is_refused_without_echoing_it(
        given: list[str], variable: str, file_flag: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse alone would answer `invalid choice: 'Hunter2-…'` (the value taken for the command) or
    # `unrecognized arguments: --restic-password Hunter2-…`: the secret on stderr, the container's log.
    assert main(given) == 2
    captured = capsys.readouterr()
    assert "Hunter2" not in captured.err + captured.out
    assert variable in captured.err, "the refusal says where the secret goes instead"
    if file_flag is not None:
        assert f"{file_flag} PATH" in captured.err


def test_a_bad_flag_is_reported_by_its_variable_with_the_others(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RESTIC_REPOSITORY", "/srv/restic")
    monkeypatch.setenv("RESTIC_PASSWORD", "pw")
    assert main(["--schedule", "0 3 30 2 *", "--concurrency", "0", "check-config"]) == 2
    err = capsys.readouterr().err
    assert "WATCHER_SCHEDULE='0 3 30 2 *'" in err and "WATCHER_CONCURRENCY" in err


def test_every_setting_of_the_table_is_a_flag_and_no_secret_is() -> None:
    for name, row in SETTINGS.items():
        if row.secret:
            assert name not in FLAG_VARIABLES
            assert f"{name}_FILE" in FLAG_VARIABLES, "a secret's flag is the path of its file"
        else:
            assert name in FLAG_VARIABLES


def test_help_lists_each_flag_with_its_variable_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--shutdown-grace VALUE how long running backups may finish" in out
    assert "(WATCHER_SHUTDOWN_GRACE; default '5s')" in out
    assert "--restic-password-file VALUE" in out and "--restic-password VALUE" not in out


def test_a_duration_flag_takes_a_unit() -> None:
    args = build_parser().parse_args(["--shutdown-grace", "2m", "--reconcile-interval", "90", "prune"])
    config = load_config(with_flags({"RESTIC_REPOSITORY": "/srv/restic", "RESTIC_PASSWORD": "pw"},
                                    settings_given(args)))
    assert (config.shutdown_grace_s, config.reconcile_interval_s) == (120, 90)


@pytest.mark.parametrize("given", [
    ["--restic-password-file", "/run/secrets/restic", "status"],  # a secret's _FILE flag is no secret
    ["status", "--json"], ["--restic-re", "x", "status"],  # a flag of its own, or short for one as well
    ["restore", "scalr-app-db", "--", "--restic-password"],  # after --, a positional (argparse's own words then)
])
def test_what_is_no_secret_flag_is_left_to_argparse(given: list[str]) -> None:
    from watcher.cli import secret_flag_problem
    assert secret_flag_problem(given) is None
