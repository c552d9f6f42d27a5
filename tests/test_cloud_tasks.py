"""The Cloud Tasks queue: the exact Task sent, checked at the network edge (the real client, REST transport,
`responses` in place of the Cloud Tasks API), and "already exists" counted as already queued."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
import responses
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import tasks_v2

from services.queue import CloudTasksQueue, TaskSpec
from tests.helpers import make_settings

TASKS_URL = "https://cloudtasks.googleapis.com/v2/projects/test-project/locations/europe-west1/queues/backups/tasks"


def tasks_queue(tmp_path, **settings):
    client = tasks_v2.CloudTasksClient(
        transport="rest",
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint="https://cloudtasks.googleapis.com"),
    )
    return CloudTasksQueue(
        make_settings(
            tmp_path, tasks_location="europe-west1", queue_backend="cloudtasks", gae_service="backup", **settings
        ),
        client=client,
    )


def echo_task(request):
    body = json.loads(request.body)
    return 200, {}, json.dumps(body["task"])


@responses.activate
def test_app_engine_task_is_named_routed_and_scheduled(tmp_path):
    responses.add_callback(responses.POST, TASKS_URL, callback=echo_task)
    when = datetime(2026, 11, 23, 2, 5, tzinfo=UTC)
    spec = TaskSpec("backups", "/tasks/nightly", {"run_id": "r1"}, name="abc-nightly-customer", schedule_time=when)

    created = tasks_queue(tmp_path).enqueue_many([spec])

    assert created == [True]
    sent = json.loads(responses.calls[0].request.body)["task"]
    assert sent["name"] == "projects/test-project/locations/europe-west1/queues/backups/tasks/abc-nightly-customer"
    assert sent["scheduleTime"] == "2026-11-23T02:05:00Z"
    request = sent["appEngineHttpRequest"]
    assert request["relativeUri"] == "/tasks/nightly"
    assert request["httpMethod"] == tasks_v2.HttpMethod.POST.value  # enums travel as integers
    assert request["appEngineRouting"] == {"service": "backup"}
    assert request["headers"] == {"Content-Type": "application/json"}
    assert json.loads(base64.b64decode(request["body"])) == {"run_id": "r1"}


@responses.activate
def test_http_target_carries_an_oidc_token(tmp_path):
    responses.add_callback(responses.POST, TASKS_URL, callback=echo_task)
    queue = tasks_queue(
        tmp_path,
        tasks_target="http",
        service_url="https://backups.example.com",
        tasks_service_account="tasks@test-project.iam.gserviceaccount.com",
    )

    queue.enqueue_many([TaskSpec("backups", "/tasks/nightly", {}, name="t1")])

    request = json.loads(responses.calls[0].request.body)["task"]["httpRequest"]
    assert request["url"] == "https://backups.example.com/tasks/nightly"
    assert request["oidcToken"] == {
        "serviceAccountEmail": "tasks@test-project.iam.gserviceaccount.com",
        "audience": "https://backups.example.com",
    }


@responses.activate
def test_already_exists_counts_as_queued_and_transient_errors_are_retried(tmp_path):
    conflict = {"error": {"code": 409, "message": "Requested entity already exists", "status": "ALREADY_EXISTS"}}
    unavailable = {"error": {"code": 503, "message": "try again", "status": "UNAVAILABLE"}}
    responses.add(responses.POST, TASKS_URL, json=conflict, status=409)
    responses.add(responses.POST, TASKS_URL, json=unavailable, status=503)
    responses.add_callback(responses.POST, TASKS_URL, callback=echo_task)
    queue = tasks_queue(tmp_path)

    assert queue.enqueue_many([TaskSpec("backups", "/tasks/p", {}, name="dup")]) == [False]
    assert queue.enqueue_many([TaskSpec("backups", "/tasks/p", {}, name="new")]) == [True]
    assert len(responses.calls) == 3


@responses.activate
def test_permission_denied_is_not_swallowed(tmp_path):
    denied = {"error": {"code": 403, "message": "cloudtasks.tasks.create denied", "status": "PERMISSION_DENIED"}}
    responses.add(responses.POST, TASKS_URL, json=denied, status=403)

    from google.api_core.exceptions import Forbidden

    with pytest.raises(Forbidden, match="cloudtasks.tasks.create"):
        tasks_queue(tmp_path).enqueue_many([TaskSpec("backups", "/tasks/p", {}, name="x")])


@responses.activate
def test_worker_queues_become_http_tasks_to_the_cloud_run_worker(tmp_path):
    directory_url = TASKS_URL.replace("/queues/backups/", "/queues/directory/")
    responses.add_callback(responses.POST, directory_url, callback=echo_task)
    responses.add_callback(responses.POST, TASKS_URL, callback=echo_task)
    queue = tasks_queue(
        tmp_path,
        worker_url="https://backup-worker-abc-ew.a.run.app",
        tasks_service_account="tasks@test-project.iam.gserviceaccount.com",
    )

    queue.enqueue_many([TaskSpec("directory", "/tasks/share", {}, name="d1"), TaskSpec("backups", "/tasks/p", {})])

    sent = {
        call.request.url.split("/queues/")[1].split("/")[0]: json.loads(call.request.body)["task"]
        for call in responses.calls
    }
    to_worker = sent["directory"]["httpRequest"]
    assert to_worker["url"] == "https://backup-worker-abc-ew.a.run.app/tasks/share"
    assert to_worker["oidcToken"]["audience"] == "https://backup-worker-abc-ew.a.run.app"
    assert "appEngineHttpRequest" in sent["backups"]


def test_a_worker_queue_without_a_worker_url_is_a_clear_configuration_error(tmp_path):
    from services.errors import ConfigError

    with pytest.raises(ConfigError, match="BACKUP_WORKER_URL is not set"):
        tasks_queue(tmp_path).build_task(TaskSpec("directory", "/tasks/share", {}))
