"""7a-7c, the watcher's own cost on the data path (issue 20): CPU-seconds (user + system) of the watcher's
own Python processes per GB dumped, beside the wall-time ratio against the bare pipeline, for the one-shot
`backup`, a daemon backup and `restore`; with --compare-ref, the same for the code of an older commit in
the same run, its repetitions alternating with this tree's.

How the CPU is counted, exactly rather than sampled: every Python process started here gets
bench/selfcost on PYTHONPATH, whose sitecustomize appends the process's own getrusage(RUSAGE_SELF) at exit
to a file (BW_BENCH_RUSAGE_FILE): the CLI and every exec helper (restic's child, which the benchmark could
not reap or read before it is gone). restic and pg_dump are not Python and write nothing. The daemon runs
on, so its share is the difference of its own utime + stime (/proc/PID/stat, children not included)
between `watching` and the end of its catch-up pass (the pass backs up the container's globals too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import restore
from bench.common import (
    Report,
    Row,
    X,
    bash,
    fmt_mb,
    fmt_ratio,
    fmt_s,
    median,
    parse_ts,
    repetitions,
    rounded,
    say,
    say_rep,
    verdict,
)
from bench.data import BIG_DB, row_count
from bench.pipelines import watcher_backup
from bench.world import DB_USER, HOST, Daemon, Repo, World
from tests.kit import PgContainer

GB = 1_000_000_000
HOOK_DIR = Path(__file__).resolve().parent / "selfcost"
CPU_GOAL = 1.0  # CPU-seconds per GB
WALL_GOAL = 1.03
ROWS = [
    Row("7a", "Watcher's own CPU (CLI + exec helpers) per GB dumped, one-shot `backup`; job wall time vs the bare "
        "pipeline", goal=f"≤ {CPU_GOAL:g} CPU-s/GB, job ≤ {WALL_GOAL}{X}"),
    Row("7b", "Watcher's own CPU (daemon + exec helpers) per GB dumped, a daemon backup; job wall time vs the bare "
        "pipeline", goal=f"≤ {CPU_GOAL:g} CPU-s/GB, job ≤ {WALL_GOAL}{X}"),
    Row("7c", "Watcher's own CPU (CLI + exec helpers) per GB restored, `restore`; wall time vs `restic dump | "
        "pg_restore`", goal=f"≤ {CPU_GOAL:g} CPU-s/GB"),
    Row("7d", "Information: 7b in the physical order (`WATCHER_DUMP_ORDER=physical`, pg_dump's stream passed on "
        "unread), so that 7b less 7d is what the key order's boundary search and held rows cost", goal="information"),
]


@dataclass(frozen=True)
class Tree:
    """A code tree of the watcher: this one (cwd None) or an older commit's, extracted."""

    label: str
    cwd: Path | None = None


@dataclass
class Sample:
    """One measured run: wall times, bytes, and the CPU and peak RSS of the watcher's processes."""

    seconds: float  # the whole command (one-shot, restore) or the job (daemon)
    job_seconds: float
    nbytes: int
    cpu_main: float  # the CLI or the daemon
    cpu_helpers: float
    rss_main_kib: int = 0  # peak RSS (0: the daemon, which runs on)
    rss_helper_kib: int = 0
    cpu_data_helper: float = 0.0  # the helper that carried the data (the most CPU), start-up included

    @property
    def cpu_per_gb(self) -> float:
        return (self.cpu_main + self.cpu_helpers) / (self.nbytes / GB) if self.nbytes else 0.0

    @property
    def data_per_gb(self) -> float:
        return self.cpu_data_helper / (self.nbytes / GB) if self.nbytes else 0.0


@dataclass
class Usage:
    """The getrusage lines the hook wrote for one run."""

    main: list[dict[str, float]] = field(default_factory=list)
    helpers: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Usage:
        usage = cls()
        if path.exists():
            for line in path.read_text().splitlines():
                item = json.loads(line)
                # The dump's helpers: the exec helper (or the key-ordered dump) and the hand-off command restic
                # runs; the daemon's own share is read apart, so a process left out here would not count.
                is_helper = str(item["argv"][0]).endswith(("dockerexec.py", "keydump.py", "handoff.py"))
                (usage.helpers if is_helper else usage.main).append(item)
        return usage

    @staticmethod
    def cpu(items: list[dict[str, float]]) -> float:
        return sum(i["utime"] + i["stime"] for i in items)

    @staticmethod
    def most(items: list[dict[str, float]]) -> float:
        return max((i["utime"] + i["stime"] for i in items), default=0.0)

    @staticmethod
    def rss(items: list[dict[str, float]]) -> int:
        return int(max((i["maxrss_kib"] for i in items), default=0))


