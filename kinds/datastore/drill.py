"""The restore drill of a Datastore export: imported into a scratch database, counted kind by kind against what
the export recorded, and the scratch emptied again.

Where the scratch is: in Google Cloud, a named database of the same project (``options.drill_database``, default
``backup-drill``; create it once in Datastore mode, ``gcloud firestore databases create --database=backup-drill
--type=datastore-mode --location=...``), never the ``(default)`` database the backups come from. Locally the
Datastore emulator has no named databases, so the scratch is the emulator's project ``<project>-drill``, which no
backup ever reads. Steps (each a task; long ones checkpoint within the task budget):

1. empty the scratch of the export's kinds (what a crashed drill left, or ``keep_scratch``);
2. start the import of the export into the scratch; 3. follow the import (``restored_in_seconds``: request to done);
4. count each kind in the scratch and compare with the counts the backup run recorded from the export;
5. empty the scratch again (unless ``drill.keep_scratch``), then report.
"""

from __future__ import annotations

import time
from typing import Any

from google.api_core import exceptions as core

from kinds.datastore.exports import _project, admin_client, emulator_path
from kinds.datastore.plan import Settings
from services.errors import PermanentError
from services.gcp_errors import classify
from services.kinds import BackupRef, Done, DrillState, DrillStep, Outcome, Pending, RunContext, Target
from services.plans import Plan
from services.runtime import Runtime

POLL_SECONDS = 15.0
DELETE_BATCH = 500  # Datastore's limit per commit


def drill(
    plan: Plan[Settings], target: Target, backup: BackupRef, state: DrillState, run: RunContext, rt: Runtime
) -> Outcome:
    state = state or {"phase": "clear-before", "pairs": _pairs(target)}
    scratch = _scratch(plan, rt)
    if state["phase"] == "clear-before":
        if not _empty_scratch(scratch, state["pairs"], run):
            return Pending(state, delay_seconds=0)
        return _start_import(plan, backup, state, scratch, run, rt)
    if state["phase"] == "importing":
        return _follow_import(backup, state, scratch, run, rt, keep=bool(plan.drill and plan.drill.keep_scratch))
    if not _empty_scratch(scratch, state["pairs"], run):
        return Pending(state, delay_seconds=0)
    return _report(state, run)


def _pairs(target: Target) -> list[list[str]]:
    return [[ns, kind] for ns in target.params["namespaces"] for kind in target.params["kinds"]]


class Scratch:
    """Where a drill imports to: a named database (Google Cloud) or another emulator project (locally)."""

    def __init__(self, project: str, database: str | None, client: Any):
        self.project, self.database, self.client = project, database, client

    @property
    def label(self) -> str:
        return f"database {self.database} of {self.project}" if self.database else f"emulator project {self.project}"


def _scratch(plan: Plan[Settings], rt: Runtime) -> Scratch:
    from google.cloud import datastore

    project = _project(plan, rt)
    if rt.settings.export_local_root is not None:  # the emulator: a project of its own
        local = f"{project}-drill"
        return Scratch(local, None, rt.client(f"drill:{local}", lambda: datastore.Client(local)))
    database = plan.settings.drill_database
    client = rt.client(f"drill:{project}/{database}", lambda: datastore.Client(project, database=database))
    return Scratch(project, database, client)


def _empty_scratch(scratch: Scratch, pairs: list[list[str]], run: RunContext) -> bool:
    """Delete the scratch's entities of ``pairs``; False when the task's budget ran out first (call again)."""
    for namespace, kind in pairs:
        while True:
            query = scratch.client.query(kind=kind, namespace=namespace or None)
            query.keys_only()
            try:
                keys = [entity.key for entity in query.fetch(limit=DELETE_BATCH)]
                if not keys:
                    break
                scratch.client.delete_multi(keys)
            except core.GoogleAPICallError as exc:
                raise classify(exc, f"emptying {kind} in the drill's {scratch.label}") from exc
            if run.out_of_time(reserve=5.0):
                return False
    return True


