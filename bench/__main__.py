"""The backup-watcher benchmark (issue 6): the watcher against the bare shell pipelines it replaces
and against the physical limit, side by side in one run, as a markdown table of ratios.

Run it through bench/run (which brings up the test ground and a private Docker engine); see
bench/README.md for what each row measures. Progress goes to stderr, the report to stdout.
Nothing here asserts a timing: a benchmark reports, CI only checks that it still runs (--quick).
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import cost, events, fleet, footprint, realistic, restore, storage, throughput
from bench.common import MB, Report, command, fmt_mb, fmt_s, say
from bench.data import BIG_DB, database_size, fill_database, sql
from bench.pipelines import watcher_backup
from bench.world import Repo, World, api, enter_environment, remove_containers, remove_stale, start_pg
from tests.kit import PG_IMAGES, wait_ready

# The table's rows in the order they are printed, each declared by its benchmark.
ROWS = [*throughput.ROWS, *storage.ROWS, *realistic.ROWS, *events.ROWS, *fleet.ROWS, *footprint.ROWS,
        *restore.ROWS, *cost.ROWS]


def machine_facts(world: World) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    engine = api(world).version()
    restic = command(["restic", "version"]).stdout.decode().strip()
    return [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"command: bench/run {' '.join(sys.argv[1:])}".rstrip(),
        f"machine: {os.cpu_count()} CPUs ({cpu}), {mem / 2**20:.1f} GiB RAM, Linux {platform.release()}, "
        f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"software: Docker engine {engine.get('Version')} (the benchmark's own), {restic.split(' compiled')[0]}, "
        f"Python {platform.python_version()}, image {world.image}",
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts: proves the scripts work")
    parser.add_argument("--size-mb", type=int, help="size of the big database (default 700, quick 30)")
    parser.add_argument("--reps", type=int, help="repetitions of the throughput and fleet runs (default 3, quick 1)")
    parser.add_argument("--restore-reps", type=int, help="repetitions of the restores (default 2, quick 1)")
    parser.add_argument("--fleet", type=int, help="number of small databases (default 20, quick 3)")
    parser.add_argument("--fleet-size-mb", type=float,
                        help="size of each small database (default 12, quick 8; an empty one is 7.5)")
    parser.add_argument("--starts", type=int, help="one-at-a-time starts (default 50, quick 5)")
    parser.add_argument("--burst", type=int, help="containers started at once (default 100, quick 10)")
    parser.add_argument("--idle-s", type=float, help="idle window of the footprint (default 30, quick 3)")
    parser.add_argument("--real-orders", type=int,
                        help="orders of the realistic database of 2d-2f (default 1500000, quick 20000; events and "
                             "sessions: 4/15 of it)")
    parser.add_argument("--scrapes", type=int, default=100, help="/metrics scrapes (default 100)")
    parser.add_argument("--pg", choices=sorted(PG_IMAGES), default="15", help="PostgreSQL major (default 15)")
    parser.add_argument("--compare-ref", metavar="REF",
                        help="7 also measures the watcher of git commit REF, alternating with this tree's")
    parser.add_argument("--after-ref", metavar="REF",
                        help="7 measures the watcher of git commit REF instead of this tree's (this tree may change)")
    parser.add_argument("--cost-restore-reps", type=int, help="restores of 7 (default --reps)")
    parser.add_argument("--only", default="1,2,3,4,5,6,7",
                        help="comma list of benchmarks to run (default all; 2r: only 2d-2f)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (repositories, daemon logs)")
    args = parser.parse_args(argv)
    q = args.quick
    defaults = {"size_mb": (700, 30), "reps": (3, 1), "restore_reps": (2, 1), "fleet": (20, 3),
                "fleet_size_mb": (12.0, 8.0), "starts": (50, 5), "burst": (100, 10), "idle_s": (30.0, 3.0),
                "real_orders": (1_500_000, 20_000)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    if "5" in args.only:
        args.only.add("3")  # the footprint is measured on the events benchmark's daemon
    return args


def big_database(world: World, report: Report, args: argparse.Namespace) -> None:
    """1, 2, 7 and 6, in that order, on one big database (2 continues 1's repository, 6 restores 2's)."""
    say(f"starting {world.name('big')} and filling it to about {args.size_mb} MB")
    big = start_pg(world, world.name("big"), BIG_DB)
    wait_ready(big.name, timeout=180)
    rows = fill_database(big, args.size_mb * MB)
    world.big_size = database_size(big)
    report.detail(f"Big database: {rows} rows, {fmt_mb(world.big_size)} (pg_database_size), "
                  f"PostgreSQL {sql(big, 'SHOW server_version')}.")
    watcher_repo: Repo | None = None
    if "1" in args.only:
        say("1. throughput")
        watcher_repo = throughput.run(world, report, big, args.reps)
    if "2" in args.only:
        say("2. storage")
        watcher_repo = storage.run(world, report, big, watcher_repo)
    if "7" in args.only:
        say("7. the watcher's own cost")
        restore_reps = args.reps if args.cost_restore_reps is None else args.cost_restore_reps
        cost.run(world, report, big, args.reps, restore_reps, args.compare_ref, args.after_ref)
    if "6" in args.only:
        say("6. restore")
        if watcher_repo is None:
            watcher_repo = world.new_repo("restore")
            watcher_backup(world, watcher_repo, big.name, [big.name], expect_ok=1)
        restore.run(world, report, big, watcher_repo, args.restore_reps)
    remove_containers(world, [big.name])


def benchmarks(world: World, report: Report, args: argparse.Namespace) -> None:
    remove_stale(world)
    report.facts = machine_facts(world)
    if args.quick:
        report.facts.append("mode: --quick (tiny sizes and counts: proves the scripts run; its ratios and "
                            "verdicts mean nothing, the fixed costs dominate)")
    say(report.facts[2])
    if args.only & {"1", "2", "6", "7"}:
        big_database(world, report, args)
    if args.only & {"2", "2r"}:
        say("2d-2f. storage on the realistic database")
        realistic.run(world, report, args.real_orders, args.real_orders * 4 // 15)
    if "4" in args.only:
        say("4. fleet")
        fleet.run(world, report, args.fleet, int(args.fleet_size_mb * MB), args.reps)
    if "3" in args.only:
        say("3./5. events and footprint")
        events.run(world, report, args.starts, args.burst, args.idle_s, args.scrapes)


def clean_up(world: World) -> None:
    """Kills the daemons still running and removes the containers still there."""
    for proc in world.daemons:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if world.containers:
        remove_containers(world, list(world.containers))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    engine = os.environ.get("BW_BENCH_DOCKER_HOST") or os.environ.get("DOCKER_HOST")
    if not engine or shutil.which("restic") is None:
        print("bench: run me through bench/run (it brings up the engine and restic)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="bwb-", dir="/var/tmp"))
    password_file = workdir / "repo-password"
    password_file.write_text(secrets.token_urlsafe(24) + "\n")
    enter_environment(engine, workdir)
    world = World(engine=engine, workdir=workdir, major=args.pg, quick=args.quick,
                  repo_password_file=password_file, pg_password=secrets.token_urlsafe(16))
    report = Report.of(ROWS)
    started = time.monotonic()
    failed: BaseException | None = None
    try:
        benchmarks(world, report, args)
    except BaseException as exc:
        failed = exc
        raise
    finally:
        clean_up(world)
        if args.keep or failed is not None:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        report.facts.append(f"benchmark wall time: {fmt_s(time.monotonic() - started)}; load average at end "
                            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if failed is None:
            sys.stdout.write(report.render())
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
