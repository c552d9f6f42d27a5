"""Notifications: recorded by the worker's run_finished, grouped and flushed (services/alerts.py), sent by the notify
task to a real Pub/Sub emulator and to a local webhook server, retried on 5xx, once for a repeated failure."""

from __future__ import annotations

import base64
import json
import logging
from datetime import timedelta

import pytest
import responses
from google.auth.credentials import AnonymousCredentials

from main import create_app
from services import alerts, notify, worker
from services.catalog import FAILED, SUCCEEDED, Catalog
from services.errors import PermanentError
from services.queue import LocalQueue
from tests.alerting import AUTH, finished_run, make_plan, served_app
from tests.helpers import Clock, make_runtime

TOPIC = "backup-events"


def pubsub_subscription(project: str, topic: str, name: str) -> tuple[object, str]:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic_path = publisher.topic_path(project, topic)
    subscription = subscriber.subscription_path(project, name)
    publisher.create_topic(name=topic_path)
    subscriber.create_subscription(name=subscription, topic=topic_path)
    return subscriber, subscription


def pull_all(subscriber, subscription: str, expect: int) -> list:
    """Pull until ``expect`` messages arrived, then once more to catch any extra (duplicates)."""
    messages: list = []
    for _ in range(20):
        response = subscriber.pull(subscription=subscription, max_messages=50, timeout=5)
        messages += [m.message for m in response.received_messages]
        if response.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
        if len(messages) >= expect:
            extra = subscriber.pull(subscription=subscription, max_messages=50, timeout=2, return_immediately=True)
            return messages + [m.message for m in extra.received_messages]
    return messages


def notify_tasks(queue: LocalQueue) -> list[dict]:
    """The tasks that send a message (not the flushes that compose them)."""
    return [t for t in queue.tasks() if t["queue"] == notify.NOTIFY_QUEUE and t["path"] == notify.NOTIFY_PATH]


def test_failed_run_reaches_pubsub_as_json_with_filterable_attributes(tmp_path, datastore, pubsub_emulator, serve):
    plan = make_plan("nightly", pubsub_topic=TOPIC)
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    subscriber, subscription = pubsub_subscription("test-project", TOPIC, "ops-failures")
    failed = finished_run("nightly", "Customer", FAILED, clock.now, error="export failed: bucket demo-backups is gone")
    succeeded = finished_run("nightly", "Order", SUCCEEDED, clock.now)

    with served_app(serve, rt, queue, Catalog(datastore)) as (_served, dispatcher):
        notify.run_finished(rt, plan, failed, queue)
        notify.run_finished(rt, plan, succeeded, queue)  # on_success is off by default: nothing queued
        assert dispatcher.wait_idle(timeout=30)
        messages = pull_all(subscriber, subscription, expect=1)

    assert len(notify_tasks(queue)) == 1
    assert len(messages) == 1
    body = json.loads(messages[0].data)
    assert body["plan"] == "nightly" and body["target"] == "Customer"
    assert body["status"] == "failed" and body["kind"] == "failure"
    assert body["error"] == "export failed: bucket demo-backups is gone"
    assert body["run_id"] == failed.run_id and body["output"] is None
    attributes = dict(messages[0].attributes)
    assert attributes == {"plan": "nightly", "status": "failed", "kind": "failure", "target": "Customer"}


