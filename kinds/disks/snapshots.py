"""Persistent disk snapshots, selected by a label whose value is how many snapshots to keep.

An SRE labels a disk ``backup-generations=7``; every run of a ``disks`` plan snapshots it and then keeps its 7
newest READY snapshots made by this service. The flow for one disk:

1. ``enumerate_targets``: ``disks.aggregatedList`` with a label-presence filter, page by page, project by project.
   A project that refuses listing is reported as a failure of its own; the other projects go ahead.
2. ``resolve_target``: a task only names its disk; the disk is read again (it must be in one of the plan's
   projects and still carry the label), and its own label value, not the task's, says how many to keep.
3. ``start``: check the label value, then ``createSnapshot`` with a name fixed by (plan, disk, period), so a
   retried task or a second cron fire finds "already exists" instead of making a second snapshot.
4. ``poll``: follow the zone/region operation, then the snapshot, until the snapshot is READY or failed.
5. Only once it is READY: read the disk's label again, list the snapshots carrying our labels for this plan and
   disk, and delete those beyond the newest N by creation time (never below the plan's floor, never one without
   our labels). A confirmation that arrives late never deletes a newer snapshot.

Compute has no emulator; tests run the real googleapiclient against a stateful fake at the HTTP edge
(tests/fakes_compute.py), and the API endpoint can be overridden per plan or by ``BACKUP_COMPUTE_ENDPOINT``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from googleapiclient.errors import HttpError

from kinds.disks.plan import DiskSettings
from services.errors import PermanentError, TargetGone
from services.gcp_errors import classify, decode_page_token, execute, next_page_token, problem_of
from services.kinds import Done, DrillsIn, Execution, ListingProblem, Outcome, Pending, RunContext, Target, TargetPage
from services.plans import PROJECT_ID, Plan
from services.requests_http import discovery_client
from services.retention import LABEL_KEEP_MAX, LABEL_KEEP_MIN, Backup, Policy, count_from_label, prune, to_delete
from services.runtime import Runtime

# Labels this service puts on every snapshot it creates. Pruning only ever considers snapshots carrying all three.
MANAGED_BY_KEY = "managed-by"
MANAGED_BY_VALUE = "backup-scheduler"
PLAN_KEY = "plan"
SOURCE_DISK_ID_KEY = "source-disk-id"

API_MAX_RESULTS = 500  # Compute refuses a larger maxResults
OPERATION_POLL_SECONDS = 20.0
SNAPSHOT_POLL_SECONDS = 30.0

GCE_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
ZONE_OR_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]+(?:-[a-z])?$")

log = logging.getLogger(__name__)


# --- the disk a task is about ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskRef:
    """One labelled disk as enumerated: enough to snapshot it without looking it up again."""

    project: str
    name: str
    disk_id: str
    label_value: str
    zone: str | None = None
    region: str | None = None

    @property
    def scope(self) -> str:
        return f"zones/{self.zone}" if self.zone else f"regions/{self.region}"

    @property
    def key(self) -> str:
        return f"projects/{self.project}/{self.scope}/disks/{self.name}"

    def to_target(self) -> Target:
        params: dict[str, Any] = {
            "project": self.project,
            "name": self.name,
            "disk_id": self.disk_id,
            "label_value": self.label_value,
        }
        if self.zone:
            params["zone"] = self.zone
        else:
            params["region"] = self.region
        return Target(key=self.key, params=params)

    @classmethod
    def from_target(cls, target: Target) -> DiskRef:
        params = target.params
        try:
            disk = cls(
                project=_required_str(params, "project"),
                name=_required_str(params, "name"),
                disk_id=_required_str(params, "disk_id"),
                label_value=str(params.get("label_value", "")),
                zone=params.get("zone") or None,
                region=params.get("region") or None,
            )
        except ValueError as exc:
            raise PermanentError(f"task for {target.key}: {exc}") from None
        if (disk.zone is None) == (disk.region is None):
            raise PermanentError(f"task for {target.key}: expected exactly one of params.zone or params.region")
        for what, value in (("zone", disk.zone), ("region", disk.region)):
            if value is not None and not ZONE_OR_REGION.match(str(value)):
                raise PermanentError(f"task for {target.key}: params.{what} {str(value)[:80]!r} is not a {what} name")
        if not GCE_NAME.match(disk.name) or not PROJECT_ID.match(disk.project):
            raise PermanentError(f"task for {target.key}: not a disk name and project id")
        return disk


def _required_str(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"params.{key}: expected a non-empty string, got {value!r}")
    return value


def snapshots_to_keep(disk: DiskRef, label_key: str) -> int:
    """The label's value as a count of snapshots to keep; anything but a whole number 1..1000 is refused."""
    count = count_from_label(disk.label_value)
    if count is not None:
        return count
    raise PermanentError(
        f"disk {disk.key}: label {label_key}={disk.label_value!r} is not a number of snapshots to keep"
        f" (expected a whole number from {LABEL_KEEP_MIN} to {LABEL_KEEP_MAX}); no snapshot taken, nothing deleted"
    )


