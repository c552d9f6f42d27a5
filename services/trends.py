"""How a plan's data grows: entities and bytes per Datastore kind, run after run, from the run records.

Every Datastore run records ``stats.kinds`` ({kind: {entities, bytes}}); this gathers them per day over a window
(the last good run of each day counts) for ``backup trends PLAN`` and the status page's chart.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from services.catalog import SUCCEEDED, Catalog


@dataclass(frozen=True)
class Point:
    day: date
    entities: int | None
    bytes: int | None


def kind_trends(catalog: Catalog, plan: str, now: datetime, days: int = 90) -> dict[str, list[Point]]:
    """{kind: points oldest first} for the good runs of ``plan`` in the last ``days`` days."""
    since = now - timedelta(days=days)
    latest: dict[tuple[str, date], tuple[datetime, dict[str, Any]]] = {}
    for run in catalog.runs_since(plan, since):
        if run.status != SUCCEEDED:
            continue
        at = run.ended or run.created or run.period
        for kind, figures in (run.stats.get("kinds") or {}).items():
            key = (kind, run.period.date())
            if key not in latest or latest[key][0] < at:
                latest[key] = (at, figures)
    trends: dict[str, list[Point]] = defaultdict(list)
    for (kind, day), (_at, figures) in sorted(latest.items()):
        trends[kind].append(Point(day, figures.get("entities"), figures.get("bytes")))
    return dict(trends)


def trends_from_states(states: list[Any], now: datetime, days: int = 90) -> dict[str, list[Point]]:
    """The same figures from the targets' own summaries (``TargetState.trend``, kept by every good run): what the
    status page draws, without reading the run history. A kind exported by several targets is added up."""
    since = (now - timedelta(days=days)).date()
    per_day: dict[tuple[str, date], list[int | None]] = {}
    for state in states:
        for day_text, figures in (state.trend or {}).items():
            day = date.fromisoformat(day_text)
            if day < since:
                continue
            for kind, (entities, size) in figures.items():
                total = per_day.setdefault((kind, day), [0, 0])
                total[0] = None if entities is None or total[0] is None else total[0] + entities
                total[1] = None if size is None or total[1] is None else total[1] + size
    trends: dict[str, list[Point]] = defaultdict(list)
    for (kind, day), (entities, size) in sorted(per_day.items()):
        trends[kind].append(Point(day, entities, size))
    return dict(trends)
