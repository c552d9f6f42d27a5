"""``backup restore-filestore``: a Filestore backup restored onto a file share, after a safety backup of it.

``instances.restore`` replaces everything on the share, so the share is backed up first and that backup must be
READY before the restore is even requested. It runs once, by hand: Filestore's one-operation-per-10-minutes limit
is waited out rather than failed, and the waits are short in-process polls (never inside a request).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from kinds.filestore.backups import (
    BACKUP_NAME,
    MANAGED_BY_KEY,
    MANAGED_BY_VALUE,
    PURPOSE_KEY,
    SOURCE_KEY,
    InstanceRef,
    _execute,
    file_client,
    file_endpoint,
)
from services.errors import PermanentError, TransientError
from services.jobs import poll_until


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
    def fetch() -> dict[str, Any]:
        on_progress(f"{what}: running")
        return _execute(
            api.projects().locations().operations().get(name=operation["name"]),
            project,
            f"checking operation {operation['name']}",
            "file.operations.get",
        )

    if not operation.get("done"):
        operation = poll_until(
            fetch, lambda op: bool(op.get("done")), what=what, deadline=deadline, interval=poll_seconds, sleep=sleep
        )
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
