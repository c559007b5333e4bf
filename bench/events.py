"""3a / 3b, events: `docker start` → target_registered in the daemon's log, one container at a time and
a burst started at once. The footprint (5, bench/footprint.py) is measured on the same daemon after
the burst, with the burst's containers registered: `--only 5` runs this benchmark too."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from bench import footprint
from bench.common import Report, Row, command, fmt_ms, fmt_s, parse_ts, percentile, say, verdict
from bench.world import HOST, OWNER_LABEL, Daemon, Repo, World, api, remove_containers

ROWS = [
    Row("3a", "Event latency: container start → target registered (p50 / p99)", goal="p99 ≤ 200 ms"),
    Row("3b", "Event burst: containers started at once → all registered; missed", goal="≤ 3 s, 0 missed"),
]


def create_sleeper(world: World, name: str) -> str:
    """Creates a lightweight "database" container: the PostgreSQL image sleeping, selected by the opt-in
    label; returns its id."""
    client = api(world)
    created = client.create_container(
        world.image, command=["infinity"], entrypoint=["sleep"], name=name,
        labels={"backup-watcher.enable": "true", OWNER_LABEL: str(os.getpid())},
        host_config=client.create_host_config(network_mode="none"))
    world.containers.append(name)
    return str(created["Id"])


def started_at(world: World, container_id: str) -> float:
    """The engine's State.StartedAt of the container, as Unix seconds."""
    return parse_ts(api(world).inspect_container(container_id)["State"]["StartedAt"])


def seed_snapshots(repo: Repo, names: list[str]) -> None:
    """One tiny snapshot per name, tagged as the watcher tags them: the targets are up to date."""
    def seed(name: str) -> None:
        command(["restic", "backup", "--stdin", "--stdin-filename", "postgres.pgdump", "--host", HOST,
                 "--tag", "backup-watcher", "--tag", f"container={name}", "--tag", "database=postgres"],
                env=repo.command_env(), input=b"seed\n", timeout=1800)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(seed, names))


def one_at_a_time(world: World, report: Report, daemon: Daemon, names: list[str], starts: int) -> None:
    """3a: starts `starts` containers one after the other, each once the previous one is registered."""
    latencies: list[float] = []
    returned: list[float] = []
    for name in names[:starts]:
        container_id = create_sleeper(world, name)
        daemon.log.poll()
        mark = len(daemon.log.lines)
        api(world).start(container_id)
        returned_at = time.time()
        deadline = time.monotonic() + 30
        found: dict[str, float] = {}
        while time.monotonic() < deadline:
            found = daemon.log.registered([container_id], mark)
            if found:
                break
            time.sleep(0.005)
        if not found:
            raise RuntimeError(f"{name} was not registered within 30 s")
        begun = started_at(world, container_id)
        latencies.append(found[container_id] - begun)
        returned.append(found[container_id] - returned_at)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    r = report.row("3a")
    r.title += f", {starts} starts one at a time"
    r.watcher = f"{fmt_ms(p50)} / {fmt_ms(p99)}"
    r.reference = f"goal 200 ms (max {fmt_ms(max(latencies))})"
    r.verdict = verdict(p99 <= 0.2)
    report.detail(f"3a. Start → target_registered (from the container's State.StartedAt to the log line's "
                  f"timestamp) over {starts} starts: p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)}, max "
                  f"{fmt_ms(max(latencies))}; from the moment `start` returned: p50 "
                  f"{fmt_ms(percentile(returned, 50))}, p99 {fmt_ms(percentile(returned, 99))}.")
    remove_containers(world, names[:starts])
    # Until the daemon has seen them go (a bounded wait: the burst's figures do not depend on it).
    deadline = time.monotonic() + 60
    while len(daemon.log.events("target_removed")) < starts and time.monotonic() < deadline:
        time.sleep(0.1)


def burst(world: World, report: Report, daemon: Daemon, names: list[str]) -> list[str]:
    """3b: creates `names`, starts them all at once (10 `start` calls in parallel); returns their ids."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(lambda n: create_sleeper(world, n), names))
    daemon.log.poll()
    mark = len(daemon.log.lines)
    first_request = time.time()
    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda i: api(world).start(i), ids))
    all_started = time.time()
    deadline = time.monotonic() + 30
    found: dict[str, float] = {}
    while time.monotonic() < deadline:
        found = daemon.log.registered(ids, mark)
        if len(found) == len(ids):
            break
        time.sleep(0.02)
    missed = len(ids) - len(found)
    begun_at = {i: started_at(world, i) for i in ids}
    last_registered = max(found.values()) if found else float("nan")
    total = last_registered - first_request
    per = [found[i] - begun_at[i] for i in found]
    r = report.row("3b")
    r.title = r.title.replace("containers", f"{len(ids)} containers")
    lag = last_registered - max(begun_at.values())
    r.watcher = (f"all registered {fmt_s(total)} after the first start request, "
                 f"{fmt_ms(lag)} after the last container started; {missed} missed")
    r.reference = f"the engine alone: its {len(ids)} starts took {fmt_s(all_started - first_request)}"
    # The engine's own start rate is not the watcher's to improve: judged on what the watcher adds.
    r.verdict = verdict(lag <= 3.0 and missed == 0) + (" (watcher's part; total over 3 s)" if total > 3.0 else "")
    report.detail(f"3b. Burst of {len(ids)} `start` calls (10 in parallel): all requests answered after "
                  f"{fmt_s(all_started - first_request)}, StartedAt spread "
                  f"{fmt_s(max(begun_at.values()) - min(begun_at.values()))}, all registered "
                  f"{fmt_s(total)} after the first request; per container start → registered p50 "
                  f"{fmt_ms(percentile(per, 50)) if per else '-'}, "
                  f"p99 {fmt_ms(percentile(per, 99)) if per else '-'}"
                  f"; missed (not registered within 30 s, reconcile interval 1 h): {missed}.")
    return ids


def run(world: World, report: Report, starts: int, burst_size: int, idle_s: float, scrapes: int) -> None:
    """Measures 3a, 3b, then the footprint (5a-5d) on the same daemon and containers."""
    names = [world.name(f"ev-{i:03d}") for i in range(max(starts, burst_size))]
    repo = world.new_repo("events")
    say(f"3. seeding {len(names)} snapshots so the targets count as up to date")
    seed_snapshots(repo, names)
    daemon = Daemon(world, repo, "idle")
    try:
        one_at_a_time(world, report, daemon, names, starts)
        burst_ids = burst(world, report, daemon, names[:burst_size])
        footprint.idle(world, report, daemon, idle_s, scrapes)
        footprint.catch_up(world, report, burst_ids, idle_s)
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
        remove_containers(world, [n for n in names if n in world.containers])
        repo.remove()
