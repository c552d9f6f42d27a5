"""Alerts grouped by plan and cause (services/alerts.py): 300 targets failing for one reason are one message per
stage (failed, stale, recovered) at a real local webhook server; a message the queue refuses is never marked sent."""

from __future__ import annotations

import json
from datetime import timedelta

from main import create_app
from services import alerts, notify
from services.catalog import FAILED, NAMESPACE, SUCCEEDED, Catalog
from services.queue import LocalQueue
from services.stale import check_stale
from tests.alerting import AUTH, finished_run, kind_plan, sent_messages, served_app
from tests.helpers import Clock, make_runtime

DISKS = [f"projects/demo/zones/us-central1-a/disks/disk-{i:03d}" for i in range(300)]


def denied(target: str) -> str:
    return f"PERMISSION_DENIED: backup@demo.iam lacks compute.snapshots.create on {target}"


def deliver_all(serve, rt, queue, catalog) -> None:
    with served_app(serve, rt, queue, catalog) as (_served, dispatcher):
        assert dispatcher.wait_idle(timeout=60)


def test_one_cause_on_300_targets_is_one_message_per_stage(tmp_path, datastore, webhook_server, serve):
    plan = kind_plan("disks-prod", "disks", rpo_hours=26, webhook_env="OPS_CHAT_WEBHOOK")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock, environ={"OPS_CHAT_WEBHOOK": webhook_server.url})
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    catalog = Catalog(datastore)
    for disk in DISKS:
        catalog.save(finished_run(plan.name, disk, SUCCEEDED, clock.now))
    clock.advance(hours=25)

    for disk in DISKS:  # the role was revoked: every disk fails the same way
        record = finished_run(plan.name, disk, FAILED, clock.now, error=denied(disk))
        catalog.save(record)
        notify.run_finished(rt, plan, record, queue)
    deliver_all(serve, rt, queue, catalog)
    after_failures = webhook_server.accepted()
    clock.advance(hours=2)  # 27 h since the last good copies: past the RPO
    stale = check_stale(rt, catalog, queue=queue)
    deliver_all(serve, rt, queue, catalog)
    after_stale = webhook_server.accepted()
    clock.advance(hours=1)
    for disk in DISKS:  # the role is back
        record = finished_run(plan.name, disk, SUCCEEDED, clock.now)
        catalog.save(record)
        notify.run_finished(rt, plan, record, queue)
    recovered = check_stale(rt, catalog, queue=queue)
    deliver_all(serve, rt, queue, catalog)
    texts = [body["text"] for body in webhook_server.accepted()]

    assert len(after_failures) == 1
    failed_text = after_failures[0]["text"]
    assert failed_text.startswith("*Backups failed*: 300 targets of plan `disks-prod`: PERMISSION_DENIED")
    assert "disk-000" in failed_text and "and 295 more" in failed_text
    assert len(stale.changes) == 300 and len(after_stale) == 2
    assert after_stale[1]["text"].startswith("*Backups stale*: 300 targets of plan `disks-prod`")
    assert len(recovered.changes) == 300 and len(texts) == 3
    assert texts[2].startswith("Backups recovered: 300 targets of plan `disks-prod`")
    sends = [t for t in queue.tasks() if t["path"] == notify.NOTIFY_PATH]
    assert len(sends) == 3 and all(t["state"] == "done" for t in sends)


class RefusingQueue:
    """The local queue, except that it refuses the first ``refusals`` messages (not the flushes)."""

    def __init__(self, inner: LocalQueue, refusals: int):
        self.inner = inner
        self.refusals = refusals

    def enqueue_many(self, tasks):
        if any(t.path == notify.NOTIFY_PATH for t in tasks) and self.refusals > 0:
            self.refusals -= 1
            raise ConnectionError("Cloud Tasks answered 503")
        return self.inner.enqueue_many(tasks)


def pending_events(datastore) -> int:
    query = datastore.query(kind=alerts.EVENT_KIND, namespace=NAMESPACE)
    return sum(1 for e in query.fetch() if e["pending"])


def test_a_message_the_queue_refuses_leaves_the_alert_pending_and_is_retried(tmp_path, datastore):
    plan = kind_plan("disks-prod", "disks", rpo_hours=26, webhook_env="OPS_CHAT_WEBHOOK")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    local = LocalQueue(tmp_path / "queue.sqlite3")
    queue = RefusingQueue(local, refusals=1)
    client = create_app(rt, queue=queue, catalog=Catalog(datastore)).test_client()
    for disk in DISKS[:3]:
        notify.run_finished(rt, plan, finished_run(plan.name, disk, FAILED, clock.now, error=denied(disk)), queue)
    [flush] = [json.loads(t["payload"]) for t in local.tasks() if t["path"] == alerts.FLUSH_PATH]

    refused = client.post(alerts.FLUSH_PATH, json=flush, headers=AUTH)
    pending_after_refusal = pending_events(datastore)
    retried = client.post(alerts.FLUSH_PATH, json=flush, headers=AUTH)

    assert refused.status_code == 503 and pending_after_refusal == 3
    assert retried.status_code == 200 and retried.get_json()["sent"] == 3
    assert pending_events(datastore) == 0
    [message] = [json.loads(t["payload"]) for t in local.tasks() if t["path"] == notify.NOTIFY_PATH]
    assert message["count"] == 3 and message["text"].startswith("*Backups failed*: 3 targets")


def test_the_hourly_sweep_queues_a_flush_that_was_never_queued(tmp_path, datastore):
    plan = kind_plan("disks-prod", "disks", rpo_hours=26, webhook_env="OPS_CHAT_WEBHOOK")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    queue = LocalQueue(tmp_path / "queue.sqlite3")

    class Down:
        def enqueue_many(self, tasks):
            raise ConnectionError("Cloud Tasks is unreachable")

    record = finished_run(plan.name, DISKS[0], FAILED, clock.now, error=denied(DISKS[0]))
    notify.run_finished(rt, plan, record, Down())  # the event is stored; its flush could not be queued
    clock.advance(minutes=1)
    swept = alerts.sweep(rt, queue)

    assert swept.flushes == 1
    [message] = sent_messages(rt, queue)
    assert message["target"] == DISKS[0] and message["run_id"] == record.run_id


def test_events_of_one_burst_wait_for_the_group_interval(tmp_path, datastore):
    plan = kind_plan("disks-prod", "disks", webhook_env="OPS_CHAT_WEBHOOK")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    for disk in DISKS[:2]:
        notify.run_finished(rt, plan, finished_run(plan.name, disk, FAILED, clock.now, error=denied(disk)), queue)
    group = json.loads(queue.tasks()[0]["payload"])["group"]
    first = alerts.flush(rt, plan.name, group, queue=queue)
    sent_at = clock.now
    clock.advance(minutes=1)
    for disk in DISKS[2:10]:  # the rest of the burst, a minute later
        notify.run_finished(rt, plan, finished_run(plan.name, disk, FAILED, clock.now, error=denied(disk)), queue)
    early = alerts.flush(rt, plan.name, group, queue=queue)
    clock.advance(minutes=4)
    on_time = alerts.flush(rt, plan.name, group, queue=queue)

    assert (first.sent, first.firing) == (2, 2)
    assert early.sent == 0 and early.deferred_until == sent_at + timedelta(minutes=5)
    assert (on_time.sent, on_time.firing) == (8, 10)