def snapshot_name(plan_name: str, prefix: str, disk: DiskRef, period: datetime) -> str:
    """The one snapshot name for this plan, disk and schedule period: ``bk-<disk>-<yyyymmdd-hhmm>-<hash>``.

    Snapshot names are global to a project, so disks with the same name in two zones, and long names cut to
    fit 63 characters, must still differ: the hash covers the plan and the full disk path."""
    stamp = _as_utc(period).strftime("%Y%m%d-%H%M")
    digest = hashlib.sha256(f"{plan_name}\n{disk.key}".encode()).hexdigest()[:10]
    room = 63 - len(prefix) - len(stamp) - len(digest) - 3
    base = disk.name[:room].rstrip("-") or "disk"
    return f"{prefix}-{base}-{stamp}-{digest}"


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- the Compute client and its errors ---------------------------------------------------------------------


def compute_endpoint(plan_endpoint: str | None, rt: Runtime) -> str | None:
    """The API base URL: the plan's ``options.endpoint``, else ``BACKUP_COMPUTE_ENDPOINT``, else Google's.
    A bare host (``https://compute-psc.p.googleapis.com``) gets Compute's ``/compute/v1/`` path added."""
    endpoint = plan_endpoint or rt.settings.endpoint("compute")
    if not endpoint:
        return None
    if urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/compute/v1/"
    return endpoint if endpoint.endswith("/") else endpoint + "/"


def compute_client(rt: Runtime, endpoint: str | None) -> Any:
    """The googleapiclient Compute v1 client for ``endpoint``, built once per Runtime (from the bundled
    discovery document, so no network call is made to build it)."""

    return discovery_client(rt, "compute", "v1", endpoint)


def _compute(plan: Plan[DiskSettings], rt: Runtime) -> Any:
    return compute_client(rt, compute_endpoint(plan.settings.endpoint, rt))


def _execute(request: Any, project: str, doing: str, passthrough: tuple[int, ...] = ()) -> dict[str, Any]:
    """One Compute call; errors judged by services/gcp_errors.py (a 404 means the thing is gone)."""
    result: dict[str, Any] = execute(
        request, doing, where=f"in project {project}", gone_means_skip=True, passthrough=passthrough
    )
    return result


def _last_segment(url_or_name: str) -> str:
    return url_or_name.rstrip("/").rsplit("/", 1)[-1]


# --- enumeration -------------------------------------------------------------------------------------------


_DISK_KEY = re.compile(r"^projects/([^/]+)/(zones|regions)/([^/]+)/disks/([^/]+)$")


def _read_disk(compute: Any, project: str, zone: str | None, location: str, name: str) -> dict[str, Any] | None:
    """The disk as Compute has it now, or None when it is gone."""
    if zone:
        request = compute.disks().get(project=project, zone=zone, disk=name)
    else:
        request = compute.regionDisks().get(project=project, region=location, disk=name)
    try:
        return _execute(request, project, f"reading disk {name}", passthrough=(404,))
    except HttpError:
        return None