def test_missing_topic_is_a_permanent_failure_not_a_retry_storm(tmp_path, datastore, pubsub_emulator, serve, caplog):
    plan = make_plan("nightly", pubsub_topic="no-such-topic")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    queue = LocalQueue(tmp_path / "queue.sqlite3")

    with served_app(serve, rt, queue, Catalog(datastore)) as (_served, dispatcher):
        notify.run_finished(rt, plan, finished_run("nightly", "Customer", FAILED, clock.now, error="boom"), queue)
        assert dispatcher.wait_idle(timeout=30)

    [task] = notify_tasks(queue)
    assert (task["state"], task["attempts"], task["last_status"]) == ("done", 1, 200)
    assert any("no-such-topic" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_webhook_gets_chat_text_and_is_retried_after_5xx(tmp_path, datastore, webhook_server, serve):
    plan = make_plan("nightly", webhook_env="OPS_CHAT_WEBHOOK")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock, environ={"OPS_CHAT_WEBHOOK": webhook_server.url})
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    webhook_server.answers = [503, 502]
    record = finished_run("nightly", "acme/Invoice", FAILED, clock.now, error="PERMISSION_DENIED on demo-backups")

    with served_app(serve, rt, queue, Catalog(datastore)) as (_served, dispatcher):
        notify.run_finished(rt, plan, record, queue)
        assert dispatcher.wait_idle(timeout=30)

    assert [r["status"] for r in webhook_server.received] == [503, 502, 200]
    assert all(r["content_type"] == "application/json" for r in webhook_server.received)
    [accepted] = webhook_server.accepted()
    assert set(accepted) == {"text"}
    assert "nightly" in accepted["text"] and "acme/Invoice" in accepted["text"]
    assert "PERMISSION_DENIED on demo-backups" in accepted["text"]
    assert f"/runs/{record.run_id}" in accepted["text"]
    [task] = notify_tasks(queue)
    assert (task["state"], task["attempts"]) == ("done", 3)


def test_webhook_4xx_is_not_retried(tmp_path, datastore, webhook_server, serve):
    plan = make_plan("nightly", webhook_env="OPS_CHAT_WEBHOOK")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock, environ={"OPS_CHAT_WEBHOOK": webhook_server.url})
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    webhook_server.answers = [404]

    with served_app(serve, rt, queue, Catalog(datastore)) as (_served, dispatcher):
        notify.run_finished(rt, plan, finished_run("nightly", "Customer", FAILED, clock.now, error="x"), queue)
        assert dispatcher.wait_idle(timeout=30)

    assert [r["status"] for r in webhook_server.received] == [404]
    assert notify_tasks(queue)[0]["last_status"] == 200


def test_a_repeated_failure_is_one_message_until_its_cause_changes_or_the_repeat_interval_passes(
    tmp_path, datastore, webhook_server, serve
):
    plan = make_plan("hourly", webhook_env="OPS_CHAT_WEBHOOK")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock, environ={"OPS_CHAT_WEBHOOK": webhook_server.url})
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    for attempt in range(40):  # the same failure every few minutes, only the operation number changes
        clock.advance(minutes=5)
        error = f"operation projects/p/operations/{9000 + attempt} failed: quota exceeded"
        notify.run_finished(rt, plan, finished_run("hourly", "Customer", FAILED, clock.now, error=error), queue)
    with served_app(serve, rt, queue, Catalog(datastore)) as (_served, dispatcher):
        assert dispatcher.wait_idle(timeout=30)
    repeated = len(webhook_server.accepted())
    clock.advance(minutes=10)
    other = finished_run("hourly", "Customer", FAILED, clock.now, error="bucket demo-backups not found")
    notify.run_finished(rt, plan, other, queue)  # a different error is news
    with served_app(serve, rt, queue, Catalog(datastore)) as (_served, dispatcher):
        assert dispatcher.wait_idle(timeout=30)
    clock.advance(hours=6, minutes=1)
    swept = alerts.sweep(rt, queue)  # the hourly check: the group still failing is repeated
    with served_app(serve, rt, queue, Catalog(datastore)) as (_served, dispatcher):
        assert dispatcher.wait_idle(timeout=30)

    assert repeated == 1
    texts = [body["text"] for body in webhook_server.accepted()]
    assert len(texts) == 3
    assert "quota exceeded" in texts[0] and "bucket demo-backups not found" in texts[1]
    assert swept.repeats == 1 and texts[2].startswith("Still: *Backup failed*") and "demo-backups not found" in texts[2]


