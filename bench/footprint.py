"""5a-5d, footprint: the daemon's RSS and CPU while idle with the events benchmark's registered targets,
its /metrics latency, and the same figures for a daemon that is not idle (catch-up backups waiting for
a PostgreSQL that never starts). Called by bench/events.py, on its daemon and containers."""

from __future__ import annotations

import json
import time

from bench.common import MB, Report, Row, fmt_ms, fmt_s, parse_ts, percentile, verdict
from bench.world import Daemon, World

ROWS = [
    Row("5a", "Footprint: daemon RSS, idle, registered targets all up to date", goal="≤ 80 MB"),
    Row("5b", "Footprint: daemon CPU, idle, registered targets all up to date", goal="≤ 1 %"),
    Row("5c", "Footprint: `/metrics` latency (p50 / p99) with the registered targets", goal="— (info)"),
    Row("5d", "Footprint: daemon RSS / CPU while catch-up backups of never-backed-up targets wait for "
        "PostgreSQL (not idle)", goal="— (info)"),
]


def cpu_window(daemon: Daemon, idle_s: float) -> tuple[float, int, int]:
    """Lets the daemon settle (up to 5 s), then watches it for `idle_s`; returns (CPU % of a core over the
    window, VmRSS bytes and threads at its end)."""
    time.sleep(min(5.0, idle_s))
    cpu0, _, _ = daemon.proc_stat()
    wall0 = time.monotonic()
    time.sleep(idle_s)
    cpu1, rss, threads = daemon.proc_stat()
    return 100 * (cpu1 - cpu0) / (time.monotonic() - wall0), rss, threads


def scrape(daemon: Daemon, scrapes: int) -> tuple[list[float], int]:
    """GET /metrics `scrapes` times, one after the other; returns (latencies, bytes of the last body)."""
    latencies = []
    size = 0
    for _ in range(scrapes):
        begun = time.perf_counter()
        size = len(daemon.body("/metrics"))
        latencies.append(time.perf_counter() - begun)
    return latencies, size


def idle(world: World, report: Report, daemon: Daemon, idle_s: float, scrapes: int) -> None:
    """5a, 5b, 5c on the events benchmark's daemon, then stops it. Raises RuntimeError when it does
    not exit 0 on SIGTERM."""
    rows = json.loads(daemon.body("/status"))
    ours = [x for x in rows if str(x["target"]).startswith(world.name("ev-"))]
    running = [x for x in ours if x["state"] == "running"]
    cpu_pct, rss, threads = cpu_window(daemon, idle_s)
    r = report.row("5a")
    r.title += f" ({len(ours)} targets)"
    r.watcher = f"{rss / 2**20:.1f} MiB"
    r.reference = "goal 80 MB"
    r.verdict = verdict(rss <= 80 * MB)
    r = report.row("5b")
    r.title += f" ({len(ours)} targets, over {idle_s:.0f} s)"
    r.watcher = f"{cpu_pct:.2f} % of a core"
    r.reference = "goal 1 %"
    r.verdict = verdict(cpu_pct <= 1.0)
    latencies, size = scrape(daemon, scrapes)
    r = report.row("5c")
    r.watcher = f"{fmt_ms(percentile(latencies, 50))} / {fmt_ms(percentile(latencies, 99))}"
    r.reference = f"{scrapes} scrapes, {size / 1000:.0f} kB each"
    r.verdict = "info"
    report.detail(f"5. Idle daemon: {len(ours)} targets registered ({len(running)} with a backup running), "
                  f"VmRSS {rss / 2**20:.1f} MiB, {threads} threads, CPU {cpu_pct:.2f} % over {idle_s:.0f} s; "
                  f"/metrics {size} bytes, p50 {fmt_ms(percentile(latencies, 50))}, p99 "
                  f"{fmt_ms(percentile(latencies, 99))}, max {fmt_ms(max(latencies))} over {scrapes} scrapes.")
    code = daemon.stop()
    if code != 0:
        raise RuntimeError(f"the daemon exited {code} on SIGTERM")


def catch_up(world: World, report: Report, burst_ids: list[str], idle_s: float) -> None:
    """5d: a daemon that sees the same containers but no snapshot of them: catch-up for every one.
    Raises RuntimeError when it does not exit 0 on SIGTERM."""
    fresh = world.new_repo("events-catchup", init=False)
    begun = time.time()
    daemon = Daemon(world, fresh, "catchup")
    deadline = time.monotonic() + 60
    while len(daemon.log.registered(burst_ids, 0)) < len(burst_ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    reconciled = daemon.log.registered(burst_ids, 0)
    watching = parse_ts(daemon.log.events("watching")[0]["timestamp"])
    cpu_pct, rss, _ = cpu_window(daemon, idle_s)
    started_jobs = len(daemon.log.events("backup_failed")) + len(daemon.log.events("backup_started"))
    states = [x["state"] for x in json.loads(daemon.body("/status"))]
    running_now = states.count("running")
    r = report.row("5d")
    r.watcher = f"{rss / 2**20:.1f} MiB / {cpu_pct:.2f} %"
    r.reference = "idle: " + report.row("5a").watcher + " / " + report.row("5b").watcher.replace(" of a core", "")
    r.verdict = "info"
    report.detail(f"5d. A daemon started against an empty repository registered all {len(reconciled)} running "
                  f"targets by reconciliation {fmt_s(max(reconciled.values()) - watching) if reconciled else '-'} "
                  f"after `watching` ({fmt_s(watching - begun)} after spawn); with concurrency 1, one catch-up "
                  f"backup at a time waits up to 120 s for a PostgreSQL that never comes (pg_isready every 1 s); "
                  f"VmRSS {rss / 2**20:.1f} MiB, CPU {cpu_pct:.2f} % over {idle_s:.0f} s "
                  f"({running_now} target(s) in state running, {started_jobs} backup log lines so far).")
    code = daemon.stop()
    if code != 0:
        raise RuntimeError(f"the catch-up daemon exited {code} on SIGTERM")
