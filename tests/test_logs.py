"""Logging as Cloud Logging reads it on App Engine (one JSON object a line: severity, message, labels, trace from
X-Cloud-Trace-Context), and plain text locally."""

from __future__ import annotations

import io
import json
import logging

import pytest

from main import create_app
from services import logs, notify
from services.catalog import FAILED
from tests.alerting import finished_run, make_plan
from tests.helpers import Clock, make_runtime


@pytest.fixture
def json_lines():
    """Log records formatted by the App Engine formatter, as parsed JSON objects."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.CloudLoggingFormatter())
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(previous_level)


def test_request_logs_carry_the_trace_of_x_cloud_trace_context(tmp_path, json_lines):
    app = create_app(make_runtime(tmp_path, plans={"nightly": make_plan("nightly")}))

    app.test_client().get("/api/status", headers={"X-Cloud-Trace-Context": "4bf92f3577b34da6a3ce929d0e0e4736/1;o=1"})

    [denied] = [e for e in json_lines() if "denied GET /api/status" in e["message"]]
    assert denied["severity"] == "WARNING"
    assert denied["logging.googleapis.com/trace"] == "projects/test-project/traces/4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_failure_log_has_severity_error_and_plan_target_run_labels(tmp_path, json_lines):
    plan = make_plan("nightly")  # no channel: logged, nothing queued
    clock = Clock()
    record = finished_run("nightly", "Customer", FAILED, clock.now, error="quota exceeded")

    notify.run_finished(make_runtime(tmp_path, plans={"nightly": plan}, clock=clock), plan, record)

    [entry] = [e for e in json_lines() if e["message"].startswith("backup failed")]
    assert entry["severity"] == "ERROR"
    assert entry["message"] == "backup failed: plan nightly, target Customer: quota exceeded"
    assert entry["logging.googleapis.com/labels"] == {"plan": "nightly", "target": "Customer", "run_id": record.run_id}


def test_local_logs_are_plain_text(capsys):
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logs.configure(on_app_engine=False)
        logging.getLogger("backup.notify").error("backup failed: plan nightly")
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)

    line = capsys.readouterr().err.strip()
    assert line.endswith("ERROR   backup.notify: backup failed: plan nightly")
    assert not line.startswith("{")
