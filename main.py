"""The backup-scheduler web app: ``app = create_app()`` is what gunicorn serves (app.yaml)."""

from __future__ import annotations

from typing import Any

from flask import Flask, g, jsonify, request

from services import logs
from services.catalog import Catalog
from services.deployment import check_deployment_files
from services.queue import make_queue
from services.runtime import Runtime, Settings

MAX_REQUEST_BYTES = 1 << 20  # task bodies and admin requests are small; nothing here uploads data


def create_app(runtime: Runtime | None = None, queue: Any = None, catalog: Catalog | None = None) -> Flask:
    """Build the app. Plans are loaded and validated here, so a bad plans.yaml stops start-up with its error.
    Tests pass their own ``runtime`` (emulators, clock) and may pass a ``queue`` or ``catalog``."""
    rt = runtime or Runtime(Settings.from_env())
    if runtime is None:
        logs.configure(rt.settings.on_app_engine)
    # Plans, queues and cron jobs are read and checked against each other now, not on the first request.
    check_deployment_files(rt.plans, rt.settings.queue_yaml, rt.settings.cron_yaml)
    if queue is not None:
        rt.client("queue", lambda: queue)  # the one queue for handlers and services (notifications) alike
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.extensions["backup"] = {
        "runtime": rt,
        "queue": (lambda: queue)
        if queue is not None
        else (lambda: rt.client("queue", lambda: make_queue(rt.settings))),
        "catalog": (lambda: catalog)
        if catalog is not None
        else (lambda: rt.client("catalog", lambda: Catalog(rt.datastore()))),
    }

    from handlers import admin, alerts, cron, status, tasks

    app.register_blueprint(cron.bp)
    app.register_blueprint(tasks.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(status.bp)  # /, /api/status, /metrics
    app.register_blueprint(alerts.bp)  # /tasks/_notify, /cron/_stale, /cron/_digest

    @app.before_request
    def _trace() -> None:
        g.trace_token = logs.current_trace.set(
            logs.trace_from_header(request.headers.get("X-Cloud-Trace-Context"), rt.settings.project)
        )

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        return jsonify({"ok": True, "plans": len(rt.plans)})

    from cli import backup

    app.cli.add_command(backup)
    return app


app = create_app()
