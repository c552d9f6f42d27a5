"""Kind ``sqlsync``: copy a production MySQL database into staging with personal data masked and staging's own
rows (demo accounts ...) kept.

One plan is one sync and has one target (named after the staging database). A ``job`` kind: the sync is a chain
of steps (kinds/sqlsync/steps.py) run by our own code on the worker that has the MariaDB client tools, as many
per task as its time budget allows, each task ending in a checkpoint the next one resumes from. Safety: staging must
not resolve to production (checked in the plan and on the live servers), a masking rule naming a column that no
longer exists stops the run listing the columns, staging is backed up before it is overwritten, and after the
import a sample of production's personal values is looked for in staging. See docs/sqlsync.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from google.api_core.retry import Retry

from kinds.sqlsync.plan import Settings
from kinds.sqlsync.steps import STEPS, advance, first_state
from services.errors import PermanentError
from services.kinds import Done, DrillsIn, Execution, Outcome, RunContext, Target, TargetPage
from services.plans import Plan
from services.runtime import Runtime

# The CLI and tests see a failure at once unless they ask for the queue-like retries of services/jobs.py.
NO_RETRY = Retry(predicate=lambda exc: False)


def enumerate_targets(plan: Plan[Settings], page_token: str | None, rt: Runtime) -> TargetPage:
    """One plan is one sync: a single target named after the staging database."""
    staging = plan.settings.staging
    return TargetPage([Target(key=f"{staging.role}-{staging.database}", params={})])


def resolve_target(plan: Plan[Settings], key: str, rt: Runtime) -> Target:
    """The one sync of the plan; a task names it, nothing in its body changes what it does."""
    target = enumerate_targets(plan, None, rt).targets[0]
    if key != target.key:
        raise PermanentError(f"refused: {key[:200]!r} is not plan {plan.name}'s sync ({target.key})")
    return target


def describe(plan: Plan[Settings], target: Target, rt: Runtime) -> str:
    settings = plan.settings
    lines = [
        f"sync {settings.production.label()} -> {settings.staging.label()} via scratch {settings.scratch.label()}"
        f" ({settings.profile} profile)"
    ]
    for step in STEPS:
        lines.append(f"  {step}: {_step_summary(settings, step)}")
    return "\n".join(lines)


def _step_summary(settings: Settings, step: str) -> str:
    ruled = sorted({f"{r.table}.{r.column}={r.kind}" for r in settings.rules})
    stream = settings.mask_mode == "stream"
    return {
        "check": "refuse if staging or scratch is production (as the servers see it), a column has neither a rule"
        " nor an allow entry, a rule names a missing column, or a masked value cannot fit its column",
        "export-production": f"dump {settings.production.label()}",
        "import-scratch": (
            f"mask {', '.join(ruled)} of the export object into another object, then import that into"
            f" {settings.scratch.label()}"
            if stream and settings.profile == "cloudsql"
            else f"empty {settings.scratch.label()} and load the production dump"
            + (f", masking {', '.join(ruled)} on the way in" if stream else "")
        ),
        "mask": "nothing left: masked during import-scratch" if stream else f"mask {', '.join(ruled)}",
        "preserve": "re-insert staging rows "
        + (", ".join(f"{t} WHERE {w}" for t, w in settings.preserve.items()) or "(none)"),
        "scan-scratch": "look for sampled production values in every text column of scratch",
        "export-scratch": "skipped: scratch shares the staging server, its tables are moved"
        if settings.moves_tables
        else f"dump the masked {settings.scratch.label()}",
        "backup-staging": f"safety backup of {settings.staging.label()}",
        "import-staging": f"move the masked tables into {settings.staging.label()} (RENAME TABLE)"
        if settings.moves_tables
        else f"load the masked dump into {settings.staging.label()}",
        "verify": f"look for {settings.verify_sample} sampled production values per table in staging",
        "cleanup-scratch": f"drop every table of {settings.scratch.label()} and delete the unmasked dump",
    }[step]


def start(plan: Plan[Settings], target: Target, run: RunContext, rt: Runtime) -> Outcome:
    """Begin at ``check`` (or the step an admin's trigger named, ``run.options['start_at']``) and go on as far as
    the budget allows. Step ranges come only from the trigger's record or the CLI, never from a task body."""
    state = first_state(run)
    run.log(f"sqlsync {plan.name}: starting at step {state['step']}")
    return advance(plan, state, run, rt)


def poll(plan: Plan[Settings], target: Target, state: dict[str, Any], run: RunContext, rt: Runtime) -> Outcome:
    """Go on from the checkpoint the run's record holds."""
    return advance(plan, state, run, rt)


class SqlSync(DrillsIn):
    """The ``sqlsync`` kind: production copied into staging, masked, in checkpointed steps."""

    name = "sqlsync"
    default_queue = "sqlsync"
    execution: Execution = "job"
    drill_module = "kinds.sqlsync.drill"

    # The module's functions keep the contract themselves (kinds/checked.py has mypy hold them to it).
    enumerate = staticmethod(enumerate_targets)
    resolve = staticmethod(resolve_target)
    start = staticmethod(start)
    poll = staticmethod(poll)
    describe = staticmethod(describe)


KIND = SqlSync()


def drive(
    plan: Plan[Settings],
    run: RunContext,
    rt: Runtime,
    *,
    start_at: str | None = None,
    stop_at: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    budget_seconds: float | None = None,
    retry: Retry = NO_RETRY,
    keep_files: bool = False,
) -> Done:
    """Run the sync (from ``start_at``, up to ``stop_at``) in this process through services/jobs.drive, exactly as
    the queue runs it across tasks: the CLI, the bench and tests."""
    from services import jobs

    target = enumerate_targets(plan, None, rt).targets[0]
    run.options = {k: v for k, v in (("start_at", start_at), ("stop_at", stop_at), ("keep_files", keep_files)) if v}
    return jobs.drive(KIND, plan, target, run, rt, budget_seconds=budget_seconds, sleep=sleep, retry=retry)