def _disk_ref(project: str, disk: dict[str, Any], label_key: str) -> DiskRef | None:
    labels = disk.get("labels") or {}
    if label_key not in labels:
        return None  # the API filter should have dropped it; never act on a disk without the label
    return DiskRef(
        project=project,
        name=disk["name"],
        disk_id=str(disk["id"]),
        label_value=str(labels[label_key]),
        zone=_last_segment(disk["zone"]) if disk.get("zone") else None,
        region=_last_segment(disk["region"]) if disk.get("region") and not disk.get("zone") else None,
    )


# --- snapshot, poll, prune ---------------------------------------------------------------------------------


def _our_labels(plan_name: str, disk: DiskRef) -> dict[str, str]:
    return {MANAGED_BY_KEY: MANAGED_BY_VALUE, PLAN_KEY: plan_name, SOURCE_DISK_ID_KEY: disk.disk_id}


def is_ours(snapshot: dict[str, Any], plan_name: str, disk: DiskRef) -> bool:
    """True only for a snapshot this plan made of this very disk (labels, and the API's own sourceDiskId)."""
    labels = snapshot.get("labels") or {}
    if any(labels.get(key) != value for key, value in _our_labels(plan_name, disk).items()):
        return False
    source_id = snapshot.get("sourceDiskId")
    return source_id is None or str(source_id) == disk.disk_id


def _after_operation(
    plan: Plan[DiskSettings],
    disk: DiskRef,
    state: dict[str, Any],
    operation: dict[str, Any],
    run: RunContext,
    compute: Any,
) -> Outcome:
    if operation.get("status") != "DONE":
        return Pending(state=state, delay_seconds=OPERATION_POLL_SECONDS)
    errors = (operation.get("error") or {}).get("errors") or []
    if errors:
        detail = "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}" for e in errors)
        raise PermanentError(f"snapshot {state['snapshot']} of {disk.key} failed: {detail}; nothing pruned")
    return _check_snapshot(plan, disk, {**state, "operation": None}, run, compute)


def _check_snapshot(
    plan: Plan[DiskSettings], disk: DiskRef, state: dict[str, Any], run: RunContext, compute: Any
) -> Outcome:
    name = state["snapshot"]
    request = compute.snapshots().get(project=disk.project, snapshot=name)
    try:
        snapshot = _execute(request, disk.project, f"checking snapshot {name}", passthrough=(404,))
    except HttpError:
        raise PermanentError(f"snapshot {name} of {disk.key} no longer exists; nothing pruned") from None
    if not is_ours(snapshot, plan.name, disk):
        raise PermanentError(
            f"a snapshot named {name} exists in {disk.project} but was not made by plan {plan.name} from {disk.key}"
            f" (labels {snapshot.get('labels')}); left alone, nothing pruned"
        )
    status = snapshot.get("status")
    if status in ("CREATING", "UPLOADING"):
        return Pending(state=state, delay_seconds=SNAPSHOT_POLL_SECONDS)
    if status != "READY":
        raise PermanentError(f"snapshot {name} of {disk.key} ended {status}; nothing pruned")
    live_keep = _keep_from_live_label(plan, disk, compute, run)
    result = (
        prune_snapshots(compute, plan, disk, live_keep, newest=snapshot, run=run)
        if live_keep is not None
        else PruneResult(keep=0)
    )
    message = f"snapshot {name} READY; kept {result.kept}, deleted {len(result.deleted)}"
    if result.errors:
        message += f"; could not delete {len(result.errors)}: {'; '.join(result.errors)}"
    return Done(
        output=snapshot.get("selfLink", name),
        stats={
            "snapshot": name,
            "keep": result.keep,
            "kept": result.kept,
            "pruned": result.deleted,
            "prune_errors": result.errors,
        },
        message=message,
    )


