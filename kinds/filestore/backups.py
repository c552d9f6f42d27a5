"""Kind ``filestore``: Filestore backups of instances selected by a label whose value is how many to keep.

An SRE labels a Filestore instance ``backup-keep=14``; every run of a ``filestore`` plan backs up its file share
and then keeps its 14 newest READY backups made by this service for this plan. The flow for one instance:

1. ``enumerate_targets``: ``instances.list`` on ``projects/P/locations/-`` (every location) with a label-presence
   filter, page by page, project by project.
2. ``start``: read the instance again (it may be gone, its label may have changed), check the label value
   (1..1000; anything else fails this instance and creates or deletes nothing), then ``backups.create`` in the
   instance's region with a backup id fixed by (plan, instance, period): a second delivery gets 409 and carries on.
3. ``poll``: follow the operation and the backup until READY (or failed: nothing is pruned).
4. Prune, only once the new backup is READY: our backups of this instance (labels ``managed-by``, ``plan``,
   ``source-instance`` and the backup's ``sourceInstance`` all match) beyond the count, oldest first, never below
   ``retention.min_keep``, never the new one. Filestore refuses concurrent deletes in one backup chain, so one
   backup is deleted per poll and the next poll waits for its operation before deleting another.

Filestore has no emulator; tests run the real googleapiclient against a stateful fake (tests/fakes_filestore.py).
The endpoint can be overridden per plan (``options.endpoint``) or by ``BACKUP_FILE_ENDPOINT`` (Private Service
Connect, local fakes).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from googleapiclient.errors import HttpError

from kinds.filestore.plan import FilestoreSettings
from services.errors import PermanentError, TargetGone
from services.gcp_errors import decode_page_token, execute, next_page_token
from services.kinds import Done, DrillsIn, Execution, ListingProblem, Outcome, Pending, RunContext, Target, TargetPage
from services.plans import Plan
from services.requests_http import discovery_client
from services.retention import LABEL_KEEP_MAX, LABEL_KEEP_MIN, Backup, NotConfirmed, Policy, count_from_label, to_delete

MANAGED_BY_KEY, MANAGED_BY_VALUE = "managed-by", "backup-scheduler"
PLAN_KEY = "plan"
SOURCE_KEY = "source-instance"
PURPOSE_KEY = "purpose"

DELETE_POLL_SECONDS = 30.0
PAGE_SIZE = 100

ZONE = re.compile(r"^([a-z]+-[a-z]+[0-9]+)-[a-z]$")
INSTANCE_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/instances/([^/]+)$")
BACKUP_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/backups/([^/]+)$")

log = logging.getLogger(__name__)


# --- the API client and its errors -------------------------------------------------------------------------


def file_endpoint(plan_endpoint: str | None, rt: Any) -> str | None:
    """The plan's ``options.endpoint``, else ``BACKUP_FILE_ENDPOINT``, else Google's (None)."""
    endpoint = plan_endpoint or rt.settings.endpoint("file")
    if not endpoint:
        return None
    return endpoint if endpoint.endswith("/") else endpoint + "/"


def file_client(rt: Any, endpoint: str | None) -> Any:
    """The googleapiclient ``file v1`` client for ``endpoint``, built once per Runtime from the bundled
    discovery document (no network call to build it)."""

    return discovery_client(rt, "file", "v1", endpoint)


def _client(plan: Plan[FilestoreSettings], rt: Any) -> Any:
    return file_client(rt, file_endpoint(plan.settings.endpoint, rt))


def _execute(
    request: Any, project: str, doing: str, permission: str, passthrough: tuple[int, ...] = ()
) -> dict[str, Any]:
    """One Filestore call; errors judged by services/gcp_errors.py. ``permission`` is what the call needs, named
    when the API does not name it itself."""
    result: dict[str, Any] = execute(
        request,
        doing,
        where=f"in project {project}",
        permission=permission,
        gone_means_skip=True,
        passthrough=passthrough,
    )
    return result


# --- names -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRef:
    project: str
    location: str  # a zone (basic/zonal tiers) or a region (regional/enterprise)
    instance_id: str

    @property
    def name(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/instances/{self.instance_id}"

    @property
    def region(self) -> str:
        """Backups are regional; a zonal instance's backups live in its zone's region."""
        zonal = ZONE.match(self.location)
        return zonal.group(1) if zonal else self.location

    @classmethod
    def parse(cls, name: str) -> InstanceRef:
        found = INSTANCE_NAME.match(name)
        if not found:
            raise ValueError(f"expected projects/P/locations/L/instances/I, got {name!r}")
        return cls(*found.groups())


def backups_to_keep(labels: dict[str, str], label_key: str, instance: str) -> int:
    """The label's value as a count; PermanentError (nothing created or deleted) when it is not 1..1000."""
    raw = labels.get(label_key)
    if raw is None:
        raise PermanentError(f"instance {instance}: label {label_key} was removed; nothing backed up or deleted")
    count = count_from_label(raw)
    if count is None:
        raise PermanentError(
            f"instance {instance}: label {label_key}={raw!r} is not a whole number from {LABEL_KEEP_MIN} to"
            f" {LABEL_KEEP_MAX}; nothing backed up or deleted. Fix the label to the number of backups to keep."
        )
    return count


