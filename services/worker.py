"""One task, one target: start or poll its backup, record the outcome, and decide what the queue hears.

The answer's status code is the contract with the queue (DESIGN.md): 2xx when the task is done, whether it
succeeded or failed for good (recorded, notified); 429/5xx when a retry may help. This module is the one place
that maps ``TransientError`` / ``PermanentError`` / ``TargetGone`` to those answers.

A task body is a claim, not authority. It names a run id, a period and a target key; the worker checks that the
run id is the one those three give, that the period is one the plan's schedule (or a recorded admin trigger)
allows, and then looks the target up again from the plan and the live resource. Nothing else in the body is used.
A poll names a run, which must belong to the plan in the URL. Whatever is refused is recorded and answered 2xx.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from google.api_core import exceptions as core

import kinds
from services import drills, notify
from services.catalog import (
    DRILL,
    FAILED,
    PENDING,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    Catalog,
    ManualTrigger,
    RunRecord,
    StaleRecord,
)
from services.errors import ConfigError, PermanentError, TargetGone, TransientError
from services.fanout import POLL_QUEUE, FanoutResult, fan_out, manual_period, period_refusal, run_id
from services.kinds import BackupRef, Done, Outcome, Pending, Restorable, RunContext, Target
from services.plans import Plan
from services.queue import QueueConfig, TaskQueue, TaskSpec, load_queue_configs
from services.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """What the queue said about this delivery (X-AppEngine-* / X-CloudTasks-* headers)."""

    queue: str = ""
    task_name: str = ""
    retry_count: int = 0


@dataclass
class Answer:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


def _queue_config(rt: Runtime, name: str) -> QueueConfig:
    configs: dict[str, QueueConfig] = rt.client("queue-configs", lambda: load_queue_configs(rt.settings.queue_yaml))
    return configs.get(name, QueueConfig(name))


def _log_delivery(rt: Runtime, plan: str, delivery: Delivery, what: str) -> None:
    if delivery.retry_count >= rt.settings.retry_error_threshold:
        log.error(
            "%s for plan %s is on retry %d (task %s): look at its last error",
            what,
            plan,
            delivery.retry_count,
            delivery.task_name,
            extra={"plan": plan},
        )
    elif delivery.retry_count:
        log.warning("%s for plan %s: retry %d", what, plan, delivery.retry_count, extra={"plan": plan})


def record_bad_task(rt: Runtime, catalog: Catalog, plan_name: str, payload: Any, problem: str) -> Answer:
    """A task that can never succeed (malformed body, unknown plan): recorded as failed, answered 2xx."""
    raw = json.dumps(payload, sort_keys=True, default=str) if not isinstance(payload, bytes) else repr(payload)
    identifier = "invalid-" + hashlib.sha256(f"{plan_name}\n{raw}".encode()).hexdigest()[:16]
    now = rt.now()
    shown_plan = plan_name if len(plan_name) <= 100 else f"{plan_name[:100]}... ({len(plan_name)} characters)"
    record = RunRecord(
        run_id=identifier,
        plan=shown_plan,
        target="(invalid task)",
        kind="",
        period=now,
        status=FAILED,
        created=now,
        started=now,
        ended=now,
        attempts=1,
        error=problem,
        log=[f"task body: {raw[:500]}"],
    )
    catalog.save(record)
    log.error("plan %s: rejected a task: %s", shown_plan, problem, extra={"plan": shown_plan, "run_id": identifier})
    return Answer(200, {"status": FAILED, "run_id": identifier, "error": problem})


def _known_plan(rt: Runtime, catalog: Catalog, plan_name: str, payload: Any) -> Plan[Any] | Answer:
    """The plan a task names, or the recorded 2xx answer for a plan that is no longer in plans.yaml."""
    plan = rt.plans.get(plan_name)
    if plan is None:
        return record_bad_task(rt, catalog, plan_name, payload, f"plan {plan_name!r} is not in plans.yaml")
    return plan


def storage_errors_are_transient(handler: Callable[..., Answer]) -> Callable[..., Answer]:
    """Run records that cannot be read or written (contention, Datastore unavailable) leave no record to keep the
    task's outcome: answer 503 so the queue delivers it again, rather than a 500 nobody classified."""

    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Answer:
        try:
            return handler(*args, **kwargs)
        except (
            core.Aborted,
            core.Conflict,
            core.ServiceUnavailable,
            core.DeadlineExceeded,
            core.InternalServerError,
            core.TooManyRequests,
            core.GatewayTimeout,
            core.BadGateway,
            core.RetryError,
        ) as exc:
            log.warning("run records unavailable, the task will be retried: %s", exc)
            return Answer(503, {"error": f"run records unavailable: {exc}", "retry": True})

    return wrapped


