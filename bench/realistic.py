"""2d / 2e / 2f, storage on a realistic database (issue 19): tables where autovacuum has run, so that
the day-2 change's inserts and new row versions land in free space all over them. The watcher's
default (WATCHER_DUMP_ORDER=key) against the seed design (`pg_dump -Fc | restic backup --stdin`) and
against today's physical order (WATCHER_DUMP_ORDER=physical), on the same database in one run; and a
table keyed by random UUIDv4 (information: what key order costs and saves there)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.common import Report, Row, X, fmt_mb, fmt_ratio, fmt_s, median, rounded, say, verdict
from bench.data import REAL_DB, UUID_DB, database_size, fill_realistic, fill_uuid, realistic_change, uuid_change
from bench.pipelines import bare_backup, watcher_backup
from bench.world import Repo, World, remove_containers, start_pg
from tests.kit import PgContainer, wait_ready

ROWS = [
    Row("2d", "Storage, realistic: day-2 repository growth where autovacuum has run before the change (orders + "
        "events, free space reused all over both tables), watcher (key order, `WATCHER_DUMP_ORDER=key`) vs seed design "
        "(`pg_dump -Fc | restic backup --stdin`)", goal=f"≤ 0.1{X}"),
    Row("2e", "Dump wall time on the realistic database: watcher backup in key order vs the same in physical order "
        "(`WATCHER_DUMP_ORDER=physical`, the watcher before issue 19)", goal=f"≤ 1.3{X}"),
    Row("2f", "A table keyed by random UUIDv4 (same ageing and change): day-2 growth and dump time, key order vs "
        "physical order", goal="— (info)"),
]
ORDERS = ("key", "physical")


@dataclass
class Arm:
    """One design's repository on one database: its sizes after each day and its backups' times."""

    repo: Repo
    sizes: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def growth(self) -> int:
        return self.sizes[-1] - self.sizes[-2]


def run(world: World, report: Report, orders: int, events: int) -> None:
    """Builds the realistic database and the UUIDv4 one in containers of their own, then day 1, the
    change and day 2 of every design on both."""
    real_db = start_pg(world, world.name("real"), REAL_DB)
    uuid_db = start_pg(world, world.name("uuid"), UUID_DB)
    for db in (real_db, uuid_db):
        wait_ready(db.name, timeout=180)
    say(f"  filling {real_db.name} ({orders} orders, {events} events) and {uuid_db.name} ({events} sessions)")
    fill_realistic(real_db, orders, events)
    fill_uuid(uuid_db, events)
    report.detail(f"2d-2f. Realistic database: {orders} orders + {events} events ({fmt_mb(database_size(real_db))}); "
                  f"UUIDv4 database: {events} sessions ({fmt_mb(database_size(uuid_db))}); in each table 1.5 % of "
                  "the rows deleted and 1.9 % updated, scattered, then VACUUM, before day 1.")
    real = {order: Arm(world.new_repo(f"real-{order}")) for order in ORDERS}
    seed = Arm(world.new_repo("real-seed"))
    uuid = {order: Arm(world.new_repo(f"uuid-{order}")) for order in ORDERS}
    for day in (1, 2):
        if day == 2:
            report.detail(f"2d-2f. Day-2 change: {realistic_change(real_db)}; sessions: {uuid_change(uuid_db)}.")
        one_day(world, day, (real_db, real), (uuid_db, uuid), seed)
    remove_containers(world, [real_db.name, uuid_db.name])
    fill_rows(report, real, seed, uuid)
    for arm in (*real.values(), seed, *uuid.values()):
        arm.repo.remove()


def one_day(world: World, day: int, real: tuple[PgContainer, dict[str, Arm]], uuid: tuple[PgContainer, dict[str, Arm]],
            seed: Arm) -> None:
    """One day's backups of both databases by every design (key and physical alternate which goes first)."""
    for order in ORDERS if day == 1 else tuple(reversed(ORDERS)):
        for db, arms in (real, uuid):
            backup = watcher_backup(world, arms[order].repo, db.name, [db.name], expect_ok=1,
                                    extra_env={"WATCHER_DUMP_ORDER": order})
            arms[order].times.append(backup.per_backup_database)
            arms[order].sizes.append(arms[order].repo.du())
            say(f"  day {day} {db.name} {order}: {fmt_s(backup.per_backup_database)}, "
                f"repository {fmt_mb(arms[order].sizes[-1])}")
    done = bare_backup(seed.repo, real[0].name, REAL_DB, flags="-Fc")
    seed.times.append(done.seconds)
    seed.sizes.append(seed.repo.du())
    say(f"  day {day} seed: {fmt_s(done.seconds)}, repository {fmt_mb(seed.sizes[-1])}")


def fill_rows(report: Report, real: dict[str, Arm], seed: Arm, uuid: dict[str, Arm]) -> None:
    key, physical = real["key"], real["physical"]
    ratio = key.growth() / max(seed.growth(), 1)
    row = report.row("2d")
    row.watcher = f"+{fmt_mb(key.growth())} (of {fmt_mb(key.sizes[-1])})"
    row.reference = (f"+{fmt_mb(seed.growth())} (of {fmt_mb(seed.sizes[-1])}); physical order "
                     f"+{fmt_mb(physical.growth())} = {fmt_ratio(physical.growth() / max(seed.growth(), 1))}")
    row.ratio = fmt_ratio(ratio, 3 if ratio < 0.1 else 2)
    row.verdict = verdict(ratio <= 0.1)
    time_ratio = median(key.times) / max(median(physical.times), 1e-9)
    row = report.row("2e")
    row.watcher = fmt_s(median(key.times))
    row.reference = fmt_s(median(physical.times))
    row.ratio = fmt_ratio(time_ratio)
    row.verdict = verdict(time_ratio <= 1.3)
    uk, up = uuid["key"], uuid["physical"]
    row = report.row("2f")
    row.watcher = f"key: +{fmt_mb(uk.growth())}, {fmt_s(median(uk.times))}"
    row.reference = f"physical: +{fmt_mb(up.growth())}, {fmt_s(median(up.times))}"
    row.ratio = fmt_ratio(uk.growth() / max(up.growth(), 1))
    row.verdict = (f"info: key order stores {fmt_ratio(uk.growth() / max(up.growth(), 1))} of physical order's "
                   f"growth, in {fmt_ratio(median(uk.times) / max(median(up.times), 1e-9))} of its time")
    report.detail(f"2d-2e. Backup times (backup_started .. backup_succeeded, day 1 and 2): key {rounded(key.times)} s, "
                  f"physical {rounded(physical.times)} s; seed design (whole pipeline) {rounded(seed.times)} s. "
                  f"Repository sizes day 1 → day 2: key {fmt_mb(key.sizes[0])} → {fmt_mb(key.sizes[-1])}, physical "
                  f"{fmt_mb(physical.sizes[0])} → {fmt_mb(physical.sizes[-1])}, seed {fmt_mb(seed.sizes[0])} → "
                  f"{fmt_mb(seed.sizes[-1])}.")
    report.detail(f"2f. UUIDv4 table: key {rounded(uk.times)} s, physical {rounded(up.times)} s; growth key "
                  f"+{fmt_mb(uk.growth())}, physical +{fmt_mb(up.growth())}.")