@dataclass
class PruneResult:
    keep: int
    kept: int = 0
    deleted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def list_our_snapshots(compute: Any, plan_name: str, disk: DiskRef) -> list[dict[str, Any]]:
    """This plan's snapshots of this disk, newest first. The API filter narrows the listing; ``is_ours``
    decides, so a filter that matched too much can never lead to deleting someone else's snapshot."""
    terms = " ".join(f'(labels.{key} = "{value}")' for key, value in _our_labels(plan_name, disk).items())
    collection = compute.snapshots()
    request = collection.list(project=disk.project, filter=terms, maxResults=API_MAX_RESULTS)
    found: list[dict[str, Any]] = []
    while request is not None:
        response = _execute(request, disk.project, f"listing snapshots of {disk.key}")
        found.extend(s for s in response.get("items", []) if is_ours(s, plan_name, disk))
        request = collection.list_next(request, response)
    found.sort(key=lambda s: (_created(s), s.get("name", "")), reverse=True)
    return found


def _created(snapshot: dict[str, Any]) -> datetime:
    """creationTimestamp as a moment. Compute writes it in Pacific time with an offset that changes with
    daylight saving, so comparing the strings would misorder snapshots around a DST change."""
    try:
        return datetime.fromisoformat(snapshot["creationTimestamp"])
    except (KeyError, TypeError, ValueError):
        return datetime.max.replace(tzinfo=UTC)  # unknown age: counted as newest, so it is kept, not pruned


def _as_backup(snapshot: dict[str, Any]) -> Backup[dict[str, Any]]:
    """A snapshot as retention sees it. Only READY ones are complete: a CREATING one may be another run's, in
    flight, and is never deleted."""
    return Backup(
        snapshot["name"], _created(snapshot), ours=True, complete=snapshot.get("status") == "READY", item=snapshot
    )


def _keep_from_live_label(plan: Plan[DiskSettings], disk: DiskRef, compute: Any, run: RunContext) -> int | None:
    """How many snapshots to keep, from the disk's label as it is now (it may have changed since the snapshot
    started); None when nothing may be pruned (the disk or its label is gone, or the label is not a count)."""
    settings: DiskSettings = plan.settings
    live = _read_disk(compute, disk.project, disk.zone, disk.zone or disk.region or "", disk.name)
    ref = _disk_ref(disk.project, live, settings.label_key) if live is not None else None
    if ref is None or ref.disk_id != disk.disk_id:
        run.log(f"{disk.key} is gone or no longer carries {settings.label_key}: nothing pruned")
        return None
    try:
        return snapshots_to_keep(ref, settings.label_key)
    except PermanentError as exc:
        run.log(f"{exc}; the new snapshot is kept, nothing pruned")
        return None


def prune_snapshots(
    compute: Any, plan: Plan[DiskSettings], disk: DiskRef, keep: int, newest: dict[str, Any], run: RunContext
) -> PruneResult:
    """Delete this plan's READY snapshots of ``disk`` beyond the newest ``keep`` by creation time (at least the
    plan's floor). Called only once ``newest`` is confirmed READY; it counts even if the listing does not show it
    yet, in its place by age, so a late confirmation never pushes a newer snapshot out."""
    listed = list_our_snapshots(compute, plan.name, disk)
    if all(s.get("name") != newest.get("name") for s in listed):
        listed.append(newest)
    policy = Policy(keep=keep, floor=plan.retention.min_keep)
    result = PruneResult(keep=policy.kept or keep)

    def delete(backup: Backup[dict[str, Any]]) -> None:
        request = compute.snapshots().delete(project=disk.project, snapshot=backup.name)
        # A 404: already gone (a retried prune, or someone deleted it by hand); either way it is done.
        with contextlib.suppress(HttpError):
            _execute(request, disk.project, f"deleting old snapshot {backup.name} of {disk.key}", passthrough=(404,))
        run.log(f"deleted {backup.name} (beyond keep {result.keep})")

    def failed(backup: Backup[dict[str, Any]], exc: Exception) -> None:
        # The new backup is good; an old snapshot we cannot delete (in use by an image, say) is reported with the
        # run rather than failing it, and is tried again by the next run.
        if not isinstance(exc, PermanentError):
            raise exc
        result.errors.append(str(exc))

    backups = [_as_backup(s) for s in listed]
    result.deleted = [b.name for b in prune(backups, policy, newest["name"], delete, on_error=failed)]
    result.kept = sum(1 for b in backups if b.complete) - len(result.deleted) - len(result.errors)
    return result