@storage_errors_are_transient
def run_backup_task(
    rt: Runtime, catalog: Catalog, queue: TaskQueue, plan_name: str, payload: Any, delivery: Delivery
) -> Answer:
    plan = _known_plan(rt, catalog, plan_name, payload)
    if isinstance(plan, Answer):
        return plan
    try:
        identifier, period, key = _parse_backup_claim(payload)
    except ValueError as exc:
        return record_bad_task(rt, catalog, plan_name, payload, f"malformed task body: {exc}")
    expected = run_id(plan.name, key, period)
    if identifier != expected:
        return record_bad_task(
            rt,
            catalog,
            plan_name,
            payload,
            f"refused: run id {identifier!r} is not the one for target {key!r} in"
            f" period {period.isoformat()} ({expected!r})",
        )
    existing = catalog.get(identifier)
    if existing is not None and (existing.final or existing.state is not None):
        return _duplicate(rt, queue, plan, existing)
    trigger = catalog.trigger(plan.name, period)
    refusal = period_refusal(rt, plan, period, triggered=trigger is not None)
    if refusal is not None:
        if existing is not None:  # a real run that outlived its period: nothing may start for it any more
            return _finish(rt, catalog, plan, existing, FAILED, error=f"not started: {refusal}")
        return record_bad_task(rt, catalog, plan_name, payload, f"refused: {refusal}")
    _log_delivery(rt, plan_name, delivery, f"backup of {key}")
    now = rt.now()
    record, _created = catalog.begin(
        RunRecord(
            run_id=identifier, plan=plan.name, target=key, kind=plan.kind, period=period, created=now, started=now
        )
    )
    if record.final or record.state is not None:
        return _duplicate(rt, queue, plan, record)
    kind = kinds.get(plan.kind)
    run = _run_context(rt, plan, record, delivery, trigger.options if trigger else {})
    record.attempts += 1

    def start() -> Outcome:
        target = kind.resolve(plan, key, rt)
        record.params = target.params  # what the poll needs, from the plan and the live resource
        return kind.start(plan, target, run, rt)

    return _settle(rt, catalog, queue, plan, record, run, delivery, start)


@storage_errors_are_transient
def run_drill_task(
    rt: Runtime, catalog: Catalog, queue: TaskQueue, plan_name: str, payload: Any, delivery: Delivery
) -> Answer:
    """A restore drill of one target: its newest good backup (looked up again, never named by the body) is
    restored into scratch, checked and timed by the kind."""
    plan = _known_plan(rt, catalog, plan_name, payload)
    if isinstance(plan, Answer):
        return plan
    try:
        identifier, period, key = _parse_backup_claim(payload)
    except ValueError as exc:
        return record_bad_task(rt, catalog, plan_name, payload, f"malformed drill task: {exc}")
    if plan.drill is None or _restorable(plan) is None:
        return record_bad_task(rt, catalog, plan_name, payload, f"refused: plan {plan.name} has no restore drill")
    if identifier != drills.drill_run_id(plan, key, period):
        return record_bad_task(rt, catalog, plan_name, payload, f"refused: run id {identifier!r} is not this drill's")
    existing = catalog.get(identifier)
    if existing is not None and (existing.final or existing.state is not None):
        return _duplicate(rt, queue, plan, existing)
    allowed = period in drills.drill_window(plan, rt.now()) or catalog.trigger(plan.name, period) is not None
    if not allowed or period > rt.now():
        return record_bad_task(rt, catalog, plan_name, payload, f"refused: drill period {period.isoformat()}")
    state = catalog.target_state(plan.name, key)
    now = rt.now()
    record, _created = catalog.begin(
        RunRecord(
            run_id=identifier,
            plan=plan.name,
            target=key,
            kind=plan.kind,
            period=period,
            params={"backup_run_id": state.last_good_run_id if state else None},
            created=now,
            started=now,
            purpose=DRILL,
        )
    )
    if record.final or record.state is not None:
        return _duplicate(rt, queue, plan, record)
    run = _run_context(rt, plan, record, delivery, {})
    record.attempts += 1
    return _settle(rt, catalog, queue, plan, record, run, delivery, lambda: _drill_step(rt, catalog, plan, record, run))


