"""The steps of a sync and the runner that moves a run along them within a task's time budget.

    check -> export-production -> import-scratch -> mask -> preserve -> scan-scratch -> export-scratch
          -> backup-staging -> import-staging -> verify -> cleanup-scratch

A task runs steps one after the other until the chain (or the run's ``stop_at``) is reached, or until less than
``STEP_RESERVE_SECONDS`` of its budget (``RunContext.deadline``) is left: then it answers ``Pending`` with the
checkpoint (the next step, the steps done with what each produced, timings) and the follow-up task goes on from
it. A step is the unit of work: one that has begun runs to its end. In the cloudsql profile the long steps are Cloud
SQL operations (kinds/sqlsync/cloud.py): a task starts one and answers ``Pending``; follow-up tasks check it.

Where the run starts and stops comes from the admin trigger's record (``run.options``) or the CLI, and the
checkpoint from the run's own record: never from a task body (skipping ``mask`` would put unmasked production
data into staging). Two profiles share the chain: ``local`` moves data with ``mariadb-dump``/``mariadb``
(kinds/sqlsync/dumps.py); ``cloudsql`` with the Cloud SQL Admin API and dump files in GCS. SQL on the scratch
database (masking, preserved rows) and the verification are the same code for both (kinds/sqlsync/db.py).
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kinds.sqlsync import db, dumps, stream
from kinds.sqlsync.errors import DumpError, HalfDone, LeakFound, Refused, SchemaDrift, SyncError
from kinds.sqlsync.masking import Masker
from kinds.sqlsync.plan import DatabaseRef, Settings, same_database_problem
from services import retention
from services.errors import BackupError, PermanentError, TransientError
from services.kinds import Done, Outcome, Pending, RunContext
from services.plans import Plan
from services.runtime import Runtime

STEPS = (
    "check",
    "export-production",
    "import-scratch",
    "mask",
    "preserve",
    "scan-scratch",
    "export-scratch",
    "backup-staging",
    "import-staging",
    "verify",
    "cleanup-scratch",
)
# Steps that are one long Cloud SQL operation in the cloudsql profile (polled by follow-up tasks).
OPERATION_STEPS = ("export-production", "import-scratch", "export-scratch", "backup-staging", "import-staging")
# A task begins another step only with at least this much of its budget left (a step cannot stop half-way).
STEP_RESERVE_SECONDS = 60.0
RUN_DIR_FORMAT = "%Y%m%dT%H%M%SZ"


def with_passwords(settings: Settings, secrets: Any) -> Settings:
    """The settings with each database's password read through the runtime's secrets (services/secrets.py)."""

    def filled(ref: DatabaseRef) -> DatabaseRef:
        if ref.password_env:
            password = secrets.require_env(ref.password_env, f"the {ref.role} database password")
        elif ref.password_secret:
            password = secrets.secret(ref.password_secret)
        else:
            return ref
        return replace(ref, password=password)

    return replace(
        settings,
        production=filled(settings.production),
        scratch=filled(settings.scratch),
        staging=filled(settings.staging),
    )


def masking_secret(settings: Settings, secrets: Any) -> bytes:
    if settings.secret_env:
        return str(secrets.require_env(settings.secret_env, "the masking secret")).encode()
    return str(secrets.secret(settings.secret_name or "")).encode()


@dataclass
class Sync:
    """One task's view of a run: the plan, its settings with passwords filled in, the checkpoint being built."""

    plan: Plan[Settings]
    settings: Settings
    state: dict[str, Any]
    run: RunContext
    rt: Runtime
    _masker: Masker | None = field(default=None, repr=False)

    def masker(self) -> Masker:
        if self._masker is None:
            secret = masking_secret(self.settings, self.rt.secrets)
            if len(secret) < 16:
                raise Refused("masking secret: expected at least 16 bytes")
            self._masker = Masker(secret, email_bits=self.settings.email_bits)
        return self._masker

    @property
    def run_dir(self) -> Path:
        return run_dir(self.plan, self.run)

    @property
    def moves_tables(self) -> bool:
        """Masked tables go into staging by RENAME TABLE: scratch shares staging's server, and ``check`` found nothing
        (views, triggers) that RENAME cannot move across databases."""
        return self.settings.moves_tables and self.state.get("move_tables", True)

    def produced(self, step: str, **what: Any) -> None:
        """Record in the checkpoint what ``step`` made (a dump file, a safety backup), for later steps and people."""
        self.state.setdefault("produced", {})[step] = what

    def stats(self, **values: Any) -> None:
        self.state.setdefault("stats", {}).update(values)

    def log(self, message: str) -> None:
        self.run.log(message)


