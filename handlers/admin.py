"""Admin routes: trigger a plan by hand, list plans and runs."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request

from handlers import catalog, queue, runtime
from handlers import status as status_pages
from handlers.auth import admin_only, same_site_only
from handlers.cron import unknown_plan
from services.fanout import dry_run, manual_period
from services.worker import trigger_plan

bp = Blueprint("admin", __name__)

_TRUE, _FALSE = ("1", "true"), ("0", "false")
_RUN_OPTIONS = {"sqlsync": ("start_at", "stop_at")}  # what a trigger may pass on to a kind, per kind


class BadRequest(ValueError):
    pass


def _flag(value: Any, where: str) -> bool:
    """A yes/no parameter: only known spellings, so a typo can never turn a dry run into a real one."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadRequest(f"{where}: expected true or false (or 1 / 0), got {str(value)[:40]!r}")


def _run_request(kind: str) -> tuple[bool, dict[str, Any]]:
    """(dry run?, options) from the query string and an optional JSON body; anything unknown is refused."""
    unknown = sorted(set(request.args) - {"dry_run"})
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r} (known: dry_run)")
    body = request.get_json(silent=True) if request.content_length else {}
    if not isinstance(body, dict):
        raise BadRequest('the request body must be a JSON object, e.g. {"dry_run": true}')
    allowed = ("dry_run", *_RUN_OPTIONS.get(kind, ()))
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise BadRequest(f"body field {extra[0]!r} is not accepted for a {kind} plan (accepted: {', '.join(allowed)})")
    dry = False
    if "dry_run" in request.args:
        dry = _flag(request.args["dry_run"], "query parameter dry_run")
    if "dry_run" in body:
        dry = _flag(body["dry_run"], "body field dry_run") or dry
    options = {name: body[name] for name in _RUN_OPTIONS.get(kind, ()) if body.get(name) is not None}
    for name, value in options.items():
        if not isinstance(value, str):
            raise BadRequest(f"body field {name!r}: expected a string")
    return dry, options


@bp.post("/admin/plans/<plan_name>/run")
@admin_only
@same_site_only
def run_plan(plan_name: str):  # type: ignore[no-untyped-def]
    rt = runtime()
    plan = rt.plans.get(plan_name)
    if plan is None:
        return unknown_plan(plan_name)
    try:
        dry, options = _run_request(plan.kind)
    except BadRequest as exc:
        return jsonify({"error": str(exc)}), 400
    if dry:
        return jsonify(dry_run(rt, plan, manual_period(rt)).to_json()), 200
    answer = trigger_plan(rt, catalog(), queue(), plan, by=g.caller.identity, options=options)
    return jsonify(answer.body), answer.status


@bp.get("/admin/plans")
@admin_only
def list_plans():  # type: ignore[no-untyped-def]
    plans = runtime().plans
    return jsonify(
        [{"name": p.name, "kind": p.kind, "description": p.description, "queue": p.queue} for p in plans.values()]
    )


@bp.get("/runs")
@admin_only
def list_runs():  # type: ignore[no-untyped-def]
    plan = request.args.get("plan") or None
    if plan is not None and plan not in runtime().plans:
        return unknown_plan(plan)
    try:
        limit = min(max(int(request.args.get("limit", "50")), 1), 500)
    except ValueError:
        return jsonify({"error": "limit: expected a whole number"}), 400
    store = catalog()
    runs = store.recent_runs(limit=limit, plan=plan)
    # The targets of the runs listed, not every target of every plan (/api/status pages through those).
    states = store.target_states_for([(r.plan, r.target) for r in runs])
    return jsonify(
        {
            "runs": [r.to_json() for r in runs],
            "targets": [states[key].to_json() for key in sorted(states)],
        }
    )


@bp.get("/runs/<run_id>")
@admin_only
def show_run(run_id: str):  # type: ignore[no-untyped-def]
    record = catalog().get(run_id)
    if record is None:
        return jsonify({"error": f"no run {run_id!r}"}), 404
    if status_pages.wants_html():
        return status_pages.run_page(record)
    return jsonify(record.to_json())