def _restorable(plan: Plan[Any]) -> Restorable[Any] | None:
    kind = kinds.get(plan.kind)
    return cast("Restorable[Any]", kind) if hasattr(kind, "drill") else None


def _drill_step(rt: Runtime, catalog: Catalog, plan: Plan[Any], record: RunRecord, run: RunContext) -> Outcome:
    """One step of a drill (``record.state`` None for the first): the backup it restores is the good run recorded
    when the drill began."""
    backup_run_id = record.params.get("backup_run_id")
    backup = catalog.get(backup_run_id) if isinstance(backup_run_id, str) else None
    if backup is None or backup.status != SUCCEEDED or not backup.output:
        raise PermanentError(f"no good backup of {record.target} to restore ({backup_run_id or 'none recorded'})")
    restorable = _restorable(plan)
    assert restorable is not None
    ref = BackupRef(backup.run_id, backup.output, backup.stats, backup.period)
    return restorable.drill(plan, Target(record.target, backup.params), ref, record.state, run, rt)


def _duplicate(rt: Runtime, queue: TaskQueue, plan: Plan[Any], record: RunRecord) -> Answer:
    """A delivery of a run another delivery already started or finished: it must not start a second backup."""
    if record.status == PENDING and record.state is not None:
        _enqueue_poll(rt, queue, plan, record, delay=0)  # make sure the operation in flight is followed
    return Answer(200, {"status": record.status, "run_id": record.run_id, "duplicate": True})


@storage_errors_are_transient
def run_poll_task(
    rt: Runtime, catalog: Catalog, queue: TaskQueue, plan_name: str, payload: Any, delivery: Delivery
) -> Answer:
    plan = _known_plan(rt, catalog, plan_name, payload)
    if isinstance(plan, Answer):
        return plan
    if not isinstance(payload, dict) or not isinstance(payload.get("run_id"), str):
        return record_bad_task(rt, catalog, plan_name, payload, "malformed poll task: expected {'run_id': ...}")
    record = catalog.get(payload["run_id"])
    if record is None:
        return record_bad_task(rt, catalog, plan_name, payload, f"poll for unknown run {payload['run_id'][:200]!r}")
    if record.plan != plan.name:
        return record_bad_task(
            rt, catalog, plan_name, payload, f"refused: run {record.run_id!r} belongs to plan {record.plan!r}"
        )
    if record.final or record.state is None:
        return Answer(200, {"status": record.status, "run_id": record.run_id, "duplicate": True})
    claimed_poll = payload.get("poll")
    if isinstance(claimed_poll, int) and claimed_poll != record.state.get("_polls"):
        # An older poll task delivered again: the newer one is already queued and does the work.
        return Answer(200, {"status": record.status, "run_id": record.run_id, "duplicate": True})
    _log_delivery(rt, plan_name, delivery, f"poll of {record.target}")
    kind = kinds.get(plan.kind)
    target = Target(record.target, record.params)
    run = _run_context(rt, plan, record, delivery, {})
    state = record.state

    def step() -> Outcome:
        if record.purpose == DRILL:
            return _drill_step(rt, catalog, plan, record, run)
        return kind.poll(plan, target, state, run, rt)

    return _settle(rt, catalog, queue, plan, record, run, delivery, step)


@storage_errors_are_transient
def run_fanout_task(
    rt: Runtime, catalog: Catalog, queue: TaskQueue, plan_name: str, payload: Any, delivery: Delivery
) -> Answer:
    plan = _known_plan(rt, catalog, plan_name, payload)
    if isinstance(plan, Answer):
        return plan
    try:
        period = datetime.fromisoformat(payload["period"])
        token = payload["page_token"]
        page = int(payload.get("page", 1))
        if not isinstance(token, str) or period.tzinfo is None:
            raise ValueError("page_token must be a string and period a timezone-aware ISO time")
    except (TypeError, KeyError, ValueError) as exc:
        return record_bad_task(rt, catalog, plan_name, payload, f"malformed fan-out continuation: {exc}")
    refusal = period_refusal(rt, plan, period, triggered=catalog.trigger(plan.name, period) is not None)
    if refusal is not None:
        return record_bad_task(rt, catalog, plan_name, payload, f"refused fan-out continuation: {refusal}")
    _log_delivery(rt, plan_name, delivery, f"fan-out page {page}")
    return answer_fanout(rt, catalog, lambda: fan_out(rt, queue, plan, period, token, page), plan)


