"""Shared pieces of the notification, stale-check and status-page tests: plans with notify settings, finished run
records, and the app served with the local queue delivering its tasks (fast retries, so a retry test is quick)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from main import create_app
from services import alerts, notify
from services.catalog import FAILED, SUCCEEDED, Catalog, RunRecord
from services.plans import Plan, parse_plan
from services.queue import LocalDispatcher, LocalQueue, QueueConfig, RetryPolicy
from tests.helpers import LOCAL_TOKEN

AUTH = {"Authorization": f"Bearer {LOCAL_TOKEN}"}
# queue.yaml's notify queue backs off 15 s and more; the same retry logic with short delays keeps tests quick.
FAST_QUEUES = {
    "notify": QueueConfig("notify", retry=RetryPolicy(min_backoff=0.05, max_backoff=0.2, task_retry_limit=6)),
}


def make_plan(name: str = "nightly", rpo_hours: float | None = 26, **notify: Any) -> Plan:
    raw: dict[str, Any] = {
        "kind": "datastore",
        "destination": {"bucket": "demo-backups", "prefix": "datastore"},
        "options": {"location": "us-central1"},
        "notify": notify,
    }
    if rpo_hours is not None:
        raw["rpo_hours"] = rpo_hours
    return parse_plan(name, raw)


def kind_plan(name: str, kind: str, rpo_hours: float | None = 26, **notify: Any) -> Plan:
    """A plan of a kind other than datastore, with the least its kind needs (disks, filestore)."""
    raw: dict[str, Any] = {"kind": kind, "select": {"projects": ["demo-prod"]}, "notify": notify}
    if kind == "filestore":
        raw["select"]["label"] = "backup-keep"
    if rpo_hours is not None:
        raw["rpo_hours"] = rpo_hours
    return parse_plan(name, raw)


def finished_run(
    plan: str, target: str, status: str, at: datetime, error: str | None = None, run_id: str | None = None
) -> RunRecord:
    stamp = at.strftime("%Y%m%dt%H%M%S")
    return RunRecord(
        run_id=run_id or f"run-{plan}-{target.lower().replace('/', '-')}-{stamp}",
        plan=plan,
        target=target,
        kind="datastore",
        period=at - timedelta(minutes=5),
        status=status,
        created=at - timedelta(minutes=5),
        started=at - timedelta(minutes=5),
        ended=at,
        attempts=1,
        error=error if status == FAILED else None,
        output=f"gs://demo-backups/datastore/{target}/{stamp}/" if status == SUCCEEDED else None,
        log=[f"export of {target} started", f"{status}: {error}" if error else f"{status}"],
    )


@contextmanager
def served_app(serve: Any, rt: Any, queue: LocalQueue, catalog: Catalog) -> Iterator[tuple[Any, LocalDispatcher]]:
    """The app on a local port with the local queue delivering to it; stops both on exit."""
    app = create_app(rt, queue=queue, catalog=catalog)
    with serve(app) as served:
        dispatcher = LocalDispatcher(queue, served.url, LOCAL_TOKEN, FAST_QUEUES, poll_interval=0.02).start()
        try:
            yield served, dispatcher
        finally:
            dispatcher.stop()


def sent_messages(rt: Any, queue: LocalQueue) -> list[dict]:
    """Run every alert flush waiting in ``queue`` (as the notify queue would deliver them, without waiting for their
    time) and return the bodies of all messages queued for sending so far, oldest first."""
    while True:
        flushes = [t for t in queue.tasks("pending") if t["path"] == alerts.FLUSH_PATH]
        if not flushes:
            break
        for task in flushes:
            queue.settle(task["name"], state="done", status=200, error=None)
            body = json.loads(task["payload"])
            alerts.flush(rt, body["plan"], body["group"], repeat=body.get("repeat") is True, queue=queue)
    return [json.loads(t["payload"]) for t in queue.tasks() if t["path"] == notify.NOTIFY_PATH]