def run_dir(plan: Plan[Settings], run: RunContext) -> Path:
    return plan.settings.dump_dir / plan.name / run.period.strftime(RUN_DIR_FORMAT)


# ---- the runner --------------------------------------------------------------------------------------------------


def first_state(run: RunContext) -> dict[str, Any]:
    """The checkpoint a run begins with: its first and last step from the trigger's record (or the CLI)."""
    first = run.options.get("start_at") or STEPS[0]
    stop_at = run.options.get("stop_at")
    for name, step in (("start_at", first), ("stop_at", stop_at)):
        if step is not None and step not in STEPS:
            raise PermanentError(f"{name}: unknown step {step!r} (steps: {', '.join(STEPS)})")
    if stop_at and STEPS.index(stop_at) < STEPS.index(first):
        raise PermanentError(f"stop_at {stop_at} comes before start_at {first}")
    return {"step": first, "stop_at": stop_at, "timings": {}, "done": []}


def advance(plan: Plan[Settings], state: dict[str, Any], run: RunContext, rt: Runtime) -> Outcome:
    """Run steps from the checkpoint ``state`` while the task's budget allows; Done at the end of the chain (or at
    ``stop_at``), else Pending with the new checkpoint."""
    state = copy.deepcopy(state)  # the stored checkpoint is never changed under its owner
    if state.get("step") not in STEPS:
        raise PermanentError(f"checkpoint names no step of sqlsync ({str(state.get('step'))[:100]!r})")
    state.setdefault("timings", {})
    sync = Sync(plan, with_passwords(plan.settings, rt.secrets), state, run, rt)
    while True:
        step = state["step"]
        began = time.monotonic()
        try:
            finished = _do(sync, step)
        except BackupError as exc:
            run.log(f"failed: {exc}")
            if not isinstance(exc, TransientError):
                discard_unmasked(sync)
            raise
        except Exception as exc:
            error = classify(step, exc)
            run.log(f"failed: {error}")
            if not isinstance(error, TransientError) and discard_unmasked(sync) and isinstance(exc, HalfDone):
                exc.restart_at = "export-production"  # the production dump it would reload is gone
            raise error from exc
        if not finished:
            return Pending(state=state, delay_seconds=sync.settings.poll_seconds)
        seconds = time.monotonic() - began + state.pop("waited_seconds", 0.0)
        state["timings"][step] = round(seconds, 3)
        state.setdefault("done", []).append(step)
        state.pop("operation", None)
        run.log(f"step {step}: done in {seconds:.1f}s")
        index = STEPS.index(step)
        if step == state.get("stop_at") or index == len(STEPS) - 1:
            stats = {"step_reached": step, "timings": state["timings"], **state.get("stats", {})}
            return Done(output=plan.settings.staging.label(), stats=stats, message=f"sqlsync reached step {step}")
        state["step"] = STEPS[index + 1]
        if run.out_of_time(STEP_RESERVE_SECONDS):
            return Pending(state=state, delay_seconds=0.0)