def trigger_plan(
    rt: Runtime, catalog: Catalog, queue: TaskQueue, plan: Plan[Any], by: str, options: dict[str, Any] | None = None
) -> Answer:
    """Start ``plan`` by hand now (an admin's HTTP call or the CLI): record who did, so workers accept the manual
    period (and any ``options``, such as a sqlsync step range), then fan out."""
    period = manual_period(rt)
    catalog.record_trigger(ManualTrigger(plan=plan.name, period=period, by=by, options=dict(options or {})))
    return answer_fanout(rt, catalog, lambda: fan_out(rt, queue, plan, period), plan)


def answer_fanout(rt: Runtime, catalog: Catalog, step: Callable[[], Any], plan: Plan[Any]) -> Answer:
    """Run a fan-out step; a permanent failure is recorded against the plan so a stale check can see it, and so is
    each part of the plan that could not be listed (the other parts are backed up)."""
    try:
        result: FanoutResult = step()
        notify.fanout_succeeded(rt, plan)
        for problem in result.problems:
            _record_listing_problem(
                rt, catalog, plan, datetime.fromisoformat(result.period), problem.where, problem.error
            )
        return Answer(200, result.to_json())
    except TransientError as exc:
        log.warning("fan-out of %s will be retried: %s", plan.name, exc, extra={"plan": plan.name})
        return Answer(429 if exc.rate_limited else 503, {"error": str(exc), "retry": True})
    except (PermanentError, ConfigError) as exc:
        now = rt.now()
        identifier = "fanout-" + hashlib.sha256(f"{plan.name}\n{now.isoformat()}".encode()).hexdigest()[:16]
        record = RunRecord(
            identifier,
            plan.name,
            "(fan-out)",
            plan.kind,
            now,
            status=FAILED,
            created=now,
            started=now,
            ended=now,
            attempts=1,
            error=str(exc),
        )
        catalog.save(record)
        notify.run_finished(rt, plan, record)
        log.error("fan-out of %s failed: %s", plan.name, exc, extra={"plan": plan.name, "run_id": identifier})
        return Answer(200, {"status": FAILED, "run_id": identifier, "error": str(exc)})


def _record_listing_problem(
    rt: Runtime, catalog: Catalog, plan: Plan[Any], period: datetime, where: str, error: str
) -> None:
    target = f"{where} (listing)"
    now = rt.now()
    record = RunRecord(
        run_id(plan.name, target, period),
        plan.name,
        target,
        plan.kind,
        period,
        status=FAILED,
        created=now,
        started=now,
        ended=now,
        attempts=1,
        error=error,
    )
    catalog.save(record)
    notify.run_finished(rt, plan, record)
    log.error("fan-out of %s: cannot list %s: %s", plan.name, where, error, extra={"plan": plan.name})


def _parse_backup_claim(payload: Any) -> tuple[str, datetime, str]:
    """(run id, period, target key) from a backup task body; ValueError naming the field that is wrong."""
    if not isinstance(payload, dict):
        raise ValueError("expected a JSON object")
    identifier = payload.get("run_id")
    if not isinstance(identifier, str) or not identifier or len(identifier) > 500:
        raise ValueError("'run_id' must be a non-empty string of at most 500 characters")
    try:
        period = datetime.fromisoformat(str(payload.get("period")))
    except ValueError:
        raise ValueError(f"'period' must be an ISO 8601 time, got {str(payload.get('period'))[:100]!r}") from None
    if period.tzinfo is None:
        raise ValueError("'period' must carry a timezone")
    return identifier, period, Target.from_json(payload.get("target")).key


def _is_job(plan: Plan[Any]) -> bool:
    """A job kind's work is done by our own code, in budgeted chunks; an operation kind's by a cloud operation."""
    return kinds.get(plan.kind).execution == "job"


def _run_context(
    rt: Runtime, plan: Plan[Any], record: RunRecord, delivery: Delivery, options: dict[str, Any]
) -> RunContext:
    def on_log(line: str) -> None:
        log.info("%s: %s", record.target, line, extra={"plan": record.plan, "run_id": record.run_id})

    return RunContext(
        run_id=record.run_id,
        plan=record.plan,
        target_key=record.target,
        period=record.period,
        attempt=delivery.retry_count,
        log_lines=record.log,
        on_log=on_log,
        options=options,
        deadline=time.monotonic() + rt.settings.job_budget_seconds if _is_job(plan) else None,
    )


