"""``GET /cron/<plan>``: App Engine cron (or an admin) starts a plan's fan-out for the current schedule period."""

from __future__ import annotations

from dataclasses import asdict

from flask import Blueprint, jsonify

from handlers import catalog, queue, runtime
from handlers.auth import cron_only
from services.drills import schedule_drills
from services.fanout import current_period, fan_out
from services.worker import answer_fanout

bp = Blueprint("cron", __name__)


def unknown_plan(name: str) -> tuple[object, int]:
    known = sorted(runtime().plans)
    return jsonify({"error": f"no plan named {name!r}", "plans": known}), 404


@bp.get("/cron/_drills")
@cron_only
def due_drills():  # type: ignore[no-untyped-def]
    """Hourly: enqueue the restore drills that are due, plan by plan."""
    rt = runtime()
    now = rt.now()
    scheduled = [
        asdict(schedule_drills(plan, catalog(), queue(), now)) for plan in rt.plans.values() if plan.drill is not None
    ]
    return jsonify({"plans": scheduled})


@bp.get("/cron/<plan_name>")
@cron_only
def run_cron(plan_name: str):  # type: ignore[no-untyped-def]
    rt = runtime()
    plan = rt.plans.get(plan_name)
    if plan is None:
        return unknown_plan(plan_name)
    period = current_period(rt, plan)
    answer = answer_fanout(rt, catalog(), lambda: fan_out(rt, queue(), plan, period), plan)
    return jsonify(answer.body), answer.status
