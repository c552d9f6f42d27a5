"""Kind ``sqlsync``: copy a production MySQL database into staging with personal data masked and staging's own
rows (demo accounts ...) kept.

One plan is one sync and has one target. The sync is a chain of steps, each run by one task:

    check -> export-production -> import-scratch -> mask -> preserve -> export-scratch -> backup-staging
          -> import-staging -> verify -> cleanup-scratch

``start`` runs ``check`` and returns ``Pending({"step": <next>})``; every ``poll`` runs (or, for a long Cloud SQL
operation, checks) one step and hands the next one on. Two profiles share the chain: ``local`` moves data with
``mariadb-dump``/``mariadb`` between servers it reaches over TCP or a socket; ``cloudsql`` uses the Cloud SQL Admin
API (export with offload, import, backupRuns.insert; one operation per instance at a time) with dump files in GCS.
SQL on the scratch database (masking, preserved rows) and the verification are the same code for both.

Safety: staging must not resolve to production (checked in the plan and on the live servers), a masking rule
naming a column that no longer exists stops the run listing the columns, staging is backed up before it is
overwritten, and after the import a sample of production's personal values is looked for in staging.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services import sqlsync_db as db
from services import sqlsync_stream
from services.errors import ConfigError, PermanentError, TransientError
from services.fields import Fields
from services.kinds import Done, Pending, RunContext, Target, TargetPage
from services.masking import KINDS, ColumnRule, Masker, is_reserved_email_domain
from services.runtime import ROOT, Runtime

KIND = "sqlsync"
DEFAULT_QUEUE = "backups"

STEPS = (
    "check",
    "export-production",
    "import-scratch",
    "mask",
    "preserve",
    "export-scratch",
    "backup-staging",
    "import-staging",
    "verify",
    "cleanup-scratch",
)
# Steps that are one long Cloud SQL operation in the cloudsql profile (polled by follow-up tasks).
OPERATION_STEPS = ("export-production", "import-scratch", "export-scratch", "backup-staging", "import-staging")
DUMP_COMPLETE = b"-- Dump completed"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


@dataclass(frozen=True)
class SyncSettings:
    profile: str  # "local" | "cloudsql"
    production: db.DatabaseRef
    scratch: db.DatabaseRef
    staging: db.DatabaseRef
    rules: tuple[ColumnRule, ...]
    preserve: dict[str, str]
    secret_env: str | None = None
    secret_name: str | None = None
    bucket: str | None = None  # cloudsql: gs://bucket[/prefix] for the dump files
    dump_dir: Path = ROOT / ".local" / "sqlsync"  # local: where dump files and staging safety dumps go
    endpoint: str | None = None  # Cloud SQL Admin API override (Private Service Connect, a local fake)
    verify_sample: int = 50
    poll_seconds: float = 20.0
    email_bits: int = 80
    move_tables: str = "auto"  # "auto": RENAME scratch tables into staging when they share a server; "never"
    mask_workers: int = 1  # processes computing masked values (big tables on a multi-core worker)
    # "stream": the production dump is masked on its way into scratch (local profile); "in-place": loaded as it
    # is, then masked by UPDATEs in scratch (the only way when Cloud SQL does the import).
    mask_mode: str = "in-place"

    @property
    def moves_tables(self) -> bool:
        """Scratch is a database on the staging server: the masked tables are moved into staging with one atomic
        RENAME TABLE instead of a dump and a reload (the reload is as slow as the whole production copy)."""
        return self.move_tables == "auto" and _location(self.scratch) == _location(self.staging)


# ---- plan parsing ----------------------------------------------------------------------------------------------


def _parse_ref(section: Fields, role: str, profile: str) -> db.DatabaseRef:
    instance = section.str("instance", None)
    host = section.str("host", None)
    sock = section.str("socket", None)
    if profile == "cloudsql" and not instance:
        raise section.error("instance", "is required with profile cloudsql (project:region:instance)")
    if instance and not re.match(r"^[a-z][a-z0-9-:.]*:[a-z0-9-]+:[a-z][a-z0-9-]*$", instance):
        raise section.error("instance", "expected a connection name project:region:instance", instance)
    if profile == "local" and not (host or sock):
        raise section.error("host", "is required with profile local (or give socket)")
    database = section.str("database")
    if not db.IDENTIFIER.match(database):
        raise section.error("database", "expected a plain database name (letters, digits, _ and $)", database)
    ref = db.DatabaseRef(
        role=role,
        database=database,
        instance=instance,
        host=host,
        port=section.int("port", 3306, minimum=1, maximum=65535),
        socket=sock,
        user=section.str("user", "root"),
        password_env=section.str("password_env", None),
        private_ip=section.bool("private_ip", False),
    )
    section.done()
    return ref


def _parse_rules(section: Fields) -> tuple[ColumnRule, ...]:
    rules: list[ColumnRule] = []
    for table in sorted(section.raw):
        if not db.IDENTIFIER.match(str(table)):
            raise section.error(str(table), "expected a plain table name")
        columns = section.section(str(table))
        for column in sorted(columns.raw):
            if not db.IDENTIFIER.match(str(column)):
                raise columns.error(str(column), "expected a plain column name")
            raw = columns.any(str(column))
            where = f"{columns.prefix}{column}"
            if isinstance(raw, str):
                raw = {"kind": raw}
            if not isinstance(raw, dict):
                raise ConfigError(f"{columns.where}, field '{where}': expected a kind or a mapping, got {raw!r}")
            rule = Fields(raw, columns.where, f"{where}.")
            kind = rule.str("kind", choices=KINDS)
            email_domain = rule.str("email_domain", "example.com")
            if not is_reserved_email_domain(email_domain):
                raise rule.error(
                    "email_domain",
                    "expected a reserved domain (example.com/.net/.org, *.test, *.example)",
                    email_domain,
                )
            value = rule.any("value", None)
            if kind == "fixed" and value is None:
                raise rule.error("value", "is required for kind fixed")
            rules.append(
                ColumnRule(
                    table=str(table),
                    column=str(column),
                    kind=kind,
                    domain=rule.str("domain", kind),
                    value=None if value is None else str(value),
                    length=rule.int("length", None, minimum=8, maximum=64),
                    email_domain=email_domain,
                )
            )
            rule.done()
        columns.done()
    section.done()
    domains: dict[tuple[str, str], str] = {}
    for column_rule in rules:
        seen = domains.setdefault((column_rule.kind, column_rule.domain), column_rule.email_domain)
        if seen != column_rule.email_domain:
            raise ConfigError(
                f"{section.where}, field '{section.prefix}{column_rule.table}.{column_rule.column}.email_domain':"
                " columns of"
                f" domain {column_rule.domain!r} must share one email_domain (so they stay joinable)"
            )
    return tuple(rules)


def parse_settings(fields: Fields) -> SyncSettings:
    select = fields.section("select", required=True)
    destination = fields.section("destination", required=True)
    options = fields.section("options", required=True)
    profile = options.str("profile", "cloudsql", choices=("cloudsql", "local"))
    production = _parse_ref(select, "production", profile)
    staging = _parse_ref(destination.section("staging", required=True), "staging", profile)
    scratch = _parse_ref(destination.section("scratch", required=True), "scratch", profile)
    bucket = destination.str("bucket", None)
    if profile == "cloudsql" and not (bucket and bucket.startswith("gs://")):
        raise destination.error("bucket", "expected gs://bucket[/prefix] with profile cloudsql", bucket)
    dump_dir = destination.str("dump_dir", None)
    destination.done()
    rules = _parse_rules(options.section("rules", required=True))
    if not rules:
        raise options.error("rules", "expected at least one table with masking rules")
    preserve_fields = options.section("preserve")
    preserve = {}
    for table in sorted(preserve_fields.raw):
        if not db.IDENTIFIER.match(str(table)):
            raise preserve_fields.error(str(table), "expected a plain table name")
        preserve[str(table)] = preserve_fields.str(str(table))
        if ";" in preserve[str(table)]:
            raise preserve_fields.error(str(table), "expected one WHERE condition (no ';')", preserve[str(table)])
    preserve_fields.done()
    secret_env = options.str("secret_env", None)
    secret_name = options.str("secret", None)
    if bool(secret_env) == bool(secret_name):
        raise options.error("secret_env", "give exactly one of secret_env (an environment variable) or secret")
    settings = SyncSettings(
        profile=profile,
        production=production,
        scratch=scratch,
        staging=staging,
        rules=rules,
        preserve=preserve,
        secret_env=secret_env,
        secret_name=secret_name,
        bucket=bucket.rstrip("/") if bucket else None,
        dump_dir=Path(dump_dir) if dump_dir else ROOT / ".local" / "sqlsync",
        endpoint=options.str("endpoint", None),
        verify_sample=options.int("verify_sample", 50, minimum=1, maximum=10000),
        poll_seconds=options.float("poll_seconds", 20.0, minimum=0.0),
        email_bits=options.int("email_bits", 80, minimum=40, maximum=160),
        move_tables=options.str("move_tables", "auto", choices=("auto", "never")),
        mask_workers=options.int("mask_workers", 1, minimum=1, maximum=64),
        mask_mode=options.str(
            "mask_mode", "stream" if profile == "local" else "in-place", choices=("stream", "in-place")
        ),
    )
    if settings.mask_mode == "stream" and profile != "local":
        raise options.error(
            "mask_mode", "stream needs profile local (with cloudsql, Cloud SQL imports the dump itself)", "stream"
        )
    options.done()
    select.done()
    problem = same_database_problem(settings)
    if problem:
        raise ConfigError(f"{fields.where}: {problem}")
    return settings


def same_database_problem(settings: SyncSettings) -> str | None:
    """Staging or scratch pointing at production (or scratch at staging) would destroy data: refuse."""
    pairs = (
        (settings.staging, settings.production),
        (settings.scratch, settings.production),
        (settings.scratch, settings.staging),
    )
    for a, b in pairs:
        if _location(a) == _location(b) and a.database == b.database:
            return f"{a.role} resolves to the {b.role} database ({a.label()}); refusing to sync"
    return None


def _location(ref: db.DatabaseRef) -> tuple[str, ...]:
    if ref.instance and not ref.host:
        return ("instance", ref.instance)
    if ref.socket:
        return ("socket", os.path.realpath(ref.socket))
    import socket

    try:
        host = socket.gethostbyname(ref.host or "127.0.0.1")
    except OSError:
        host = ref.host or ""
    if host.startswith("127."):
        host = "127.0.0.1"
    return ("tcp", host, str(ref.port))


# ---- the kind interface ----------------------------------------------------------------------------------------


def enumerate_targets(plan: Any, page_token: str | None, rt: Runtime) -> TargetPage:
    """One plan is one sync: a single target named after the staging database."""
    settings: SyncSettings = plan.settings
    return TargetPage([Target(key=f"{settings.staging.role}-{settings.staging.database}", params={})])


def resolve_target(plan: Any, key: str, rt: Runtime) -> Target:
    """The one sync of the plan; a task names it, nothing in its body changes what it does."""
    target = enumerate_targets(plan, None, rt).targets[0]
    if key != target.key:
        raise PermanentError(f"refused: {key[:200]!r} is not plan {plan.name}'s sync ({target.key})")
    return target


def describe(plan: Any, target: Target, rt: Runtime) -> str:
    settings: SyncSettings = plan.settings
    lines = [
        f"sync {settings.production.label()} -> {settings.staging.label()} via scratch {settings.scratch.label()}"
        f" ({settings.profile} profile)"
    ]
    for step in STEPS:
        lines.append(f"  {step}: {_step_summary(settings, step)}")
    return "\n".join(lines)


def _step_summary(settings: SyncSettings, step: str) -> str:
    ruled = sorted({f"{r.table}.{r.column}={r.kind}" for r in settings.rules})
    return {
        "check": "refuse if staging is production or a rule names a missing column",
        "export-production": f"dump {settings.production.label()}",
        "import-scratch": f"empty {settings.scratch.label()} and load the production dump"
        + (f", masking {', '.join(ruled)} on the way in" if settings.mask_mode == "stream" else ""),
        "mask": "nothing left: masked during import-scratch"
        if settings.mask_mode == "stream"
        else f"mask {', '.join(ruled)}",
        "preserve": "re-insert staging rows "
        + (", ".join(f"{t} WHERE {w}" for t, w in settings.preserve.items()) or "(none)"),
        "export-scratch": "skipped: scratch shares the staging server, its tables are moved"
        if settings.moves_tables
        else f"dump the masked {settings.scratch.label()}",
        "backup-staging": f"safety backup of {settings.staging.label()}",
        "import-staging": f"move the masked tables into {settings.staging.label()} (RENAME TABLE)"
        if settings.moves_tables
        else f"load the masked dump into {settings.staging.label()}",
        "verify": f"look for {settings.verify_sample} sampled production values per table in staging",
        "cleanup-scratch": f"drop every table of {settings.scratch.label()} and delete the unmasked dump",
    }[step]


def start(plan: Any, target: Target, run: RunContext, rt: Runtime) -> Done | Pending:
    """Run ``check`` (or the step an admin's trigger named, ``run.options['start_at']``) and hand the chain on.
    Step ranges come only from the trigger's record or the CLI, never from a task body: skipping ``mask`` would
    load unmasked production data into staging."""
    first = run.options.get("start_at") or STEPS[0]
    stop_at = run.options.get("stop_at")
    for name, step in (("start_at", first), ("stop_at", stop_at)):
        if step is not None and step not in STEPS:
            raise PermanentError(f"{name}: unknown step {step!r} (steps: {', '.join(STEPS)})")
    state: dict[str, Any] = {"step": first, "stop_at": stop_at, "timings": {}}
    run.log(f"sqlsync {plan.name}: starting at step {first}")
    return run_step(plan, state, run, rt)


def poll(plan: Any, target: Target, state: dict[str, Any], run: RunContext, rt: Runtime) -> Done | Pending:
    return run_step(plan, state, run, rt)


def run_step(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> Done | Pending:
    """Do (or check) the step named in ``state`` and return what comes next."""
    settings: SyncSettings = plan.settings
    state = copy.deepcopy(state)  # the caller's (the task body's) state is never changed under it
    step = state["step"]
    began = time.monotonic()
    try:
        moved = settings.moves_tables and step in ("export-scratch", "import-staging")
        if settings.profile == "cloudsql" and step in OPERATION_STEPS and not moved:
            from services import sqlsync_cloud

            finished = sqlsync_cloud.operation_step(plan, step, state, run, rt)
            if not finished:
                return Pending(state=state, delay_seconds=settings.poll_seconds)
        else:
            _STEP_FUNCTIONS[step](plan, state, run, rt)
    except (PermanentError, TransientError) as exc:
        run.log(f"failed: {exc}")
        raise
    except Exception as exc:
        error = classify(step, exc)
        run.log(f"failed: {error}")
        raise error from exc
    seconds = time.monotonic() - began + state.pop("waited_seconds", 0.0)
    state["timings"][step] = round(seconds, 3)
    run.log(f"step {step}: done in {seconds:.1f}s")
    state.pop("operation", None)
    index = STEPS.index(step)
    if step == state.get("stop_at") or index == len(STEPS) - 1:
        stats = {"step_reached": step, "timings": state["timings"], **state.get("stats", {})}
        return Done(output=settings.staging.label(), stats=stats, message=f"sqlsync reached step {step}")
    state["step"] = STEPS[index + 1]
    return Pending(state=state, delay_seconds=0.0)


def classify(step: str, exc: BaseException) -> PermanentError | TransientError:
    """Map an exception from a step to retry-or-stop, naming the step and the class of failure."""
    from googleapiclient.errors import HttpError

    if isinstance(exc, HttpError):
        status = int(exc.resp.status)
        detail = _http_detail(exc)
        if status in (401, 403):
            return PermanentError(f"step {step}: auth: {detail}")
        if status == 404:
            return PermanentError(f"step {step}: not found: {detail}")
        if status == 429:
            return TransientError(f"step {step}: quota: {detail}", rate_limited=True)
        if status == 409:
            return TransientError(f"step {step}: another operation is running: {detail}")
        if status >= 500:
            return TransientError(f"step {step}: server error {status}: {detail}")
        return PermanentError(f"step {step}: request refused ({status}): {detail}")
    try:
        import pymysql
    except ImportError:  # pragma: no cover
        pymysql = None
    if pymysql is not None and isinstance(exc, pymysql.err.MySQLError):
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
        if "Can't connect" in text or "Lost connection" in text:
            return TransientError(f"step {step}: SQL connection error: {exc}")
        return PermanentError(f"step {step}: SQL error: {exc}")
    if isinstance(exc, (ValueError, LookupError, ConfigError)):
        return PermanentError(f"step {step}: {exc}")
    if isinstance(exc, OSError):
        return TransientError(f"step {step}: {exc}")
    return PermanentError(f"step {step}: unexpected {type(exc).__name__}: {exc}")


def _http_detail(exc: Any) -> str:
    import json

    try:
        return json.loads(exc.content.decode())["error"]["message"]
    except Exception:
        return exc.content.decode(errors="replace")[:300] if exc.content else str(exc)


# ---- steps -----------------------------------------------------------------------------------------------------


class DumpError(Exception):
    """``mariadb-dump`` or ``mariadb`` failed; ``stderr`` is kept for classification."""

    def __init__(self, message: str, stderr: str):
        super().__init__(f"{message}: {stderr.strip()[-500:]}")
        self.stderr = stderr


def masker_for(settings: SyncSettings, rt: Runtime) -> Masker:
    if settings.secret_env:
        value = os.environ.get(settings.secret_env)
        if not value:
            raise LookupError(f"masking secret: environment variable {settings.secret_env} is not set")
        secret = value.encode()
    else:
        secret = _secret_manager_value(settings.secret_name or "", rt)
    if len(secret) < 16:
        raise ValueError("masking secret: expected at least 16 bytes")
    return Masker(secret, email_bits=settings.email_bits)


def _secret_manager_value(name: str, rt: Runtime) -> bytes:
    try:
        from google.cloud import secretmanager  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - depends on the deployment
        raise LookupError("google-cloud-secret-manager is not installed; use secret_env instead") from exc
    client = rt.client("secretmanager", lambda: secretmanager.SecretManagerServiceClient())
    return client.access_secret_version(name=name).payload.data


def step_check(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    settings: SyncSettings = plan.settings
    problem = same_database_problem(settings)
    if problem:
        raise ValueError(problem)
    masker_for(settings, rt)  # the secret must be there before anything is copied
    identities = {}
    for ref in (settings.production, settings.staging, settings.scratch):
        with _connection(ref, database="") as conn:
            (identity,) = db.query(conn, "SELECT CONCAT_WS('|', @@hostname, @@port, @@datadir)")
            identities[ref.role] = identity[0]
            if ref.role == "production":
                schema = db.read_schema(conn, ref.database)
    for a, b in (("staging", "production"), ("scratch", "production"), ("scratch", "staging")):
        ref_a, ref_b = getattr(settings, a), getattr(settings, b)
        if identities[a] == identities[b] and ref_a.database == ref_b.database:
            raise ValueError(f"{a} resolves to the {b} database on the same server ({identities[a]}); refusing")
    if not schema.columns:
        raise LookupError(f"production database {settings.production.label()} has no tables")
    problems = db.schema_problems(schema, settings.rules, settings.preserve)
    if problems:
        raise ValueError("schema drift: " + "; ".join(problems))
    run.log(f"step check: {len(schema.columns)} tables, {len(settings.rules)} masked columns, schema matches")


def _connection(ref: db.DatabaseRef, database: str | None = None, streaming: bool = False) -> Any:
    return db.connect(ref, database, streaming=streaming)


def run_dir(plan: Any, run: RunContext) -> Path:
    settings: SyncSettings = plan.settings
    return settings.dump_dir / plan.name / run.period.strftime("%Y%m%dT%H%M%SZ")


def _binary(name: str) -> str:
    path = shutil.which(name, path=SEARCH_PATH)
    if path is None:
        raise LookupError(f"{name} not found: install mariadb-client (scripts/ensure-mariadb.sh)")
    return path


def _client_args(ref: db.DatabaseRef, option_file: Path) -> list[str]:
    option_file.write_text(f"[client]\nuser={ref.user}\npassword={ref.password()}\n")
    option_file.chmod(0o600)
    args = [f"--defaults-extra-file={option_file}"]
    if ref.socket:
        args.append(f"--socket={ref.socket}")
    else:
        args += [f"--host={ref.host}", f"--port={ref.port}", "--protocol=TCP"]
    return args


def dump_database(
    ref: db.DatabaseRef, path: Path, ignore_tables: tuple[str, ...] = (), tables: tuple[str, ...] = ()
) -> int:
    """``mariadb-dump`` of one database (or of ``tables`` in it) to ``path``; written aside then renamed, so a half
    dump never counts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with tempfile.TemporaryDirectory() as tmp, open(partial, "wb") as out:
        result = subprocess.run(
            [
                _binary("mariadb-dump"),
                *_client_args(ref, Path(tmp) / "client.cnf"),
                "--single-transaction",
                "--quick",
                "--skip-lock-tables",
                "--hex-blob",
                "--no-tablespaces",
                "--default-character-set=utf8mb4",
                "--skip-dump-date",
                *[f"--ignore-table={ref.database}.{table}" for table in ignore_tables],
                ref.database,
                *tables,
            ],
            stdout=out,
            stderr=subprocess.PIPE,
            text=False,
        )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise DumpError(f"mariadb-dump of {ref.label()} failed", result.stderr.decode(errors="replace"))
    _check_complete(partial)
    partial.replace(path)
    return path.stat().st_size


def _check_complete(path: Path) -> None:
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 200))
        if DUMP_COMPLETE not in fh.read():
            raise ValueError(f"dump {path} has no completion marker: it is truncated")