def discard_unmasked(sync: Sync) -> bool:
    """After a failure that retrying will not fix, delete this run's dumps (the production one holds unmasked data),
    unless the run was told to keep them (``--keep-files``). The staging safety dump stays. True if anything was
    deleted."""
    if sync.run.options.get("keep_files"):
        sync.log("failed run: its dump files are kept (keep_files)")
        return False
    if sync.settings.profile == "cloudsql":
        from kinds.sqlsync import cloud

        try:
            objects = cloud.delete_dumps(sync.plan, sync.run, sync.rt)
        except Exception as exc:  # the failure being reported matters more; the bucket's lifecycle rule is the backstop
            sync.log(f"failed run: could not delete its dump objects ({type(exc).__name__}: {exc})")
            return False
        return objects > 0
    files = [name for name in UNMASKED if _unlink(sync.run_dir / name)]
    if files:
        sync.log(f"failed run: deleted {', '.join(files)} (unmasked data must not outlive the run)")
    return bool(files)


# Files of a run that may hold unmasked production data.
UNMASKED = ("production.sql", "production.partial", "masked.sql", "masked.partial")
UNMASKED_MAX_AGE_SECONDS = 24 * 3600


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def sweep_unmasked(plan: Plan[Settings], current: Path, now: float) -> list[str]:
    """Dumps of other runs of this plan that may hold unmasked data and are older than a day, deleted whatever
    ``retention.keep`` says (a run that died, or a queue that gave up, never reached its own cleanup); run folders
    left empty are removed."""
    base = current.parent
    if not base.is_dir():
        return []
    deleted = []
    for folder in base.iterdir():
        if folder == current or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            datetime.strptime(folder.name, RUN_DIR_FORMAT)
        except ValueError:
            continue  # not a run folder of this kind
        for name in UNMASKED:
            path = folder / name
            try:
                old = now - path.stat().st_mtime > UNMASKED_MAX_AGE_SECONDS
            except FileNotFoundError:
                continue
            if old and _unlink(path):
                deleted.append(f"{folder.name}/{name}")
        if not any(folder.iterdir()):
            folder.rmdir()
    return deleted


def _do(sync: Sync, step: str) -> bool:
    """Do (or, for a Cloud SQL operation, start or check) ``step``; True once it is finished."""
    settings = sync.settings
    moved = sync.moves_tables and step in ("export-scratch", "import-staging")
    if settings.profile == "cloudsql" and step in OPERATION_STEPS and not moved:
        from kinds.sqlsync import cloud

        if step == "import-scratch" and settings.mask_mode == "stream" and not sync.state.get("masked_export"):
            began = time.monotonic()
            report = cloud.mask_export(sync.plan, settings, sync.masker(), sync.run, sync.rt)
            seconds = time.monotonic() - began
            sync.state["masked_export"] = cloud.dump_uri(sync.plan, sync.run, cloud.MASKED_EXPORT)
            sync.stats(masked_rows=report.rows, masked_values=report.values)
            sync.log(
                f"step import-scratch: masked {report.rows} rows of {', '.join(report.tables) or 'no table'} of the"
                f" export into {sync.state['masked_export']} ({report.rows / seconds if seconds else 0.0:.0f} rows/s);"
                " the unmasked export is deleted"
            )
        return cloud.operation_step(sync.plan, settings, step, sync.state, sync.run, sync.rt)
    STEP_FUNCTIONS[step](sync)
    return True


def classify(step: str, exc: BaseException) -> Exception:
    """Retry or stop for an exception from ``step``, naming the step and the class of failure: the engine's own
    errors stop the run; Google API errors are judged by services/gcp_errors.py as for every kind; SQL and
    client-tool errors by what the server said."""
    if isinstance(exc, SyncError):
        return PermanentError(f"step {step}: {exc}")
    from googleapiclient.errors import HttpError

    if isinstance(exc, HttpError):
        from kinds.sqlsync import cloud

        return cloud.api_error(step, exc)
    import pymysql

    if isinstance(exc, pymysql.err.MySQLError):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        message = exc.args[1] if len(exc.args) > 1 else str(exc)
        if code in (1044, 1045, 1142, 1227):
            return PermanentError(f"step {step}: auth: {message}")
        if code in (1049, 1146):
            return PermanentError(f"step {step}: not found: {message}")
        if code in (2002, 2003, 2006, 2013, 1205, 1213, 1040):
            return TransientError(f"step {step}: SQL connection error {code}: {message}")
        return PermanentError(f"step {step}: SQL error {code}: {message}")
    if isinstance(exc, DumpError):
        text = exc.stderr
        if "Access denied" in text:
            return PermanentError(f"step {step}: auth: {exc}")
        if "Unknown database" in text:
            return PermanentError(f"step {step}: not found: {exc}")
        if "Can't connect" in text or "Lost connection" in text or text.startswith("stalled:"):
            return TransientError(f"step {step}: SQL connection error: {exc}")
        return PermanentError(f"step {step}: SQL error: {exc}")
    if isinstance(exc, (ValueError, LookupError)):
        return PermanentError(f"step {step}: {exc}")
    if isinstance(exc, OSError):
        return TransientError(f"step {step}: {exc}")
    from services import gcp_errors

    return gcp_errors.classify(exc, f"step {step}")


