"""What the status page, ``/api/status`` and ``/metrics`` show: every plan with its targets counted by health, the
targets that need attention first, the last good backup and the last failure of each target shown, the last
restore drill, the growth of a Datastore plan, the next scheduled run, and where each backup lives.

One model (``StatusView``) feeds all three, so the page, the JSON and the metrics never disagree. It is built from
the per-plan summaries and attention lists kept current by every run (services/summary.py) and from the shown
targets' own states, looked up by key: a request's cost depends on what it shows, not on how many targets or how
much history there is. A plan of up to ``SMALL_PLAN`` targets shows all of them; a larger one shows its targets
that need attention (``ROWS_PER_PLAN``) and folds the healthy ones, which ``/?plan=NAME`` lists page by page.

Health of a target: green while its last good copy is younger than 75 % of the RPO, amber up to the RPO, red past
it or when it has no good copy. Without an RPO there is no age to judge: green with a good copy, red without.
A target whose latest run failed is at least amber whatever its age: a job that started failing tonight must show
before its RPO runs out, not after. Plan counts are to the minute (services/summary.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from services import summary as summaries
from services.catalog import FAILED, SUCCEEDED, Catalog, TargetState
from services.stale import FANOUT_TARGET, PLAN_UNIT, AlertStore
from services.summary import AMBER_FRACTION, PlanSummary, is_real_target
from services.trends import Point, trends_from_states

GREEN, AMBER, RED, GREY = "green", "amber", "red", "grey"
_SEVERITY = {GREEN: 0, GREY: 1, AMBER: 2, RED: 3}
SMALL_PLAN = 50  # plans with at most this many targets show every target
ROWS_PER_PLAN = 20  # targets needing attention shown per larger plan on the overview
PAGE_SIZE = 100  # targets per page of one plan (/?plan=NAME)
CHART_KINDS = 6  # kinds drawn per chart; the rest are added up as "other kinds"
CHART_TARGETS = 200  # a Datastore plan with more targets (exports) than this has no chart on the page


def health(last_good_at: datetime | None, rpo_hours: float | None, now: datetime, failing: bool = False) -> str:
    """The colour of one target: its last good copy's age against the RPO, and at least amber when ``failing``
    (its latest run failed)."""
    if last_good_at is None:
        return RED
    by_age = GREEN
    if rpo_hours is not None:
        age = now - last_good_at
        rpo = timedelta(hours=rpo_hours)
        if age > rpo:
            by_age = RED
        elif age > rpo * AMBER_FRACTION:
            by_age = AMBER
    if failing and by_age == GREEN:
        return AMBER
    return by_age


def location_url(output: str | None, storage_emulator: str | None = None) -> str | None:
    """A link a person can open for a backup's location: gs:// paths go to the Cloud Console (or, in a local run,
    to the GCS emulator's listing of the objects), Compute snapshots to the Console, https URLs as they are;
    anything else (a local path) has no link and is shown as text."""
    if not output:
        return None
    if output.startswith("gs://"):
        path = output[len("gs://") :].rstrip("/")
        if storage_emulator:
            bucket, _, prefix = path.partition("/")
            base = storage_emulator.rstrip("/")
            return f"{base}/storage/v1/b/{quote(bucket)}/o?prefix={quote(prefix + '/' if prefix else '')}"
        return "https://console.cloud.google.com/storage/browser/" + quote(path)
    if output.startswith("https://"):
        return output
    if output.startswith("projects/") and "/snapshots/" in output:
        return "https://console.cloud.google.com/compute/snapshotsDetail/" + quote(output)
    return None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def duration_text(seconds: float | None) -> str:
    """A run's or restore's length as a person says it: "0.4 s", "42 s", "1 min 12 s", "2 h 05 min"."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size_text(size: float | int | None) -> str:
    """Bytes in decimal units, as the Cloud Console shows them: "812 B", "2.3 kB", "1.5 GB"."""
    if size is None:
        return "—"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


def short_path(text: str | None, keep: int = 48) -> str:
    """A long backup location cut in the middle, so a table stays readable; the page keeps the whole value in the
    element's title and copy text."""
    if not text or len(text) <= keep:
        return text or ""
    head = keep // 2 - 1
    return f"{text[:head]}…{text[-(keep - head - 1) :]}"