def _enqueue_poll(rt: Runtime, queue: TaskQueue, plan: Plan[Any], record: RunRecord, delay: float) -> None:
    """The follow-up task: a poll of a cloud operation (the shared polls queue), or a job's next chunk (the plan's
    own queue, so it runs where the job's tools are)."""
    polls = int((record.state or {}).get("_polls", 0))
    queue.enqueue_many(
        [
            TaskSpec(
                queue=plan.queue if _is_job(plan) else POLL_QUEUE,
                path=f"/tasks/{plan.name}/poll",
                payload={"run_id": record.run_id, "poll": polls},
                name=f"{record.run_id}-poll-{polls}",
                schedule_time=rt.now() + timedelta(seconds=delay),
            )
        ]
    )


def _settle(
    rt: Runtime,
    catalog: Catalog,
    queue: TaskQueue,
    plan: Plan[Any],
    record: RunRecord,
    run: RunContext,
    delivery: Delivery,
    step: Callable[[], Outcome],
) -> Answer:
    try:
        outcome = step()
    except TargetGone as exc:
        return _finish(rt, catalog, plan, record, SKIPPED, error=str(exc))
    except PermanentError as exc:
        return _finish(rt, catalog, plan, record, FAILED, error=str(exc))
    except TransientError as exc:
        return _retry(rt, catalog, plan, record, delivery, str(exc), 429 if exc.rate_limited else 503)
    except Exception as exc:  # a bug or an error nobody classified: retried, and visible in the record
        log.exception("unexpected error for %s", record.target, extra={"plan": plan.name, "run_id": record.run_id})
        return _retry(rt, catalog, plan, record, delivery, f"unexpected {type(exc).__name__}: {exc}", 500)
    if isinstance(outcome, Done):
        record.output = outcome.output
        record.stats = outcome.stats
        if outcome.message:
            run.log(outcome.message)
        return _finish(rt, catalog, plan, record, SUCCEEDED)
    if isinstance(outcome, Pending):
        polls = int((record.state or {}).get("_polls", -1)) + 1
        record.state = dict(outcome.state) | {"_polls": polls}
        record.status = PENDING
        record.error = None
        try:
            stored = catalog.update(record, advance=True)
        except StaleRecord as stale:
            return _superseded(stale)
        _enqueue_poll(rt, queue, plan, stored, outcome.delay_seconds)
        return Answer(200, {"status": PENDING, "run_id": record.run_id, "poll_in_seconds": outcome.delay_seconds})
    raise TypeError(f"kind {plan.kind} returned {outcome!r}, not Done or Pending")


def _retry(
    rt: Runtime, catalog: Catalog, plan: Plan[Any], record: RunRecord, delivery: Delivery, error: str, status: int
) -> Answer:
    policy = _queue_config(rt, delivery.queue or plan.queue).retry
    if policy.task_retry_limit is not None and delivery.retry_count >= policy.task_retry_limit:
        # The queue will not deliver this task again: record the failure now rather than leave it "running".
        return _finish(
            rt, catalog, plan, record, FAILED, error=f"gave up after {delivery.retry_count + 1} attempts: {error}"
        )
    record.error = error
    record.log.append(f"attempt {delivery.retry_count + 1} failed, will be retried: {error}")
    if record.status != PENDING:
        record.status = RUNNING
    try:
        catalog.update(record, advance=False)
    except StaleRecord as stale:
        # Another delivery of this run got further (started the backup, or finished it): its state stands.
        return _superseded(stale)
    return Answer(status, {"status": record.status, "run_id": record.run_id, "error": error, "retry": True})


def _superseded(stale: StaleRecord) -> Answer:
    stored = stale.stored
    log.info("run %s: another delivery moved it on to %s; this one's result is dropped", stored.run_id, stored.status)
    return Answer(200, {"status": stored.status, "run_id": stored.run_id, "duplicate": True})


def _finish(
    rt: Runtime, catalog: Catalog, plan: Plan[Any], record: RunRecord, status: str, error: str | None = None
) -> Answer:
    record.status = status
    record.error = error
    record.ended = rt.now()
    record.state = None
    if error:
        record.log.append(f"{status}: {error}")
    try:
        catalog.update(record, advance=True)
    except StaleRecord as stale:
        return _superseded(stale)
    level = logging.ERROR if status == FAILED else logging.INFO
    log.log(
        level,
        "%s %s: %s",
        record.target,
        status,
        error or record.output or "",
        extra={"plan": plan.name, "run_id": record.run_id},
    )
    notify.run_finished(rt, plan, record)
    body = {"status": status, "run_id": record.run_id}
    if error:
        body["error"] = error
    if record.output:
        body["output"] = record.output
    return Answer(200, body)
