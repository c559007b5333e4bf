"""Observability on the real test ground: a real Prometheus scrapes a watcher that did real backups.

Every query of the shipped Grafana dashboard and every expression of the shipped alert rules is
evaluated against that Prometheus; the JSON log lines are checked against SPEC §9; the metrics
survive a restart; and a scrape with 100 registered targets never runs restic.
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    PG_IMAGES,
    TEST_LABEL,
    DaemonProcess,
    Repo,
    StartDaemon,
    StartPg,
    docker,
    free_port,
    wait_for,
)

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "backup-watcher.json"
ALERTS = ROOT / "prometheus" / "alerts.yml"
TARGETS = ["bwt-obs-1-db", "bwt-obs-2-db"]
JOB = "backup-watcher"

# Dashboard queries (panel title, refId) that legitimately return nothing in this run: a healthy
# watcher that ran backups and prunes, but no restore drill (not implemented yet; monthly by
# default), no failed backup and no Apprise notification (no WATCHER_APPRISE_URLS).
EMPTY_DASHBOARD_QUERIES = {
    ("Target health", "D"),  # last failure: no backup failed
    ("Last success, failure and snapshot per database", "B"),  # last failure: no backup failed
    ("Restore drills", "A"),  # time since the last successful drill: no drill ran
    ("Restore drills", "B"),  # last drill duration: no drill ran
    ("Restore drills", "C"),  # failed drills: no drill ran
    ("Running now", "A"),  # running for: no job runs at the scrape (test_progress.py reads them running)
    ("Running now", "B"),  # bytes done: likewise
}
# Series selected by alert expressions that legitimately have no data in this run.
EMPTY_ALERT_SELECTORS = {
    'backup_watcher_restore_drills_total{result="failure"}',  # no drill ran
    "backup_watcher_restore_drill_last_success_timestamp_seconds",  # no drill ran
    'backup_watcher_job_started_timestamp_seconds{kind="backup"}',  # no backup runs at the scrape
}
# Alerts made to fire in this healthy run by relaxing their threshold: proves that their joins
# and label matching select both targets (value: replacement, how many series must come back).
ALERT_PROBES = {
    "BackupWatcherBackupFailing": (("> 0", ">= 0"), 2),
    # One series per (target, database): each target's database and its globals.
    "BackupWatcherSnapshotStale": (("(1.5 *", "(0 *"), 4),
    "BackupWatcherNoSnapshot": (("unless on(job, instance, target)", "and on(job, instance, target)"), 2),
    "BackupWatcherDown": (("== 0", "== 1"), 1),
    "BackupWatcherEventStreamDisconnected": (("== 0", "== 1"), 1),
    "BackupWatcherInvalidLabels": (("> 0", ">= 0"), 1),
}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


# --- Prometheus ----------------------------------------------------------------------------------
class Prometheus:
    """A real Prometheus process scraping one watcher every second, with the shipped rules."""

    def __init__(self, workdir: Path, scrape_port: int) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.write_config(scrape_port)
        self._log = open(workdir / "prometheus.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is not None or self._ready(), 30, "Prometheus to be ready", interval=0.2)
        assert self.proc.poll() is None, self.log()

    def write_config(self, scrape_port: int) -> None:
        self.instance = f"127.0.0.1:{scrape_port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [self.instance]}]}],
        }
        self.config.write_text(yaml.safe_dump(config))

    def reload(self, scrape_port: int) -> None:
        """Points the scrape job at another port and reloads the configuration (SIGHUP)."""
        self.write_config(scrape_port)
        self.proc.send_signal(signal.SIGHUP)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def api(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """POSTs to the HTTP API; returns the decoded JSON answer, errors included."""
        data = urllib.parse.urlencode(params or {}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data if params else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", {"query": expr})

    def vector(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's result as (labels, value); fails on a query error."""
        answer = self.query(expr)
        assert answer.get("status") == "success", (expr, answer)
        data = answer["data"]
        assert isinstance(data, dict)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(dict(item["metric"]), float(item["value"][1])) for item in data["result"]]

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """Factory: starts Prometheus scraping 127.0.0.1:PORT; always stopped at the end."""
    started: list[Prometheus] = []

    def start(scrape_port: int) -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        prom = Prometheus(workdir, scrape_port)
        started.append(prom)
        return prom

    yield start
    for prom in started:
        prom.stop()


# --- helpers -------------------------------------------------------------------------------------
def scraped_after(prom: Prometheus, moment: float) -> None:
    """Waits until Prometheus has a successful scrape of its target that started after `moment` (Unix time)."""
    wait_for(lambda: prom.vector(f'timestamp(up{{instance="{prom.instance}"}} == 1) > {moment:.3f}'), 30,
             f"a scrape of {prom.instance} after {moment:.3f}", interval=0.1)