@dataclass
class TargetRow:
    target: str
    health: str
    last_status: str | None
    last_run_at: datetime | None
    last_good_at: datetime | None
    age_seconds: float | None
    last_good_output: str | None
    location_url: str | None
    last_good_run_id: str | None
    last_failure_at: datetime | None
    last_error: str | None
    last_failure_run_id: str | None
    last_run_id: str | None
    stale_alert: bool = False
    last_drill_at: datetime | None = None
    last_drill_status: str | None = None
    last_drill_seconds: float | None = None
    last_drill_error: str | None = None
    last_drill_run_id: str | None = None
    running_since: datetime | None = None  # a run of this target is in progress
    running_run_id: str | None = None

    @property
    def age(self) -> str:
        return age_text(self.age_seconds)

    @property
    def failing(self) -> bool:
        return self.last_status == FAILED

    @property
    def drill_ok(self) -> bool | None:
        return None if self.last_drill_status is None else self.last_drill_status == SUCCEEDED

    @property
    def drill_time(self) -> str:
        return duration_text(self.last_drill_seconds)

    @property
    def short_output(self) -> str:
        return short_path(self.last_good_output)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("last_good_at", "last_failure_at", "last_run_at", "last_drill_at", "running_since"):
            data[key] = _iso(data[key])
        data["drill_ok"] = self.drill_ok
        return data


@dataclass
class Series:
    """One kind's line in a plan's growth chart, scaled into the chart's box."""

    kind: str
    points: list[Point]
    svg_points: str = ""
    latest: int | None = None


@dataclass
class Chart:
    """Entities per kind over the last 90 days, as an inline SVG the page draws without JavaScript."""

    width: int
    height: int
    first_day: str
    last_day: str
    top: int
    series: list[Series]

    def to_json(self) -> dict[str, Any]:
        return {
            "first_day": self.first_day,
            "last_day": self.last_day,
            "kinds": {
                s.kind: [{"day": p.day.isoformat(), "entities": p.entities, "bytes": p.bytes} for p in s.points]
                for s in self.series
            },
        }


COLOURS = ("#1a73e8", "#e37400", "#188038", "#a142f4", "#d93025", "#12b5cb", "#80868b")


def growth_chart(trends: dict[str, list[Point]], width: int = 360, height: int = 90) -> Chart | None:
    """The chart of ``trends`` ({kind: points}), the biggest kinds first; None without two days of figures."""
    if not trends:
        return None
    ranked = sorted(trends.items(), key=lambda item: -max((p.entities or 0) for p in item[1]))
    shown = ranked[:CHART_KINDS]
    if len(ranked) > CHART_KINDS:
        other: dict[Any, int] = {}
        for _kind, points in ranked[CHART_KINDS:]:
            for point in points:
                other[point.day] = other.get(point.day, 0) + (point.entities or 0)
        shown.append(("other kinds", [Point(day, count, None) for day, count in sorted(other.items())]))
    days = sorted({p.day for _, points in shown for p in points})
    if not days:
        return None
    top = max((p.entities or 0) for _, points in shown for p in points) or 1
    span = max((days[-1] - days[0]).days, 1)
    series = []
    for kind, points in shown:
        coords = []
        for point in points:
            if point.entities is None:
                continue
            x = (point.day - days[0]).days / span * (width - 2) + 1
            y = height - 1 - point.entities / top * (height - 2)
            coords.append(f"{x:.1f},{y:.1f}")
        latest = next((p.entities for p in reversed(points) if p.entities is not None), None)
        series.append(Series(kind, points, " ".join(coords), latest))
    return Chart(width, height, days[0].isoformat(), days[-1].isoformat(), top, series)


@dataclass
class PlanRow:
    name: str
    kind: str
    description: str
    rpo_hours: float | None
    schedule: str | None
    next_run: datetime | None
    health: str
    summary: PlanSummary
    targets: list[TargetRow] = field(default_factory=list)
    folded: int = 0  # targets not shown here (healthy targets of a large plan, or past the rows shown)
    fanout_error: str | None = None  # the last fan-out failed (after the last good backup of any target)
    fanout_failed_at: datetime | None = None
    fanout_run_id: str | None = None
    never_ran: bool = False
    never_ran_stale: bool = False
    chart: Chart | None = None
    drills: bool = False  # the plan has restore drills
    next_cursor: str | None = None  # the next page of this plan's targets (/?plan=NAME)
    running: list[summaries.Running] = field(default_factory=list)  # runs begun and not finished (first 1000)

    @property
    def colour(self) -> str:
        return self.health

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "rpo_hours": self.rpo_hours,
            "schedule": self.schedule,
            "next_run": _iso(self.next_run),
            "health": self.health,
            "summary": self.summary.to_json(),
            "targets": [t.to_json() for t in self.targets],
            "folded": self.folded,
            "fanout_error": self.fanout_error,
            "fanout_failed_at": _iso(self.fanout_failed_at),
            "fanout_run_id": self.fanout_run_id,
            "never_ran": self.never_ran,
            "never_ran_stale": self.never_ran_stale,
            "growth": self.chart.to_json() if self.chart else None,
            "next_cursor": self.next_cursor,
            "running": [
                {"target": r.target, "run_id": r.run_id, "started": _iso(r.started), "purpose": r.purpose}
                for r in self.running
            ],
        }