def backup_id(plan_name: str, instance: InstanceRef, period: datetime) -> str:
    """The same id for every delivery of one run: ``<plan>-<instance>-<YYYYmmddHHMM>``, at most 63 characters
    (a long name is shortened and made unique again with a hash of what was cut)."""
    stamp = period.astimezone(UTC).strftime("%Y%m%d%H%M")
    base = f"{plan_name}-{instance.instance_id}"
    if len(base) + 1 + len(stamp) > 63:
        digest = hashlib.sha256(f"{instance.name}/{plan_name}".encode()).hexdigest()[:8]
        base = f"{base[: 63 - len(stamp) - 10].rstrip('-')}-{digest}"
    return f"{base}-{stamp}"


def _our_labels(plan_name: str, instance: InstanceRef) -> dict[str, str]:
    return {MANAGED_BY_KEY: MANAGED_BY_VALUE, PLAN_KEY: plan_name, SOURCE_KEY: instance.instance_id}


def is_ours(backup: dict[str, Any], plan_name: str, instance: InstanceRef) -> bool:
    """Only backups carrying all our labels AND made from this instance may ever be pruned."""
    labels = backup.get("labels") or {}
    source = str(backup.get("sourceInstance", ""))
    return (
        labels.get(MANAGED_BY_KEY) == MANAGED_BY_VALUE
        and labels.get(PLAN_KEY) == plan_name
        and labels.get(SOURCE_KEY) == instance.instance_id
        # sourceInstance may carry the project number instead of its id: compare from "locations/" on.
        and source.endswith(f"/locations/{instance.location}/instances/{instance.instance_id}")
    )


# --- enumeration -------------------------------------------------------------------------------------------


def _projects(plan: Plan[FilestoreSettings], rt: Any) -> tuple[str, ...]:
    return plan.settings.projects or (rt.settings.project,)


# --- start / poll ------------------------------------------------------------------------------------------


def _operation(api: Any, name: str, project: str) -> dict[str, Any] | None:
    try:
        return _execute(
            api.projects().locations().operations().get(name=name),
            project,
            f"checking operation {name}",
            "file.operations.get",
            passthrough=(404,),
        )
    except HttpError:
        return None  # operations are kept for a while only; the resource itself tells us the rest


