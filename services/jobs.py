"""Running a target to the end in one process: what the queue does across tasks, for the CLI and tests.

In the service a backup moves on one task at a time: ``start``, then a follow-up task per ``Pending`` (a cloud
operation polled later, or a job's checkpoint resumed). ``drive`` does the same here: it calls ``start``, then
``poll`` with each ``Pending``'s state after its delay, and retries a ``TransientError`` with backoff as the queue
would. A job given a time budget (``RunContext.deadline``) stops at each budget and resumes from its checkpoint,
exactly as it does across tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from google.api_core.exceptions import RetryError
from google.api_core.retry import Retry

from services.errors import TransientError
from services.kinds import Done, Outcome, Pending, RunContext, Target

# Like the queue's backoff (queue.yaml), compressed for a person waiting at a terminal: 1 s doubling to 60 s,
# giving up after 15 minutes of failures in a row.
DRIVE_RETRY = Retry(predicate=lambda exc: isinstance(exc, TransientError), initial=1.0, maximum=60.0, timeout=900.0)


def drive(
    kind: Any,
    plan: Any,
    target: Target,
    run: RunContext,
    rt: Any,
    *,
    budget_seconds: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    retry: Retry = DRIVE_RETRY,
    on_pending: Callable[[Pending], None] | None = None,
) -> Done:
    """Run ``target`` of ``plan`` to the end. ``budget_seconds`` gives each step the time budget a task would
    have (None: no budget, a job runs in one go). PermanentError and TargetGone are raised as they come."""

    def step(call: Callable[[], Outcome]) -> Outcome:
        run.deadline = time.monotonic() + budget_seconds if budget_seconds is not None else None
        try:
            outcome: Outcome = retry(call)()
        except RetryError as exc:
            raise TransientError(f"{target.key}: still failing when retries ran out: {exc.cause}") from exc
        return outcome

    outcome = step(lambda: kind.start(plan, target, run, rt))
    while isinstance(outcome, Pending):
        if on_pending is not None:
            on_pending(outcome)
        if outcome.delay_seconds:
            sleep(outcome.delay_seconds)
        state = outcome.state
        outcome = step(lambda state=state: kind.poll(plan, target, state, run, rt))  # type: ignore[misc]
    return outcome


T = TypeVar("T")


def poll_until(
    fetch: Callable[[], T],
    finished: Callable[[T], bool],
    *,
    what: str,
    deadline: float,
    interval: float,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Wait in this process (a CLI restore, never a request) for ``finished(fetch())``, looking every ``interval``
    seconds until ``deadline`` (time.monotonic()), then TransientError. For the APIs whose clients have no
    operation object of their own to wait on (the discovery-based Compute and Filestore clients)."""
    while True:
        sleep(interval)
        current = fetch()
        if finished(current):
            return current
        if time.monotonic() > deadline:
            raise TransientError(f"{what}: still not finished when the wait ran out")
