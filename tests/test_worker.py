"""The worker's contract with the queue: 2xx when done or failed for good (recorded), 429/5xx when a retry may
help; duplicates never start a second backup; long operations are polled by delayed tasks; large fan-outs
continue in a follow-up task."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest

import kinds
from main import create_app
from services.catalog import FAILED, PENDING, RUNNING, SKIPPED, SUCCEEDED, Catalog
from services.fanout import backup_task, current_period
from services.kinds import Target
from services.plans import parse_plan
from services.queue import LocalQueue
from tests import scripted_kind
from tests.helpers import LOCAL_TOKEN, Clock, make_runtime

AUTH = {"Authorization": f"Bearer {LOCAL_TOKEN}"}


@pytest.fixture
def env(tmp_path, datastore, monkeypatch):
    monkeypatch.setitem(kinds.REGISTRY, "scripted", scripted_kind.REGISTRATION)
    scripted_kind.calls.clear()
    targets = ["done-a", "pending-b", "transient-c", "limited-d", "permanent-e", "gone-f", "crash-g"]
    plan = parse_plan("scripted", {"kind": "scripted", "fanout_page_size": 3, "select": {"targets": targets}})
    clock = Clock()
    rt = make_runtime(tmp_path, plans={"scripted": plan}, clock=clock)
    queue = LocalQueue(tmp_path / "q.sqlite3", clock=clock)
    client = create_app(rt, queue=queue).test_client()

    class Env:
        pass

    e = Env()
    e.plan, e.rt, e.queue, e.client, e.clock, e.catalog = plan, rt, queue, client, clock, Catalog(datastore)
    return e


def deliver(env, task, retry=0, queue_name=None):
    headers = AUTH | {"X-AppEngine-TaskRetryCount": str(retry), "X-AppEngine-QueueName": queue_name or task.queue}
    return env.client.post(task.path, data=json.dumps(task.payload), headers=headers, content_type="application/json")


def task_for(env, key):
    return backup_task(env.plan, Target(key, {"do": key.split("-")[0]}), current_period(env.rt, env.plan))


@pytest.mark.parametrize(
    ("key", "status", "recorded"),
    [
        ("done-a", 200, SUCCEEDED),
        ("transient-c", 503, RUNNING),
        ("limited-d", 429, RUNNING),
        ("permanent-e", 200, FAILED),
        ("gone-f", 200, SKIPPED),
        ("crash-g", 500, RUNNING),
    ],
)
def test_outcome_maps_to_status_code_and_is_recorded(env, key, status, recorded):
    task = task_for(env, key)

    response = deliver(env, task)

    assert response.status_code == status
    record = env.catalog.get(task.name)
    assert record.status == recorded
    if recorded in (FAILED, SKIPPED, RUNNING) and key != "done-a":
        assert record.error and key in record.error


def test_malformed_task_body_is_recorded_and_answered_2xx(env):
    response = env.client.post("/tasks/scripted", data="{not json", headers=AUTH, content_type="application/json")
    wrong_shape = env.client.post("/tasks/scripted", json={"run_id": "x", "period": "yesterday"}, headers=AUTH)

    assert response.status_code == 200 and wrong_shape.status_code == 200
    assert "malformed task body" in response.get_json()["error"]
    assert "'period' must be an ISO 8601 time" in wrong_shape.get_json()["error"]
    record = env.catalog.get(wrong_shape.get_json()["run_id"])
    assert record.status == FAILED and record.target == "(invalid task)"


def test_task_for_a_plan_no_longer_in_plans_yaml_is_recorded_not_retried(env):
    response = env.client.post("/tasks/removed-plan", json={"run_id": "r"}, headers=AUTH)

    assert response.status_code == 200
    assert "plan 'removed-plan' is not in plans.yaml" in response.get_json()["error"]


def test_unknown_plan_at_cron_is_404_listing_the_plans(env):
    response = env.client.get("/cron/nope", headers=AUTH)

    assert response.status_code == 404
    assert response.get_json() == {"error": "no plan named 'nope'", "plans": ["scripted"]}


def test_a_duplicate_delivery_does_not_start_a_second_backup(env):
    done, pending = task_for(env, "done-a"), task_for(env, "pending-b")

    for task in (done, done, pending, pending):
        assert deliver(env, task).status_code == 200

    assert scripted_kind.calls[("start", "done-a")] == 1
    assert scripted_kind.calls[("start", "pending-b")] == 1


def test_a_long_operation_is_polled_by_delayed_tasks_until_done(env):
    task = task_for(env, "pending-b")

    first = deliver(env, task)

    assert first.get_json()["status"] == PENDING
    polls = [t for t in env.queue.tasks() if t["path"] == "/tasks/scripted/poll"]
    assert [p["name"] for p in polls] == [f"{task.name}-poll-0"]
    assert polls[0]["eta"] == pytest.approx((env.clock() + timedelta(seconds=30)).timestamp())
    poll_body = json.loads(polls[0]["payload"])

    second = env.client.post("/tasks/scripted/poll", json=poll_body, headers=AUTH)
    assert second.get_json()["status"] == PENDING
    next_poll = json.loads(env.queue.tasks()[-1]["payload"])
    third = env.client.post("/tasks/scripted/poll", json=next_poll, headers=AUTH)

    assert third.get_json()["status"] == SUCCEEDED
    record = env.catalog.get(task.name)
    assert (record.status, record.output, record.stats) == (SUCCEEDED, "mem://pending-b", {"polls": 1})
    assert env.catalog.target_states("scripted")[0].last_good_run_id == task.name


def test_the_last_retry_the_queue_allows_records_the_failure(env):
    task = task_for(env, "transient-c")  # queue "backups": task_retry_limit 10 in queue.yaml

    early = deliver(env, task, retry=3)
    last = deliver(env, task, retry=10)

    assert early.status_code == 503
    assert last.status_code == 200
    record = env.catalog.get(task.name)
    assert record.status == FAILED and record.error.startswith("gave up after 11 attempts")


def test_retry_count_is_logged_at_error_level_past_the_threshold(env, caplog):
    task = task_for(env, "transient-c")

    with caplog.at_level(logging.INFO):
        deliver(env, task, retry=1)
        deliver(env, task, retry=3)

    retry_lines = [r for r in caplog.records if "retry" in r.getMessage() and "transient-c" in r.getMessage()]
    assert [r.levelno for r in retry_lines] == [logging.WARNING, logging.ERROR]


def test_a_large_fan_out_continues_in_a_follow_up_task(env):
    first = env.client.get("/cron/scripted", headers=AUTH).get_json()

    assert (first["targets"], first["enqueued"], first["continuation"]) == (3, 3, True)
    for _ in range(3):
        continuation = [t for t in env.queue.tasks("pending") if t["path"] == "/tasks/scripted/fanout"]
        if not continuation:
            break
        task = continuation[-1]
        env.queue.settle(task["name"], state="done", status=200, error=None)
        env.client.post(task["path"], data=task["payload"], headers=AUTH, content_type="application/json")
    backups = [t for t in env.queue.tasks() if t["path"] == "/tasks/scripted"]
    assert len(backups) == 7
    again = env.client.get("/cron/scripted", headers=AUTH).get_json()
    assert (again["enqueued"], again["already_queued"]) == (0, 3)