# ---- the steps ---------------------------------------------------------------------------------------------------


def step_check(sync: Sync) -> None:
    settings = sync.settings
    problem = same_database_problem(settings)
    if problem:
        raise Refused(problem)
    sync.masker()  # the secret must be there before anything is copied
    identities = {}
    for ref in (settings.production, settings.staging, settings.scratch):
        with db.connect(ref, database="") as conn:
            identities[ref.role] = db.database_identity(conn, ref.database)
            if ref.role == "production":
                schema = db.read_schema(conn, ref.database)
    for a, b in (("staging", "production"), ("scratch", "production"), ("scratch", "staging")):
        if identities[a] == identities[b]:
            server, database = identities[a]
            raise Refused(f"{a} resolves to the {b} database on the same server ({server}, {database}); refusing")
    if not schema.columns:
        raise SchemaDrift(f"production database {settings.production.label()} has no tables")
    if settings.profile == "local":
        swept = sweep_unmasked(sync.plan, sync.run_dir, time.time())
        if swept:
            sync.log(f"step check: deleted unmasked dumps older than a day of other runs: {', '.join(swept)}")
    problems = db.schema_problems(schema, settings.rules, settings.preserve)
    problems += db.width_problems(schema, settings.rules, settings.email_bits)
    problems += db.coverage_problems(schema, settings.rules, settings.allow)
    if problems:
        raise SchemaDrift("schema drift: " + "; ".join(problems))
    with db.connect(settings.production) as production, db.connect(settings.staging) as staging:
        twins = db.twin_problems(production, schema, settings.rules)
        if twins:
            raise Refused("; ".join(twins))
        copied = [
            (table, column)
            for table in schema.tables
            for column in schema.columns[table]
            if db.allowed(settings.allow, table, column)
        ]
        flagged = db.personal_looking(production, schema, copied)
        staging_only = sorted(set(db.table_names(staging, settings.staging.database)) - set(schema.columns))
    if flagged:
        sync.log(f"step check: allowed as they are, but look like personal data: {', '.join(flagged)}")
    if staging_only:
        # Tables production no longer has are not touched by a sync: whatever they hold stays in staging.
        sync.log(f"step check: staging has tables production does not (left as they are): {', '.join(staging_only)}")
    sync.stats(flagged_columns=flagged, staging_only_tables=staging_only)
    if settings.moves_tables:
        with db.connect(settings.production) as production:
            triggers = db.query(
                production,
                "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s",
                (settings.production.database,),
            )[0][0]
        if schema.views or triggers:
            # Decided here, not found out at import-staging after all the work: views and triggers cannot be moved
            # by RENAME TABLE across databases, so the masked tables are dumped and loaded instead.
            sync.state["move_tables"] = False
            sync.log(
                f"step check: production has {len(schema.views)} views and {triggers} triggers: the masked tables will"
                " be dumped and loaded into staging, not moved"
            )
    sync.log(f"step check: {len(schema.columns)} tables, {len(settings.rules)} masked columns, schema matches")


