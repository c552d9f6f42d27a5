"""``POST /tasks/<plan>[/poll|/fanout]``: queue deliveries. One target per task; the status code tells the queue
whether to retry (see services/worker.py)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from handlers import catalog, queue, runtime
from handlers.auth import queue_only
from services import worker

bp = Blueprint("tasks", __name__)


def _delivery() -> worker.Delivery:
    headers = request.headers
    retries = headers.get("X-AppEngine-TaskRetryCount") or headers.get("X-CloudTasks-TaskRetryCount") or "0"
    return worker.Delivery(
        queue=headers.get("X-AppEngine-QueueName") or headers.get("X-CloudTasks-QueueName") or "",
        task_name=headers.get("X-AppEngine-TaskName") or headers.get("X-CloudTasks-TaskName") or "",
        retry_count=int(retries) if retries.isdigit() else 0,
    )


def _payload() -> Any:
    payload = request.get_json(silent=True)
    return payload if payload is not None else request.get_data()


def _answer(handler: Any, plan_name: str):  # type: ignore[no-untyped-def]
    try:
        payload = _payload()
    except RequestEntityTooLarge:
        # Our own tasks are a few hundred bytes: a body this size was not made by this service. Recorded and
        # answered 2xx, so the queue does not deliver it again and again.
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        answer = worker.record_bad_task(
            runtime(), catalog(), plan_name, b"", f"task body of {request.content_length} bytes is over {limit}"
        )
    else:
        answer = handler(runtime(), catalog(), queue(), plan_name, payload, _delivery())
    return jsonify(answer.body), answer.status


@bp.post("/tasks/<plan_name>")
@queue_only
def backup(plan_name: str):  # type: ignore[no-untyped-def]
    return _answer(worker.run_backup_task, plan_name)


@bp.post("/tasks/<plan_name>/poll")
@queue_only
def poll(plan_name: str):  # type: ignore[no-untyped-def]
    return _answer(worker.run_poll_task, plan_name)


@bp.post("/tasks/<plan_name>/drill")
@queue_only
def drill(plan_name: str):  # type: ignore[no-untyped-def]
    return _answer(worker.run_drill_task, plan_name)


@bp.post("/tasks/<plan_name>/fanout")
@queue_only
def fanout(plan_name: str):  # type: ignore[no-untyped-def]
    return _answer(worker.run_fanout_task, plan_name)