def parse_time(raw: str) -> float:
    """RFC 3339 with any number of fractional digits (restic writes nanoseconds) → Unix seconds."""
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", raw)
    assert match, raw
    base, fraction, offset = match.groups()
    offset = "+00:00" if offset == "Z" else offset
    return datetime.fromisoformat(f"{base}{(fraction or '')[:7]}{offset}").timestamp()


def scraped(text: str, name: str) -> dict[tuple[str, ...], float]:
    """Samples of one metric in a /metrics text, keyed by their sorted label values."""
    values: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                values[tuple(f"{k}={v}" for k, v in sorted(sample.labels.items()))] = sample.value
    return values


def by_target_db(rows: list[tuple[dict[str, str], float]]) -> dict[tuple[str, str], float]:
    return {(labels["target"], labels["database"]): value for labels, value in rows}


def newest_in_repository(repo: Repo) -> dict[tuple[str, str], float]:
    """The newest snapshot time of every (container, database), read with restic itself."""
    newest: dict[tuple[str, str], float] = {}
    for snap in repo.snapshots(include_globals=True):
        tags = {tag.split("=", 1)[0]: tag.split("=", 1)[1] for tag in snap.get("tags") or [] if "=" in tag}
        # A container's globals stand in the metrics as the database "(globals)".
        key = (tags.get("container", ""), tags.get("database", "(globals)"))
        newest[key] = max(newest.get(key, 0.0), parse_time(str(snap["time"])))
    return newest


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels") or [])


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel."""
    queries = []
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets") or []:
            queries.append((str(panel["title"]), str(target["refId"]), str(target["expr"])))
    return queries


GRAFANA_VARIABLES = {"target": ".*", "instance": ".*", "__rate_interval": "1m", "__interval": "15s",
                     "__range": "5m"}


def substitute(expr: str, **chosen: str) -> str:
    """Replaces Grafana's variables ($name and ${name}) as Grafana would for "All" (or the `chosen`
    values) and a 1 h view."""
    values = {**GRAFANA_VARIABLES, **chosen}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def alert_rules() -> list[dict[str, str]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


# --- a to d: Prometheus, dashboard, alert rules, logs, restart -----------------------------------------
def test_prometheus_dashboard_alerts_logs_and_restart(start_pg: StartPg, start_daemon: StartDaemon, repo: Repo,
                                                      watcher_env: dict[str, str],
                                                      prometheus: Callable[[int], Prometheus]) -> None:
    # a. Two real targets, backed up at once (no snapshot yet), then every minute.
    start_pg(TARGETS[0], "15")
    start_pg(TARGETS[1], "17")
    # One copy (SPEC §12) on a local path, for the dashboard's and the alert rules' copy series.
    env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "bwt-obs-*", "WATCHER_SCHEDULE": "* * * * *",
           "WATCHER_COPY_TO": "offsite", "WATCHER_COPY_OFFSITE_REPOSITORY": str(repo.path.parent / "offsite"),
           "WATCHER_COPY_OFFSITE_PASSWORD": "offsite-copy-password"}
    daemon: DaemonProcess = start_daemon(env)
    # Some container events for backup_watcher_docker_events_total (a name the patterns do not select).
    docker("run", "--rm", "--network", "none", "--label", TEST_LABEL, "--name", "bwt-evt-obs",
           "--entrypoint", "true", PG_IMAGES["15"])
    wait_for(lambda: all(daemon.events("backup_succeeded", target=name) for name in TARGETS), 150,
             "a backup of each target", interval=0.5)
    wait_for(lambda: daemon.events("prune_succeeded"), 120, "the first prune", interval=0.5)
    assert all(repo.snapshots_of(name) for name in TARGETS)

    prom: Prometheus = prometheus(daemon.port)
    wait_for(lambda: prom.vector(f'up{{job="{JOB}"}}') == [({"__name__": "up", "job": JOB,
                                                            "instance": prom.instance}, 1.0)],
             30, "Prometheus to scrape the daemon", interval=0.2)
    now = time.time()
    successes = by_target_db(prom.vector("backup_watcher_last_success_timestamp_seconds"))
    ages = by_target_db(prom.vector("backup_watcher_snapshot_age_seconds"))
    assert {target for target, _ in successes} == set(TARGETS), successes
    assert {target for target, _ in ages} == set(TARGETS), ages
    for value in successes.values():
        assert now - 600 <= value <= now + 5
    for value in ages.values():
        assert 0 <= value <= 600

    # Let one more pass and its prune happen while Prometheus scrapes, so that rate() and
    # increase() see the counters move.
    prunes = len(daemon.events("prune_succeeded"))
    wait_for(lambda: len(daemon.events("prune_succeeded")) > prunes, 100, "the next pass and its prune",
             interval=0.5)
    pruned = f'backup_watcher_prunes_total{{instance="{prom.instance}",result="success"}} >= {prunes + 1}'
    wait_for(lambda: prom.vector(pruned), 30, "Prometheus to scrape the counters of that pass", interval=0.2)

    # c. Every dashboard query and every alert expression, against this Prometheus.
    check_dashboard_structure()
    check_dashboard_queries(prom)
    check_alert_rules(prom)

    # b. The newest snapshot's timestamp survives a restart (read from the repository).
    def quiet() -> bool:
        rows = daemon.status()
        return (datetime.now(UTC).second < 35 and len(rows) == 2 and all(r["state"] == "ok" for r in rows)
                and len(daemon.events("prune_started")) == len(daemon.events("prune_succeeded")))

    wait_for(quiet, 70, "a moment without a running job, well before the next slot", interval=0.2)
    scraped_after(prom, time.time())
    before = by_target_db(prom.vector(f'backup_watcher_last_snapshot_timestamp_seconds{{instance="{prom.instance}"}}'))
    assert {target for target, _ in before} == set(TARGETS)
    assert daemon.stop() == 0
    in_repository = newest_in_repository(repo)
    for key, value in before.items():
        assert abs(in_repository[key] - value) < 0.01, (key, value, in_repository)

    restarted: DaemonProcess = start_daemon(env)

    def snapshot_series() -> dict[tuple[str, ...], float] | None:
        series = scraped(restarted.metrics(), "backup_watcher_last_snapshot_timestamp_seconds")
        return series if len(series) == len(before) else None

    after_direct = wait_for(snapshot_series, 30, "the restarted daemon's snapshot series")
    assert isinstance(after_direct, dict)
    assert sorted(after_direct.values()) == sorted(before.values())
    reloaded_at = time.time()
    prom.reload(restarted.port)
    scraped_after(prom, reloaded_at)
    after = by_target_db(prom.vector(f'backup_watcher_last_snapshot_timestamp_seconds{{instance="{prom.instance}"}}'))
    assert after == before
    assert restarted.stop() == 0

    # d. Every log line of both daemons (SPEC §9).
    check_log_lines([*daemon.lines(), *restarted.lines()])


def check_dashboard_structure() -> None:
    board = dashboard()
    assert "__inputs" not in board
    assert 36 <= int(board["schemaVersion"]) <= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["target"]["type"] == "query"
    uids = set()
    for panel in all_panels(board["panels"]):
        if panel["type"] == "row":
            continue
        uids.add(panel["datasource"]["uid"])
        for target in panel["targets"]:
            uids.add(target["datasource"]["uid"])
    for variable in variables.values():
        if variable["type"] == "query":
            uids.add(variable["datasource"]["uid"])
    assert uids == {"${datasource}"}
    ids = [p["id"] for p in all_panels(board["panels"])]
    assert len(ids) == len(set(ids))


def check_dashboard_queries(prom: Prometheus) -> None:
    assert len(EMPTY_DASHBOARD_QUERIES) + len(EMPTY_ALERT_SELECTORS) <= 10, "the allow-list has grown"
    # Template variables: label_values(SELECTOR, LABEL) must list something.
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
        assert match, variable["definition"]
        rows = prom.vector(substitute(match.group(1)))
        assert rows and all(match.group(2) in labels for labels, _ in rows), variable["name"]

    queries = dashboard_queries()
    assert len(queries) >= 25
    problems = []
    seen_allowed = set()
    for title, ref, expr in queries:
        answer = prom.query(substitute(expr))
        if answer.get("status") != "success":
            problems.append(f"{title} [{ref}]: {answer.get('error')}\n{expr}")
            continue
        result = answer["data"]["result"]
        if (title, ref) in EMPTY_DASHBOARD_QUERIES:
            seen_allowed.add((title, ref))
            if result:
                problems.append(f"{title} [{ref}] has data now: take it off EMPTY_DASHBOARD_QUERIES")
        elif not result:
            problems.append(f"{title} [{ref}] returned nothing:\n{expr}")
        else:
            # With one target chosen, a query that returns targets returns only that one.
            chosen = prom.query(substitute(expr, target=TARGETS[0]))
            chosen_rows = chosen.get("data", {}).get("result") or []
            others = {row["metric"].get("target") for row in chosen_rows} - {None, TARGETS[0]}
            if chosen.get("status") != "success" or not chosen_rows or others:
                problems.append(f"{title} [{ref}] with target={TARGETS[0]}: {chosen}")
    assert seen_allowed == EMPTY_DASHBOARD_QUERIES, "stale allow-list entries"
    assert not problems, "\n\n".join(problems)
    print(f"\n{len(queries)} dashboard queries evaluated, {len(queries) - len(EMPTY_DASHBOARD_QUERIES)} with data")


def check_alert_rules(prom: Prometheus) -> None:
    rules = alert_rules()
    problems: list[str] = []
    selectors: set[str] = set()
    for rule in rules:
        problems.extend(_quiet_and_probed(prom, rule))
        selectors |= set(re.findall(r"\b(?:up|backup_watcher_\w+)(?:\{[^}]*\})?", rule["expr"]))
    problems.extend(_selectors_present(prom, selectors))
    problems.extend(_rules_loaded(prom, rules))
    assert not problems, "\n".join(problems)
    print(f"{len(rules)} alert expressions quiet, {len(ALERT_PROBES)} relaxed probes fire, "
          f"{len(selectors)} selectors checked")


def _quiet_and_probed(prom: Prometheus, rule: dict[str, Any]) -> list[str]:
    """A healthy run: the rule does not fire, and its relaxed probe (if any) fires for the expected series."""
    expr = rule["expr"]
    answer = prom.query(expr)
    if answer.get("status") != "success":
        return [f"{rule['alert']}: {answer.get('error')}"]
    problems = []
    if answer["data"]["result"]:
        problems.append(f"{rule['alert']} would fire: {answer['data']}")
    if rule["alert"] in ALERT_PROBES:
        (old, new), expected = ALERT_PROBES[rule["alert"]]
        assert old in expr, (rule["alert"], old)
        probed = prom.vector(expr.replace(old, new))
        if len(probed) != expected:
            problems.append(f"{rule['alert']} relaxed ({old!r} → {new!r}) gave {probed}, expected {expected} series")
    return problems


def _selectors_present(prom: Prometheus, selectors: set[str]) -> list[str]:
    """Every series an alert reads exists, except those that only a failure or a drill creates."""
    problems = []
    for selector in sorted(selectors):
        rows = prom.vector(selector)
        if selector in EMPTY_ALERT_SELECTORS:
            if rows:
                problems.append(f"{selector} has data now: take it off EMPTY_ALERT_SELECTORS")
        elif not rows:
            problems.append(f"no series for {selector}")
    assert selectors >= EMPTY_ALERT_SELECTORS, "stale allow-list entries"
    return problems


def _rules_loaded(prom: Prometheus, rules: list[dict[str, Any]]) -> list[str]:
    """Prometheus itself loaded and evaluated every rule without an error, and nothing is pending."""
    answer = prom.api("/api/v1/rules")
    loaded = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules}
    problems = [f"rule {rule['name']}: health {rule['health']} {rule.get('lastError')}" for rule in loaded
                if rule["health"] != "ok" or rule["lastEvaluation"].startswith("0001")]
    alerts = prom.api("/api/v1/alerts")["data"]["alerts"]
    if alerts:
        problems.append(f"alerts active in a healthy run: {alerts}")
    return problems


def check_log_lines(lines: list[dict[str, object]]) -> None:
    assert lines
    for line in lines:
        for key in ("timestamp", "level", "event"):
            assert key in line, line
        assert RFC3339_UTC.match(str(line["timestamp"])), line
        assert line["level"] in ("debug", "info", "warning", "error", "critical"), line
        assert re.fullmatch(r"[a-z][a-z0-9_]*", str(line["event"])), line
    started = [line for line in lines if line["event"] == "backup_started"]
    succeeded = [line for line in lines if line["event"] == "backup_succeeded"]
    assert len(succeeded) >= 4
    for line in succeeded:
        for key in ("target", "database", "run_id", "snapshot_id", "duration_s", "bytes"):
            assert key in line, (key, line)
        assert isinstance(line["bytes"], int) and line["bytes"] > 0, line
        assert isinstance(line["duration_s"], int | float) and line["duration_s"] >= 0, line
        same_job = [s for s in started if s["run_id"] == line["run_id"]]
        assert same_job, f"no backup_started line with run_id {line['run_id']}"
        assert all(s["target"] == line["target"] for s in same_job), same_job
        assert any(s["database"] == line["database"] for s in same_job), same_job
    # One run_id per job: all its lines are of one target, once per database; jobs never share one.
    jobs: dict[str, list[dict[str, object]]] = {}
    for line in started:
        jobs.setdefault(str(line["run_id"]), []).append(line)
    for run_id, job in jobs.items():
        assert len({line["target"] for line in job}) == 1, (run_id, job)
        assert len({line["database"] for line in job}) == len(job), (run_id, job)
    assert len(jobs) >= 4


# --- e: 100 registered targets, scrapes never run restic --------------------------------------------
# Runs in its own process (no GIL shared with the scrapes): lists /proc every millisecond or so
# and reports, on SIGTERM, every process whose argv[0] is restic, with its ancestors. A command
# line is read again while its process is young (a fork shows its parent's command line until it
# execs), then cached, so a round costs little more than listing /proc.
RESTIC_WATCH = r"""
import json, os, signal, sys, time