def step_export_production(sync: Sync) -> None:
    dumps.private_dir(sync.run_dir.parent)  # the plan's folder of runs: only the service's user may look inside
    path = sync.run_dir / "production.sql"
    size = dumps.dump_database(sync.settings.production, path)
    sync.produced("export-production", dump=str(path), bytes=size)
    sync.log(f"step export-production: {size} bytes")


def step_import_scratch(sync: Sync) -> None:
    settings = sync.settings
    dump = sync.run_dir / "production.sql"
    dumps.check_complete(dump)
    if settings.mask_mode != "stream":
        dropped = db.empty_database(settings.scratch)
        dumps.load_dump(settings.scratch, dump)
        sync.log(f"step import-scratch: dropped {dropped} leftover tables, loaded the production dump")
        return
    masker = sync.masker()
    dropped = db.empty_database(settings.scratch)
    began = time.monotonic()

    def masked_load(one_pass: bool) -> stream.StreamReport:
        report: stream.StreamReport = dumps.load_dump(
            settings.scratch,
            dump,
            lambda write: stream.mask_dump(
                str(dump),
                list(settings.rules),
                masker,
                write,
                workers=settings.mask_workers,
                spool_dir=str(dump.parent),
                one_pass=one_pass,
            ),
        )
        return report

    try:
        report = masked_load(one_pass=True)
    except stream.Collision as exc:
        sync.log(f"step import-scratch: {exc}; scratch emptied and the dump masked again with a first pass")
        db.empty_database(settings.scratch)
        report = masked_load(one_pass=False)
    with db.connect(settings.scratch) as conn:
        db.mark_progress(conn, "mask", "done")
    seconds = time.monotonic() - began
    sync.stats(masked_rows=report.rows, masked_values=report.values)
    sync.log(
        f"step import-scratch: dropped {dropped} leftover tables, loaded the production dump masking"
        f" {report.rows} rows of {', '.join(report.tables) or 'no table'} on the way in"
        f" ({report.rows / seconds if seconds else 0.0:.0f} rows/s); seconds by phase {report.seconds}"
    )


def step_mask(sync: Sync) -> None:
    settings = sync.settings
    if settings.mask_mode == "stream":
        # Masked on the way in (the local loader, or the export object for Cloud SQL): scratch never held originals.
        with db.connect(settings.scratch) as conn:
            db.mark_progress(conn, "mask", "done")
        sync.log("step mask: scratch is already masked (on import, or by an earlier attempt of this step); skipped")
        return
    masker = sync.masker()
    with db.connect(settings.scratch) as conn, db.connect(settings.scratch, streaming=True) as streaming:
        schema = db.read_schema(conn, settings.scratch.database)
        problems = db.schema_problems(schema, settings.rules, {})
        if problems:
            raise SchemaDrift("schema drift in scratch: " + "; ".join(problems))
        if not db.begin_in_place_step(conn, "mask"):
            sync.log("step mask: scratch is already masked (on import, or by an earlier attempt of this step); skipped")
            return
        began = time.monotonic()
        triggers = db.suspend_triggers(conn, settings.scratch.database)  # an audit trigger would copy originals
        try:
            rules = list(settings.rules)
            report = db.mask_database(conn, streaming, schema, rules, masker, workers=settings.mask_workers)
        finally:
            db.restore_triggers(conn, triggers)
        db.mark_progress(conn, "mask", "done")
    seconds = time.monotonic() - began
    sync.stats(masked_rows=report.rows_updated, masked_values=report.values_masked)
    rate = report.rows_updated / seconds if seconds else 0.0
    sync.log(
        f"step mask: {report.rows_updated} rows in {', '.join(report.tables)}, {report.values_masked} distinct"
        f" values, {rate:.0f} rows/s; seconds by phase {report.seconds}"
    )


