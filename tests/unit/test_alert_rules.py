"""The shipped Prometheus alert rules: valid, unit-tested with promtool, complete."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "prometheus" / "alerts.test.yml"
EXAMPLE_CONFIG = ROOT / "prometheus" / "prometheus.example.yml"
EXPECTED_ALERTS = {
    "BackupWatcherBackupFailing", "BackupWatcherSnapshotStale", "BackupWatcherNoSnapshot",
    "BackupWatcherPruneFailing", "BackupWatcherDown", "BackupWatcherMetricsAbsent",
    "BackupWatcherEventStreamDisconnected", "BackupWatcherInvalidLabels",
    "BackupWatcherRestoreDrillFailing", "BackupWatcherRestoreDrillOverdue", "BackupWatcherJobRunningLong",
    "BackupWatcherDumpShrunk",
    "BackupWatcherCopyBehind",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: the test ground installs it (apt-get install prometheus)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules() -> None:
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_example_config_is_valid_and_loads_the_rules() -> None:
    done = promtool("check", "config", str(EXAMPLE_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def test_every_alert_has_severity_and_annotations() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert [group["name"] for group in document["groups"]] == ["backup-watcher"]
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        labels = rule.get("labels") or {}
        annotations = rule.get("annotations") or {}
        assert isinstance(labels, dict) and isinstance(annotations, dict)
        assert labels.get("severity") in ("critical", "warning"), rule["alert"]
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test") or []:
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == EXPECTED_ALERTS, EXPECTED_ALERTS - firing
    assert quiet == EXPECTED_ALERTS, EXPECTED_ALERTS - quiet
