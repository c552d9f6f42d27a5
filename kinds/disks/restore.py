"""``backup restore-disk``: a new persistent disk from one of the snapshots this service took.

A restore never touches the disk the snapshot came from and never reuses an existing disk name, so running it
cannot destroy data. It runs once, by hand, from a terminal: every API call is retried on a transient answer with
backoff, and the wait for the new disk is a short in-process poll (never inside a request).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.api_core.exceptions import RetryError
from google.api_core.retry import Retry
from googleapiclient.errors import HttpError

from kinds.disks.snapshots import GCE_NAME, _execute, compute_client, compute_endpoint
from services.errors import PermanentError, TransientError
from services.jobs import poll_until
from services.runtime import Runtime

RESTORE_POLL_SECONDS = 2.0
# A restore's API calls are retried on 429 / 5xx for up to five minutes, backing off from 1 s to 30 s.
RESTORE_RETRY = Retry(predicate=lambda exc: isinstance(exc, TransientError), initial=1.0, maximum=30.0, timeout=300.0)


@dataclass
class RestoredDisk:
    project: str
    zone: str
    name: str
    self_link: str
    status: str
    size_gb: str


def restore_disk(
    rt: Runtime,
    *,
    project: str,
    zone: str,
    snapshot: str,
    name: str,
    disk_type: str | None = None,
    endpoint: str | None = None,
    timeout_seconds: float = 1800.0,
    sleep: Callable[[float], None] = time.sleep,
    on_progress: Callable[[str], None] | None = None,
    retry: Retry | None = None,
) -> RestoredDisk:
    """Create the new disk ``name`` from ``snapshot`` and wait until it is READY. Never replaces an existing
    disk: a name already taken is an error, so a restore cannot destroy anything. Every call is retried on a
    transient answer (429, 5xx, a dropped connection) with ``retry``'s backoff; a restore runs once, by hand,
    and should not fail on the first busy moment of the API."""
    if not GCE_NAME.match(name):
        raise PermanentError(f"--name {name!r}: expected a disk name (1-63 lowercase letters, digits, '-')")
    say = on_progress or (lambda _msg: None)
    compute = compute_client(rt, compute_endpoint(endpoint, rt))
    patient = retry or RESTORE_RETRY

    def call(request: Any, doing: str, passthrough: tuple[int, ...] = ()) -> dict[str, Any]:
        try:
            result: dict[str, Any] = patient(_execute)(request, project, doing, passthrough)
        except RetryError as exc:
            raise TransientError(f"{doing}: still failing when retries ran out: {exc.cause}") from exc
        return result

    try:
        source = call(
            compute.snapshots().get(project=project, snapshot=snapshot), f"reading snapshot {snapshot}", (404,)
        )
    except HttpError:
        raise PermanentError(f"snapshot {snapshot} not found in project {project}") from None
    if source.get("status") != "READY":
        raise PermanentError(f"snapshot {snapshot} is {source.get('status')}, not READY; cannot restore from it")
    try:
        call(compute.disks().get(project=project, zone=zone, disk=name), f"checking disk {name}", (404,))
    except HttpError:
        pass  # the name is free, which is what we want
    else:
        raise PermanentError(
            f"disk {name} already exists in projects/{project}/zones/{zone}; restore never overwrites a disk,"
            " choose a new --name"
        )
    body: dict[str, Any] = {
        "name": name,
        "sourceSnapshot": source.get("selfLink") or f"projects/{project}/global/snapshots/{snapshot}",
        "labels": {"restored-from": snapshot[:63]},
    }
    if disk_type:
        body["type"] = f"projects/{project}/zones/{zone}/diskTypes/{disk_type}"
    # The same requestId on a retried insert makes Compute answer with the first call's operation.
    request_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"projects/{project}/zones/{zone}/disks/{name}<-{snapshot}"))
    doing = f"creating disk {name} from snapshot {snapshot}"
    try:
        operation = call(
            compute.disks().insert(project=project, zone=zone, body=body, requestId=request_id), doing, (409,)
        )
    except HttpError:
        raise PermanentError(f"disk {name} already exists in zone {zone}; restore never overwrites a disk") from None
    say(f"creating disk {name} in {zone} from {snapshot} (operation {operation.get('name')})")
    deadline = time.monotonic() + timeout_seconds
    if operation.get("status") != "DONE":
        operation = poll_until(
            lambda: call(compute.zoneOperations().get(project=project, zone=zone, operation=operation["name"]), doing),
            lambda op: op.get("status") == "DONE",
            what=doing,
            deadline=deadline,
            interval=RESTORE_POLL_SECONDS,
            sleep=sleep,
        )
    errors = (operation.get("error") or {}).get("errors") or []
    if errors:
        raise PermanentError(f"{doing} failed: " + "; ".join(str(e.get("message", e)) for e in errors))
    disk = call(compute.disks().get(project=project, zone=zone, disk=name), f"reading disk {name}")
    if disk.get("status") not in ("READY", "FAILED"):
        disk = poll_until(
            lambda: call(compute.disks().get(project=project, zone=zone, disk=name), f"reading disk {name}"),
            lambda d: d.get("status") in ("READY", "FAILED"),
            what=doing,
            deadline=deadline,
            interval=RESTORE_POLL_SECONDS,
            sleep=sleep,
        )
    if disk.get("status") != "READY":
        raise PermanentError(f"{doing}: disk ended {disk.get('status')}")
    return RestoredDisk(
        project=project,
        zone=zone,
        name=name,
        self_link=disk.get("selfLink", ""),
        status=disk["status"],
        size_gb=str(disk.get("sizeGb", "")),
    )
