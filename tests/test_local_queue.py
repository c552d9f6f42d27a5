"""The local queue: dedup by task name, schedule time, Cloud Tasks-style headers, and retry timing taken from
queue.yaml, delivered over real HTTP to a recording server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.queue import LocalDispatcher, LocalQueue, QueueConfig, RetryPolicy, TaskSpec, load_queue_configs
from services.runtime import ROOT
from tests.helpers import LOCAL_TOKEN, wait_until


def dispatcher_for(queue, recorder, configs=None):
    return LocalDispatcher(queue, recorder.url, LOCAL_TOKEN, configs or {}, poll_interval=0.02).start()


def test_a_task_name_is_enqueued_once(tmp_path):
    queue = LocalQueue(tmp_path / "q.sqlite3")
    task = TaskSpec(queue="backups", path="/tasks/p", payload={"a": 1}, name="p-target-20261123")

    first = queue.enqueue_many([task, TaskSpec("backups", "/tasks/p", {"b": 2}, name="other")])
    again = queue.enqueue_many([task])

    assert first == [True, True]
    assert again == [False]
    assert [t["name"] for t in queue.tasks()] == ["p-target-20261123", "other"]


def test_delivery_carries_app_engine_headers_and_the_local_token(tmp_path, recorder):
    queue = LocalQueue(tmp_path / "q.sqlite3")
    queue.enqueue_many([TaskSpec("backups", "/tasks/nightly", {"x": 1}, name="task-1")])

    dispatcher = dispatcher_for(queue, recorder)
    try:
        wait_until(lambda: recorder.requests, timeout=10)
    finally:
        dispatcher.stop()

    request = recorder.requests[0]
    assert request["path"] == "/tasks/nightly"
    assert request["body"] == b'{"x": 1}'
    assert request["headers"]["X-AppEngine-QueueName"] == "backups"
    assert request["headers"]["X-AppEngine-TaskName"] == "task-1"
    assert request["headers"]["X-AppEngine-TaskRetryCount"] == "0"
    assert request["headers"]["Authorization"] == f"Bearer {LOCAL_TOKEN}"


def test_schedule_time_is_honoured(tmp_path, recorder):
    queue = LocalQueue(tmp_path / "q.sqlite3")
    soon = datetime.now(UTC) + timedelta(seconds=0.6)
    queue.enqueue_many([TaskSpec("polls", "/tasks/p/poll", {}, name="later", schedule_time=soon)])

    dispatcher = dispatcher_for(queue, recorder)
    try:
        wait_until(lambda: recorder.requests, timeout=10)
    finally:
        dispatcher.stop()

    assert recorder.requests[0]["at"] >= soon.timestamp()


def test_failed_deliveries_are_retried_with_queue_yaml_backoff_then_given_up(tmp_path, recorder):
    configs = {
        "flaky": QueueConfig(
            "flaky", retry=RetryPolicy(min_backoff=0.2, max_backoff=0.5, max_doublings=1, task_retry_limit=3)
        )
    }
    recorder.script = [503, 500, 429, 503]
    queue = LocalQueue(tmp_path / "q.sqlite3")
    queue.enqueue_many([TaskSpec("flaky", "/tasks/p", {}, name="t")])

    dispatcher = dispatcher_for(queue, recorder, configs)
    try:
        wait_until(lambda: queue.tasks("failed"), timeout=15)
    finally:
        dispatcher.stop()

    times = [r["at"] for r in recorder.requests]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert len(times) == 4  # the first try and task_retry_limit=3 retries
    assert [r["headers"]["X-AppEngine-TaskRetryCount"] for r in recorder.requests] == ["0", "1", "2", "3"]
    # backoff 0.2, 0.4 (one doubling), then linear growth capped at max_backoff 0.5
    for gap, expected in zip(gaps, [0.2, 0.4, 0.5], strict=True):
        assert expected - 0.01 <= gap <= expected + 0.35, gaps
    assert queue.tasks("failed")[0]["last_status"] == 503


def test_retry_policy_follows_the_cloud_tasks_rule():
    policy = RetryPolicy(min_backoff=10, max_backoff=300, max_doublings=3)

    assert [policy.delay(n) for n in range(8)] == [10, 20, 40, 80, 160, 240, 300, 300]


def test_queue_yaml_is_read_into_retry_policies():
    configs = load_queue_configs(ROOT / "queue.yaml")

    exports = configs["datastore-exports"].retry
    assert (exports.min_backoff, exports.max_backoff, exports.max_doublings, exports.task_retry_limit) == (
        60.0,
        1800.0,
        4,
        8,
    )