def _check_backup(
    plan: Plan[FilestoreSettings], instance: InstanceRef, state: dict[str, Any], run: RunContext, api: Any
) -> Outcome:
    backup_name = state["backup"]
    operation_name = state.get("operation")
    if operation_name:
        operation = _operation(api, operation_name, instance.project)
        if operation is not None and operation.get("done") and operation.get("error"):
            error = operation["error"]
            raise PermanentError(
                f"backup {backup_name} of {instance.name} failed ({error.get('code')}: {error.get('message')});"
                " nothing was pruned"
            )
    try:
        backup = _execute(
            api.projects().locations().backups().get(name=backup_name),
            instance.project,
            f"reading backup {backup_name}",
            "file.backups.get",
            passthrough=(404,),
        )
    except HttpError:
        if operation_name:
            return Pending(state, delay_seconds=plan.settings.poll_seconds)  # not visible yet
        raise PermanentError(f"backup {backup_name} of {instance.name} disappeared; nothing was pruned") from None
    status = backup.get("state")
    if status == "READY":
        run.log(f"backup {backup_name} is READY ({backup.get('storageBytes', '?')} bytes stored)")
        return _prune_step(plan, instance, {**state, "phase": "prune", "operation": None}, run, api)
    if status in ("CREATING", "FINALIZING", "STATE_UNSPECIFIED", None):
        return Pending(state, delay_seconds=plan.settings.poll_seconds)
    raise PermanentError(f"backup {backup_name} of {instance.name} ended {status}; nothing was pruned")


def _as_backup(backup: dict[str, Any]) -> Backup[dict[str, Any]]:
    created = (
        datetime.fromisoformat(backup["createTime"]) if backup.get("createTime") else datetime.max.replace(tzinfo=UTC)
    )
    return Backup(backup["name"], created, ours=True, complete=backup.get("state") == "READY", item=backup)


def list_our_backups(api: Any, plan_name: str, instance: InstanceRef) -> list[dict[str, Any]]:
    """Our backups of ``instance`` in its region, newest first. The list is filtered by the API and then again
    here: only what ``is_ours`` accepts is returned."""
    parent = f"projects/{instance.project}/locations/{instance.region}"
    flt = (
        f'labels.{MANAGED_BY_KEY}="{MANAGED_BY_VALUE}" AND labels.{PLAN_KEY}="{plan_name}"'
        f' AND labels.{SOURCE_KEY}="{instance.instance_id}"'
    )
    found: list[dict[str, Any]] = []
    token = None
    while True:
        kwargs: dict[str, Any] = {"parent": parent, "filter": flt, "pageSize": PAGE_SIZE}
        if token:
            kwargs["pageToken"] = token
        page = _execute(
            api.projects().locations().backups().list(**kwargs),
            instance.project,
            f"listing backups of {instance.name}",
            "file.backups.list",
        )
        found.extend(b for b in page.get("backups", []) if is_ours(b, plan_name, instance))
        token = page.get("nextPageToken")
        if not token:
            break
    return sorted(found, key=lambda b: (b.get("createTime", ""), b.get("name", "")), reverse=True)


