"""The pages people read: ``/`` (every plan and target at a glance), the HTML view of ``/runs/<id>``,
``/api/status`` (the same as JSON, for scripts) and ``/metrics`` (Prometheus).

All of it is admin-only: target names and error messages are not for the public. ``/metrics`` also accepts the
scrape token in ``BACKUP_METRICS_TOKEN`` as a bearer token, so a Prometheus scraper needs no admin identity.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, jsonify, render_template, request

from handlers import catalog, runtime
from handlers.auth import admin_only
from services.catalog import RunRecord
from services.fanout import schedules
from services.status import StatusView, age_text, build_status, location_url, render_metrics

bp = Blueprint("status", __name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _view() -> StatusView:
    rt = runtime()
    return build_status(rt, catalog(), schedules(rt))


@bp.get("/")
@admin_only
def status_page():  # type: ignore[no-untyped-def]
    view = _view()
    response = Response(render_template("status.html", view=view, project=runtime().settings.project))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/api/status")
@admin_only
def api_status():  # type: ignore[no-untyped-def]
    return jsonify(_view().to_json())


def wants_html() -> bool:
    """A browser (which asks for text/html first); scripts and curl (*/*) keep getting JSON."""
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def run_page(record: RunRecord) -> Response:
    """One run with its log lines. Called by the admin ``GET /runs/<id>`` route when a browser asks."""
    rt = runtime()
    duration = (record.ended - record.started).total_seconds() if record.ended and record.started else None
    html = render_template(
        "run.html",
        run=record,
        duration=age_text(duration) if duration is not None else None,
        location=location_url(record.output),
        project=rt.settings.project,
    )
    response = Response(html)
    response.headers["Cache-Control"] = "no-store"
    return response


def _scrape_token_ok() -> bool:
    expected = runtime().secrets.env("BACKUP_METRICS_TOKEN") or ""
    header = request.headers.get("Authorization", "")
    if not expected or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), expected.encode())


@admin_only
def _metrics_for_admin() -> Response:
    return Response(render_metrics(_view()), content_type=METRICS_CONTENT_TYPE)


@bp.get("/metrics")
def metrics():  # type: ignore[no-untyped-def]
    if _scrape_token_ok():
        return Response(render_metrics(_view()), content_type=METRICS_CONTENT_TYPE)
    return _metrics_for_admin()
