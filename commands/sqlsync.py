"""``backup sqlsync PLAN``: run a production -> staging sync in this process, step by step, printing each step.

The steps are the ones the queue runs (kinds/sqlsync), driven by services/jobs.drive, which retries a transient
failure with backoff as the queue would. ``--stop-at STEP`` ends after that step, ``--start-at STEP --period P``
resumes a run (the dump files and objects of a run are named by its period, printed at the start), ``--dry-run``
prints the steps and runs only the read-only ``check``. Exit codes: 0 done, 1 failed (not worth retrying), 75 failed
but worth retrying (EX_TEMPFAIL).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import click

from commands import current_runtime
from kinds.sqlsync.steps import STEPS
from services.errors import BackupError, TransientError
from services.kinds import RunContext

EX_TEMPFAIL = 75
STEP = click.Choice(STEPS)


def _period(value: str | None) -> datetime | None:
    if value is None:
        return None
    for fmt in ("%Y%m%dT%H%M%SZ", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            parsed = datetime.strptime(value, fmt)
        except ValueError:
            continue
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    raise click.BadParameter(f"expected e.g. 20261123T020000Z, got {value!r}", param_hint="--period")


@click.command("sqlsync")
@click.argument("plan_name")
@click.option("--start-at", type=STEP, default=None, help="Resume at this step (needs --period of the run).")
@click.option("--stop-at", type=STEP, default=None, help="Stop after this step.")
@click.option("--period", "period_text", default=None, help="Period of the run to resume, e.g. 20261123T020000Z.")
@click.option("--dry-run", is_flag=True, help="Print the steps and run only the read-only safety/schema check.")
@click.option("--keep-files", is_flag=True, help="Keep the run's dump files when it fails (they hold unmasked data).")
def sqlsync_command(
    plan_name: str, start_at: str | None, stop_at: str | None, period_text: str | None, dry_run: bool, keep_files: bool
) -> None:
    """Copy production into staging with personal data masked (a plan of kind sqlsync)."""
    from kinds.sqlsync import kind as sqlsync
    from kinds.sqlsync.errors import HalfDone
    from services import jobs

    rt = current_runtime()
    try:
        plans = rt.plans
    except BackupError as exc:  # plans.yaml is wrong: one line naming the plan and field, no traceback
        raise click.ClickException(str(exc)) from exc
    plan = plans.get(plan_name)
    if plan is None:
        raise click.UsageError(f"no plan named {plan_name!r}; plans: {', '.join(sorted(plans))}")
    if plan.kind != sqlsync.KIND.name:
        raise click.UsageError(f"plan {plan_name!r} is of kind {plan.kind}, not {sqlsync.KIND.name}")
    period = _period(period_text)
    if start_at and STEPS.index(start_at) > 1 and period is None:
        raise click.UsageError(f"--start-at {start_at} resumes a run: give that run's --period")
    if start_at and stop_at and STEPS.index(stop_at) < STEPS.index(start_at):
        raise click.UsageError(f"--stop-at {stop_at} comes before --start-at {start_at}")
    period = period or rt.now().astimezone(UTC).replace(microsecond=0)
    stamp = period.strftime("%Y%m%dT%H%M%SZ")
    target = sqlsync.enumerate_targets(plan, None, rt).targets[0]
    run = RunContext(
        run_id=f"{plan.name}-cli-{stamp}", plan=plan.name, target_key=target.key, period=period, on_log=click.echo
    )
    if dry_run:
        click.echo(sqlsync.describe(plan, target, rt))
        start_at, stop_at = "check", "check"
    else:
        click.echo(f"run period {stamp} (resume with --start-at STEP --period {stamp})")
    try:
        outcome = sqlsync.drive(
            plan, run, rt, start_at=start_at, stop_at=stop_at, retry=jobs.DRIVE_RETRY, keep_files=keep_files
        )
    except TransientError as exc:
        click.echo(f"error (worth retrying): {exc}", err=True)
        sys.exit(EX_TEMPFAIL)
    except BackupError as exc:
        cause = exc.__cause__
        if isinstance(cause, HalfDone):
            click.echo(f"resume with: backup sqlsync {plan.name} --start-at {cause.restart_at} --period {stamp}")
        raise click.ClickException(str(exc)) from exc
    if dry_run:
        click.echo("dry run: the check passed; nothing was changed")
    else:
        click.echo(f"reached step {outcome.stats['step_reached']}: {outcome.stats['timings']}")


commands = [sqlsync_command]
