"""``backup trends PLAN``: entities and bytes per Datastore kind over the last days, from the run records."""

from __future__ import annotations

import json

import click

from commands import current_runtime
from commands.errors import EXIT_USAGE, CliError
from services.catalog import Catalog
from services.trends import kind_trends


@click.command("trends")
@click.argument("plan_name")
@click.option("--days", default=90, show_default=True, help="How far back to look.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trends_command(plan_name: str, days: int, as_json: bool) -> None:
    """Entities and bytes per kind of a datastore PLAN, one line per day with a good run."""
    rt = current_runtime()
    plan = rt.plans.get(plan_name)
    if plan is None:
        raise CliError(f"no plan named {plan_name!r}; plans: {', '.join(sorted(rt.plans))}", EXIT_USAGE)
    if plan.kind != "datastore":
        what = f"plan {plan_name!r} is of kind {plan.kind}: trends are recorded for datastore plans"
        raise CliError(what, EXIT_USAGE)
    trends = kind_trends(Catalog(rt.datastore()), plan_name, rt.now(), days)
    if as_json:
        click.echo(json.dumps({k: [p.__dict__ | {"day": p.day.isoformat()} for p in v] for k, v in trends.items()}))
        return
    if not trends:
        click.echo(f"no good runs of {plan_name} with per-kind figures in the last {days} days")
        return
    click.echo(f"{'day':<12}{'kind':<32}{'entities':>14}{'bytes':>16}{'change':>10}")
    for kind, points in sorted(trends.items()):
        previous = None
        for point in points:
            change = ""
            if previous is not None and previous.entities and point.entities is not None:
                change = f"{(point.entities - previous.entities) / previous.entities:+.1%}"
            entities = "-" if point.entities is None else f"{point.entities:,}"
            size = "-" if point.bytes is None else f"{point.bytes:,}"
            click.echo(f"{point.day.isoformat():<12}{kind[:31]:<32}{entities:>14}{size:>16}{change:>10}")
            previous = point


commands = [trends_command]
