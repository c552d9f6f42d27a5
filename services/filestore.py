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
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from googleapiclient.errors import HttpError

from services.errors import PermanentError, TargetGone, TransientError
from services.fields import Fields
from services.gcp_errors import decode_page_token, execute, next_page_token
from services.kinds import Done, ListingProblem, Outcome, Pending, RunContext, Target, TargetPage
from services.requests_http import discovery_client

KIND = "filestore"
DEFAULT_QUEUE = "filestore"

DEFAULT_LABEL_KEY = "backup-keep"
KEEP_MIN, KEEP_MAX = 1, 1000
MANAGED_BY_KEY, MANAGED_BY_VALUE = "managed-by", "backup-scheduler"
PLAN_KEY = "plan"
SOURCE_KEY = "source-instance"
PURPOSE_KEY = "purpose"

POLL_SECONDS = 60.0  # backups of large shares take many minutes; a minute between looks is plenty
DELETE_POLL_SECONDS = 30.0
PAGE_SIZE = 100

LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
PROJECT_ID = re.compile(r"^(?:[a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
ZONE = re.compile(r"^([a-z]+-[a-z]+[0-9]+)-[a-z]$")
INSTANCE_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/instances/([^/]+)$")
BACKUP_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/backups/([^/]+)$")

log = logging.getLogger(__name__)


# --- plan settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilestoreSettings:
    projects: tuple[str, ...] = ()  # empty: the service's own project
    label_key: str = DEFAULT_LABEL_KEY
    endpoint: str | None = None
    poll_seconds: float = POLL_SECONDS


def parse_settings(fields: Fields) -> FilestoreSettings:
    select = fields.section("select")
    projects = select.str_list("projects", [])
    for project in projects:
        if not PROJECT_ID.match(project):
            raise select.error("projects", "expected Google Cloud project ids (e.g. my-project-123)", project)
    label_key = select.str("label", DEFAULT_LABEL_KEY)
    if not LABEL_KEY.match(label_key):
        raise select.error("label", "expected a label key (lowercase letter, then letters, digits, - or _)", label_key)
    select.done()
    options = fields.section("options")
    endpoint = options.str("endpoint", None)
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise options.error("endpoint", "expected an http(s) URL such as https://file.googleapis.com/", endpoint)
    poll_seconds = options.float("poll_seconds", POLL_SECONDS, minimum=1.0)
    options.done()
    return FilestoreSettings(tuple(projects), label_key, endpoint, poll_seconds)


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


def _client(plan: Any, rt: Any) -> Any:
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


COUNT = re.compile(r"^[0-9]{1,4}$")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


def backups_to_keep(labels: dict[str, str], label_key: str, instance: str) -> int:
    """The label's value as a count; PermanentError (nothing created or deleted) when it is not 1..1000."""
    raw = labels.get(label_key)
    if raw is None:
        raise PermanentError(f"instance {instance}: label {label_key} was removed; nothing backed up or deleted")
    if not COUNT.match(raw) or not KEEP_MIN <= int(raw) <= KEEP_MAX:
        raise PermanentError(
            f"instance {instance}: label {label_key}={raw!r} is not a whole number from {KEEP_MIN} to {KEEP_MAX};"
            " nothing backed up or deleted. Fix the label to the number of backups to keep."
        )
    return int(raw)


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


def _projects(plan: Any, rt: Any) -> tuple[str, ...]:
    return plan.settings.projects or (rt.settings.project,)


def enumerate_targets(plan: Any, page_token: str | None, rt: Any) -> TargetPage:
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
        problem = ListingProblem(f"projects/{project}", f"plan {plan.name}: cannot list instances of {project}: {exc}")
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


def resolve_target(plan: Any, key: str, rt: Any) -> Target:
    """The instance ``key`` names, if it is in one of the plan's projects. ``start`` reads the instance itself
    (labels, shares), so nothing of a task body but the name is used."""
    try:
        instance = InstanceRef.parse(key)
    except ValueError as exc:
        raise PermanentError(f"refused: {str(exc)[:200]}") from None
    if instance.project not in _projects(plan, rt):
        raise PermanentError(f"refused: project {instance.project!r} is not one of plan {plan.name}'s projects")
    return Target(key=instance.name)


def describe(plan: Any, target: Target, rt: Any) -> str:
    instance = InstanceRef.parse(target.key)
    name = backup_id(plan.name, instance, rt.now())
    return (
        f"back up share {target.params.get('share')} of {instance.name} to"
        f" projects/{instance.project}/locations/{instance.region}/backups/{name},"
        f" then keep label {plan.settings.label_key}={target.params.get('label')} backups"
        f" (floor {plan.retention.min_keep})"
    )


# --- start / poll ------------------------------------------------------------------------------------------


def start(plan: Any, target: Target, run: RunContext, rt: Any) -> Outcome:
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
        f"creating backup {name_id} of {instance.name} share {share} (keep {keep}); operation {operation.get('name')}"
    )
    state = {"phase": "create", "backup": backup_name, "operation": operation.get("name"), "keep": keep}
    return _check_backup(plan, instance, state, run, api)


