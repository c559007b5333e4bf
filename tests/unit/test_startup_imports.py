"""What a one-shot command and the exec helper import: a guard on start-up cost (issue 20), not a timing.

A cron job that runs `backup-watcher backup` over a fleet, and every dump's exec helper, pay for each import
on every run; these modules belong to other commands (the daemon, metrics, Apprise, schedules) or were
replaced (docker-py, requests). Each check runs in a fresh interpreter, as the command does.
"""

from __future__ import annotations

import json
import subprocess
import sys

ONE_SHOT_START = """
import json, os, socket, sys
from watcher import cli
from watcher.settings import with_flags
args = cli.build_parser().parse_args(["backup", "some-container"])
with socket.socket() as probe:  # a loopback port nobody listens on once this closes: no daemon is told
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
environ = {"RESTIC_REPOSITORY": "/nonexistent", "RESTIC_PASSWORD": "x", "DOCKER_HOST": "unix:///nonexistent.sock",
           "WATCHER_METRICS_ADDRESS": f"127.0.0.1:{port}"}
config = cli.load_config(with_flags(environ, cli.settings_given(args)))
app = cli.build_app(config)
with app.showing_progress():  # stdout is a pipe here: log lines, no terminal lines
    pass
cli._ask_daemon_to_refresh(app)  # what a backup does at its end (no daemon listens there)
print(json.dumps(sorted(sys.modules)))
"""

NOT_FOR_BACKUP = ("docker", "requests", "urllib3", "croniter", "prometheus_client", "apprise", "tqdm",
                  "urllib.request", "http.client",
                  "importlib.metadata", "watcher.daemon", "watcher.metrics", "watcher.drill", "watcher.drill_checks",
                  "watcher.drill_container", "watcher.drill_restore", "watcher.restore", "watcher.keydump")

HELPER_START = """
import json, sys
import watcher.dockerexec
print(json.dumps(sorted(sys.modules)))
"""

NOT_FOR_HELPER = ("structlog", "secrets", "ctypes", "watcher.cli", "watcher.config", "watcher.jobs", "http.client",
                  "email", "dataclasses", "inspect", "argparse", "importlib.metadata", "docker")


def modules_after(script: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `script` (which prints them as JSON, last: log
    lines may come before)."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_backup_start_imports_only_what_backup_needs() -> None:
    loaded = modules_after(ONE_SHOT_START)
    assert "watcher.jobs" in loaded  # the script did get as far as a backup's wiring
    assert sorted(name for name in NOT_FOR_BACKUP if name in loaded) == []


def test_exec_helper_imports_no_http_or_cli_machinery() -> None:
    loaded = modules_after(HELPER_START)
    assert sorted(name for name in NOT_FOR_HELPER if name in loaded) == []
