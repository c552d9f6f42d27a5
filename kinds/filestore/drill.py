"""The restore drill of a Filestore instance: its newest backup checked (READY, from this instance, holding data
within the plan's limit) and, where the plan names a scratch instance, restored onto that instance and timed.

The scratch instance is one the operator made for drills and labelled ``backup-scheduler-drill=<plan>``: a drill
refuses to restore onto anything else, so it can never overwrite a real share. Filestore allows one restore per
instance at a time; a 429 is retried by the queue.
"""

from __future__ import annotations

from typing import Any

from kinds.filestore.backups import InstanceRef, _client, _execute, _operation
from kinds.filestore.plan import FilestoreSettings
from services.errors import PermanentError
from services.kinds import DRILL_LABEL, BackupRef, Done, DrillState, DrillStep, Outcome, Pending, RunContext, Target
from services.plans import Plan
from services.runtime import Runtime

POLL_SECONDS = 30.0


def drill(
    plan: Plan[FilestoreSettings], target: Target, backup: BackupRef, state: DrillState, run: RunContext, rt: Runtime
) -> Outcome:
    api = _client(plan, rt)
    if state is not None:
        return _follow_restore(state, api, run, rt)
    source = InstanceRef.parse(target.key)
    found = _execute(
        api.projects().locations().backups().get(name=backup.output),
        source.project,
        f"reading backup {backup.output}",
        "file.backups.get",
    )
    checked = [f"backup {backup.output} is {found.get('state')}"]
    problems = []
    if found.get("state") != "READY":
        problems.append(f"backup {backup.output} is {found.get('state')}, not READY")
    if not str(found.get("sourceInstance", "")).endswith(
        f"/locations/{source.location}/instances/{source.instance_id}"
    ):
        problems.append(f"backup {backup.output} was made from {found.get('sourceInstance')}, not {source.name}")
    stored = int(found.get("storageBytes") or 0)
    checked.append(f"it holds {stored} bytes of a {found.get('capacityGb')} GB share")
    if stored <= 0:
        problems.append(f"backup {backup.output} holds no data (storageBytes {found.get('storageBytes')!r})")
    assert plan.drill is not None
    if plan.drill.max_bytes is not None and stored > plan.drill.max_bytes:
        problems.append(f"it holds {stored} bytes, over drill.max_bytes ({plan.drill.max_bytes}); not restored")
    if problems:
        raise PermanentError("drill failed: " + "; ".join(problems))
    scratch_name = plan.settings.drill_instance
    if scratch_name is None:
        run.log("drill: backup checked (no options.drill_instance to restore onto)")
        return Done(output="drill", stats={"restored_in_seconds": None, "checked": checked, "passed": True})
    return _start_restore(plan, backup, scratch_name, source, checked, api, run, rt)


def _start_restore(
    plan: Plan[FilestoreSettings],
    backup: BackupRef,
    scratch_name: str,
    source: InstanceRef,
    checked: list[str],
    api: Any,
    run: RunContext,
    rt: Runtime,
) -> Outcome:
    scratch = InstanceRef.parse(scratch_name)
    instance = _execute(
        api.projects().locations().instances().get(name=scratch.name),
        scratch.project,
        f"reading the drill instance {scratch.name}",
        "file.instances.get",
    )
    if (instance.get("labels") or {}).get(DRILL_LABEL) != plan.name or scratch.name == source.name:
        raise PermanentError(
            f"refused: {scratch.name} does not carry the label {DRILL_LABEL}={plan.name}; a drill restores only onto"
            " an instance marked as this plan's scratch"
        )
    share = instance["fileShares"][0]["name"]
    operation = _execute(
        api.projects()
        .locations()
        .instances()
        .restore(name=scratch.name, body={"fileShare": share, "sourceBackup": backup.output}),
        scratch.project,
        f"restoring {backup.output} onto the drill instance {scratch.name}",
        "file.instances.restore",
    )
    run.log(f"drill: restoring {backup.output} onto scratch instance {scratch.name} share {share}")
    state = {
        "operation": operation.get("name"),
        "project": scratch.project,
        "scratch": scratch.name,
        "started": rt.now().timestamp(),
        "checked": checked,
    }
    return Pending(state, delay_seconds=POLL_SECONDS)


def _follow_restore(state: dict[str, Any], api: Any, run: RunContext, rt: Runtime) -> Outcome:
    operation = _operation(api, state["operation"], state["project"])
    if operation is not None and not operation.get("done"):
        return Pending(state, delay_seconds=POLL_SECONDS)
    if operation is not None and operation.get("error"):
        error = operation["error"]
        raise PermanentError(f"drill failed: restore onto {state['scratch']}: {error.get('message')}")
    seconds = round(rt.now().timestamp() - float(state["started"]), 3)
    run.log(f"drill: restored onto {state['scratch']} in {seconds} s")
    checked = [*state["checked"], f"restored onto {state['scratch']} in {seconds} s"]
    return Done(output="drill", stats={"restored_in_seconds": seconds, "checked": checked, "passed": True})


_SIGNATURE: DrillStep[FilestoreSettings] = drill  # mypy holds it to the contract