def poll(plan: Any, target: Target, state: dict[str, Any], run: RunContext, rt: Any) -> Outcome:
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


def _check_backup(plan: Any, instance: InstanceRef, state: dict[str, Any], run: RunContext, api: Any) -> Outcome:
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


def _prune_step(plan: Any, instance: InstanceRef, state: dict[str, Any], run: RunContext, api: Any) -> Outcome:
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
    keep = max(int(state["keep"]), plan.retention.min_keep, 1)
    ready = [b for b in list_our_backups(api, plan.name, instance) if b.get("state") == "READY"]
    new_backup = state["backup"]
    if new_backup not in {b["name"] for b in ready}:
        raise PermanentError(f"backup {new_backup} is not among the READY backups of {instance.name}; pruning nothing")
    surplus = [b for b in ready[keep:] if b["name"] != new_backup]
    if not surplus:
        return Done(
            output=new_backup,
            stats={"kept": min(len(ready), keep), "pruned": pruned},
            message=f"backup {new_backup} READY; {len(pruned)} old backups deleted",
        )
    oldest = surplus[-1]["name"]
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
    run.log(f"retention: deleting {oldest} (keep {keep}); operation {operation.get('name')}")
    return Pending(
        {**state, "phase": "prune", "pruned": pruned, "deleting": oldest, "delete_operation": operation.get("name")},
        delay_seconds=DELETE_POLL_SECONDS,
    )


# --- restore -------------------------------------------------------------------------------------------------


@dataclass
class RestoreResult:
    instance: str
    share: str
    backup: str
    safety_backup: str


def _wait_operation(
    api: Any,
    operation: dict[str, Any],
    project: str,
    what: str,
    deadline: float,
    poll_seconds: float,
    sleep: Callable[[float], None],
    on_progress: Callable[[str], None],
) -> dict[str, Any]:
    while not operation.get("done"):
        if time.monotonic() > deadline:
            raise PermanentError(f"{what}: still running after the timeout (operation {operation.get('name')})")
        sleep(poll_seconds)
        operation = _execute(
            api.projects().locations().operations().get(name=operation["name"]),
            project,
            f"checking operation {operation['name']}",
            "file.operations.get",
        )
        on_progress(f"{what}: running")
    if operation.get("error"):
        error = operation["error"]
        raise PermanentError(f"{what} failed ({error.get('code')}: {error.get('message')})")
    return operation


def _retry_rate_limited(
    call: Callable[[], dict[str, Any]],
    what: str,
    deadline: float,
    sleep: Callable[[float], None],
    on_progress: Callable[[str], None],
    wait_seconds: float,
) -> dict[str, Any]:
    """Filestore allows one backup create and one in-place restore per instance every 10 minutes: when the
    API says so (429), wait and ask again until the deadline rather than fail a restore someone is waiting on."""
    while True:
        try:
            return call()
        except TransientError as exc:
            if not exc.rate_limited or time.monotonic() + wait_seconds > deadline:
                raise
            on_progress(f"{what}: rate limited, asking again in {wait_seconds:.0f} s ({exc})")
            sleep(wait_seconds)