def _start_import(
    plan: Plan[Settings], backup: BackupRef, state: dict[str, Any], scratch: Scratch, run: RunContext, rt: Runtime
) -> Outcome:
    assert plan.drill is not None
    recorded = backup.stats.get("kinds") or {}
    size = sum(int(k.get("bytes") or 0) for k in recorded.values()) or int(backup.stats.get("bytes") or 0)
    if plan.drill.max_bytes is not None and size > plan.drill.max_bytes:
        raise PermanentError(
            f"the export holds {size} bytes, over drill.max_bytes ({plan.drill.max_bytes}); not restored"
        )
    source = emulator_path(rt, backup.output)
    namespaces = sorted({ns for ns, _kind in state["pairs"]})
    kinds = sorted({kind for _ns, kind in state["pairs"]})
    request: dict[str, Any] = {
        "project_id": scratch.project,
        "input_url": source,
        "entity_filter": {"kinds": kinds, "namespace_ids": namespaces},
        "labels": {"managed-by": "backup-scheduler", "purpose": "drill"},
    }
    started, began = rt.now().timestamp(), time.monotonic()
    try:
        if scratch.database:
            operation = _import_into_named_database(rt, scratch, request)
        else:
            operation = admin_client(rt).import_entities(request=request).operation
    except core.GoogleAPICallError as exc:
        raise classify(exc, f"importing {backup.output} into the drill's {scratch.label}") from exc
    run.log(f"drill: importing {backup.output} into {scratch.label}")
    state = {**state, "phase": "importing", "operation": operation.name, "started": started}
    if operation.done:  # a small import (and the emulator's, which keeps no operations) is done at once
        state["seconds"] = round(time.monotonic() - began, 3)
        return _imported(backup, state, operation, scratch, run, rt, keep=plan.drill.keep_scratch)
    return Pending(state, delay_seconds=POLL_SECONDS)


def _import_into_named_database(rt: Runtime, scratch: Scratch, request: dict[str, Any]) -> Any:
    """``projects.import`` with a ``databaseId``, over REST (the Admin client in use has no database field)."""
    from google.auth.transport.requests import AuthorizedSession
    from google.longrunning import operations_pb2
    from google.protobuf import json_format

    endpoint = (rt.settings.datastore_admin_endpoint or "https://datastore.googleapis.com").rstrip("/")
    body = {
        "databaseId": scratch.database,
        "inputUrl": request["input_url"],
        "entityFilter": {
            "kinds": request["entity_filter"]["kinds"],
            "namespaceIds": request["entity_filter"]["namespace_ids"],
        },
        "labels": request["labels"],
    }
    session = rt.client("datastore-admin-session", lambda: AuthorizedSession(rt.credentials()))
    response = session.post(f"{endpoint}/v1/projects/{scratch.project}:import", json=body, timeout=60)
    if response.status_code >= 400:
        raise core.from_http_response(response)
    body = response.json()
    return json_format.ParseDict({"name": body["name"], "done": bool(body.get("done"))}, operations_pb2.Operation())


def _follow_import(
    backup: BackupRef, state: dict[str, Any], scratch: Scratch, run: RunContext, rt: Runtime, keep: bool
) -> Outcome:
    from google.longrunning import operations_pb2

    try:
        operation = admin_client(rt).get_operation(operations_pb2.GetOperationRequest(name=state["operation"]))
    except core.GoogleAPICallError as exc:
        raise classify(exc, f"following the drill's import {state['operation']}") from exc
    if not operation.done:
        return Pending(state, delay_seconds=POLL_SECONDS)
    return _imported(backup, state, operation, scratch, run, rt, keep)


def _imported(
    backup: BackupRef,
    state: dict[str, Any],
    operation: Any,
    scratch: Scratch,
    run: RunContext,
    rt: Runtime,
    keep: bool,
) -> Outcome:
    # Across tasks the clock says how long the import took; within one task, the time it took here.
    seconds = state.get("seconds") or round(max(rt.now().timestamp() - float(state["started"]), 0.0), 3)
    problems: list[str] = []
    if operation.HasField("error") and operation.error.code:
        problems.append(f"the import failed (code {operation.error.code}): {operation.error.message}")
    recorded = backup.stats.get("kinds") or {}
    checked = [f"imported {backup.output} into {scratch.label} in {seconds} s"]
    if not recorded:
        problems.append("the backup recorded no entity counts per kind to compare with")
    for namespace, kind in state["pairs"]:
        name = f"{namespace}/{kind}" if namespace else kind
        query = scratch.client.query(kind=kind, namespace=namespace or None)
        query.keys_only()
        found = sum(1 for _ in query.fetch())
        expected = (recorded.get(name) or {}).get("entities")
        checked.append(f"{name}: {found} entities restored, the export recorded {expected}")
        if recorded and found != expected:
            problems.append(f"{name}: {found} entities restored where the export recorded {expected}")
    result = {**state, "restored_in_seconds": seconds, "checked": checked, "problems": problems}
    if keep:
        run.log(f"drill: keeping the restored entities in {scratch.label} (drill.keep_scratch)")
        return _report(result, run)
    return Pending({**result, "phase": "clear-after"}, delay_seconds=0)


def _report(state: dict[str, Any], run: RunContext) -> Outcome:
    if state["problems"]:
        raise PermanentError("drill failed: " + "; ".join(state["problems"]))
    run.log(f"drill: restored in {state['restored_in_seconds']} s and every kind's count matches")
    return Done(
        output="drill",
        stats={"restored_in_seconds": state["restored_in_seconds"], "checked": state["checked"], "passed": True},
    )


_SIGNATURE: DrillStep[Settings] = drill  # mypy holds it to the contract
