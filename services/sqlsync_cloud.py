"""The Cloud SQL Admin API half of the sqlsync kind (profile ``cloudsql``): the long steps are Cloud SQL operations
(``instances.export`` with ``offload``, ``instances.import``, ``backupRuns.insert``) that a task starts and
follow-up tasks poll.

Cloud SQL runs one import/export per instance at a time: before starting an operation the step lists the
instance's operations; if one is still running it waits (returns "not finished") instead of starting a second
one, and if it is *our* operation (same type and dump URI, or our backup description) it adopts it, which makes a
duplicated task harmless.
"""

from __future__ import annotations

from typing import Any

from services.errors import PermanentError
from services.kinds import RunContext
from services.runtime import Runtime

ACTIVE = ("PENDING", "RUNNING")


def admin_client(plan: Any, rt: Runtime) -> Any:
    """The sqladmin v1beta4 client from the bundled discovery document; endpoint from the plan, else
    BACKUP_SQLADMIN_ENDPOINT (Private Service Connect, or a local fake)."""
    from googleapiclient.discovery import build

    from services.requests_http import RequestsHttp

    endpoint = plan.settings.endpoint or rt.settings.endpoint("sqladmin")
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


def split_instance(connection_name: str) -> tuple[str, str]:
    """``project:region:instance`` (or ``domain:project:region:instance``) -> (project, instance)."""
    parts = connection_name.split(":")
    return ":".join(parts[:-2]), parts[-1]


def dump_uri(plan: Any, run: RunContext, name: str) -> str:
    return f"{plan.settings.bucket}/sqlsync/{plan.name}/{run.period.strftime('%Y%m%dT%H%M%SZ')}/{name}.sql.gz"


def backup_description(plan: Any, run: RunContext) -> str:
    return f"sqlsync:{plan.name}:{run.period.strftime('%Y%m%dT%H%M%SZ')}"


def scratch_tables(plan: Any) -> list[str]:
    from services import sqlsync
    from services.sqlsync_db import PROGRESS_TABLE, query

    scratch = plan.settings.scratch
    with sqlsync.db.connect(scratch) as conn:
        rows = query(
            conn, "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (scratch.database,)
        )
    return sorted(name for (name,) in rows if name != PROGRESS_TABLE)


def _request(plan: Any, step: str, run: RunContext, with_tables: bool = False) -> tuple[str, str, dict[str, Any]]:
    """(role, API method, body) of the operation a step starts."""
    settings = plan.settings
    if step == "export-production":
        body = {
            "exportContext": {
                "fileType": "SQL",
                "uri": dump_uri(plan, run, "production"),
                "databases": [settings.production.database],
                "offload": True,  # serverless export: production serves traffic undisturbed
            }
        }
        return "production", "export", body
    if step == "export-scratch":
        body = {
            "exportContext": {
                "fileType": "SQL",
                "uri": dump_uri(plan, run, "masked"),
                "databases": [settings.scratch.database],
                "offload": True,
                # Every table but the progress marker (listed when the step starts).
                "sqlExportOptions": {"tables": scratch_tables(plan) if with_tables else []},
            }
        }
        return "scratch", "export", body
    if step == "import-scratch":
        ctx = {"fileType": "SQL", "uri": dump_uri(plan, run, "production"), "database": settings.scratch.database}
        return "scratch", "import", {"importContext": ctx}
    if step == "import-staging":
        ctx = {"fileType": "SQL", "uri": dump_uri(plan, run, "masked"), "database": settings.staging.database}
        return "staging", "import", {"importContext": ctx}
    if step == "backup-staging":
        return "staging", "backup", {"description": backup_description(plan, run)}
    raise ValueError(f"step {step} is not a Cloud SQL operation")


def _is_ours(op: dict[str, Any], method: str, body: dict[str, Any]) -> bool:
    if method == "export":
        return (
            op.get("operationType") == "EXPORT"
            and op.get("exportContext", {}).get("uri") == body["exportContext"]["uri"]
        )
    if method == "import":
        return (
            op.get("operationType") == "IMPORT"
            and op.get("importContext", {}).get("uri") == body["importContext"]["uri"]
        )
    return False