def restore_filestore(
    rt: Any,
    *,
    backup: str,
    instance: str,
    share: str,
    endpoint: str | None = None,
    timeout_seconds: float = 3 * 3600,
    poll_seconds: float = 15.0,
    rate_limit_wait_seconds: float = 120.0,
    sleep: Callable[[float], None] | None = None,
    on_progress: Callable[[str], None] = lambda _message: None,
) -> RestoreResult:
    """Restore ``backup`` onto file share ``share`` of ``instance`` (``instances.restore``), and wait for it.

    The restore replaces everything on the share, so a backup of the target share is taken first and must be
    READY before the restore is even requested (labels ``managed-by`` and ``purpose=pre-restore``, no plan
    label, so no plan's retention ever deletes it). If that safety backup cannot be made, nothing is restored.
    """
    if not BACKUP_NAME.match(backup):
        raise PermanentError(f"--backup: expected projects/P/locations/REGION/backups/ID, got {backup!r}")
    try:
        target = InstanceRef.parse(instance)
    except ValueError as exc:
        raise PermanentError(f"--instance: {exc}") from exc
    sleep = sleep or time.sleep
    api = file_client(rt, file_endpoint(endpoint, rt))
    deadline = time.monotonic() + timeout_seconds
    backup_project = BACKUP_NAME.match(backup).group(1)  # type: ignore[union-attr]

    source = _execute(
        api.projects().locations().backups().get(name=backup),
        backup_project,
        f"reading backup {backup}",
        "file.backups.get",
    )
    if source.get("state") != "READY":
        raise PermanentError(f"backup {backup} is {source.get('state')}, not READY; refusing to restore from it")
    current = _execute(
        api.projects().locations().instances().get(name=target.name),
        target.project,
        f"reading instance {target.name}",
        "file.instances.get",
    )
    shares = [s.get("name") for s in current.get("fileShares", [])]
    if share not in shares:
        raise PermanentError(
            f"instance {target.name} has no file share {share!r} (it has: {', '.join(shares) or 'none'})"
        )

    stamp = rt.now().astimezone(UTC).strftime("%Y%m%d%H%M%S")
    safety_id = f"pre-restore-{target.instance_id}"[: 63 - len(stamp) - 1].rstrip("-") + f"-{stamp}"
    parent = f"projects/{target.project}/locations/{target.region}"
    safety_name = f"{parent}/backups/{safety_id}"
    body = {
        "sourceInstance": target.name,
        "sourceFileShare": share,
        "description": f"backup-scheduler: taken before restoring {backup} onto {target.name}/{share}",
        "labels": {MANAGED_BY_KEY: MANAGED_BY_VALUE, PURPOSE_KEY: "pre-restore", SOURCE_KEY: target.instance_id},
    }
    on_progress(f"taking safety backup {safety_name} of {target.name} share {share}")
    what = f"safety backup {safety_name}"
    operation = _retry_rate_limited(
        lambda: _execute(
            api.projects().locations().backups().create(parent=parent, backupId=safety_id, body=body),
            target.project,
            f"creating {what}",
            "file.backups.create",
        ),
        what,
        deadline,
        sleep,
        on_progress,
        rate_limit_wait_seconds,
    )
    _wait_operation(api, operation, target.project, what, deadline, poll_seconds, sleep, on_progress)
    made = _execute(
        api.projects().locations().backups().get(name=safety_name),
        target.project,
        f"reading {what}",
        "file.backups.get",
    )
    if made.get("state") != "READY":
        raise PermanentError(f"{what} is {made.get('state')}, not READY; nothing was restored")
    on_progress(f"{what} is READY; restoring {backup} onto {target.name} share {share}")

    what = f"restore of {backup} onto {target.name}/{share}"
    operation = _retry_rate_limited(
        lambda: _execute(
            api.projects()
            .locations()
            .instances()
            .restore(name=target.name, body={"fileShare": share, "sourceBackup": backup}),
            target.project,
            what,
            "file.instances.restore",
        ),
        what,
        deadline,
        sleep,
        on_progress,
        rate_limit_wait_seconds,
    )
    _wait_operation(api, operation, target.project, what, deadline, poll_seconds, sleep, on_progress)
    on_progress(f"{what}: done")
    return RestoreResult(target.name, share, backup, safety_name)
