"""Notification plumbing over HTTP: the queued tasks that flush an alert group and send a message, and the cron
jobs for the stale check (with the alert sweep) and the digest.

The cron URLs start with ``_`` (``/cron/_stale``, ``/cron/_digest``) and so can never be a plan's name (plan names
are lowercase letters, digits and '-'); the same goes for the task path ``/tasks/_notify``.
"""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request

from handlers import catalog, queue, runtime
from handlers.auth import cron_only, queue_only
from services import alerts, notify
from services.stale import AlertStore, check_stale

log = logging.getLogger(__name__)

bp = Blueprint("alerts", __name__)


@bp.post(notify.NOTIFY_PATH)
@queue_only
def send_notification():  # type: ignore[no-untyped-def]
    rt = runtime()
    try:
        message = notify.Message.from_json(request.get_json(silent=True))
    except ValueError as exc:
        # Retrying a malformed body cannot help: logged at error level and acknowledged.
        log.error("notify task rejected: %s: %r", exc, request.get_data()[:500])
        return jsonify({"error": f"malformed notify task: {exc}"}), 200
    retries = request.headers.get("X-AppEngine-TaskRetryCount") or request.headers.get("X-CloudTasks-TaskRetryCount")
    if retries and retries.isdigit() and int(retries) >= rt.settings.retry_error_threshold:
        log.error("notification %s is on retry %s: a channel keeps failing", message.key, retries)
    result = notify.deliver(rt, message)
    # 503 makes the queue retry with queue.yaml's backoff; channels that already have the message are skipped then.
    return jsonify(result.to_json()), 503 if result.retry else 200


@bp.post(alerts.FLUSH_PATH)
@queue_only
def flush_alert_group():  # type: ignore[no-untyped-def]
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("plan"), str) or not isinstance(body.get("group"), str):
        log.error("alert flush task rejected: %r", request.get_data()[:500])
        return jsonify({"error": 'malformed flush task: expected {"plan": ..., "group": ...}'}), 200
    try:
        result = alerts.flush(runtime(), body["plan"], body["group"], repeat=body.get("repeat") is True, queue=queue())
    except Exception as exc:  # the events stay pending: the queue retries this flush (and the sweep would too)
        log.warning("alert group %s not flushed, will be retried: %s", body["group"], exc)
        return jsonify({"error": f"{type(exc).__name__}: {exc}", "retry": True}), 503
    return jsonify(result.to_json()), 200


@bp.get("/cron/_stale")
@cron_only
def stale_check():  # type: ignore[no-untyped-def]
    rt = runtime()
    report = check_stale(rt, catalog(), queue=queue())
    swept = alerts.sweep(rt, queue())
    return jsonify(report.to_json() | {"alerts": swept.to_json()})


@bp.get("/cron/_digest")
@cron_only
def daily_digest():  # type: ignore[no-untyped-def]
    rt = runtime()
    store = catalog()
    alerts = AlertStore(store.client, store.namespace)
    queued = []
    for plan in rt.plans.values():
        if not (plan.notify.digest and notify.has_channels(plan)):
            continue
        stale = sorted(name for name, alert in alerts.for_plan(plan.name).items() if alert.stale)
        message = notify.digest_message(rt, plan, store, stale)
        if notify.enqueue_message(rt, plan, message, queue()):
            queued.append(plan.name)
    return jsonify({"queued": queued})
