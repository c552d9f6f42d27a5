"""The Cloud SQL Admin API half of the sqlsync kind (profile ``cloudsql``): the long steps are Cloud SQL operations
(``instances.export`` with ``offload``, ``instances.import``, ``backupRuns.insert``) that a task starts and
follow-up tasks poll.

Cloud SQL runs one import/export per instance at a time: before starting an operation the step lists the
instance's operations; if one is still running it waits (returns "not finished") instead of starting a second
one, and if it is *our* operation (same type and dump URI, or our backup description) it adopts it, which makes a
duplicated task harmless. API errors are judged by services/gcp_errors.py, as for every kind (``api_error``).
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kinds.sqlsync import db, stream
from kinds.sqlsync.errors import Refused
from kinds.sqlsync.plan import Settings
from services import gcp_errors, retention
from services.errors import PermanentError, TransientError
from services.kinds import RunContext
from services.plans import Plan
from services.runtime import Runtime

ACTIVE = ("PENDING", "RUNNING")
MASKED_EXPORT = "production-masked"  # the production export, masked by this code on its way to scratch
STAMP = "%Y%m%dT%H%M%SZ"


def admin_client(settings: Settings, rt: Runtime) -> Any:
    """The sqladmin v1beta4 client from the bundled discovery document; endpoint from the plan, else
    BACKUP_SQLADMIN_ENDPOINT (Private Service Connect, or a local fake)."""
    from googleapiclient.discovery import build

    from services.requests_http import RequestsHttp

    endpoint = settings.endpoint or rt.settings.endpoint("sqladmin")
    if endpoint and not endpoint.endswith("/"):
        endpoint += "/"  # the API's paths (sql/v1beta4/...) are joined to it
    options = {"api_endpoint": endpoint} if endpoint else None

    def factory() -> Any:
        return build(
            "sqladmin",
            "v1beta4",
            http=RequestsHttp(rt.credentials()),
            static_discovery=True,
            client_options=options,
            cache_discovery=False,
        )

    return rt.client(f"sqladmin:{endpoint or 'default'}", factory)


def api_error(step: str, exc: BaseException) -> Exception:
    """The service error for a Cloud SQL Admin API failure in ``step``: retry, skip or stop exactly as
    services/gcp_errors.py judges it for every kind, worded with the step and a short name for the trouble."""
    judged = gcp_errors.classify(exc, f"step {step}")
    from googleapiclient.errors import HttpError

    if not isinstance(exc, HttpError):
        return judged
    problem = gcp_errors.problem_of(exc)
    status = problem.status
    if status in (401, 403):
        trouble = "auth"
    elif status == 404:
        trouble = "not found"
    elif status == 429 or problem.reason in gcp_errors.RATE_LIMIT_REASONS:
        trouble = "quota"
    elif status >= 500:
        trouble = f"server error {status}"
    elif status == 409:
        trouble = "another operation is running"
    else:
        trouble = f"request refused ({status})"
    message = f"step {step}: {trouble}: {problem.message}"
    if isinstance(judged, TransientError):
        return TransientError(message, rate_limited=judged.rate_limited, retry_after=judged.retry_after)
    return type(judged)(message)


def split_instance(connection_name: str) -> tuple[str, str]:
    """``project:region:instance`` (or ``domain:project:region:instance``) -> (project, instance)."""
    parts = connection_name.split(":")
    return ":".join(parts[:-2]), parts[-1]


def dump_uri(plan: Plan[Settings], run: RunContext, name: str) -> str:
    return f"{plan.settings.bucket}/sqlsync/{plan.name}/{run.period.strftime(STAMP)}/{name}.sql.gz"


def backup_description(plan: Plan[Settings], run: RunContext) -> str:
    return f"sqlsync:{plan.name}:{run.period.strftime(STAMP)}"


def scratch_tables(scratch: db.DatabaseRef) -> list[str]:
    with db.connect(scratch) as conn:
        return db.table_names(conn, scratch.database)


def _request(
    plan: Plan[Settings], settings: Settings, step: str, run: RunContext, with_tables: bool = False
) -> tuple[str, str, dict[str, Any]]:
    """(role, API method, body) of the operation a step starts."""
    if step in ("export-production", "export-scratch"):
        role, name = ("production", "production") if step == "export-production" else ("scratch", "masked")
        # offload: a serverless export, so production serves traffic undisturbed.
        context: dict[str, Any] = {
            "fileType": "SQL",
            "uri": dump_uri(plan, run, name),
            "databases": [getattr(settings, role).database],
            "offload": True,
        }
        if role == "scratch":  # every table but the progress marker (listed when the step starts)
            context["sqlExportOptions"] = {"tables": scratch_tables(settings.scratch) if with_tables else []}
        return role, "export", {"exportContext": context}
    if step == "import-scratch":
        source = MASKED_EXPORT if settings.mask_mode == "stream" else "production"
        ctx = {"fileType": "SQL", "uri": dump_uri(plan, run, source), "database": settings.scratch.database}
        return "scratch", "import", {"importContext": ctx}
    if step == "import-staging":
        ctx = {"fileType": "SQL", "uri": dump_uri(plan, run, "masked"), "database": settings.staging.database}
        return "staging", "import", {"importContext": ctx}
    if step == "backup-staging":
        return "staging", "backup", {"description": backup_description(plan, run)}
    raise ValueError(f"step {step} is not a Cloud SQL operation")


def _is_ours(op: dict[str, Any], method: str, body: dict[str, Any]) -> bool:
    """An export or import of this run's dump URI (the URI is the run's: plan, period and dump name)."""
    if method not in ("export", "import"):
        return False
    context = f"{method}Context"
    return op.get("operationType") == method.upper() and op.get(context, {}).get("uri") == body[context]["uri"]


def operation_step(
    plan: Plan[Settings], settings: Settings, step: str, state: dict[str, Any], run: RunContext, rt: Runtime
) -> bool:
    """Start or check the operation of ``step``. True when it finished well; PermanentError when it failed."""
    client = admin_client(settings, rt)
    role, method, body = _request(plan, settings, step, run, with_tables="operation" not in state)
    ref = getattr(settings, role)
    project, instance = split_instance(ref.instance)
    if state.get("operation") is not None:
        return _check(client, plan, step, state, run, rt)
    if step == "import-staging" and not state.get("staging_backup"):
        raise Refused("no safety backup of staging for this run (backup-staging did not complete); refusing")
    if step == "import-scratch" and not state.get("scratch_emptied"):
        # Cloud SQL imports into an existing database: leftovers of an earlier, broken run must go first.
        dropped = db.empty_database(settings.scratch)
        state["scratch_emptied"] = True
        run.log(f"step import-scratch: dropped {dropped} leftover tables in {settings.scratch.label()}")
    items = client.operations().list(project=project, instance=instance, maxResults=20).execute(num_retries=0)
    items = items.get("items", [])
    if method == "backup":
        status = _our_backup_status(client, project, instance, body["description"])
        if status == "SUCCESSFUL":
            state["staging_backup"] = body["description"]
            run.log(f"step {step}: safety backup {body['description']} already exists")
            return True
        if status is not None:
            run.log(f"step {step}: safety backup {body['description']} is {status}; waiting")
            return False
    ours = next((op["name"] for op in items if _is_ours(op, method, body) and not op.get("error")), None)
    if ours is not None:
        state["operation"] = {"name": ours, "project": project, "instance": instance, "since": rt.now().isoformat()}
        run.log(f"step {step}: adopted operation {ours} already started for this run")
        return _check(client, plan, step, state, run, rt)
    busy = [op for op in items if op.get("status") in ACTIVE]
    if busy:
        run.log(
            f"step {step}: instance {instance} is busy with {busy[0].get('operationType')} operation"
            f" {busy[0].get('name')}; waiting (Cloud SQL runs one operation per instance)"
        )
        return False
    if method == "export":
        request = client.instances().export(project=project, instance=instance, body=body)
    elif method == "import":
        request = client.instances().import_(project=project, instance=instance, body=body)
    else:
        request = client.backupRuns().insert(project=project, instance=instance, body=body)
    op = request.execute(num_retries=0)
    state["operation"] = {"name": op["name"], "project": project, "instance": instance, "since": rt.now().isoformat()}
    run.log(f"step {step}: started {method} operation {op['name']} on {instance}")
    return False


def backup_runs(client: Any, project: str, instance: str) -> list[dict[str, Any]]:
    """Every backup run of ``instance``, page by page."""
    runs: list[dict[str, Any]] = []
    token = None
    while True:
        page = (
            client.backupRuns()
            .list(project=project, instance=instance, maxResults=500, pageToken=token)
            .execute(num_retries=0)
        )
        runs += page.get("items", [])
        token = page.get("nextPageToken")
        if not token:
            return runs


def _our_backup_status(client: Any, project: str, instance: str, description: str) -> str | None:
    for backup in backup_runs(client, project, instance):
        if backup.get("description") == description and backup.get("status") not in ("FAILED", "DELETED"):
            return str(backup.get("status"))
    return None


def _check(client: Any, plan: Plan[Settings], step: str, state: dict[str, Any], run: RunContext, rt: Runtime) -> bool:
    current = state["operation"]
    op = client.operations().get(project=current["project"], operation=current["name"]).execute(num_retries=0)
    if op.get("status") != "DONE":
        return False
    errors = op.get("error", {}).get("errors", [])
    if errors:
        detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        raise PermanentError(f"step {step}: operation failed: {current['name']} on {current['instance']}: {detail}")
    state["waited_seconds"] = max(0.0, (rt.now() - datetime.fromisoformat(current["since"])).total_seconds())
    if step == "backup-staging":
        state["staging_backup"] = current["name"]
        prunebackup_runs(client, plan, current["project"], current["instance"], backup_description(plan, run), run)
    return True


def _created(description: str, prefix: str) -> datetime:
    return datetime.strptime(description[len(prefix) :], STAMP).replace(tzinfo=UTC)


def prunebackup_runs(
    client: Any, plan: Plan[Settings], project: str, instance: str, confirmed: str, run: RunContext
) -> int:
    """Retention (services/retention.py) over the safety backups this kind made of staging (description
    ``sqlsync:<plan>:<period>``), once this run's is confirmed good; automated and other on-demand backups are
    never candidates."""
    prefix = f"sqlsync:{plan.name}:"
    listed = []
    for item in backup_runs(client, project, instance):
        description = str(item.get("description", ""))
        try:
            created = _created(description, prefix) if description.startswith(prefix) else None
        except ValueError:
            created = None
        listed.append(
            retention.Backup(
                name=description or str(item.get("id")),
                created=created or datetime.min.replace(tzinfo=UTC),
                ours=created is not None,
                complete=item.get("status") == "SUCCESSFUL",
                item=item,
            )
        )

    def delete(backup: retention.Backup[dict[str, Any]]) -> None:
        assert backup.item is not None
        client.backupRuns().delete(project=project, instance=instance, id=backup.item["id"]).execute(num_retries=0)
        run.log(f"step backup-staging: deleted old safety backup {backup.item['id']} ({backup.name})")

    policy = retention.Policy(plan.retention.keep, plan.retention.min_keep)
    return len(retention.prune(listed, policy, confirmed, delete))


def _blob(rt: Runtime, uri: str) -> Any:
    bucket_name, _, path = uri[len("gs://") :].partition("/")
    return rt.storage().bucket(bucket_name).blob(path)


def mask_export(
    plan: Plan[Settings], settings: Settings, masker: Any, run: RunContext, rt: Runtime
) -> stream.StreamReport:
    """The production export object masked into another object (``production-masked``), by the same stream masker as
    the local profile: Cloud SQL then imports only masked data into scratch. The unmasked object is deleted once the
    masked one is stored. Works in a private temporary folder (the export, unzipped, and the masked file)."""
    source, target = _blob(rt, dump_uri(plan, run, "production")), _blob(rt, dump_uri(plan, run, MASKED_EXPORT))
    if not source.exists() and target.exists():
        return stream.StreamReport()  # an earlier attempt stored the masked object and deleted the export
    with tempfile.TemporaryDirectory(prefix="sqlsync-mask-") as tmp:
        packed, plain, masked = Path(tmp) / "production.sql.gz", Path(tmp) / "production.sql", Path(tmp) / "masked.gz"
        source.download_to_filename(str(packed), checksum=None)
        with gzip.open(packed, "rb") as unzipped, open(plain, "wb") as out:
            shutil.copyfileobj(unzipped, out, 1 << 20)
        packed.unlink()
        try:
            report = _mask_file(plain, masked, settings, masker, tmp, one_pass=True)
        except stream.Collision:
            report = _mask_file(plain, masked, settings, masker, tmp, one_pass=False)
        target.upload_from_filename(str(masked), content_type="application/gzip")
    source.delete()
    return report


def _mask_file(
    plain: Path, masked: Path, settings: Settings, masker: Any, tmp: str, one_pass: bool
) -> stream.StreamReport:
    # Level 1: the object lives minutes, and the masking, not the bytes, should set the pace.
    with gzip.open(masked, "wb", compresslevel=1) as out:
        return stream.mask_dump(
            str(plain),
            list(settings.rules),
            masker,
            out.write,
            workers=settings.mask_workers,
            spool_dir=tmp,
            one_pass=one_pass,
        )


def delete_dumps(plan: Plan[Settings], run: RunContext, rt: Runtime) -> int:
    """Delete this run's dump objects from GCS: the production export holds unmasked personal data."""
    from google.api_core.exceptions import NotFound

    client = rt.storage()
    deleted = 0
    for name in ("production", MASKED_EXPORT, "masked"):
        bucket_name, _, path = dump_uri(plan, run, name)[len("gs://") :].partition("/")
        try:
            client.bucket(bucket_name).blob(path).delete()
            deleted += 1
        except NotFound:
            pass
    return deleted
