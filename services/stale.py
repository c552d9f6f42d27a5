"""The stale-backup check: is every known target's last good copy younger than its plan's RPO?

A backup that silently stopped is the failure nobody reports, so this check does not wait for a failed run. Run by
cron (``/cron/_stale``), it looks at every plan with ``rpo_hours`` and every target the catalog knows of that plan:

- a target whose last good copy is older than the RPO, or that never had one for a whole RPO since the check
  first saw it, is stale. That covers targets that disappeared (no new runs) and targets never enqueued because
  the fan-out failed (their last good copy just gets older; the alert carries the fan-out's error);
- a plan with no target at all in the catalog (it never ran, or its fan-out always failed) is checked as one unit
  named ``(plan)``, from the moment the check first saw it.

Per-unit alert state (``StaleAlert`` in the catalog namespace) makes it report once when a unit goes stale and once
when it recovers, however often the cron fires. Each change is an alert event (services/alerts.py), grouped by plan
and reason with every other unit that changed the same way: a failed listing that leaves 10,000 disks stale is one
message. The event is stored before the unit is marked stale, so a change is never marked without being reported.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from services import alerts, notify, summary
from services.catalog import FAILED, NAMESPACE, SKIPPED, Catalog, TargetState
from services.summary import AMBER_FRACTION, is_real_target

__all__ = ["AMBER_FRACTION", "is_real_target"]  # still importable from here

log = logging.getLogger(__name__)

STALE_KIND = "StaleAlert"
PLAN_UNIT = "(plan)"
FANOUT_TARGET = "(fan-out)"  # what services/worker.py records a failed fan-out against


@dataclass
class StaleAlert:
    plan: str
    target: str
    first_seen: datetime
    stale: bool = False
    since: datetime | None = None  # when the check found it stale
    reason: str | None = None
    recovered_at: datetime | None = None


@dataclass
class StaleChange:
    plan: str
    target: str
    change: str  # notify.STALE or notify.RECOVERED
    reason: str


@dataclass
class StaleReport:
    checked: int = 0
    stale: list[str] = field(default_factory=list)  # "plan/target" of every unit stale after this check
    changes: list[StaleChange] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "stale": self.stale, "changes": [asdict(c) for c in self.changes]}


class AlertStore:
    """StaleAlert entities, one per (plan, unit), in the catalog's namespace."""

    def __init__(self, client: Any, namespace: str = NAMESPACE):
        self.client = client
        self.namespace = namespace

    def _key(self, plan: str, target: str) -> Any:
        return self.client.key(STALE_KIND, f"{plan}/{target}", namespace=self.namespace)

    def for_plan(self, plan: str) -> dict[str, StaleAlert]:
        from google.cloud.datastore.query import PropertyFilter

        query = self.client.query(kind=STALE_KIND, namespace=self.namespace)
        query.add_filter(filter=PropertyFilter("plan", "=", plan))
        known = StaleAlert.__dataclass_fields__
        found = (StaleAlert(**{k: v for k, v in dict(e).items() if k in known}) for e in query.fetch())
        return {a.target: a for a in found}

    def get_many(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], StaleAlert]:
        """The alerts of the given (plan, unit) pairs that exist, by key."""
        known = StaleAlert.__dataclass_fields__
        found: dict[tuple[str, str], StaleAlert] = {}
        unique = sorted(set(pairs))
        for start in range(0, len(unique), 500):
            keys = [self._key(plan, target) for plan, target in unique[start : start + 500]]
            for entity in self.client.get_multi(keys):
                alert = StaleAlert(**{k: v for k, v in dict(entity).items() if k in known})
                found[(alert.plan, alert.target)] = alert
        return found

    def mark_attention(self, plan: str, target: str, since: datetime) -> None:
        """List a stale target among those needing attention on the status page (services/summary.py)."""
        if is_real_target(target):
            key = summary.attention_key(self.client, self.namespace, plan, summary.STALE_REASON, target)
            self.client.put(summary.attention_entity(self.client, key, plan, summary.STALE_REASON, target, since))

    def clear_attention(self, plan: str, target: str) -> None:
        if is_real_target(target):
            self.client.delete(summary.attention_key(self.client, self.namespace, plan, summary.STALE_REASON, target))

    def put(self, alert: StaleAlert) -> None:
        from google.cloud import datastore

        entity = datastore.Entity(self._key(alert.plan, alert.target), exclude_from_indexes=("reason",))
        entity.update(asdict(alert))
        self.client.put(entity)


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _reason(
    state: TargetState | None, now: datetime, rpo: timedelta, first_seen: datetime, latest_run: datetime | None
) -> str:
    """Why a unit is stale, in words an on-call person can act on."""
    if state is None:
        parts = [f"no run of this plan recorded in the {_hours(now - first_seen)} since the check first saw it"]
    elif state.last_good_at is None:
        parts = [f"no good copy in the {_hours(now - first_seen)} since the check first saw this target"]
    else:
        parts = [f"last good copy {_hours(now - state.last_good_at)} ago (RPO {_hours(rpo)})"]
    if state is not None:
        if state.last_status == FAILED:
            parts.append(f"last run failed: {state.last_error}")
        elif state.last_status == SKIPPED:
            parts.append("last run was skipped (the target may be gone)")
        if latest_run and state.last_run_at and state.last_run_at < latest_run - rpo:
            parts.append("it was not part of the plan's recent runs (removed or renamed?)")
    return "; ".join(parts)