@dataclass
class StatusView:
    generated_at: datetime
    plans: list[PlanRow]
    only_plan: str | None = None  # the view of one plan (/?plan=NAME)

    @property
    def counts(self) -> dict[str, int]:
        counts = {GREEN: 0, AMBER: 0, RED: 0, "failing": 0}
        for plan in self.plans:
            counts[GREEN] += plan.summary.green
            counts[AMBER] += plan.summary.amber
            counts[RED] += plan.summary.red
            counts["failing"] += plan.summary.failing
        return counts

    @property
    def health(self) -> str:
        return max((p.health for p in self.plans), key=_SEVERITY.__getitem__, default=GREY)

    @property
    def headline(self) -> str:
        """What the page says first: the failures and the overdue, counted; "all good" only when nothing is."""
        counts = self.counts
        problems = []
        if counts["failing"]:
            problems.append(f"{counts['failing']:,} failing")
        if counts[RED]:
            problems.append(f"{counts[RED]:,} red")
        fanouts = sum(1 for p in self.plans if p.fanout_error)
        if fanouts:
            problems.append(f"{fanouts} plan{'s' if fanouts > 1 else ''} could not list targets")
        if problems:
            return "needs attention: " + ", ".join(problems)
        if counts[AMBER]:
            return f"getting old: {counts[AMBER]:,} amber"
        return "all good" if self.health == GREEN else "nothing recorded yet"

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at.isoformat(),
            "health": self.health,
            "headline": self.headline,
            "counts": self.counts,
            "plans": [p.to_json() for p in self.plans],
        }


def _row(state: TargetState, rpo_hours: float | None, now: datetime, stale: bool, emulator: str | None) -> TargetRow:
    age = (now - state.last_good_at).total_seconds() if state.last_good_at else None
    return TargetRow(
        target=state.target,
        health=health(state.last_good_at, rpo_hours, now, failing=state.last_status == FAILED),
        last_status=state.last_status,
        last_run_at=state.last_run_at,
        last_good_at=state.last_good_at,
        age_seconds=age,
        last_good_output=state.last_good_output,
        location_url=location_url(state.last_good_output, emulator),
        last_good_run_id=state.last_good_run_id,
        last_failure_at=state.last_failure_at,
        last_error=state.last_error,
        last_failure_run_id=state.last_failure_run_id,
        last_run_id=state.last_run_id,
        stale_alert=stale,
        last_drill_at=state.last_drill_at,
        last_drill_status=state.last_drill_status,
        last_drill_seconds=state.last_drill_seconds,
        last_drill_error=state.last_drill_error,
        last_drill_run_id=state.last_drill_run_id,
    )


def _plan_health(row: PlanRow) -> str:
    s = row.summary
    if s.red or row.fanout_error or row.never_ran_stale:
        return RED
    if s.amber:
        return AMBER
    return GREEN if s.total else GREY


def _summaries(rt: Any, catalog: Catalog, plans: list[Any], now: datetime) -> dict[str, PlanSummary]:
    """Each plan's summary at ``now``; a plan whose summary was never built (data older than summaries) is built
    first, once."""
    names = [p.name for p in plans]
    shards = summaries.read_shards(catalog.client, catalog.namespace, names)
    missing = [name for name, found in shards.items() if found is None]
    for name in missing:
        catalog.rebuild_summary(name)
    if missing:
        shards.update(summaries.read_shards(catalog.client, catalog.namespace, missing))
    return {p.name: summaries.judge(p.name, shards[p.name] or [], p.rpo_hours, now) for p in plans}