def step_preserve(sync: Sync) -> None:
    settings = sync.settings
    if not settings.preserve:
        sync.log("step preserve: no preserve rules")
        return
    with db.connect(settings.scratch) as scratch, db.connect(settings.staging) as staging:
        if not db.begin_in_place_step(scratch, "preserve"):
            sync.log("step preserve: rows were already re-inserted by an earlier attempt of this step; skipped")
            return
        schema = db.read_schema(scratch, settings.scratch.database)
        report = db.copy_preserved_rows(staging, scratch, schema, settings.preserve)
        db.mark_progress(scratch, "preserve", "done")
    remapped = {table: len(ids) for table, ids in report.remapped.items() if ids}
    sync.stats(preserved_rows=report.rows, remapped_ids=remapped)
    sync.log(f"step preserve: re-inserted {report.rows}; new ids for {remapped or 'none'}")


def step_scan_scratch(sync: Sync) -> None:
    """Nothing leaves scratch before it is searched: sampled production originals that no mask can give back
    (emails, free text, values set to NULL or fixed) are looked for in every text column of every scratch table."""
    settings = sync.settings
    with db.connect(settings.production) as production, db.connect(settings.scratch) as scratch:
        found = db.scan_for_values(
            production, scratch, settings.scratch.database, list(settings.rules), sync.masker(), settings.verify_sample
        )
    if found:
        raise LeakFound(f"personal data found in scratch, nothing was copied on: {'; '.join(sorted(set(found))[:10])}")
    sync.log(f"step scan-scratch: no sampled production value in any text column of {settings.scratch.label()}")


def step_export_scratch(sync: Sync) -> None:
    if sync.moves_tables:
        sync.log("step export-scratch: skipped, scratch shares the staging server and its tables will be moved")
        return
    path = sync.run_dir / "masked.sql"
    size = dumps.dump_database(sync.settings.scratch, path, (db.PROGRESS_TABLE,))
    sync.produced("export-scratch", dump=str(path), bytes=size)
    sync.log(f"step export-scratch: {size} bytes")


def step_backup_staging(sync: Sync) -> None:
    path = sync.run_dir / "staging-before.sql"
    if _complete(path):
        # Made by an earlier attempt of this run, before anything of it reached staging: the only copy of staging
        # as it was. A second dump now might be of staging already overwritten by this run.
        sync.state["staging_backup"] = str(path)
        sync.stats(staging_backup=str(path), staging_backup_sha256=dumps.file_sha256(path))
        sync.log(f"step backup-staging: this run's safety dump {path} is already there; kept")
        return
    size = dumps.dump_database(sync.settings.staging, path)
    sync.state["staging_backup"] = str(path)
    sync.produced("backup-staging", dump=str(path), bytes=size)
    # What a restore drill checks the dump against (kinds/sqlsync/drill.py): it must be this file, unchanged.
    sync.stats(staging_backup=str(path), staging_backup_sha256=dumps.file_sha256(path))
    sync.log(f"step backup-staging: safety dump {path} ({size} bytes)")


def step_import_staging(sync: Sync) -> None:
    settings = sync.settings
    if settings.profile == "local":
        safety = sync.run_dir / "staging-before.sql"
        if not safety.exists():
            raise Refused(f"no safety backup of staging for this run ({safety}); refusing to overwrite staging")
        dumps.check_complete(safety)
    elif not sync.state.get("staging_backup"):
        raise Refused("no safety backup of staging for this run (backup-staging did not complete); refusing")
    if sync.moves_tables:
        moved = move_tables(settings.scratch, settings.staging)
        sync.log(f"step import-staging: moved {moved} tables from {settings.scratch.label()} with RENAME TABLE")
        return
    dumps.load_dump(settings.staging, sync.run_dir / "masked.sql")


