"""What the status page, ``/api/status`` and ``/metrics`` show: every plan and target with its last good backup,
that backup's age against the plan's RPO, the last failure, the next scheduled run and where the backup lives.

One model (``StatusView``) feeds all three, so the page, the JSON and the metrics never disagree.

Health of a target: green while its last good copy is younger than 75 % of the RPO, amber up to the RPO, red past
it or when it has no good copy. Without an RPO there is no age to judge: green with a good copy, red without.
A target whose latest run failed is at least amber whatever its age: a job that started failing tonight must show
before its RPO runs out, not after.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from services.catalog import FAILED, Catalog, TargetState
from services.stale import AMBER_FRACTION, FANOUT_TARGET, PLAN_UNIT, AlertStore, is_real_target

GREEN, AMBER, RED, GREY = "green", "amber", "red", "grey"
_SEVERITY = {GREEN: 0, GREY: 1, AMBER: 2, RED: 3}


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


def location_url(output: str | None) -> str | None:
    """A link a person can open for a backup's location: gs:// paths and Compute resources go to the Cloud
    Console; https URLs as they are; anything else (a local path) has no link."""
    if not output:
        return None
    if output.startswith("gs://"):
        path = output[len("gs://") :].rstrip("/")
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


@dataclass
class TargetRow:
    target: str
    health: str
    last_status: str | None
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

    @property
    def age(self) -> str:
        return age_text(self.age_seconds)

    @property
    def failing(self) -> bool:
        return self.last_status == FAILED

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("last_good_at", "last_failure_at"):
            data[key] = _iso(data[key])
        return data


@dataclass
class PlanRow:
    name: str
    kind: str
    description: str
    rpo_hours: float | None
    schedule: str | None
    next_run: datetime | None
    health: str
    targets: list[TargetRow] = field(default_factory=list)
    fanout_error: str | None = None  # the last fan-out failed (after the last good backup of any target)
    fanout_failed_at: datetime | None = None
    fanout_run_id: str | None = None
    never_ran: bool = False
    never_ran_stale: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["next_run"] = _iso(self.next_run)
        data["fanout_failed_at"] = _iso(self.fanout_failed_at)
        data["targets"] = [t.to_json() for t in self.targets]
        return data


@dataclass
class StatusView:
    generated_at: datetime
    plans: list[PlanRow]

    @property
    def counts(self) -> dict[str, int]:
        counts = {GREEN: 0, AMBER: 0, RED: 0, "failing": 0}
        for plan in self.plans:
            for target in plan.targets:
                counts[target.health] = counts.get(target.health, 0) + 1
                counts["failing"] += 1 if target.failing else 0
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
            problems.append(f"{counts['failing']} failing")
        if counts[RED]:
            problems.append(f"{counts[RED]} red")
        fanouts = sum(1 for p in self.plans if p.fanout_error)
        if fanouts:
            problems.append(f"{fanouts} plan{'s' if fanouts > 1 else ''} could not list targets")
        if problems:
            return "needs attention: " + ", ".join(problems)
        if counts[AMBER]:
            return f"getting old: {counts[AMBER]} amber"
        return "all good" if self.health == GREEN else "nothing recorded yet"

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at.isoformat(),
            "health": self.health,
            "headline": self.headline,
            "counts": self.counts,
            "plans": [p.to_json() for p in self.plans],
        }


def _row(state: TargetState, rpo_hours: float | None, now: datetime, stale: bool) -> TargetRow:
    age = (now - state.last_good_at).total_seconds() if state.last_good_at else None
    return TargetRow(
        target=state.target,
        health=health(state.last_good_at, rpo_hours, now, failing=state.last_status == FAILED),
        last_status=state.last_status,
        last_good_at=state.last_good_at,
        age_seconds=age,
        last_good_output=state.last_good_output,
        location_url=location_url(state.last_good_output),
        last_good_run_id=state.last_good_run_id,
        last_failure_at=state.last_failure_at,
        last_error=state.last_error,
        last_failure_run_id=state.last_failure_run_id,
        last_run_id=state.last_run_id,
        stale_alert=stale,
    )


def build_status(rt: Any, catalog: Catalog, schedules: dict[str, Any]) -> StatusView:
    """Read the catalog once and judge every plan and target at ``rt.now()``."""
    now = rt.now()
    states_by_plan: dict[str, list[TargetState]] = {}
    for state in catalog.target_states():
        states_by_plan.setdefault(state.plan, []).append(state)
    alerts = AlertStore(catalog.client, catalog.namespace)
    plans = []
    for plan in sorted(rt.plans.values(), key=lambda p: p.name):
        states = states_by_plan.get(plan.name, [])
        stale = {name for name, a in alerts.for_plan(plan.name).items() if a.stale}
        rows = [_row(s, plan.rpo_hours, now, s.target in stale) for s in states if is_real_target(s.target)]
        rows.sort(key=lambda r: (-_SEVERITY[r.health], r.target))
        schedule = schedules.get(plan.name)
        row = PlanRow(
            name=plan.name,
            kind=plan.kind,
            description=plan.description,
            rpo_hours=plan.rpo_hours,
            schedule=schedule.text if schedule else None,
            next_run=schedule.next_fire(now) if schedule else None,
            health=GREY,
            targets=rows,
            never_ran=not rows,
            never_ran_stale=PLAN_UNIT in stale,
        )
        fanout = next((s for s in states if s.target == FANOUT_TARGET), None)
        newest_good = max((r.last_good_at for r in rows if r.last_good_at), default=None)
        if fanout and fanout.last_failure_at and (newest_good is None or fanout.last_failure_at > newest_good):
            row.fanout_error = fanout.last_error
            row.fanout_failed_at = fanout.last_failure_at
            row.fanout_run_id = fanout.last_failure_run_id
        worst = max((r.health for r in rows), key=_SEVERITY.__getitem__, default=GREY)
        if row.fanout_error or row.never_ran_stale:
            worst = RED
        row.health = worst
        plans.append(row)
    return StatusView(generated_at=now, plans=plans)


# ------------------------------------------------------------------------------------------------- metrics


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value:.17g}" if inner else f"{name} {value:.17g}"


def render_metrics(view: StatusView) -> str:
    """Prometheus text exposition (version 0.0.4). A target without a good copy has no last-success sample, which
    is what ``absent()`` alerts expect; ``backup_target_has_good_copy`` says so explicitly."""
    families: dict[str, tuple[str, list[str]]] = {
        "backup_last_success_timestamp_seconds": ("Unix time of the target's last good backup.", []),
        "backup_last_failure_timestamp_seconds": ("Unix time of the target's last failed run.", []),
        "backup_last_run_failed": ("1 when the target's most recent run failed.", []),
        "backup_target_has_good_copy": ("1 when the target has at least one good backup.", []),
        "backup_target_health": ("0 green, 1 amber (past 75% of the RPO), 2 red (past the RPO or no copy).", []),
        "backup_plan_rpo_seconds": ("The plan's recovery point objective.", []),
        "backup_plan_next_run_timestamp_seconds": ("Unix time of the plan's next scheduled run.", []),
        "backup_plan_fanout_failed": ("1 when the plan's latest fan-out failed (no targets were enqueued).", []),
    }
    level = {GREEN: 0, AMBER: 1, RED: 2}

    def add(name: str, labels: dict[str, str], value: float) -> None:
        families[name][1].append(_sample(name, labels, value))

    for plan in view.plans:
        plan_labels = {"plan": plan.name}
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
    lines = []
    for name, (help_text, samples) in families.items():
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(samples)
    return "\n".join(lines) + "\n"