# --- dry run -----------------------------------------------------------------------------------------------


class Disks(DrillsIn):
    """The ``disks`` kind: a snapshot per labelled disk per period, confirmed READY, then pruned by the disk's
    own label (never below the plan's floor, never a snapshot this service did not make)."""

    name = "disks"
    default_queue = "backups"
    execution: Execution = "operation"
    drill_module = "kinds.disks.drill"

    def enumerate(self, plan: Plan[DiskSettings], page_token: str | None, rt: Runtime) -> TargetPage:
        """One page of labelled disks: one ``aggregatedList`` call (zonal and regional disks together). The page
        token carries (project, API page token), so the fan-out continues across projects page by page."""
        settings: DiskSettings = plan.settings
        index, api_token = decode_page_token(page_token, settings.projects, "disks") if page_token else (0, "")
        project = settings.projects[index]
        compute = _compute(plan, rt)
        request = compute.disks().aggregatedList(
            project=project,
            filter=f"labels.{settings.label_key}:*",
            maxResults=min(plan.fanout_page_size, API_MAX_RESULTS),
            pageToken=api_token or None,
        )
        following = next_page_token(settings.projects, index, None)
        try:
            response = _execute(request, project, f"listing disks labelled {settings.label_key}")
        except (TargetGone, PermanentError) as exc:
            # One project the service cannot list (not found, permission denied) is that project's failure: it is
            # recorded, and the plan's other projects are still listed and backed up.
            problem = ListingProblem(f"projects/{project}", f"plan {plan.name}: cannot list disks of {project}: {exc}")
            return TargetPage(targets=[], next_page_token=following, problems=[problem])
        targets = []
        for scope_key in sorted(response.get("items", {})):
            for disk in response["items"][scope_key].get("disks", []):
                ref = _disk_ref(project, disk, settings.label_key)
                if ref is not None:
                    targets.append(ref.to_target())
        if response.get("unreachables"):
            # Disks in an unreachable zone are missing from this run; say so rather than pretend the list is whole.
            log.warning("plan %s: project %s: zones unreachable: %s", plan.name, project, response["unreachables"])
        return TargetPage(targets, next_page_token(settings.projects, index, response.get("nextPageToken")))

    def resolve(self, plan: Plan[DiskSettings], key: str, rt: Runtime) -> Target:
        """The disk ``key`` names, read again: it must be in one of the plan's projects and carry the plan's label
        now. Its id and label value come from Compute, never from a task body."""
        settings: DiskSettings = plan.settings
        found = _DISK_KEY.match(key)
        if not found:
            raise PermanentError(f"refused: {key[:200]!r} is not a disk path projects/P/zones/Z/disks/NAME")
        project, scope, location, name = found.groups()
        if project not in settings.projects:
            raise PermanentError(f"refused: project {project[:80]!r} is not one of plan {plan.name}'s projects")
        if not ZONE_OR_REGION.match(location) or not GCE_NAME.match(name):
            raise PermanentError(f"refused: {key[:200]!r} does not name a zone or region and a disk")
        disk = _read_disk(_compute(plan, rt), project, location if scope == "zones" else None, location, name)
        if disk is None:
            raise TargetGone(f"disk {key} no longer exists")
        ref = _disk_ref(project, disk, settings.label_key)
        if ref is None:
            raise TargetGone(f"disk {key} no longer carries the label {settings.label_key}")
        return ref.to_target()

    def start(self, plan: Plan[DiskSettings], target: Target, run: RunContext, rt: Runtime) -> Outcome:
        """Create this period's snapshot of the disk (or find it already created by an earlier delivery)."""
        settings: DiskSettings = plan.settings
        disk = DiskRef.from_target(target)
        keep = snapshots_to_keep(disk, settings.label_key)
        name = snapshot_name(plan.name, settings.snapshot_prefix, disk, run.period)
        compute = _compute(plan, rt)
        body: dict[str, Any] = {
            "name": name,
            "labels": _our_labels(plan.name, disk),
            "description": f"backup-scheduler plan {plan.name}, disk {disk.key}, keep {keep}",
        }
        if settings.storage_locations:
            body["storageLocations"] = list(settings.storage_locations)
        # The same requestId on a retried call lets Compute answer with the first call's operation.
        request_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{disk.key}/snapshots/{name}"))
        if disk.zone:
            extra = {"guestFlush": True} if settings.guest_flush else {}
            request = compute.disks().createSnapshot(
                project=disk.project, zone=disk.zone, disk=disk.name, body=body, requestId=request_id, **extra
            )
        else:
            if settings.guest_flush:
                body["guestFlush"] = True  # regionDisks.createSnapshot takes it in the body only
            request = compute.regionDisks().createSnapshot(
                project=disk.project, region=disk.region, disk=disk.name, body=body, requestId=request_id
            )
        doing = f"creating snapshot {name} of {disk.key}"
        try:
            operation = _execute(request, disk.project, doing, passthrough=(409,))
        except HttpError as exc:
            if not problem_of(exc).already_exists:
                raise classify(exc, doing, True, where=f"in project {disk.project}") from exc
            run.log(f"snapshot {name} already exists (an earlier delivery created it); checking it")
            return _check_snapshot(plan, disk, {"snapshot": name, "operation": None}, run, compute)
        run.log(f"creating snapshot {name} of {disk.key} (keep {keep}); operation {operation.get('name')}")
        state = {"snapshot": name, "operation": operation.get("name")}
        return _after_operation(plan, disk, state, operation, run, compute)

    def poll(
        self, plan: Plan[DiskSettings], target: Target, state: dict[str, Any], run: RunContext, rt: Runtime
    ) -> Outcome:
        """Follow the snapshot's operation, then the snapshot itself, until it is READY (prune, Done) or failed."""
        disk = DiskRef.from_target(target)
        if not isinstance(state.get("snapshot"), str):
            raise PermanentError(f"poll for {disk.key}: state has no snapshot name: {state!r}")
        compute = _compute(plan, rt)
        operation_name = state.get("operation")
        if not operation_name:
            return _check_snapshot(plan, disk, state, run, compute)
        if disk.zone:
            request = compute.zoneOperations().get(project=disk.project, zone=disk.zone, operation=operation_name)
        else:
            request = compute.regionOperations().get(project=disk.project, region=disk.region, operation=operation_name)
        try:
            operation = _execute(request, disk.project, f"checking operation {operation_name}", passthrough=(404,))
        except HttpError:
            # Operations are only kept for a while; the snapshot itself still tells us how it went.
            return _check_snapshot(plan, disk, {**state, "operation": None}, run, compute)
        return _after_operation(plan, disk, state, operation, run, compute)

    def describe(self, plan: Plan[DiskSettings], target: Target, rt: Runtime) -> str:
        """What a run would do for this disk, read-only: the snapshot it would create and the ones it would delete
        once that snapshot is READY."""
        settings: DiskSettings = plan.settings
        disk = DiskRef.from_target(target)
        try:
            keep = snapshots_to_keep(disk, settings.label_key)
        except PermanentError as exc:
            return f"{disk.key}: would FAIL and change nothing: {exc}"
        policy = Policy(keep=keep, floor=plan.retention.min_keep)
        keep = policy.kept or keep
        name = snapshot_name(plan.name, settings.snapshot_prefix, disk, rt.now())
        existing = list_our_snapshots(_compute(plan, rt), plan.name, disk)
        # The new snapshot, as it will be once READY, takes one of the ``keep`` places.
        would_be: Backup[dict[str, Any]] = Backup(name, datetime.max.replace(tzinfo=UTC), ours=True)
        doomed = to_delete([*map(_as_backup, existing), would_be], policy, confirmed=None)
        deletes = ", ".join(b.name for b in doomed) if doomed else "nothing"
        return (
            f"{disk.key}: would create snapshot {name} (keep {keep}, {len(existing)} existing);"
            f" once it is READY would delete {deletes}"
        )


KIND = Disks()