def test_a_good_run_resolves_the_failure_so_it_is_not_repeated(tmp_path, datastore):
    plan = make_plan("nightly", webhook_env="OPS_CHAT_WEBHOOK")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    catalog = Catalog(datastore)
    failed = finished_run("nightly", "Customer", FAILED, clock.now, error="quota exceeded")
    catalog.save(failed)
    notify.run_finished(rt, plan, failed, queue)
    [flush_task] = [t for t in queue.tasks() if t["path"] == alerts.FLUSH_PATH]
    flushed = alerts.flush(rt, "nightly", json.loads(flush_task["payload"])["group"], queue=queue)
    clock.advance(hours=1)
    good = finished_run("nightly", "Customer", SUCCEEDED, clock.now)
    catalog.save(good)
    notify.run_finished(rt, plan, good, queue)
    clock.advance(hours=7)

    swept = alerts.sweep(rt, queue)

    assert flushed.sent == 1
    assert swept.repeats == 0
    assert len(notify_tasks(queue)) == 1


def test_retry_for_the_webhook_does_not_publish_to_pubsub_twice(
    tmp_path, datastore, pubsub_emulator, webhook_server, serve
):
    plan = make_plan("nightly", pubsub_topic="events-both", webhook_env="OPS_CHAT_WEBHOOK")
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock, environ={"OPS_CHAT_WEBHOOK": webhook_server.url})
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    subscriber, subscription = pubsub_subscription("test-project", "events-both", "both")
    webhook_server.answers = [503, 503]

    with served_app(serve, rt, queue, Catalog(datastore)) as (_served, dispatcher):
        notify.run_finished(rt, plan, finished_run("nightly", "Order", FAILED, clock.now, error="boom"), queue)
        assert dispatcher.wait_idle(timeout=30)
        messages = pull_all(subscriber, subscription, expect=1)

    assert len(webhook_server.received) == 3 and len(webhook_server.accepted()) == 1
    assert len(messages) == 1


class BrokenQueue:
    def enqueue_many(self, tasks):
        raise ConnectionError("Cloud Tasks is unreachable")


def test_a_queue_outage_never_fails_the_recorded_run(tmp_path, datastore, caplog):
    plan = make_plan("nightly", webhook_env="OPS_CHAT_WEBHOOK")
    rt = make_runtime(tmp_path, plans={plan.name: plan}, environ={"OPS_CHAT_WEBHOOK": "https://chat.example/hook"})
    rt.client("queue", BrokenQueue)  # what run_finished uses when the worker passes no queue
    catalog = Catalog(datastore)

    def failing_fanout():
        raise PermanentError("select.kinds: kind 'Gone' does not exist")

    answer = worker.answer_fanout(rt, catalog, failing_fanout, plan)

    assert answer.status == 200 and answer.body["status"] == FAILED
    assert catalog.get(answer.body["run_id"]).status == FAILED
    assert any("could not queue the flush of alert group" in r.getMessage() for r in caplog.records)


def test_webhook_url_can_come_from_secret_manager(tmp_path):
    version = "projects/test-project/secrets/chat-hook/versions/3"
    rt = make_runtime(
        tmp_path, endpoints={"secretmanager": "https://secrets.test"}, environ={"OPS_CHAT_WEBHOOK": f"sm://{version}"}
    )
    rt._credentials = AnonymousCredentials()
    payload = base64.b64encode(b"https://chat.googleapis.com/v1/spaces/X/messages?key=k\n").decode()

    with responses.RequestsMock() as mocked:
        mocked.get(f"https://secrets.test/v1/{version}:access", json={"name": version, "payload": {"data": payload}})
        first = notify.resolve_secret(rt, "OPS_CHAT_WEBHOOK")
        second = notify.resolve_secret(rt, "OPS_CHAT_WEBHOOK")  # cached: one call to Secret Manager

        assert len(mocked.calls) == 1
    assert first == second == "https://chat.googleapis.com/v1/spaces/X/messages?key=k"


