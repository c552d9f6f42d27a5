"""Polling a Datastore export that runs for a while. The emulator finishes exports at once, so the long-running
operation is served at the network edge (the real admin client, REST transport, `responses`) with the API's own
message shapes."""

from __future__ import annotations

import json

import pytest
import responses
from google.auth.credentials import AnonymousCredentials
from google.cloud import datastore_admin_v1
from google.protobuf import any_pb2

from kinds.datastore import exports as kind
from services.errors import PermanentError, TransientError
from services.kinds import Done, Pending, RunContext, Target
from services.plans import parse_plan
from tests.helpers import Clock, make_runtime

ADMIN = "https://datastore-admin.test"
OPERATION = "projects/test-project/operations/ASA1MTAwNDQxMjQ"


def packed(message) -> dict:
    holder = any_pb2.Any()
    holder.Pack(type(message).pb(message))
    return {"@type": holder.type_url, **json.loads(type(message).to_json(message))}


def operation_json(done: bool, entities: int = 0, error: dict | None = None) -> dict:
    metadata = datastore_admin_v1.ExportEntitiesMetadata(
        progress_entities=datastore_admin_v1.Progress(work_completed=entities),
        progress_bytes=datastore_admin_v1.Progress(work_completed=entities * 100),
    )
    body = {"name": OPERATION, "done": done, "metadata": packed(metadata)}
    if error:
        body["error"] = error
    elif done:
        url = "gs://b/nightly/20261123t020005z/Customer/2026-11-23T02:00:07_1/2026-11-23T02:00:07_1.overall_export_metadata"
        body["response"] = packed(datastore_admin_v1.ExportEntitiesResponse(output_url=url))
    return body


@pytest.fixture
def env(tmp_path):
    rt = make_runtime(tmp_path, credentials=AnonymousCredentials(), datastore_admin_endpoint=ADMIN)
    plan = parse_plan(
        "nightly",
        {
            "kind": "datastore",
            "destination": {"bucket": "b", "prefix": "nightly"},
            "options": {"location": "us-central1"},
        },
    )
    target = Target("Customer", {"project": "test-project", "namespaces": [""], "kinds": ["Customer"]})
    run = RunContext("r1", "nightly", "Customer", Clock()())
    return rt, plan, target, run


@responses.activate
def test_poll_until_done_then_record_counts_and_output(env):
    rt, plan, target, run = env
    url = f"{ADMIN}/v1/{OPERATION}"
    responses.add(responses.GET, url, json=operation_json(done=False, entities=10))
    responses.add(responses.GET, url, json=operation_json(done=True, entities=1234))

    first = kind.KIND.poll(plan, target, {"operation": OPERATION}, run, rt)
    second = kind.KIND.poll(plan, target, {"operation": OPERATION}, run, rt)

    assert isinstance(first, Pending) and first.delay_seconds == kind.POLL_SECONDS
    assert isinstance(second, Done)
    assert second.stats == {
        "entities": 1234,
        "bytes": 123400,
        "kinds": {"Customer": {"entities": 1234, "bytes": 123400}},  # one kind: its own figures too
    }
    assert second.output.endswith("/Customer/2026-11-23T02:00:07_1/2026-11-23T02:00:07_1.overall_export_metadata")


@responses.activate
def test_failed_export_is_permanent_with_the_api_message(env):
    rt, plan, target, run = env
    error = {"code": 7, "message": "The caller does not have permission to write to gs://b"}
    responses.add(responses.GET, f"{ADMIN}/v1/{OPERATION}", json=operation_json(done=True, error=error))

    with pytest.raises(PermanentError, match="does not have permission to write to gs://b"):
        kind.KIND.poll(plan, target, {"operation": OPERATION}, run, rt)


@responses.activate
def test_a_503_while_polling_is_transient(env):
    rt, plan, target, run = env
    unavailable = {"error": {"code": 503, "message": "backend unavailable", "status": "UNAVAILABLE"}}
    responses.add(responses.GET, f"{ADMIN}/v1/{OPERATION}", json=unavailable, status=503)

    with pytest.raises(TransientError, match="backend unavailable"):
        kind.KIND.poll(plan, target, {"operation": OPERATION}, run, rt)