halt = []
signal.signal(signal.SIGTERM, lambda *_: halt.append(1))

def ancestors(pid):
    chain = []
    while pid > 1 and len(chain) < 64:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        chain.append(pid)
    return chain

seen, known, rounds = {}, {}, 0
print("watching", flush=True)
while not halt:
    now = time.monotonic()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in seen or now - known.setdefault(pid, now) > 0.5:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"restic":
            seen[pid] = {"argv": b" ".join(argv).decode(errors="replace"), "ancestors": ancestors(pid)}
    rounds += 1
    time.sleep(0.0005)
json.dump({"rounds": rounds, "seen": {str(k): v for k, v in seen.items()}}, sys.stdout)
"""


class ResticWatch:
    """The /proc sampler above, as a separate process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RESTIC_WATCH], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "watching"
        self.started = time.perf_counter()

    def halt(self) -> tuple[int, float, dict[int, dict[str, object]]]:
        """Stops sampling; returns (rounds, seconds, {pid: {argv, ancestors}})."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        report = json.loads(out)
        seen = {int(pid): info for pid, info in report["seen"].items()}
        return int(report["rounds"]), time.perf_counter() - self.started, seen


def _start_sleeper(name: str) -> None:
    docker("run", "-d", "--network", "none", "--name", name, "--label", TEST_LABEL,
           "--label", "backup-watcher.enable=true", "--entrypoint", "sleep", PG_IMAGES["15"], "infinity")


@pytest.mark.alone  # 100 opt-in containers: every other watcher on the engine would select them
def test_scrapes_with_100_targets_never_run_restic(start_daemon: StartDaemon, watcher_env: dict[str, str]) -> None:
    names = [f"bwt-fleet-{i:03d}" for i in range(1, 101)]
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(_start_sleeper, names))
        env = {**watcher_env, "WATCHER_CONTAINER_PATTERNS": "bwt-nothing", "WATCHER_CONCURRENCY": "1"}
        daemon: DaemonProcess = start_daemon(env)
        wait_for(lambda: len([r for r in daemon.status() if str(r["target"]).startswith("bwt-fleet-")]) == 100,
                 60, "100 registered targets", interval=0.2)

        # The watch runs during the scrapes; a short-lived "restic" of ours proves it sees one.
        watch = ResticWatch()
        control = subprocess.Popen(["bash", "-c", "exec -a restic sleep 0.1"])
        control.wait()
        latencies = []
        for _ in range(50):
            started = time.perf_counter()
            text = daemon.metrics()
            latencies.append(time.perf_counter() - started)
        rounds, window, seen = watch.halt()

        assert control.pid in seen, f"the /proc watch missed the control process: {seen}"
        ours = [info["argv"] for pid, info in seen.items()
                if daemon.proc.pid in info["ancestors"]]  # type: ignore[operator]
        others = [info["argv"] for pid, info in seen.items()
                  if pid != control.pid and daemon.proc.pid not in info["ancestors"]]  # type: ignore[operator]
        intervals = scraped(text, "backup_watcher_schedule_interval_seconds")
        listed = {key[-1].split("=", 1)[1] for key in intervals}
        p50, worst = statistics.median(latencies), max(latencies)
        print(f"\n/metrics with {len(listed)} targets: p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms "
              f"over {len(latencies)} scrapes; /proc sampled {rounds} times in {window * 1000:.0f} ms; "
              f"restic processes of the daemon: "
              f"{len(ours)}; other restic processes on the machine: {len(others)}")
        assert rounds >= 10, "the /proc watch did not run during the scrapes"
        assert not ours, f"restic ran during scrapes: {ours}"
        assert set(names) <= listed, sorted(set(names) - listed)
        assert worst < 2.0, latencies
        daemon.stop(timeout=60)
    finally:
        for start in range(0, len(names), 25):
            docker("rm", "-f", *names[start:start + 25], check=False, timeout=300)
