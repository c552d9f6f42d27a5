"""The restore drill of a disk: a scratch disk made from its newest snapshot, checked, timed, deleted.

Steps (each a task; the waits are follow-up polls):

1. remove what an earlier, crashed drill of this plan left in the zone (disks labelled ``backup-scheduler-drill``
   with this plan's name), refuse a snapshot over ``drill.max_bytes``, and create the scratch disk from the
   snapshot (a deterministic request id: a redelivered task finds the same operation);
2. wait until the scratch disk is READY: the time from the request to READY is ``restored_in_seconds``;
3. check it is the size the snapshot says and was made from that very snapshot (its id);
4. delete it (unless ``drill.keep_scratch``), then report: passed, or the mismatch found in step 3.

The source disk is never touched; the scratch disk's name starts with ``drill-`` and carries the drill label, so it
can never be taken for a real disk.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from googleapiclient.errors import HttpError

from kinds.disks.plan import DiskSettings
from kinds.disks.snapshots import DiskRef, _compute, _execute, _last_segment
from services.errors import PermanentError
from services.kinds import DRILL_LABEL, BackupRef, Done, DrillState, DrillStep, Outcome, Pending, RunContext, Target
from services.plans import Plan
from services.runtime import Runtime

POLL_SECONDS = 10.0


def drill(
    plan: Plan[DiskSettings], target: Target, backup: BackupRef, state: DrillState, run: RunContext, rt: Runtime
) -> Outcome:
    disk = DiskRef.from_target(target)
    compute = _compute(plan, rt)
    if state is None:
        return _create_scratch(plan, disk, backup, run, rt, compute)
    if state["phase"] == "restoring":
        return _check_scratch(plan, disk, state, run, rt, compute)
    return _after_delete(state, run, compute, disk)


def _create_scratch(
    plan: Plan[DiskSettings], disk: DiskRef, backup: BackupRef, run: RunContext, rt: Runtime, compute: Any
) -> Outcome:
    assert plan.drill is not None
    zone = disk.zone or _a_zone_of(compute, disk)
    _remove_leftovers(plan, disk, zone, run, compute)
    snapshot_name = str(backup.stats.get("snapshot") or _last_segment(backup.output))
    snapshot = _execute(
        compute.snapshots().get(project=disk.project, snapshot=snapshot_name),
        disk.project,
        f"reading snapshot {snapshot_name}",
    )
    size_bytes = int(snapshot.get("diskSizeGb", 0)) * 2**30
    if plan.drill.max_bytes is not None and size_bytes > plan.drill.max_bytes:
        raise PermanentError(
            f"snapshot {snapshot_name} restores a {snapshot.get('diskSizeGb')} GB disk, over drill.max_bytes"
            f" ({plan.drill.max_bytes}); not restored"
        )
    digest = hashlib.sha256(run.run_id.encode()).hexdigest()[:8]
    name = f"drill-{digest}-{disk.name}"[:63].rstrip("-")
    body = {
        "name": name,
        "sourceSnapshot": snapshot.get("selfLink") or f"projects/{disk.project}/global/snapshots/{snapshot_name}",
        "labels": {DRILL_LABEL: plan.name, "drill-run": digest},
        "description": f"backup-scheduler restore drill of {disk.key} from {snapshot_name}; scratch, deleted after",
    }
    request_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"drill/{run.run_id}/{name}"))
    _execute(
        compute.disks().insert(project=disk.project, zone=zone, body=body, requestId=request_id),
        disk.project,
        f"creating scratch disk {name} from {snapshot_name}",
    )
    run.log(f"drill: restoring {snapshot_name} into scratch disk {name} in {zone}")
    state = {
        "phase": "restoring",
        "zone": zone,
        "scratch": name,
        "snapshot": snapshot_name,
        "snapshot_id": str(snapshot.get("id", "")),
        "snapshot_gb": str(snapshot.get("diskSizeGb", "")),
        "started": rt.now().timestamp(),
    }
    return Pending(state, delay_seconds=POLL_SECONDS)


def _check_scratch(
    plan: Plan[DiskSettings], disk: DiskRef, state: dict[str, Any], run: RunContext, rt: Runtime, compute: Any
) -> Outcome:
    assert plan.drill is not None
    scratch = _execute(
        compute.disks().get(project=disk.project, zone=state["zone"], disk=state["scratch"]),
        disk.project,
        f"reading scratch disk {state['scratch']}",
    )
    if scratch.get("status") not in ("READY", "FAILED"):
        return Pending(state, delay_seconds=POLL_SECONDS)
    seconds = round(rt.now().timestamp() - float(state["started"]), 3)
    checked = [
        f"scratch disk {state['scratch']} READY after {seconds} s",
        f"size {scratch.get('sizeGb')} GB against the snapshot's {state['snapshot_gb']} GB",
        f"made from snapshot id {scratch.get('sourceSnapshotId')} against {state['snapshot_id']}",
    ]
    problems = []
    if scratch.get("status") != "READY":
        problems.append(f"scratch disk ended {scratch.get('status')}")
    if str(scratch.get("sizeGb")) != state["snapshot_gb"]:
        problems.append(f"restored {scratch.get('sizeGb')} GB where the snapshot holds {state['snapshot_gb']} GB")
    if str(scratch.get("sourceSnapshotId")) != state["snapshot_id"]:
        problems.append(f"restored from snapshot id {scratch.get('sourceSnapshotId')}, not {state['snapshot_id']}")
    result = {**state, "restored_in_seconds": seconds, "checked": checked, "problems": problems}
    if plan.drill.keep_scratch:
        run.log(f"drill: keeping scratch disk {state['scratch']} (drill.keep_scratch); the next drill removes it")
        return _report(result, run)
    operation = _execute(
        compute.disks().delete(project=disk.project, zone=state["zone"], disk=state["scratch"]),
        disk.project,
        f"deleting scratch disk {state['scratch']}",
    )
    return Pending({**result, "phase": "deleting", "operation": operation.get("name")}, delay_seconds=POLL_SECONDS)


def _after_delete(state: dict[str, Any], run: RunContext, compute: Any, disk: DiskRef) -> Outcome:
    operation = _execute(
        compute.zoneOperations().get(project=disk.project, zone=state["zone"], operation=state["operation"]),
        disk.project,
        f"deleting scratch disk {state['scratch']}",
    )
    if operation.get("status") != "DONE":
        return Pending(state, delay_seconds=POLL_SECONDS)
    run.log(f"drill: scratch disk {state['scratch']} deleted")
    return _report(state, run)


def _report(state: dict[str, Any], run: RunContext) -> Outcome:
    if state["problems"]:
        raise PermanentError(f"drill of snapshot {state['snapshot']} failed: {'; '.join(state['problems'])}")
    run.log(f"drill: snapshot {state['snapshot']} restored in {state['restored_in_seconds']} s and checked")
    return Done(
        output=f"drill of {state['snapshot']}",
        stats={"restored_in_seconds": state["restored_in_seconds"], "checked": state["checked"], "passed": True},
    )


def _remove_leftovers(plan: Plan[DiskSettings], disk: DiskRef, zone: str, run: RunContext, compute: Any) -> None:
    """Scratch disks of this plan's earlier drills in the zone (a crashed drill, or ``keep_scratch``): deleted."""
    listing = _execute(
        compute.disks().list(project=disk.project, zone=zone, filter=f'(labels.{DRILL_LABEL} = "{plan.name}")'),
        disk.project,
        "listing leftover drill disks",
    )
    for leftover in listing.get("items", []):
        if (leftover.get("labels") or {}).get(DRILL_LABEL) != plan.name or not leftover["name"].startswith("drill-"):
            continue  # the filter narrows, this decides: only our own scratch disks
        try:
            _execute(
                compute.disks().delete(project=disk.project, zone=zone, disk=leftover["name"]),
                disk.project,
                f"deleting leftover drill disk {leftover['name']}",
                passthrough=(404,),
            )
        except HttpError:
            continue  # already gone
        run.log(f"drill: removed leftover scratch disk {leftover['name']} of an earlier drill")


def _a_zone_of(compute: Any, disk: DiskRef) -> str:
    """A zone in a regional disk's region, for its zonal scratch copy."""
    zones = _execute(compute.zones().list(project=disk.project), disk.project, "listing zones")
    for zone in zones.get("items", []):
        if str(zone.get("name", "")).startswith(f"{disk.region}-"):
            return str(zone["name"])
    raise PermanentError(f"no zone of region {disk.region} found for the scratch disk of {disk.key}")


_SIGNATURE: DrillStep[DiskSettings] = drill  # mypy holds it to the contract