def extract(ref: str, workdir: Path, role: str) -> Tree:
    """The watcher and alerting packages of commit `ref`, extracted under `workdir`; raises RuntimeError."""
    target = workdir / f"tree-{role}"
    target.mkdir()
    archive = subprocess.run(["git", "archive", ref, "watcher", "alerting"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {ref}: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", ref], capture_output=True, text=True, check=True)
    return Tree(f"{role} ({ref} = {commit.stdout.strip()})", target)


def compile_bytecode(tree: Tree) -> None:
    """Writes the bytecode of `tree`'s packages and of the rusage hook, as an installed package has it (pip
    compiles a wheel's modules): with PYTHONDONTWRITEBYTECODE set, as in CI shells, and no __pycache__ yet,
    every measured process would otherwise compile the watcher's source anew, a cost no installation pays
    (about a third of the CLI's CPU). Raises subprocess.CalledProcessError."""
    where = tree.cwd or Path.cwd()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "watcher", "alerting"], cwd=where, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HOOK_DIR)], check=True, stdout=subprocess.DEVNULL)


def installed_python(workdir: Path) -> Path:
    """An interpreter whose start is an installation's (the image's venv, `pip install .`), made once under
    `workdir`: a venv that sees this venv's site-packages (the dependencies) as a plain directory on its path, so
    that the checkout's editable-install hook there (a .pth that loads an import finder at every start: about
    10 ms of CPU per Python process, and a backup starts four or five) is never run; the watcher itself comes
    from the measured tree (the working directory). Returns its python; raises subprocess.CalledProcessError."""
    home = workdir / "installed-python"
    python = home / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True, timeout=300)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        (Path(purelib) / "bench-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@contextlib.contextmanager
def measured(tree: Tree, workdir: Path) -> Iterator[Path]:
    """Runs the watcher commands started inside from `tree` with the rusage hook, on the interpreter of
    installed_python (every command the kit starts uses sys.executable, and the CLI passes its own to its
    helpers); yields the hook's file."""
    python = installed_python(workdir)  # made before the hook is on: its making is no measured process
    fd, name = tempfile.mkstemp(prefix="bwb-rusage-")
    os.close(fd)
    os.unlink(name)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "BW_BENCH_RUSAGE_FILE")}
    os.environ["PYTHONPATH"] = str(HOOK_DIR)
    os.environ["BW_BENCH_RUSAGE_FILE"] = name
    # `python -m watcher` puts its working directory first on sys.path: the tree's packages win over the
    # installed (editable) ones, also in the exec helper restic starts (it inherits the directory).
    with contextlib.chdir(tree.cwd or Path.cwd()):
        original, sys.executable = sys.executable, str(python)
        try:
            yield Path(name)
        finally:
            sys.executable = original
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


BARE_TIMED = """
$BW_TIMER docker exec "$BW_DB" pg_dump -Fc -Z0 -U "$BW_USER" "$BW_DATABASE" \\
    | restic backup --json --stdin --stdin-filename "$BW_DATABASE.pgdump" --host "$BW_HOST" --tag "container=$BW_DB"
"""


def bare_timed(big: PgContainer, repo: Repo) -> tuple[float, float | None]:
    """The bare pipeline of 1a, its `docker exec` client timed by GNU time when there is one (the process that
    does, in the bare pipeline, what the exec helper does for the watcher); returns (wall seconds, that
    client's CPU-s or None)."""
    timer = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.NamedTemporaryFile(prefix="bwb-time-") as times:
        env = {**repo.command_env(), "BW_DB": big.name, "BW_USER": DB_USER, "BW_DATABASE": BIG_DB,
               "BW_HOST": HOST, "BW_TIMER": f"{timer} -f %U,%S -o {times.name}" if timer else ""}
        seconds, _ = bash(BARE_TIMED, env)
        if not timer:
            return seconds, None
        user, system = Path(times.name).read_text().split()[-1].split(",")
    return seconds, float(user) + float(system)


def one_shot(world: World, big: PgContainer, repo: Repo, tree: Tree) -> Sample:
    """`watcher backup BIG` from `tree`; returns its sample."""
    with measured(tree, world.workdir) as path:
        result = watcher_backup(world, repo, big.name, [big.name], expect_ok=1)
        usage = Usage.read(path)
    return Sample(result.seconds, result.job_seconds[BIG_DB], result.bytes_processed, Usage.cpu(usage.main),
                  Usage.cpu(usage.helpers), Usage.rss(usage.main), Usage.rss(usage.helpers), Usage.most(usage.helpers))