def check_stale(rt: Any, catalog: Catalog, store: AlertStore | None = None, queue: Any = None) -> StaleReport:
    """Compare every known unit of every plan with an RPO against ``rt.now()``; report changes."""
    store = store or AlertStore(catalog.client, catalog.namespace)
    report = StaleReport()
    now = rt.now()
    for plan in rt.plans.values():
        if plan.rpo_hours is None:
            continue
        rpo = timedelta(hours=plan.rpo_hours)
        states = catalog.target_states(plan.name)
        targets = {s.target: s for s in states if is_real_target(s.target)}
        fanout = next((s for s in states if s.target == FANOUT_TARGET), None)
        latest_run = max((s.last_run_at for s in targets.values() if s.last_run_at), default=None)
        known = store.for_plan(plan.name)
        units: dict[str, TargetState | None] = dict(targets) if targets else {PLAN_UNIT: None}
        for name, state in units.items():
            report.checked += 1
            alert = known.get(name) or StaleAlert(plan.name, name, first_seen=now)
            good_at = state.last_good_at if state else None
            is_stale = now - (good_at or alert.first_seen) > rpo
            reason = _reason(state, now, rpo, alert.first_seen, latest_run) if is_stale else ""
            if is_stale and fanout and fanout.last_failure_at and (good_at is None or fanout.last_failure_at > good_at):
                reason += f"; the plan's fan-out failed at {fanout.last_failure_at:%Y-%m-%d %H:%M} UTC"
                reason += f": {fanout.last_error}"
            episode = (good_at or alert.first_seen).isoformat()  # the same for every checker racing on this unit
            _settle(rt, store, plan, alert, is_stale, reason, state, report, queue, name in known, episode)
        # A unit that no longer applies (the "(plan)" unit once targets exist) is resolved, not left stale forever.
        for name, alert in known.items():
            if name not in units and alert.stale:
                _settle(rt, store, plan, alert, False, "", None, report, queue, True, "")
    return report


def _settle(
    rt: Any,
    alerts_store: AlertStore,
    plan: Any,
    alert: StaleAlert,
    is_stale: bool,
    reason: str,
    state: TargetState | None,
    report: StaleReport,
    queue: Any,
    stored: bool,
    episode: str,
) -> None:
    """Record and announce a change of ``alert``. ``episode`` names a stale episode (the time of the last good copy,
    or first sight): two checks racing on the same unit record the same event, so only one is reported."""
    now = rt.now()
    if is_stale:
        report.stale.append(f"{plan.name}/{alert.target}")
    if is_stale and not alert.stale:
        # The event first: if it cannot be stored this raises, the unit stays unmarked and the next check tries again.
        if notify.has_channels(plan):
            alerts.record(
                rt, plan, alerts.STALE, alert.target, reason, _run_id(state), _output(state), episode, queue=queue
            )
        alert.stale, alert.since, alert.reason = True, now, reason
        alerts_store.put(alert)
        alerts_store.mark_attention(plan.name, alert.target, now)
        labels = {"plan": plan.name, "target": alert.target}
        log.error("backup stale: plan %s, target %s: %s", plan.name, alert.target, reason, extra=labels)
        report.changes.append(StaleChange(plan.name, alert.target, notify.STALE, reason))
    elif not is_stale and alert.stale:
        episode = alert.since.isoformat() if alert.since else ""  # as stored: racing checks read the same value
        good = f"good copy at {state.last_good_at:%Y-%m-%d %H:%M} UTC" if state and state.last_good_at else "resolved"
        if notify.has_channels(plan):
            alerts.recovered(rt, plan, alert.target, _run_id(state), _output(state), episode, queue=queue)
        alert.stale, alert.recovered_at = False, now
        alerts_store.put(alert)
        alerts_store.clear_attention(plan.name, alert.target)
        log.info("backup recovered: plan %s, target %s: %s", plan.name, alert.target, good, extra={"plan": plan.name})
        report.changes.append(StaleChange(plan.name, alert.target, notify.RECOVERED, good))
    elif not stored:
        alerts_store.put(alert)  # remember first_seen: a target that never succeeds goes stale one RPO later


def _run_id(state: TargetState | None) -> str | None:
    return (state.last_good_run_id or state.last_run_id) if state else None


def _output(state: TargetState | None) -> str | None:
    return state.last_good_output if state else None
