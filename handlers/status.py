"""The pages people read: ``/`` (every plan at a glance, what needs attention first; ``/?plan=NAME`` one plan's
targets page by page), the HTML view of ``/runs/<id>``, ``/api/status`` (the same as JSON, for scripts, with the
same ``plan`` and ``cursor`` parameters) and ``/metrics`` (Prometheus).

All of it is admin-only: target names and error messages are not for the public. ``/metrics`` also accepts the
scrape token in ``BACKUP_METRICS_TOKEN`` as a bearer token, so a Prometheus scraper needs no admin identity.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app, jsonify, redirect, render_template, request, url_for

from handlers import catalog, runtime
from handlers.auth import admin_only
from services import status as human
from services.catalog import RunRecord
from services.fanout import schedules
from services.status import StatusView, build_status, duration_text, location_url, render_metrics

bp = Blueprint("status", __name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


REFRESH_SECONDS = 60


class UnknownPlan(LookupError):
    pass


def _view(from_request: bool = False) -> StatusView:
    rt = runtime()
    only_plan = cursor = None
    if from_request:
        only_plan = request.args.get("plan") or None
        cursor = request.args.get("cursor") or None
        if only_plan is not None and only_plan not in rt.plans:
            raise UnknownPlan(only_plan)
    return build_status(rt, catalog(), schedules(rt), only_plan=only_plan, cursor=cursor)


def _no_such_plan(name: str) -> tuple[Response, int]:
    plans = ", ".join(sorted(runtime().plans)) or "none"
    return jsonify({"error": f"no plan named {name[:100]!r} (plans: {plans})"}), 404


@bp.get("/")
@admin_only
def status_page():  # type: ignore[no-untyped-def]
    try:
        view = _view(from_request=True)
    except UnknownPlan as exc:
        return _no_such_plan(str(exc))
    rt = runtime()
    html = render_template(
        "status.html",
        view=view,
        project=rt.settings.project,
        refresh=REFRESH_SECONDS,
        human=human,
        colours=human.COLOURS,
        page_size=human.PAGE_SIZE,
    )
    response = Response(html)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/signin")
def local_signin():  # type: ignore[no-untyped-def]
    """A local run only: the one-time link ``make run`` prints gives this browser the local token as a cookie
    (HttpOnly: no script reads it; SameSite=Strict: no other site's page sends it)."""
    from handlers.auth import LOCAL_COOKIE, from_loopback

    rt = runtime()
    expected = rt.secrets.env("BACKUP_LOCAL_SIGNIN_CODE")
    code = request.args.get("code", "")
    used: set[str] = current_app.extensions["backup"].setdefault("signin_used", set())
    ok = (
        rt.settings.local_token is not None
        and not rt.settings.on_app_engine
        and expected is not None
        and from_loopback()
        and hmac.compare_digest(code.encode(), expected.encode())
        and code not in used
    )
    if not ok:
        return jsonify({"error": "this sign-in link is not valid (used already, or not from this make run)"}), 403
    used.add(code)
    response = redirect(url_for("status.status_page"))
    response.set_cookie(LOCAL_COOKIE, rt.settings.local_token, httponly=True, samesite="Strict", path="/")
    return response


@bp.get("/api/status")
@admin_only
def api_status():  # type: ignore[no-untyped-def]
    try:
        return jsonify(_view(from_request=True).to_json())
    except UnknownPlan as exc:
        return _no_such_plan(str(exc))


def wants_html() -> bool:
    """A browser (which asks for text/html first); scripts and curl (*/*) keep getting JSON."""
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def run_page(record: RunRecord) -> Response:
    """One run with its log lines. Called by the admin ``GET /runs/<id>`` route when a browser asks."""
    rt = runtime()
    duration = (record.ended - record.started).total_seconds() if record.ended and record.started else None
    emulator = None if rt.settings.on_app_engine else rt.secrets.env("STORAGE_EMULATOR_HOST")
    html = render_template(
        "run.html",
        run=record,
        duration=duration_text(duration) if duration is not None else None,
        location=location_url(record.output, emulator),
        project=rt.settings.project,
        human=human,
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