def own_cpu(pid: int) -> float:
    """utime + stime of process `pid` so far (its children not included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_backup(world: World, big: PgContainer, repo: Repo, tree: Tree, order: str = "key") -> Sample:
    """A daemon from `tree` against an empty repository, dumping in `order`: its catch-up pass backs BIG up (its
    database and its globals); returns the sample of that pass. Raises RuntimeError when it fails or takes over
    an hour."""
    with measured(tree, world.workdir) as path:
        daemon = Daemon(world, repo, f"cost-{repo.path.name}", patterns=big.name, WATCHER_DUMP_ORDER=order)
        try:
            before = own_cpu(daemon.proc.pid)
            deadline = time.monotonic() + 3600
            while len(daemon.log.events("backup_succeeded")) < 2:
                if daemon.log.events("backup_failed") or daemon.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon backup: {daemon.log_path.read_text()[-3000:]}")
                time.sleep(0.05)
            cpu = own_cpu(daemon.proc.pid) - before
        finally:
            daemon.stop()
        usage = Usage.read(path)
    ends = daemon.log.events("backup_succeeded")
    db = next(e for e in ends if e.get("database") == BIG_DB)
    starts = [parse_ts(e["timestamp"]) for e in daemon.log.events("backup_started")]
    pass_s = max(parse_ts(e["timestamp"]) for e in ends) - min(starts)
    return Sample(pass_s, float(db["duration_s"]), int(db["bytes"]), cpu, Usage.cpu(usage.helpers),
                  0, Usage.rss(usage.helpers), Usage.most(usage.helpers))


def restore_sample(world: World, big: PgContainer, repo: Repo, tree: Tree, nbytes: int) -> Sample:
    """`watcher restore BIG latest --yes` from `tree`; returns its sample. Raises RuntimeError on a wrong count."""
    expected = row_count(big)
    with measured(tree, world.workdir) as path:
        seconds, count, phases = restore.by_watcher(world, big, repo)
        usage = Usage.read(path)
    if count != expected:
        raise RuntimeError(f"restore from {tree.label} gave {count} rows, expected {expected}")
    return Sample(seconds, phases[1] if phases else seconds, nbytes, Usage.cpu(usage.main),
                  Usage.cpu(usage.helpers), Usage.rss(usage.main), Usage.rss(usage.helpers), Usage.most(usage.helpers))


def run(world: World, report: Report, big: PgContainer, reps: int, restore_reps: int,
        compare_ref: str | None, after_ref: str | None = None) -> None:
    """Measures 7a-7c on the big database, this tree or the `after_ref` commit's (and the `compare_ref` commit's)
    against the bare pipeline."""
    trees = [extract(after_ref, world.workdir, "after") if after_ref else Tree("after (this tree)")]
    if compare_ref:
        trees.insert(0, extract(compare_ref, world.workdir, "before"))
    for tree in trees:
        compile_bytecode(tree)
    # The physical order (7d, information) only for the tree measured: what the key order costs in it.
    kinds = ["bare", *(f"{mode}@{i}" for i in range(len(trees)) for mode in ("oneshot", "daemon")),
             f"physical@{len(trees) - 1}"]
    bare: list[float] = []
    client_cpu: list[float] = []
    samples: dict[str, list[Sample]] = {kind: [] for kind in kinds[1:]}
    kept: Repo | None = None
    for rep, kind in repetitions(kinds, reps):
        repo = world.new_repo(f"cost-{kind.replace('@', '-')}-{rep}")
        if kind == "bare":
            seconds, cpu = bare_timed(big, repo)
            bare.append(seconds)
            if cpu is not None:
                client_cpu.append(cpu)
        else:
            mode, index = kind.split("@")
            tree = trees[int(index)]
            if mode == "oneshot":
                sample = one_shot(world, big, repo, tree)
            else:
                sample = daemon_backup(world, big, repo, tree, "physical" if mode == "physical" else "key")
            samples[kind].append(sample)
            seconds = sample.seconds
            say(f"    {kind}: job {fmt_s(sample.job_seconds)}, {sample.nbytes / GB:.2f} GB, CPU main "
                f"{sample.cpu_main:.2f} s + helpers {sample.cpu_helpers:.2f} s = {sample.cpu_per_gb:.2f} CPU-s/GB, "
                f"peak RSS main {sample.rss_main_kib // 1024} MiB, helper {sample.rss_helper_kib // 1024} MiB")
        if kept is None and kind.startswith("oneshot"):
            kept = repo
        else:
            repo.remove()
        say_rep("cost", rep, reps, kind, seconds)
    assert kept is not None
    nbytes = samples["oneshot@0"][0].nbytes
    hand: list[float] = []
    restored: dict[str, list[Sample]] = {f"restore@{i}": [] for i in range(len(trees))}
    if restore_reps > 0:
        restores(world, big, kept, trees, restore_reps, nbytes, hand, restored)
    kept.remove()
    report_rows(report, trees, bare, samples, hand, restored, nbytes)
    if client_cpu:
        report.detail(f"7. For comparison, the bare pipeline's `docker exec` client (Go; it demultiplexes the same "
                      f"stream into restic's pipe) used {median(client_cpu) / (nbytes / GB):.2f} CPU-s/GB "
                      f"(median; {rounded(client_cpu)} s).")


def restores(world: World, big: PgContainer, kept: Repo, trees: list[Tree], reps: int, nbytes: int,
             hand: list[float], restored: dict[str, list[Sample]]) -> None:
    """The restores of 7c, by hand and by each tree's watcher, alternating; appends to `hand` and `restored`."""
    snapshot = str(max(kept.snapshots(), key=lambda s: str(s["time"]))["id"])
    for rep, kind in repetitions(["hand", *restored], reps):
        if kind == "hand":
            seconds, _ = restore.by_hand(big, kept, snapshot)
            hand.append(seconds)
        else:
            sample = restore_sample(world, big, kept, trees[int(kind.split("@")[1])], nbytes)
            restored[kind].append(sample)
            seconds = sample.seconds
        say_rep("cost restore", rep, reps, kind, seconds)


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} to {max(values):.2f}"