def test_the_webhook_url_comes_from_the_runtime_not_the_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OPS_CHAT_WEBHOOK", "https://from-the-process.example/hook")
    rt = make_runtime(tmp_path, environ={"OPS_CHAT_WEBHOOK": "https://chat.example/hook"})

    assert notify.resolve_secret(rt, "OPS_CHAT_WEBHOOK") == "https://chat.example/hook"


@pytest.mark.parametrize(
    ("value", "problem"),
    [("http://chat.example/hook", "must be https://"), ("", "is not set")],
)
def test_a_webhook_url_that_would_leak_or_is_missing_is_refused(tmp_path, value, problem):
    rt = make_runtime(tmp_path, environ={"OPS_CHAT_WEBHOOK": value})
    message = notify.Message("failure", "nightly", "Customer", "failed", "text", "2026-11-23T02:00:00+00:00", key="k")

    with pytest.raises(PermanentError, match=problem):
        notify.post_webhook(rt, "OPS_CHAT_WEBHOOK", message)


def test_daily_digest_summarises_the_last_day_once(tmp_path, datastore):
    plan = make_plan("nightly", digest=True, on_failure=False, webhook_env="OPS_CHAT_WEBHOOK")
    quiet = make_plan("quiet", webhook_env="OPS_CHAT_WEBHOOK")  # no digest asked for
    clock = Clock()
    rt = make_runtime(tmp_path, plans={plan.name: plan, quiet.name: quiet}, clock=clock)
    catalog = Catalog(datastore)
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    catalog.save(finished_run("nightly", "Customer", SUCCEEDED, clock.now - timedelta(hours=2)))
    catalog.save(finished_run("nightly", "Order", FAILED, clock.now - timedelta(hours=1), error="quota exceeded"))
    catalog.save(finished_run("nightly", "Old", FAILED, clock.now - timedelta(days=3), error="long ago"))
    client = create_app(rt, queue=queue, catalog=catalog).test_client()

    first = client.get("/cron/_digest", headers=AUTH)
    second = client.get("/cron/_digest", headers=AUTH)

    assert first.get_json() == {"queued": ["nightly"]}
    assert second.get_json() == {"queued": []}  # same day: collapsed
    [message] = [json.loads(t["payload"]) for t in notify_tasks(queue)]
    assert message["kind"] == "digest" and message["status"] == "failed"
    assert "1 failed, 1 succeeded in the last 24 h" in message["text"]
    assert "`Order`: quota exceeded" in message["text"]
    assert "long ago" not in message["text"]


def test_a_message_delivered_twice_is_sent_once_per_channel(tmp_path, datastore, webhook_server):
    """Cloud Tasks forgets a task name some time after the task ran: the same message can be delivered again."""
    plan = make_plan("nightly", webhook_env="OPS_CHAT_WEBHOOK")
    rt = make_runtime(tmp_path, plans={plan.name: plan}, environ={"OPS_CHAT_WEBHOOK": webhook_server.url})
    queue = LocalQueue(tmp_path / "a.sqlite3")
    notify.run_finished(rt, plan, finished_run("nightly", "Customer", FAILED, rt.now(), error="boom"), queue)
    [flush_task] = [t for t in queue.tasks() if t["path"] == alerts.FLUSH_PATH]
    alerts.flush(rt, "nightly", json.loads(flush_task["payload"])["group"], queue=queue)
    [message] = [notify.Message.from_json(json.loads(t["payload"])) for t in notify_tasks(queue)]

    sent = notify.deliver(rt, message)
    again = notify.deliver(rt, message)

    assert (sent.channels, again.channels) == ({"webhook": "sent"}, {"webhook": "already sent"})
    assert len(webhook_server.received) == 1
