"""The ``backup`` command group: ``./backup ...`` (or ``flask --app main backup ...``).

It does what the admin HTTP routes do, from a terminal with credentials: list plans, run a plan (or show what a
run would do), list runs, restore. Kind-specific commands live in ``commands/``.

Errors a person can expect (a broken plans.yaml, no credentials, an emulator or API that cannot be reached, an
unknown plan) are one ``Error:`` line on stderr and an exit code from ``commands.errors`` (docs/cli.md); a
traceback only with ``--debug`` (or ``BACKUP_DEBUG=1``). While ``make run`` is running, commands use its local
emulators and queue without any environment to set (``commands.local_environment``).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

import commands
from commands import LAZY_COMMANDS, QUICK_EXIT, current_runtime
from commands.errors import EXIT_TEMPFAIL, EXIT_USAGE, CliError, explain


class _LazyGroup(click.Group):
    """Kind commands (commands/*.py) are imported only when one of them runs: ``--help`` lists them from
    ``commands.LAZY_COMMANDS``, so no command pays for another kind's client libraries. A module missing from
    that table is imported for every command (slower, never lost; tests/test_cli_imports.py asks for a row)."""

    _unlisted_loaded = False

    def _load(self, module_name: str) -> None:
        for command in getattr(importlib.import_module(module_name), "commands", []):
            self.add_command(command)

    def _load_unlisted(self) -> None:
        if not self._unlisted_loaded:
            self._unlisted_loaded = True
            import pkgutil

            listed = {module for module, _ in LAZY_COMMANDS.values()}
            for info in pkgutil.iter_modules(commands.__path__):
                if f"commands.{info.name}" not in listed:
                    self._load(f"commands.{info.name}")

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_unlisted()
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            if cmd_name in LAZY_COMMANDS:
                self._load(LAZY_COMMANDS[cmd_name][0])
            else:
                self._load_unlisted()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except Exception as exc:
            if _debug(ctx):
                raise
            raise explain(exc) from exc

    def format_commands(self, ctx: click.Context, formatter: Any) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [
            (name, self.commands[name].get_short_help_str(limit))
            if name in self.commands
            else (name, click.Command(name, help=LAZY_COMMANDS[name][1]).get_short_help_str(limit))
            for name in names
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(isinstance(root.obj, dict) and root.obj.get("debug")) or os.environ.get("BACKUP_DEBUG") == "1"


@click.group("backup", cls=_LazyGroup)
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also BACKUP_DEBUG=1).")
@click.pass_context
def backup(ctx: click.Context, debug: bool) -> None:
    """Scheduled, verifiable backups: plans, runs, restores.

    Exit codes: 0 done, 1 the work failed, 2 bad usage or unknown plan, 69 a service could not be reached,
    70 unexpected error, 75 worth retrying, 77 no credentials or not allowed, 78 configuration (docs/cli.md).
    """
    root = ctx.find_root()
    if not isinstance(root.obj, dict):
        root.obj = {}
    root.obj["debug"] = debug or bool(root.obj.get("debug"))


def _plan(name: str):  # type: ignore[no-untyped-def]
    plans = current_runtime().plans
    if name not in plans:
        raise CliError(f"no plan named {name!r}; plans: {', '.join(sorted(plans))}", EXIT_USAGE)
    return plans[name]


@backup.command("plans")
def list_plans() -> None:
    """List the plans in plans.yaml."""
    plans = list(current_runtime().plans.values())
    width = max([len(p.name) for p in plans] + [4]) + 2
    click.echo(f"{'PLAN':<{width}}{'KIND':<11}{'QUEUE':<20}DESCRIPTION")
    for plan in plans:
        click.echo(f"{plan.name:<{width}}{plan.kind:<11}{plan.queue:<20}{plan.description}")


@backup.command("run")
@click.argument("plan_name")
@click.option(
    "--dry-run", "dry_run_only", is_flag=True, help="Print what would be backed up (and pruned), change nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON (for scripts).")
def run_plan(plan_name: str, dry_run_only: bool, as_json: bool) -> None:
    """Run PLAN now: enqueue one task per target (the queue's workers do the backups)."""
    import getpass
    import json

    from services.catalog import Catalog
    from services.fanout import dry_run, manual_period
    from services.queue import make_queue

    rt = current_runtime()
    plan = _plan(plan_name)
    period = manual_period(rt)
    if dry_run_only:
        result = dry_run(rt, plan, period)
        if as_json:
            click.echo(json.dumps(result.to_json()))
            return
        for line in result.dry_run:
            click.echo(line)
        click.echo(f"{result.targets} target(s); nothing was changed")
        return
    from services.worker import trigger_plan

    answer = trigger_plan(rt, Catalog(rt.datastore()), make_queue(rt.settings), plan, by=f"cli:{getpass.getuser()}")
    body = answer.body
    if as_json:
        click.echo(json.dumps(body))
    if body.get("status") == "failed":
        raise CliError(f"{plan.name}: listing its targets failed: {body.get('error')} (run {body.get('run_id')})")
    if answer.status >= 400 or body.get("retry"):
        raise CliError(f"{plan.name}: not started, worth retrying: {body.get('error')}", EXIT_TEMPFAIL)
    if not as_json:
        queued = f"{body.get('enqueued', 0)} task(s) queued"
        if body.get("already_queued"):
            queued += f", {body['already_queued']} already queued for this period"
        more = "; the rest of the targets follow in a continuation task" if body.get("continuation") else ""
        click.echo(f"{plan.name}: {body.get('targets', 0)} target(s), {queued}{more}")
        for problem in body.get("problems", []):
            click.echo(f"  could not list {problem['where']}: {problem['error']}")
        click.echo(f"follow with: ./backup runs --plan {plan.name}")


@backup.command("runs")
@click.option("--plan", "plan_name", default=None, help="Only runs of this plan.")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_runs(plan_name: str | None, limit: int, as_json: bool) -> None:
    """Recent runs, newest first."""
    import json

    from services.catalog import Catalog

    if plan_name is not None:
        _plan(plan_name)
    catalog = Catalog(current_runtime().datastore())
    runs = catalog.recent_runs(limit=limit, plan=plan_name)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in runs], indent=2))
        return
    if not runs:
        click.echo(f"no runs recorded{' for ' + plan_name if plan_name else ''}")
        return
    plan_width = max(len(r.plan) for r in runs) + 2
    target_width = min(max(len(r.target) for r in runs), 48) + 2
    click.echo(f"{'CREATED (UTC)':<21}{'STATUS':<11}{'PLAN':<{plan_width}}{'TARGET':<{target_width}}DETAIL")
    for r in runs:
        when = r.created.strftime("%Y-%m-%d %H:%M:%S") if r.created else "-"
        target = r.target if len(r.target) <= 48 else r.target[:22] + "…" + r.target[-25:]
        detail = r.error or r.output or ""
        click.echo(f"{when:<21}{r.status:<11}{r.plan:<{plan_width}}{target:<{target_width}}{detail}")


@backup.command("restore-datastore")
@click.argument("export_url")
@click.option("--kinds", default="", help="Comma-separated kinds to import (default: all in the export).")
@click.option("--namespaces", default="", help="Comma-separated namespaces (default: all in the export).")
@click.option("--project", default=None, help="Project to import into (default: the service's project).")
@click.option("--safety-prefix", default=None, help="Where the safety export of the overwritten kinds goes.")
def restore_datastore(
    export_url: str, kinds: str, namespaces: str, project: str | None, safety_prefix: str | None
) -> None:
    """Import a Datastore export (its folder or .overall_export_metadata URL), after a safety export."""
    from kinds.datastore import exports as datastore

    rt = current_runtime()
    result = datastore.restore(
        rt,
        export_url,
        project=project,
        kinds=[k for k in kinds.split(",") if k] or None,
        namespaces=[n for n in namespaces.split(",") if n] or None,
        safety_url_prefix=safety_prefix,
    )
    click.echo(f"safety export: {result.safety_export}")
    counted = f"{result.entities} entities" if result.entities else "(the server reported no entity count)"
    click.echo(f"imported {counted} from {result.imported_from}")


def main() -> None:
    """Entry point of ``./backup``: the same group, without typing ``flask --app main``.

    A command that leaves ``QUICK_EXIT`` set in the context's object has nothing left to clean up: the process
    ends without the interpreter's teardown (freeing every module and object one by one), once its output is
    flushed."""
    obj: dict[str, Any] = {}
    try:
        backup(prog_name="backup", obj=obj, args=sys.argv[1:])
    except SystemExit as done:
        if obj.get(QUICK_EXIT):
            _exit_now(done.code)
        raise


def _exit_now(code: object) -> None:
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # as sys.exit("message") does
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1
    os._exit(code or 0)