def cost_cell(runs: list[Sample], reference: list[float], job: bool) -> tuple[str, float, float]:
    """The table cell of one tree's runs: CPU-s/GB and the wall ratio (median, spread); returns it with
    the two medians."""
    cpu = [s.cpu_per_gb for s in runs]
    data = [s.data_per_gb for s in runs]
    ratios = [(s.job_seconds if job else s.seconds) / median(reference) for s in runs]
    cell = (f"{median(cpu):.2f} CPU-s/GB ({spread(cpu)}), of which the data's exec helper {median(data):.2f}; "
            f"{'job' if job else 'wall'} "
            f"{fmt_ratio(median(ratios), 3)} ({spread(ratios)})")
    return cell, median(cpu), median(ratios)


def report_rows(report: Report, trees: list[Tree], bare: list[float], samples: dict[str, list[Sample]],
                hand: list[float], restored: dict[str, list[Sample]], nbytes: int) -> None:
    after = len(trees) - 1
    cpus: dict[str, float] = {}
    for key, kind, reference, job in (("7a", "oneshot", bare, True), ("7b", "daemon", bare, True),
                                      ("7c", "restore", hand, False), ("7d", "physical", bare, True)):
        runs = samples[f"{kind}@{after}"] if kind != "restore" else restored[f"restore@{after}"]
        if not runs:
            continue
        cell, cpu, ratio = cost_cell(runs, reference, job)
        cpus[key] = cpu
        r = report.row(key)
        r.watcher = cell
        r.reference = f"{'bare pipeline' if kind != 'restore' else 'by hand'} {fmt_s(median(reference))}"
        if key == "7d":
            r.ratio = fmt_ratio(ratio, 3)
            r.verdict = (f"info: the key order costs 7b less 7d = {cpus['7b'] - cpu:.2f} CPU-s/GB"
                         if "7b" in cpus else "info")
            continue
        if after:
            before_runs = samples[f"{kind}@0"] if kind != "restore" else restored["restore@0"]
            r.reference += "; before: " + cost_cell(before_runs, reference, job)[0]
        r.ratio = fmt_ratio(ratio, 3)
        r.verdict = verdict(cpu <= CPU_GOAL and (ratio <= WALL_GOAL or kind == "restore"))
    report.detail(f"7. Cost ({len(bare)} repetitions, kinds alternating, a fresh repository per backup; "
                  f"{fmt_mb(nbytes)} dumped; CPU = utime + stime of the watcher's Python processes, exact "
                  f"(getrusage at exit; the daemon's from /proc between `watching` and the end of its pass); "
                  f"bare pipeline {rounded(bare)} s, restore by hand {rounded(hand)} s.")
    for index, tree in enumerate(trees):
        for kind in ("oneshot", "daemon", "physical", "restore"):
            runs = samples.get(f"{kind}@{index}", []) if kind != "restore" else restored[f"restore@{index}"]
            if not runs:
                continue
            main = "daemon" if kind in ("daemon", "physical") else "CLI"
            main_rss = "" if main == "daemon" else f"CLI {max(s.rss_main_kib for s in runs) // 1024} MiB, "
            report.detail(
                f"7. {tree.label}, {kind}: wall {rounded(s.seconds for s in runs)} s, job "
                f"{rounded(s.job_seconds for s in runs)} s; CPU {main} {rounded(s.cpu_main for s in runs)} s, "
                f"exec helpers {rounded(s.cpu_helpers for s in runs)} s; peak RSS {main_rss}"
                f"exec helper {max(s.rss_helper_kib for s in runs) // 1024} MiB.")
