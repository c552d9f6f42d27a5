"""The restore drill of a sync: the staging safety dump of the newest good run restored into a scratch database, and
checked against the dump.

Local profile:

- The dump is the one the run made of staging before overwriting it (``<dump_dir>/<plan>/<period>/
  staging-before.sql``, found from the plan and the run's period, never from a task body). Its sha256 must be the
  one recorded when it was made, and it must be complete.
- It is loaded into ``backup_scheduler_drill_<plan>`` on the scratch server (made for the drill, after dropping
  what a crashed drill left under that name); ``restored_in_seconds`` is how long the load took.
- The restored database is dumped again and compared with the dump table by table: the same tables, the same
  number of rows, the same sha256 over the rows; and ``SELECT COUNT(*)`` of every table against the dump's count.
- What was restored is staging as the previous sync left it: a sample of production's rows (``options.
  drill_sample`` per ruled table) is looked for in it, so a drill also proves that masking held.
- The scratch database is dropped (unless ``drill.keep_scratch``). Production, staging and the dump are only read.

Cloud SQL profile: the safety backup is a Cloud SQL backup run of the staging instance; restoring it would replace a
whole instance, so the drill checks that the run's backup exists and succeeded, and that staging (the copy) holds no
sampled production value.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kinds.sqlsync import db, dumps, stream
from kinds.sqlsync.errors import DumpError, SyncError
from kinds.sqlsync.plan import DatabaseRef, Settings
from kinds.sqlsync.steps import RUN_DIR_FORMAT, Sync, classify, with_passwords
from services.errors import BackupError, PermanentError
from services.kinds import DRILL_LABEL, BackupRef, Done, DrillStep, Outcome, RunContext, Target
from services.plans import Plan
from services.runtime import Runtime


def drill_database(plan: Plan[Settings]) -> str:
    """The scratch database of this plan's drills: named by the drill label and the plan, so a leftover is found by
    the next drill and never taken for real data."""
    return f"{DRILL_LABEL}_{plan.name}".replace("-", "_")[:64]


def drill(
    plan: Plan[Settings], target: Target, backup: BackupRef, state: dict[str, Any] | None, run: RunContext, rt: Runtime
) -> Outcome:
    assert plan.drill is not None
    settings = with_passwords(plan.settings, rt.secrets)
    sync = Sync(plan, settings, {}, run, rt)
    try:
        if settings.profile == "cloudsql":
            return _cloud_drill(plan, sync, backup)
        return _local_drill(plan, sync, backup)
    except BackupError:
        raise
    except (SyncError, DumpError) as exc:
        raise PermanentError(f"drill failed: {exc}") from exc
    except Exception as exc:
        raise classify("drill", exc) from exc


def _local_drill(plan: Plan[Settings], sync: Sync, backup: BackupRef) -> Done:
    assert plan.drill is not None
    settings = sync.settings
    dump = settings.dump_dir / plan.name / backup.period.strftime(RUN_DIR_FORMAT) / "staging-before.sql"
    dumps.check_complete(dump)
    size = dump.stat().st_size
    if plan.drill.max_bytes is not None and size > plan.drill.max_bytes:
        raise PermanentError(f"the dump holds {size} bytes, over drill.max_bytes ({plan.drill.max_bytes}); not drilled")
    problems = []
    recorded = backup.stats.get("staging_backup_sha256")
    if recorded and dumps.file_sha256(dump) != recorded:
        problems.append(f"{dump} is not the file the run made (sha256 differs from the one recorded)")
    scratch = replace(settings.scratch, database=drill_database(plan))
    if scratch.database in {settings.production.database, settings.staging.database, settings.scratch.database}:
        raise PermanentError(f"the drill database {scratch.database} is a database of the sync; not drilled")
    _recreate(scratch)
    try:
        began = time.monotonic()
        dumps.load_dump(scratch, dump)
        seconds = round(time.monotonic() - began, 3)
        expected = stream.table_digests(str(dump))
        problems += _compare(scratch, expected, dump)
        leaks = _leaks(sync, scratch)
        problems += leaks
    finally:
        if not plan.drill.keep_scratch:
            _drop(scratch)
    rows = sum(count for count, _ in expected.values())
    checked = [
        f"dump {dump}: {size} bytes, complete" + (", sha256 as recorded" if recorded else ""),
        f"{len(expected)} tables, {rows} rows restored into {scratch.label()} in {seconds} s",
        "restored tables dumped again: row counts and sha256 per table equal to the dump's",
        f"{settings.drill_sample} production rows per masked table looked for in the restored copy",
    ]
    if problems:
        raise PermanentError(f"drill failed: {'; '.join(problems[:20])}")
    sync.log(f"drill: {dump} restored into {scratch.label()} and checked in {seconds} s")
    return Done(output="drill", stats={"restored_in_seconds": seconds, "checked": checked, "passed": True})


def _recreate(scratch: DatabaseRef) -> None:
    with db.connect(scratch, database="") as conn:
        db.query(conn, f"DROP DATABASE IF EXISTS {db.quote(scratch.database)}")  # a crashed drill's leftover
        db.query(conn, f"CREATE DATABASE {db.quote(scratch.database)} CHARACTER SET utf8mb4")


def _drop(scratch: DatabaseRef) -> None:
    with db.connect(scratch, database="") as conn:
        db.query(conn, f"DROP DATABASE IF EXISTS {db.quote(scratch.database)}")


def _compare(scratch: DatabaseRef, expected: dict[str, tuple[int, str]], dump: Path) -> list[str]:
    """What differs between the restored database and the dump it came from."""
    problems = []
    with tempfile.TemporaryDirectory(prefix=f"{DRILL_LABEL}-") as tmp:
        again = Path(tmp) / "restored.sql"
        dumps.dump_database(scratch, again)
        restored = stream.table_digests(str(again))
    for table in sorted(set(expected) | set(restored)):
        if table not in restored:
            problems.append(f"table {table} is in the dump but was not restored")
        elif table not in expected:
            problems.append(f"table {table} was restored but is not in the dump")
        elif restored[table][0] != expected[table][0]:
            problems.append(f"table {table}: {restored[table][0]} rows restored, {expected[table][0]} in the dump")
        elif restored[table][1] != expected[table][1]:
            problems.append(f"table {table}: restored rows differ from the dump's (sha256)")
    with db.connect(scratch) as conn:
        for table in db.table_names(conn, scratch.database):
            (count,) = db.query(conn, f"SELECT COUNT(*) FROM {db.quote(table)}")[0]
            if table in expected and count != expected[table][0]:
                problems.append(f"table {table}: COUNT(*) is {count}, the dump holds {expected[table][0]} rows")
    return problems


def _leaks(sync: Sync, copy: DatabaseRef, where: str = "the restored copy") -> list[str]:
    """Production values found in ``copy`` where masking should have replaced them."""
    settings = sync.settings
    rules = [rule for rule in settings.rules]
    with db.connect(settings.production) as production, db.connect(copy) as restored:
        schema = db.read_schema(production, settings.production.database)
        present = set(db.table_names(restored, copy.database))
        ruled = [rule for rule in rules if rule.table in present]
        leaks = db.find_leaks(production, restored, schema, ruled, sync.masker(), settings.drill_sample)
    return [f"personal data in {where}: {leak}" for leak in sorted(set(leaks))]


def _cloud_drill(plan: Plan[Settings], sync: Sync, backup: BackupRef) -> Done:
    from kinds.sqlsync import cloud

    settings = sync.settings
    began = time.monotonic()
    description = f"sqlsync:{plan.name}:{backup.period.strftime(RUN_DIR_FORMAT)}"
    project, instance = cloud.split_instance(settings.staging.instance or "")
    client = cloud.admin_client(settings, sync.rt)
    runs = [r for r in cloud.backup_runs(client, project, instance) if r.get("description") == description]
    problems = [] if any(r.get("status") == "SUCCESSFUL" for r in runs) else [f"no successful backup run {description}"]
    problems += _leaks(sync, settings.staging, "staging")
    seconds = round(time.monotonic() - began, 3)
    if problems:
        raise PermanentError(f"drill failed: {'; '.join(problems[:20])}")
    checked = [
        f"backup run {description} of {instance}: SUCCESSFUL",
        f"{settings.drill_sample} production rows per masked table looked for in staging",
    ]
    return Done(output="drill", stats={"restored_in_seconds": seconds, "checked": checked, "passed": True})


_SIGNATURE: DrillStep[Settings] = drill  # mypy holds it to the contract