def move_tables(scratch: DatabaseRef, staging: DatabaseRef) -> int:
    """Replace staging's tables by scratch's in one RENAME TABLE (atomic; foreign keys move along). Staging
    tables that production does not have are left alone, as a dump import would."""
    with db.connect(scratch) as conn:
        tables = db.table_names(conn, scratch.database)
        views = db.query(
            conn, "SELECT COUNT(*) FROM information_schema.VIEWS WHERE TABLE_SCHEMA = %s", (scratch.database,)
        )[0][0]
        triggers = db.query(
            conn, "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s", (scratch.database,)
        )[0][0]
        if views or triggers:
            raise Refused(
                "scratch has views or triggers, which RENAME TABLE cannot move across databases:"
                " set options.move_tables: never"
            )
        src, dst = db.quote(scratch.database), db.quote(staging.database)
        db.query(conn, "SET SESSION foreign_key_checks = 0")
        existing = set(db.table_names(conn, staging.database))
        for name in tables:
            if name in existing:
                db.query(conn, f"DROP TABLE {dst}.{db.quote(name)}")
        if tables:
            db.query(conn, "RENAME TABLE " + ", ".join(f"{src}.{db.quote(t)} TO {dst}.{db.quote(t)}" for t in tables))
        db.query(conn, "SET SESSION foreign_key_checks = 1")
    return len(tables)


def step_verify(sync: Sync) -> None:
    settings = sync.settings
    masker = sync.masker()
    with db.connect(settings.production) as production, db.connect(settings.staging) as staging:
        schema = db.read_schema(production, settings.production.database)
        leaks = db.find_leaks(production, staging, schema, list(settings.rules), masker, settings.verify_sample)
    if leaks:
        raise LeakFound(f"personal data found in staging after the import: {'; '.join(sorted(set(leaks))[:10])}")
    sync.log(f"step verify: no sampled production value found in staging (sample {settings.verify_sample}/table)")


def step_cleanup_scratch(sync: Sync) -> None:
    settings = sync.settings
    dropped = db.empty_database(settings.scratch)
    if settings.profile == "cloudsql":
        from kinds.sqlsync import cloud

        deleted = cloud.delete_dumps(sync.plan, sync.run, sync.rt)
        sync.log(f"step cleanup-scratch: dropped {dropped} tables, deleted {deleted} dump objects")
        return
    directory = sync.run_dir
    # The production dump holds unmasked personal data: it must not outlive the run.
    for name in ("production.sql", "masked.sql"):
        (directory / name).unlink(missing_ok=True)
    pruned = prune_safety_dumps(sync.plan, directory)
    swept = sweep_unmasked(sync.plan, directory, time.time())
    sync.log(
        f"step cleanup-scratch: dropped {dropped} tables, deleted the dumps, pruned {pruned} old safety dumps"
        + (f", deleted unmasked dumps older than a day of other runs: {', '.join(swept)}" if swept else "")
    )


def prune_safety_dumps(plan: Plan[Settings], current: Path) -> int:
    """Retention (services/retention.py) over the staging safety dumps: only run folders this kind made (named by
    period) are candidates, and only once this run's safety dump is there and complete."""
    listed = []
    for path in current.parent.iterdir():
        try:
            created = datetime.strptime(path.name, RUN_DIR_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            continue
        if path.is_dir() and not path.is_symlink():
            complete = _complete(path / "staging-before.sql")
            listed.append(retention.Backup(path.name, created, ours=True, complete=complete, item=path))
    policy = retention.Policy(plan.retention.keep, plan.retention.min_keep)

    def delete(backup: retention.Backup[Path]) -> None:
        assert backup.item is not None
        shutil.rmtree(backup.item)

    try:
        return len(retention.prune(listed, policy, current.name, delete))
    except retention.NotConfirmed:
        return 0  # this run made no complete safety dump (it began after that step): nothing is pruned


def _complete(dump: Path) -> bool:
    try:
        dumps.check_complete(dump)
    except SyncError:
        return False
    return True


STEP_FUNCTIONS: dict[str, Callable[[Sync], None]] = {
    "check": step_check,
    "export-production": step_export_production,
    "import-scratch": step_import_scratch,
    "mask": step_mask,
    "preserve": step_preserve,
    "scan-scratch": step_scan_scratch,
    "export-scratch": step_export_scratch,
    "backup-staging": step_backup_staging,
    "import-staging": step_import_staging,
    "verify": step_verify,
    "cleanup-scratch": step_cleanup_scratch,
}
