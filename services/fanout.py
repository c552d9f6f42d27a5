"""Fan-out: enumerate a plan's targets one page at a time and enqueue one task per target.

Task names are deterministic (plan + target + schedule period), so a second cron fire in the same period, a retried
cron request or a duplicated continuation task enqueues nothing new. A plan with more targets than one request
should handle hands its page token to a continuation task.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kinds
from services.kinds import ListingProblem, Target
from services.plans import Plan
from services.queue import TaskQueue, TaskSpec
from services.runtime import Runtime
from services.schedule import Schedule, load_cron, plan_schedules

log = logging.getLogger(__name__)

FANOUT_QUEUE = "fanout"
POLL_QUEUE = "polls"
_UNSAFE = re.compile(r"[^a-z0-9]+")


@dataclass
class FanoutResult:
    plan: str
    period: str
    targets: int = 0
    enqueued: int = 0
    already_queued: int = 0
    continuation: bool = False
    dry_run: list[str] = field(default_factory=list)
    problems: list[ListingProblem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("dry_run", "problems"):
            if not data[optional]:
                data.pop(optional)
        return data


def period_stamp(period: datetime) -> str:
    return period.astimezone(UTC).strftime("%Y%m%dt%H%M%S")


def run_id(plan: str, target_key: str, period: datetime) -> str:
    """The task name and run id of one target in one period: valid as a Cloud Tasks task id
    ([A-Za-z0-9_-], at most 500 chars) and led by a hash, which Cloud Tasks shards on better than a prefix
    shared by every task."""
    stamp = period_stamp(period)
    digest = hashlib.sha256(f"{plan}\n{target_key}\n{stamp}".encode()).hexdigest()[:10]
    slug = _UNSAFE.sub("-", target_key.lower()).strip("-")[:80] or "target"
    return f"{digest}-{plan}-{slug}-{stamp}"


def schedules(rt: Runtime) -> dict[str, Schedule]:
    found: dict[str, Schedule] = rt.client("cron-schedules", lambda: plan_schedules(load_cron(rt.settings.cron_yaml)))
    return found


def current_period(rt: Runtime, plan: Plan[Any]) -> datetime:
    """The schedule period of ``now`` for a cron-triggered run (a plan without a cron entry: the UTC day)."""
    schedule = schedules(rt).get(plan.name)
    now = rt.now()
    if schedule is None:
        return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return schedule.period_start(now)


def previous_period(rt: Runtime, plan: Plan[Any]) -> datetime:
    """The schedule period before the current one: a task enqueued just before a period ended may arrive after."""
    current = current_period(rt, plan)
    schedule = schedules(rt).get(plan.name)
    if schedule is None:
        return current - timedelta(days=1)
    return schedule.period_start(current - timedelta(microseconds=1))


def manual_period(rt: Runtime) -> datetime:
    """A run started by hand is its own period (to the second): it runs even if cron already ran today."""
    return rt.now().astimezone(UTC).replace(microsecond=0)


def period_refusal(rt: Runtime, plan: Plan[Any], period: datetime, triggered: bool) -> str | None:
    """Why a task for ``period`` must not run, or None when it may. A task body only claims its period: the
    period names the backup and decides what retention keeps, so only the plan's current or previous schedule
    period, or a period an authenticated admin started (``triggered``: a ManualTrigger is recorded), is accepted."""
    if period > rt.now():
        return f"period {period.isoformat()} is in the future"
    allowed = (current_period(rt, plan), previous_period(rt, plan))
    if period in allowed or triggered:
        return None
    return (
        f"period {period.isoformat()} is neither the current ({allowed[0].isoformat()}) nor the previous"
        f" ({allowed[1].isoformat()}) schedule period of plan {plan.name}, nor one an admin started"
    )


def backup_task(plan: Plan[Any], target: Target, period: datetime) -> TaskSpec:
    identifier = run_id(plan.name, target.key, period)
    return TaskSpec(
        queue=plan.queue,
        path=f"/tasks/{plan.name}",
        payload={"run_id": identifier, "period": period.isoformat(), "target": target.to_json()},
        name=identifier,
    )


def fan_out(
    rt: Runtime,
    queue: TaskQueue,
    plan: Plan[Any],
    period: datetime,
    page_token: str | None = None,
    page: int = 0,
) -> FanoutResult:
    """Enumerate one page of ``plan``'s targets and enqueue a task for each, plus a continuation if more remain."""
    kind = kinds.get(plan.kind)
    result = FanoutResult(plan=plan.name, period=period.isoformat())
    target_page = kind.enumerate(plan, page_token, rt)
    tasks = [backup_task(plan, target, period) for target in target_page.targets]
    created = queue.enqueue_many(tasks) if tasks else []
    result.targets = len(tasks)
    result.enqueued = sum(created)
    result.already_queued = len(created) - result.enqueued
    result.problems = list(target_page.problems)
    if target_page.next_page_token:
        token = target_page.next_page_token
        token_hash = hashlib.sha256(token.encode()).hexdigest()[:10]
        continuation = TaskSpec(
            queue=FANOUT_QUEUE,
            path=f"/tasks/{plan.name}/fanout",
            payload={"period": period.isoformat(), "page_token": token, "page": page + 1},
            name=f"{token_hash}-{plan.name}-fanout-{period_stamp(period)}-p{page + 1}",
        )
        queue.enqueue_many([continuation])
        result.continuation = True
    log.info(
        "fan-out %s page %d: %d targets, %d enqueued, %d already queued%s",
        plan.name,
        page,
        result.targets,
        result.enqueued,
        result.already_queued,
        ", continues" if result.continuation else "",
        extra={"plan": plan.name},
    )
    return result


def dry_run(rt: Runtime, plan: Plan[Any], period: datetime) -> FanoutResult:
    """What a run would do, changing nothing: every page enumerated, each target described by its kind."""
    kind = kinds.get(plan.kind)
    result = FanoutResult(plan=plan.name, period=period.isoformat())
    token: str | None = None
    while True:
        target_page = kind.enumerate(plan, token, rt)
        for problem in target_page.problems:
            result.problems.append(problem)
            result.dry_run.append(f"{problem.where}: cannot list targets, would record a failure: {problem.error}")
        for target in target_page.targets:
            result.targets += 1
            result.dry_run.append(kind.describe(plan, target, rt))
        token = target_page.next_page_token
        if not token:
            return result
