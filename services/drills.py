"""Restore drills on a schedule: which targets are due, and the drill tasks that prove their newest backups.

A plan with ``drill: {every: 7d}`` has each target's newest good backup restored into a scratch place once per
drill period (periods are counted from a fixed Monday, so weekly drills land on Mondays, daily ones at midnight
UTC). The hourly ``/cron/_drills`` enqueues the due ones, at most ``drill.max_scratch`` per plan at a time (each
holds a scratch restore: a disk, a database, a folder), as named tasks so a second cron fire adds nothing. The
worker runs them like backups (services/worker.py ``run_drill_task``), and a failed drill is reported like a
failed backup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.catalog import Catalog
from services.fanout import run_id
from services.plans import Plan
from services.queue import TaskQueue, TaskSpec

_EPOCH = datetime(2001, 1, 1, tzinfo=UTC)  # a Monday


@dataclass
class DrillSchedule:
    """What one ``/cron/_drills`` fire did for one plan."""

    plan: str
    period: str
    due: list[str] = field(default_factory=list)
    enqueued: int = 0
    waiting: int = 0  # due, but the plan's scratch slots are taken: the next fire enqueues them


def drill_period(plan: Plan[Any], now: datetime) -> datetime:
    """The drill period ``now`` falls in."""
    assert plan.drill is not None
    every = plan.drill.interval
    return _EPOCH + ((now - _EPOCH) // every) * every


def previous_drill_period(plan: Plan[Any], now: datetime) -> datetime:
    assert plan.drill is not None
    return drill_period(plan, now) - plan.drill.interval


def drill_run_id(plan: Plan[Any], target_key: str, period: datetime) -> str:
    """The task name and run id of one target's drill in one drill period (never a backup's run id)."""
    return run_id(plan.name, f"drill {target_key}", period)


def drill_task(plan: Plan[Any], target_key: str, period: datetime) -> TaskSpec:
    identifier = drill_run_id(plan, target_key, period)
    return TaskSpec(
        queue=plan.queue,
        path=f"/tasks/{plan.name}/drill",
        payload={"run_id": identifier, "period": period.isoformat(), "target": {"key": target_key}},
        name=identifier,
    )


def schedule_drills(
    plan: Plan[Any], catalog: Catalog, queue: TaskQueue, now: datetime, period: datetime | None = None
) -> DrillSchedule:
    """Enqueue the drills of ``plan`` that are due in ``period`` (default: the current drill period), oldest drill
    first, as many as the plan's free scratch slots allow."""
    assert plan.drill is not None
    period = period or drill_period(plan, now)
    result = DrillSchedule(plan.name, period.isoformat())
    due = [
        state
        for state in catalog.target_states(plan.name)
        if state.last_good_run_id and (state.last_drill_at is None or state.last_drill_at < period)
    ]
    due.sort(key=lambda s: (s.last_drill_at or _EPOCH, s.target))
    result.due = [s.target for s in due]
    slots = max(plan.drill.max_scratch - len(catalog.active_drills(plan.name)), 0)
    tasks = [drill_task(plan, s.target, period) for s in due[:slots]]
    result.enqueued = sum(queue.enqueue_many(tasks)) if tasks else 0
    result.waiting = len(due) - len(tasks)
    return result


def drill_window(plan: Plan[Any], now: datetime) -> tuple[datetime, datetime]:
    """The drill periods a drill task may name (the current one, or the previous when it arrives late)."""
    return drill_period(plan, now), previous_drill_period(plan, now)