def _prune_step(
    plan: Plan[FilestoreSettings], instance: InstanceRef, state: dict[str, Any], run: RunContext, api: Any
) -> Outcome:
    """Delete at most one surplus backup per call (Filestore allows one delete at a time per backup chain)."""
    pruned: list[str] = list(state.get("pruned", []))
    pending_delete = state.get("delete_operation")
    if pending_delete:
        operation = _operation(api, pending_delete, instance.project)
        if operation is not None and not operation.get("done"):
            return Pending(state, delay_seconds=DELETE_POLL_SECONDS)
        if operation is not None and operation.get("error"):
            error = operation["error"]
            run.log(f"retention: deleting {state.get('deleting')} failed: {error.get('message')}; will try again")
            return Pending({**state, "delete_operation": None}, delay_seconds=DELETE_POLL_SECONDS)
        pruned.append(str(state.get("deleting")))
    policy = Policy(keep=int(state["keep"]), floor=plan.retention.min_keep)
    listed = [_as_backup(b) for b in list_our_backups(api, plan.name, instance)]
    new_backup = state["backup"]
    try:
        surplus = to_delete(listed, policy, confirmed=new_backup)
    except NotConfirmed:
        raise PermanentError(
            f"backup {new_backup} is not among the READY backups of {instance.name}; pruning nothing"
        ) from None
    if not surplus:
        kept = sum(1 for b in listed if b.complete)
        return Done(
            output=new_backup,
            stats={"kept": kept, "pruned": pruned},
            message=f"backup {new_backup} READY; {len(pruned)} old backups deleted",
        )
    oldest = surplus[0].name
    try:
        operation = _execute(
            api.projects().locations().backups().delete(name=oldest),
            instance.project,
            f"deleting old backup {oldest}",
            "file.backups.delete",
            passthrough=(404, 429),
        )
    except HttpError as exc:
        if int(exc.resp.status) == 404:
            pruned.append(oldest)  # someone else deleted it meanwhile: it is gone either way
            return Pending({**state, "phase": "prune", "pruned": pruned, "delete_operation": None}, delay_seconds=1)
        run.log(f"retention: another delete in the backup chain of {instance.name} is running; waiting")
        return Pending({**state, "phase": "prune", "pruned": pruned}, delay_seconds=DELETE_POLL_SECONDS)
    run.log(f"retention: deleting {oldest} (keep {policy.kept}); operation {operation.get('name')}")
    return Pending(
        {**state, "phase": "prune", "pruned": pruned, "deleting": oldest, "delete_operation": operation.get("name")},
        delay_seconds=DELETE_POLL_SECONDS,
    )