def load_dump(ref: db.DatabaseRef, path: Path, feed: Callable[[Callable[[bytes], object]], Any] | None = None) -> Any:
    """Feed a dump file to ``mariadb`` connected to ``ref``'s database. With ``feed``, the file is not read here:
    ``feed(write)`` writes the statements (masked ones, say) and its result is returned."""
    _check_complete(path)
    with (
        tempfile.TemporaryDirectory() as tmp,
        open(Path(tmp) / "stderr", "w+b") as errors,
        open(path, "rb") if feed is None else nullcontext(subprocess.PIPE) as source,
    ):
        loader = subprocess.Popen(
            [
                _binary("mariadb"),
                *_client_args(ref, Path(tmp) / "client.cnf"),
                "--default-character-set=utf8mb4",
                "--batch",
                ref.database,
            ],
            stdin=source,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        result = None
        try:
            if feed is None:
                loader.wait()
            else:
                assert loader.stdin is not None
                try:
                    result = feed(loader.stdin.write)
                    loader.stdin.close()
                except BrokenPipeError:
                    pass  # the loader stopped: its exit status and message say why
                loader.wait()
        except BaseException:
            loader.kill()
            loader.wait()
            raise
        errors.seek(0)
        message = errors.read().decode(errors="replace")
    if loader.returncode != 0:
        raise DumpError(f"loading {path.name} into {ref.label()} failed", message)
    return result


def empty_database(ref: db.DatabaseRef) -> int:
    """Drop every table (and view) of ``ref``'s database; used only on the scratch database."""
    with _connection(ref) as conn:
        db.query(conn, "SET SESSION foreign_key_checks = 0")
        rows = db.query(
            conn,
            "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
            (ref.database,),
        )
        for name, table_type in rows:
            what = "VIEW" if table_type == "VIEW" else "TABLE"
            db.query(conn, f"DROP {what} IF EXISTS `{name.replace('`', '``')}`")
        return len(rows)


def step_export_production(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    size = dump_database(plan.settings.production, run_dir(plan, run) / "production.sql")
    run.log(f"step export-production: {size} bytes")


def step_import_scratch(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    settings: SyncSettings = plan.settings
    dump = run_dir(plan, run) / "production.sql"
    if settings.mask_mode != "stream":
        dropped = empty_database(settings.scratch)
        load_dump(settings.scratch, dump)
        run.log(f"step import-scratch: dropped {dropped} leftover tables, loaded the production dump")
        return
    masker = masker_for(settings, rt)
    dropped = empty_database(settings.scratch)
    began = time.monotonic()
    report = load_dump(
        settings.scratch,
        dump,
        lambda write: sqlsync_stream.mask_dump(
            str(dump), list(settings.rules), masker, write, workers=settings.mask_workers, spool_dir=str(dump.parent)
        ),
    )
    with _connection(settings.scratch) as conn:
        db.mark_progress(conn, "mask", "done")
    seconds = time.monotonic() - began
    state.setdefault("stats", {}).update(masked_rows=report.rows, masked_values=report.values)
    run.log(
        f"step import-scratch: dropped {dropped} leftover tables, loaded the production dump masking"
        f" {report.rows} rows of {', '.join(report.tables) or 'no table'} on the way in"
        f" ({report.rows / seconds if seconds else 0.0:.0f} rows/s); seconds by phase {report.seconds}"
    )


def step_mask(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    settings: SyncSettings = plan.settings
    masker = masker_for(settings, rt)
    with _connection(settings.scratch) as conn, _connection(settings.scratch, streaming=True) as stream:
        schema = db.read_schema(conn, settings.scratch.database)
        problems = db.schema_problems(schema, settings.rules, {})
        if problems:
            raise ValueError("schema drift in scratch: " + "; ".join(problems))
        if not db.begin_in_place_step(conn, "mask"):
            run.log("step mask: scratch is already masked (on import, or by an earlier attempt of this step); skipped")
            return
        began = time.monotonic()
        report = db.mask_database(conn, stream, schema, list(settings.rules), masker, workers=settings.mask_workers)
        db.mark_progress(conn, "mask", "done")
    seconds = time.monotonic() - began
    state.setdefault("stats", {}).update(masked_rows=report.rows_updated, masked_values=report.values_masked)
    rate = report.rows_updated / seconds if seconds else 0.0
    run.log(
        f"step mask: {report.rows_updated} rows in {', '.join(report.tables)}, {report.values_masked} distinct"
        f" values, {rate:.0f} rows/s; seconds by phase {report.seconds}"
    )


def step_preserve(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    settings: SyncSettings = plan.settings
    if not settings.preserve:
        run.log("step preserve: no preserve rules")
        return
    with _connection(settings.scratch) as scratch, _connection(settings.staging) as staging:
        if not db.begin_in_place_step(scratch, "preserve"):
            run.log("step preserve: rows were already re-inserted by an earlier attempt of this step; skipped")
            return
        schema = db.read_schema(scratch, settings.scratch.database)
        report = db.copy_preserved_rows(staging, scratch, schema, settings.preserve)
        db.mark_progress(scratch, "preserve", "done")
    remapped = {table: len(ids) for table, ids in report.remapped.items() if ids}
    state.setdefault("stats", {}).update(preserved_rows=report.rows, remapped_ids=remapped)
    run.log(f"step preserve: re-inserted {report.rows}; new ids for {remapped or 'none'}")


def step_export_scratch(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    if plan.settings.moves_tables:
        run.log("step export-scratch: skipped, scratch shares the staging server and its tables will be moved")
        return
    size = dump_database(plan.settings.scratch, run_dir(plan, run) / "masked.sql", (db.PROGRESS_TABLE,))
    run.log(f"step export-scratch: {size} bytes")


def step_backup_staging(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    settings: SyncSettings = plan.settings
    path = run_dir(plan, run) / "staging-before.sql"
    size = dump_database(settings.staging, path)
    state["staging_backup"] = str(path)
    run.log(f"step backup-staging: safety dump {path} ({size} bytes)")


def step_import_staging(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    settings: SyncSettings = plan.settings
    if settings.profile == "local":
        safety = run_dir(plan, run) / "staging-before.sql"
        if not safety.exists():
            raise ValueError(f"no safety backup of staging for this run ({safety}); refusing to overwrite staging")
        _check_complete(safety)
    elif not state.get("staging_backup"):
        raise ValueError("no safety backup of staging for this run (backup-staging did not complete); refusing")
    if settings.moves_tables:
        moved = move_tables(settings.scratch, settings.staging)
        run.log(f"step import-staging: moved {moved} tables from {settings.scratch.label()} with RENAME TABLE")
        return
    load_dump(settings.staging, run_dir(plan, run) / "masked.sql")


def move_tables(scratch: db.DatabaseRef, staging: db.DatabaseRef) -> int:
    """Replace staging's tables by scratch's in one RENAME TABLE (atomic; foreign keys move along). Staging
    tables that production does not have are left alone, as a dump import would."""
    with _connection(scratch) as conn:
        tables = [
            name
            for (name,) in db.query(
                conn, "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (scratch.database,)
            )
            if name != db.PROGRESS_TABLE
        ]
        views = db.query(
            conn, "SELECT COUNT(*) FROM information_schema.VIEWS WHERE TABLE_SCHEMA = %s", (scratch.database,)
        )[0][0]
        triggers = db.query(
            conn, "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s", (scratch.database,)
        )[0][0]
        if views or triggers:
            raise ValueError(
                "scratch has views or triggers, which RENAME TABLE cannot move across databases:"
                " set options.move_tables: never"
            )
        src, dst = db.quote(scratch.database), db.quote(staging.database)
        db.query(conn, "SET SESSION foreign_key_checks = 0")
        existing = {
            row[0]
            for row in db.query(
                conn, "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (staging.database,)
            )
        }
        for name in tables:
            if name in existing:
                db.query(conn, f"DROP TABLE {dst}.{db.quote(name)}")
        if tables:
            db.query(conn, "RENAME TABLE " + ", ".join(f"{src}.{db.quote(t)} TO {dst}.{db.quote(t)}" for t in tables))
        db.query(conn, "SET SESSION foreign_key_checks = 1")
    return len(tables)


def step_verify(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    settings: SyncSettings = plan.settings
    masker = masker_for(settings, rt)
    with _connection(settings.production) as production, _connection(settings.staging) as staging:
        schema = db.read_schema(production, settings.production.database)
        leaks = db.find_leaks(production, staging, schema, list(settings.rules), masker, settings.verify_sample)
    if leaks:
        raise ValueError(f"personal data found in staging after the import: {'; '.join(sorted(set(leaks))[:10])}")
    run.log(f"step verify: no sampled production value found in staging (sample {settings.verify_sample}/table)")


def step_cleanup_scratch(plan: Any, state: dict[str, Any], run: RunContext, rt: Runtime) -> None:
    settings: SyncSettings = plan.settings
    dropped = empty_database(settings.scratch)
    if settings.profile == "cloudsql":
        from services import sqlsync_cloud

        deleted = sqlsync_cloud.delete_dumps(plan, run, rt)
        run.log(f"step cleanup-scratch: dropped {dropped} tables, deleted {deleted} dump objects")
        return
    directory = run_dir(plan, run)
    # The production dump holds unmasked personal data: it must not outlive the run.
    for name in ("production.sql", "masked.sql"):
        (directory / name).unlink(missing_ok=True)
    pruned = prune_safety_dumps(plan, directory)
    run.log(f"step cleanup-scratch: dropped {dropped} tables, deleted the dumps, pruned {pruned} old safety dumps")


RUN_DIR_NAME = re.compile(r"^\d{8}T\d{6}Z$")


def prune_safety_dumps(plan: Any, current: Path) -> int:
    """Keep the newest ``retention.keep`` staging safety dumps (never fewer than ``min_keep``, never the current
    run's); only run folders this kind created (named by period) are considered."""
    keep = plan.retention.keep
    if keep is None:
        return 0
    keep = max(keep, plan.retention.min_keep)
    base = current.parent
    runs = sorted(p for p in base.iterdir() if p.is_dir() and RUN_DIR_NAME.match(p.name))
    pruned = 0
    for old in runs[:-keep]:
        if old == current:
            continue
        shutil.rmtree(old)
        pruned += 1
    return pruned


_STEP_FUNCTIONS = {
    "check": step_check,
    "export-production": step_export_production,
    "import-scratch": step_import_scratch,
    "mask": step_mask,
    "preserve": step_preserve,
    "export-scratch": step_export_scratch,
    "backup-staging": step_backup_staging,
    "import-staging": step_import_staging,
    "verify": step_verify,
    "cleanup-scratch": step_cleanup_scratch,
}


def drive(
    plan: Any,
    run: RunContext,
    rt: Runtime,
    *,
    start_at: str | None = None,
    stop_at: str | None = None,
    sleep: Any = time.sleep,
) -> Done:
    """Run the whole chain in this process (the CLI and tests): start, then poll after each Pending's delay.
    The queue does the same across tasks in the service."""
    for name, step in (("--start-at", start_at), ("--stop-at", stop_at)):
        if step is not None and step not in STEPS:
            raise PermanentError(f"{name}: unknown step {step!r} (steps: {', '.join(STEPS)})")
    if start_at and stop_at and STEPS.index(stop_at) < STEPS.index(start_at):
        raise PermanentError(f"--stop-at {stop_at} comes before --start-at {start_at}")
    target = enumerate_targets(plan, None, rt).targets[0]
    run.options = {k: v for k, v in (("start_at", start_at), ("stop_at", stop_at)) if v}
    outcome = start(plan, target, run, rt)
    while isinstance(outcome, Pending):
        if outcome.delay_seconds:
            sleep(outcome.delay_seconds)
        outcome = poll(plan, target, outcome.state, run, rt)
    return outcome