def build_status(
    rt: Any, catalog: Catalog, schedules: dict[str, Any], only_plan: str | None = None, cursor: str | None = None
) -> StatusView:
    """The overview of every plan at ``rt.now()``, or (``only_plan``) one plan with its targets page by page from
    ``cursor``."""
    now = rt.now()
    emulator = None if rt.settings.on_app_engine else rt.secrets.env("STORAGE_EMULATOR_HOST")
    plans = sorted(rt.plans.values(), key=lambda p: p.name)
    if only_plan is not None:
        plans = [p for p in plans if p.name == only_plan]
    judged = _summaries(rt, catalog, plans, now)
    alerts = AlertStore(catalog.client, catalog.namespace)

    shown: dict[str, list[str]] = {}
    next_cursors: dict[str, str | None] = {}
    for plan in plans:
        s = judged[plan.name]
        if only_plan is not None:
            attention = summaries.attention_targets(catalog.client, catalog.namespace, plan.name, PAGE_SIZE)
            page, next_cursors[plan.name] = catalog.target_page(plan.name, PAGE_SIZE, cursor)
            names = attention + [n for n in page if n not in attention] if cursor is None else page
        elif s.members is not None and s.total <= SMALL_PLAN:
            names = s.members
        elif s.red or s.amber or s.failing:
            names = summaries.attention_targets(catalog.client, catalog.namespace, plan.name, ROWS_PER_PLAN)
        else:
            names = []
        shown[plan.name] = names
    wanted = [(plan, name) for plan, names in shown.items() for name in names]
    wanted += [(p.name, FANOUT_TARGET) for p in plans]
    charted = [
        p
        for p in plans
        if p.kind == "datastore" and judged[p.name].members is not None and judged[p.name].total <= CHART_TARGETS
    ]
    wanted += [(p.name, name) for p in charted for name in judged[p.name].members or []]
    states = catalog.target_states_for(wanted)
    stale = alerts.get_many(
        [(plan, name) for plan, names in shown.items() for name in names] + [(p.name, PLAN_UNIT) for p in plans]
    )

    rows: list[PlanRow] = []
    for plan in plans:
        s = judged[plan.name]
        schedule = schedules.get(plan.name)
        targets = []
        for name in shown[plan.name]:
            if (plan.name, name) in states and is_real_target(name):
                alert = stale.get((plan.name, name))
                targets.append(
                    _row(states[(plan.name, name)], plan.rpo_hours, now, bool(alert and alert.stale), emulator)
                )
        targets.sort(key=lambda r: (-_SEVERITY[r.health], r.target))
        in_flight = summaries.running(catalog.client, catalog.namespace, plan.name)
        by_target = {r.target: r for r in in_flight if r.purpose != "drill"}
        for target in targets:
            if target.target in by_target:
                target.running_since = by_target[target.target].started
                target.running_run_id = by_target[target.target].run_id
        plan_alert = stale.get((plan.name, PLAN_UNIT))
        row = PlanRow(
            name=plan.name,
            kind=plan.kind,
            description=plan.description,
            rpo_hours=plan.rpo_hours,
            schedule=schedule.text if schedule else None,
            next_run=schedule.next_fire(now) if schedule else None,
            health=GREY,
            summary=s,
            targets=targets,
            folded=max(s.total - len(targets), 0),
            never_ran=s.total == 0,
            never_ran_stale=bool(plan_alert and plan_alert.stale),
            drills=plan.drill is not None,
            next_cursor=next_cursors.get(plan.name),
            running=sorted(in_flight, key=lambda r: (r.started is None, r.started, r.target)),
        )
        fanout = states.get((plan.name, FANOUT_TARGET))
        newest_good = s.newest_good_at
        if fanout and fanout.last_failure_at and (newest_good is None or fanout.last_failure_at > newest_good):
            row.fanout_error = fanout.last_error
            row.fanout_failed_at = fanout.last_failure_at
            row.fanout_run_id = fanout.last_failure_run_id
        if plan in charted:
            members = [states[(plan.name, n)] for n in s.members or [] if (plan.name, n) in states]
            row.chart = growth_chart(trends_from_states(members, now))
        row.health = _plan_health(row)
        rows.append(row)
    rows.sort(key=lambda r: (-_SEVERITY[r.health], r.name))  # what needs attention first
    return StatusView(generated_at=now, plans=rows, only_plan=only_plan)


# ------------------------------------------------------------------------------------------------- metrics


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value:.17g}" if inner else f"{name} {value:.17g}"