class Filestore(DrillsIn):
    """The ``filestore`` kind: a Filestore backup per labelled instance per period, confirmed READY, then the
    instance's surplus backups deleted one at a time (Filestore allows one delete per backup chain at a time)."""

    name = "filestore"
    default_queue = "filestore"
    execution: Execution = "operation"
    drill_module = "kinds.filestore.drill"

    def enumerate(self, plan: Plan[FilestoreSettings], page_token: str | None, rt: Any) -> TargetPage:
        """One page of labelled instances across every location of one project (one ``instances.list`` call)."""
        settings: FilestoreSettings = plan.settings
        projects = _projects(plan, rt)
        index, api_token = decode_page_token(page_token, projects, "filestore") if page_token else (0, "")
        project = projects[index]
        api = _client(plan, rt)
        kwargs: dict[str, Any] = {
            "parent": f"projects/{project}/locations/-",
            "filter": f"labels.{settings.label_key}:*",
            "pageSize": min(PAGE_SIZE, plan.fanout_page_size),
        }
        if api_token:
            kwargs["pageToken"] = api_token
        following = next_page_token(projects, index, None)
        try:
            page = _execute(
                api.projects().locations().instances().list(**kwargs),
                project,
                f"listing Filestore instances of project {project}",
                "file.instances.list",
            )
        except (PermanentError, TargetGone) as exc:
            # That project's failure alone: recorded, and the plan's other projects are still backed up.
            problem = ListingProblem(
                f"projects/{project}", f"plan {plan.name}: cannot list instances of {project}: {exc}"
            )
            return TargetPage([], following, problems=[problem])
        if page.get("unreachable"):
            log.warning(
                "filestore: locations unreachable in %s, their instances are missing: %s", project, page["unreachable"]
            )
        targets = []
        for instance in page.get("instances", []):
            ref = InstanceRef.parse(instance["name"])
            shares = [s.get("name") for s in instance.get("fileShares", []) if s.get("name")]
            targets.append(
                Target(
                    key=ref.name,
                    params={
                        "share": shares[0] if shares else None,
                        "label": (instance.get("labels") or {}).get(settings.label_key),
                    },
                )
            )
        return TargetPage(targets, next_page_token(projects, index, page.get("nextPageToken")))

    def resolve(self, plan: Plan[FilestoreSettings], key: str, rt: Any) -> Target:
        """The instance ``key`` names, if it is in one of the plan's projects. ``start`` reads the instance itself
        (labels, shares), so nothing of a task body but the name is used."""
        try:
            instance = InstanceRef.parse(key)
        except ValueError as exc:
            raise PermanentError(f"refused: {str(exc)[:200]}") from None
        if instance.project not in _projects(plan, rt):
            raise PermanentError(f"refused: project {instance.project!r} is not one of plan {plan.name}'s projects")
        return Target(key=instance.name)

    def start(self, plan: Plan[FilestoreSettings], target: Target, run: RunContext, rt: Any) -> Outcome:
        """Create this period's backup of the instance's file share (or find it created by an earlier delivery)."""
        settings: FilestoreSettings = plan.settings
        try:
            instance = InstanceRef.parse(target.key)
        except ValueError as exc:
            raise PermanentError(f"filestore target: {exc}") from exc
        api = _client(plan, rt)
        current = _execute(
            api.projects().locations().instances().get(name=instance.name),
            instance.project,
            f"reading instance {instance.name}",
            "file.instances.get",
        )
        keep = backups_to_keep(current.get("labels") or {}, settings.label_key, instance.name)
        shares = [s["name"] for s in current.get("fileShares", []) if s.get("name")]
        if not shares:
            raise PermanentError(f"instance {instance.name} has no file share to back up")
        share = shares[0]
        name_id = backup_id(plan.name, instance, run.period)
        parent = f"projects/{instance.project}/locations/{instance.region}"
        backup_name = f"{parent}/backups/{name_id}"
        body = {
            "sourceInstance": instance.name,
            "sourceFileShare": share,
            "description": f"backup-scheduler plan {plan.name}, instance {instance.name}, keep {keep}",
            "labels": _our_labels(plan.name, instance),
        }
        doing = f"creating backup {name_id} of {instance.name}"
        try:
            operation = _execute(
                api.projects().locations().backups().create(parent=parent, backupId=name_id, body=body),
                instance.project,
                doing,
                "file.backups.create",
                passthrough=(409,),
            )
        except HttpError:
            # 409: an earlier delivery of this run created it. Make sure it really is ours before going on.
            existing = _execute(
                api.projects().locations().backups().get(name=backup_name),
                instance.project,
                f"reading backup {backup_name}",
                "file.backups.get",
            )
            if not is_ours(existing, plan.name, instance):
                raise PermanentError(
                    f"backup {backup_name} exists but was not made by this plan for {instance.name}; not touching it"
                ) from None
            run.log(f"backup {name_id} already exists (an earlier delivery created it); checking it")
            operation = {}
        run.log(
            f"creating backup {name_id} of {instance.name} share {share} (keep {keep});"
            f" operation {operation.get('name')}"
        )
        state = {"phase": "create", "backup": backup_name, "operation": operation.get("name"), "keep": keep}
        return _check_backup(plan, instance, state, run, api)

    def poll(
        self, plan: Plan[FilestoreSettings], target: Target, state: dict[str, Any], run: RunContext, rt: Any
    ) -> Outcome:
        try:
            instance = InstanceRef.parse(target.key)
        except ValueError as exc:
            raise PermanentError(f"filestore target: {exc}") from exc
        if not isinstance(state.get("backup"), str) or not isinstance(state.get("keep"), int):
            raise PermanentError(f"poll for {instance.name}: state is not one this service wrote: {state!r}")
        api = _client(plan, rt)
        if state.get("phase") == "prune":
            return _prune_step(plan, instance, state, run, api)
        return _check_backup(plan, instance, state, run, api)

    def describe(self, plan: Plan[FilestoreSettings], target: Target, rt: Any) -> str:
        instance = InstanceRef.parse(target.key)
        name = backup_id(plan.name, instance, rt.now())
        return (
            f"back up share {target.params.get('share')} of {instance.name} to"
            f" projects/{instance.project}/locations/{instance.region}/backups/{name},"
            f" then keep label {plan.settings.label_key}={target.params.get('label')} backups"
            f" (floor {plan.retention.min_keep})"
        )


KIND = Filestore()