def operation_step(plan: Any, step: str, state: dict[str, Any], run: RunContext, rt: Runtime) -> bool:
    """Start or check the operation of ``step``. True when it finished well; PermanentError when it failed."""
    from services import sqlsync

    client = admin_client(plan, rt)
    role, method, body = _request(plan, step, run, with_tables="operation" not in state)
    ref = getattr(plan.settings, role)
    project, instance = split_instance(ref.instance)
    current = state.get("operation")
    if current is None:
        if step == "import-staging" and not state.get("staging_backup"):
            raise ValueError("no safety backup of staging for this run (backup-staging did not complete); refusing")
        if step == "import-scratch" and not state.get("scratch_emptied"):
            # Cloud SQL imports into an existing database: leftovers of an earlier, broken run must go first.
            dropped = sqlsync.empty_database(plan.settings.scratch)
            state["scratch_emptied"] = True
            run.log(f"step import-scratch: dropped {dropped} leftover tables in {plan.settings.scratch.label()}")
        operations = client.operations().list(project=project, instance=instance, maxResults=20).execute()
        items = operations.get("items", [])
        if method == "backup":
            status = _our_backup_status(client, project, instance, body["description"])
            if status == "SUCCESSFUL":
                state["staging_backup"] = body["description"]
                run.log(f"step {step}: safety backup {body['description']} already exists")
                return True
            if status is not None:
                run.log(f"step {step}: safety backup {body['description']} is {status}; waiting")
                return False
        ours = _find_ours(client, project, instance, items, method, body)
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
            op = client.instances().export(project=project, instance=instance, body=body).execute()
        elif method == "import":
            op = client.instances().import_(project=project, instance=instance, body=body).execute()
        else:
            op = client.backupRuns().insert(project=project, instance=instance, body=body).execute()
        state["operation"] = {
            "name": op["name"],
            "project": project,
            "instance": instance,
            "since": rt.now().isoformat(),
        }
        run.log(f"step {step}: started {method} operation {op['name']} on {instance}")
        return False
    return _check(client, plan, step, state, run, rt)


def _find_ours(client: Any, project: str, instance: str, items: list[dict], method: str, body: dict) -> str | None:
    """The name of an operation this run already started for this step (a duplicated task), if any."""
    for op in items:
        if _is_ours(op, method, body) and not op.get("error"):
            return op["name"]
    return None


def _our_backup_status(client: Any, project: str, instance: str, description: str) -> str | None:
    runs = client.backupRuns().list(project=project, instance=instance, maxResults=50).execute()
    for backup in runs.get("items", []):
        if backup.get("description") == description and backup.get("status") not in ("FAILED", "DELETED"):
            return backup.get("status")
    return None


def _check(client: Any, plan: Any, step: str, state: dict[str, Any], run: RunContext, rt: Runtime) -> bool:
    from datetime import datetime

    current = state["operation"]
    op = client.operations().get(project=current["project"], operation=current["name"]).execute()
    if op.get("status") != "DONE":
        return False
    errors = op.get("error", {}).get("errors", [])
    if errors:
        detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        raise PermanentError(f"step {step}: operation failed: {current['name']} on {current['instance']}: {detail}")
    state["waited_seconds"] = max(0.0, (rt.now() - datetime.fromisoformat(current["since"])).total_seconds())
    if step == "backup-staging":
        state["staging_backup"] = current["name"]
        prune_backup_runs(client, plan, current["project"], current["instance"], run)
    return True


def prune_backup_runs(client: Any, plan: Any, project: str, instance: str, run: RunContext) -> int:
    """Keep the newest ``retention.keep`` safety backups this kind made of staging (description prefix
    ``sqlsync:<plan>:``), never fewer than ``min_keep``; automated and other on-demand backups are not touched."""
    keep = plan.retention.keep
    if keep is None:
        return 0
    keep = max(keep, plan.retention.min_keep)
    prefix = f"sqlsync:{plan.name}:"
    runs = client.backupRuns().list(project=project, instance=instance, maxResults=500).execute().get("items", [])
    ours = sorted(
        (r for r in runs if str(r.get("description", "")).startswith(prefix) and r.get("status") == "SUCCESSFUL"),
        key=lambda r: r["description"],
        reverse=True,
    )
    for old in ours[keep:]:
        client.backupRuns().delete(project=project, instance=instance, id=old["id"]).execute()
        run.log(f"step backup-staging: deleted old safety backup {old['id']} ({old['description']})")
    return max(0, len(ours) - keep)


def delete_dumps(plan: Any, run: RunContext, rt: Runtime) -> int:
    """Delete this run's dump objects from GCS: the production export holds unmasked personal data."""
    from google.api_core.exceptions import NotFound

    client = rt.storage()
    deleted = 0
    for name in ("production", "masked"):
        bucket_name, _, path = dump_uri(plan, run, name)[len("gs://") :].partition("/")
        try:
            client.bucket(bucket_name).blob(path).delete()
            deleted += 1
        except NotFound:
            pass
    return deleted