def render_metrics(view: StatusView) -> str:
    """Prometheus text exposition (version 0.0.4).

    Per plan, always: targets by health, failing targets, the oldest good copy, drills by result and a histogram
    of restore times. Per target: every target of a plan with at most ``SMALL_PLAN`` targets, and the targets that
    need attention in larger plans (so a scrape stays small at 100,000 targets). A target without a good copy has no
    last-success sample, which is what ``absent()`` alerts expect; ``backup_target_has_good_copy`` says so."""
    families: dict[str, tuple[str, str, list[str]]] = {
        "backup_plan_targets": ("gauge", "Targets of the plan by health (green, amber, red).", []),
        "backup_plan_failing_targets": ("gauge", "Targets of the plan whose latest run failed.", []),
        "backup_plan_targets_without_good_copy": ("gauge", "Targets of the plan with no good backup.", []),
        "backup_plan_oldest_success_timestamp_seconds": (
            "gauge",
            "Unix time of the oldest last-good backup among the plan's targets (to the minute).",
            [],
        ),
        "backup_plan_drills": ("gauge", "Targets of the plan by the result of their latest restore drill.", []),
        "backup_plan_restore_seconds": (
            "histogram",
            "Restore time of the latest passed drill of each target of the plan.",
            [],
        ),
        "backup_last_success_timestamp_seconds": ("gauge", "Unix time of the target's last good backup.", []),
        "backup_last_failure_timestamp_seconds": ("gauge", "Unix time of the target's last failed run.", []),
        "backup_last_run_failed": ("gauge", "1 when the target's most recent run failed.", []),
        "backup_target_has_good_copy": ("gauge", "1 when the target has at least one good backup.", []),
        "backup_target_health": ("gauge", "0 green, 1 amber (failing, or past 75% of the RPO), 2 red.", []),
        "backup_restore_seconds": ("gauge", "How long the restore of the target's latest drill took.", []),
        "backup_drill_success": ("gauge", "1 when the target's latest restore drill passed, 0 when it failed.", []),
        "backup_drill_timestamp_seconds": ("gauge", "Unix time of the target's latest restore drill.", []),
        "backup_plan_rpo_seconds": ("gauge", "The plan's recovery point objective.", []),
        "backup_plan_next_run_timestamp_seconds": ("gauge", "Unix time of the plan's next scheduled run.", []),
        "backup_plan_fanout_failed": (
            "gauge",
            "1 when the plan's latest fan-out failed (no targets were enqueued).",
            [],
        ),
    }
    level = {GREEN: 0, AMBER: 1, RED: 2}

    def add(name: str, labels: dict[str, str], value: float, family: str | None = None) -> None:
        families[family or name][2].append(_sample(name, labels, value))

    for plan in view.plans:
        plan_labels = {"plan": plan.name}
        s = plan.summary
        for colour, count in ((GREEN, s.green), (AMBER, s.amber), (RED, s.red)):
            add("backup_plan_targets", plan_labels | {"health": colour}, count)
        add("backup_plan_failing_targets", plan_labels, s.failing)
        add("backup_plan_targets_without_good_copy", plan_labels, s.no_good)
        if s.oldest_good_at is not None:
            add("backup_plan_oldest_success_timestamp_seconds", plan_labels, s.oldest_good_at.timestamp())
        if plan.drills:
            for result in (SUCCEEDED, FAILED):
                add("backup_plan_drills", plan_labels | {"result": result}, s.drills.get(result, 0))
            for bound, count in s.restore_buckets.items():
                add(
                    "backup_plan_restore_seconds_bucket",
                    plan_labels | {"le": bound},
                    count,
                    "backup_plan_restore_seconds",
                )
            add("backup_plan_restore_seconds_sum", plan_labels, s.restore_sum, "backup_plan_restore_seconds")
            add(
                "backup_plan_restore_seconds_count",
                plan_labels,
                s.restore_buckets.get("+Inf", 0),
                "backup_plan_restore_seconds",
            )
        if plan.rpo_hours is not None:
            add("backup_plan_rpo_seconds", plan_labels, plan.rpo_hours * 3600)
        if plan.next_run is not None:
            add("backup_plan_next_run_timestamp_seconds", plan_labels, plan.next_run.timestamp())
        add("backup_plan_fanout_failed", plan_labels, 1 if plan.fanout_error else 0)
        for target in plan.targets:
            labels = {"plan": plan.name, "target": target.target}
            if target.last_good_at is not None:
                add("backup_last_success_timestamp_seconds", labels, target.last_good_at.timestamp())
            if target.last_failure_at is not None:
                add("backup_last_failure_timestamp_seconds", labels, target.last_failure_at.timestamp())
            add("backup_last_run_failed", labels, 1 if target.failing else 0)
            add("backup_target_has_good_copy", labels, 1 if target.last_good_at else 0)
            add("backup_target_health", labels, level.get(target.health, 2))
            if target.drill_ok is not None:
                add("backup_drill_success", labels, 1 if target.drill_ok else 0)
                if target.last_drill_at is not None:
                    add("backup_drill_timestamp_seconds", labels, target.last_drill_at.timestamp())
                if target.last_drill_seconds is not None:
                    add("backup_restore_seconds", labels, target.last_drill_seconds)
    lines = []
    for name, (kind, help_text, samples) in families.items():
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)
    return "\n".join(lines) + "\n"
