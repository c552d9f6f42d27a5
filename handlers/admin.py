"""Admin routes: trigger a plan by hand, list plans and runs."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from handlers import catalog, queue, runtime
from handlers.auth import admin_only
from handlers.cron import unknown_plan
from services.fanout import dry_run, fan_out, manual_period
from services.worker import answer_fanout

bp = Blueprint("admin", __name__)


@bp.post("/admin/plans/<plan_name>/run")
@admin_only
def run_plan(plan_name: str):  # type: ignore[no-untyped-def]
    rt = runtime()
    plan = rt.plans.get(plan_name)
    if plan is None:
        return unknown_plan(plan_name)
    period = manual_period(rt)
    if request.args.get("dry_run") in ("1", "true"):
        return jsonify(dry_run(rt, plan, period).to_json()), 200
    answer = answer_fanout(rt, catalog(), lambda: fan_out(rt, queue(), plan, period), plan)
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
    try:
        limit = min(max(int(request.args.get("limit", "50")), 1), 500)
    except ValueError:
        return jsonify({"error": "limit: expected a whole number"}), 400
    store = catalog()
    return jsonify(
        {
            "runs": [r.to_json() for r in store.recent_runs(limit=limit, plan=plan)],
            "targets": [s.to_json() for s in store.target_states(plan)],
        }
    )


@bp.get("/runs/<run_id>")
@admin_only
def show_run(run_id: str):  # type: ignore[no-untyped-def]
    record = catalog().get(run_id)
    if record is None:
        return jsonify({"error": f"no run {run_id!r}"}), 404
    return jsonify(record.to_json())
