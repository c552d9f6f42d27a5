"""Per-plan summaries kept current by every run, so the status page, /api/status and /metrics cost the same at
100,000 targets as at 10 and never read the run history.

Each plan has ``SHARDS`` ``PlanSummary`` entities; a target always counts in the same shard (a hash of its name),
and the transaction that folds a run into the target's ``TargetState`` (services/catalog.py) moves the target's
*contribution* in its shard: which minute its last good copy is from, whether its latest run failed, its latest
drill. Sharding keeps a burst of 10,000 runs from all writing one entity. Health depends on the time of reading,
so a shard holds a histogram of last-good minutes rather than colours: at any ``now`` the counts of green, amber and
red follow from the plan's RPO (to the minute).

``Attention`` entities (one per target whose latest run failed or that has no good copy; the stale check adds
one per stale target) are what the page lists first: a small kind, read with one query per plan that needs it.

A shard also keeps the names of its targets while it holds few (``MEMBERS_CAP``), so a small plan's rows are read
by key. Summaries of data written before they existed are built once by ``rebuild`` (``backup reindex``, or the
status page when a plan has none).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

SUMMARY_KIND = "PlanSummary"
ATTENTION_KIND = "Attention"
RUNNING_KIND = "RunningRun"  # one per run begun and not yet final: what the page shows as in progress
SHARDS = 16
MEMBERS_CAP = 64  # names kept per shard; past that the plan is "large" and its healthy rows are folded
AMBER_FRACTION = 0.75
FAILED = "failed"
SUCCEEDED = "succeeded"
# Upper bounds (seconds) of the restore-time histogram of the latest drill of each target (Prometheus buckets).
RESTORE_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
STATE_REASON, STALE_REASON = "state", "stale"


def shard_of(plan: str, target: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{plan}/{target}".encode()).digest()[:4], "big") % SHARDS


def is_real_target(name: str) -> bool:
    """Targets named ``(...)`` are bookkeeping (a failed fan-out, a rejected task), not things backed up."""
    return not name.startswith("(")


def _minute(at: datetime | None) -> int | None:
    return int(at.timestamp() // 60) if at is not None else None


@dataclass(frozen=True)
class Contribution:
    """What one target adds to its plan's summary."""

    good_minute: int | None  # the minute of its last good copy
    failing: bool  # its latest run failed
    drill: str | None  # its latest drill's status
    restore_seconds: float | None  # how long that drill's restore took

    @classmethod
    def of(cls, state: Any) -> Contribution | None:
        """``state`` is a TargetState (or None: the target is not known yet). None for bookkeeping targets."""
        if state is None or not is_real_target(state.target):
            return None
        seconds = state.last_drill_seconds if state.last_drill_status == SUCCEEDED else None
        return cls(_minute(state.last_good_at), state.last_status == FAILED, state.last_drill_status, seconds)

    @property
    def needs_attention(self) -> bool:
        return self.failing or self.good_minute is None


def _bucket(seconds: float) -> str:
    for bound in RESTORE_BUCKETS:
        if seconds <= bound:
            return f"{bound:g}"
    return "+Inf"


@dataclass
class Shard:
    """One shard of a plan's summary. Histograms are {minute (str): targets}; JSON keys are strings."""

    total: int = 0
    good: dict[str, int] = field(default_factory=dict)
    failing: dict[str, int] = field(default_factory=dict)  # by last-good minute, "none" without a good copy
    drills: dict[str, int] = field(default_factory=dict)  # latest drill status -> targets
    restore: dict[str, int] = field(default_factory=dict)  # restore-time bucket -> targets (latest good drill)
    restore_sum: float = 0.0
    members: list[str] | None = field(default_factory=list)

    def apply(self, target: str, before: Contribution | None, after: Contribution | None) -> None:
        if before is not None:
            self._count(before, -1)
        if after is not None:
            self._count(after, +1)
        if before is None and after is not None:
            self.total += 1
            if self.members is not None:
                self.members = sorted({*self.members, target}) if len(self.members) < MEMBERS_CAP else None

    def _count(self, part: Contribution, sign: int) -> None:
        minute = str(part.good_minute) if part.good_minute is not None else None
        if minute is not None:
            _add(self.good, minute, sign)
        if part.failing:
            _add(self.failing, minute or "none", sign)
        if part.drill is not None:
            _add(self.drills, part.drill, sign)
        if part.restore_seconds is not None:
            _add(self.restore, _bucket(part.restore_seconds), sign)
            self.restore_sum += sign * part.restore_seconds

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Shard:
        if not text:
            return cls()
        data = json.loads(text)
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


def _add(counts: dict[str, int], key: str, sign: int) -> None:
    value = counts.get(key, 0) + sign
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


def shard_key(client: Any, namespace: str, plan: str, shard: int) -> Any:
    return client.key(SUMMARY_KIND, f"{plan}#{shard:02d}", namespace=namespace)


def shard_entity(client: Any, key: Any, plan: str, shard: Shard) -> Any:
    from google.cloud import datastore

    entity = datastore.Entity(key, exclude_from_indexes=("data",))
    entity.update({"plan": plan, "data": shard.to_json()})
    return entity


def datastore_entity(key: Any) -> Any:
    from google.cloud import datastore

    return datastore.Entity(key)


def attention_key(client: Any, namespace: str, plan: str, reason: str, target: str) -> Any:
    from services.catalog import key_name

    return client.key(ATTENTION_KIND, key_name(f"{plan}/{reason}/{target}", "attention"), namespace=namespace)


def attention_entity(client: Any, key: Any, plan: str, reason: str, target: str, since: datetime | None) -> Any:
    from google.cloud import datastore

    entity = datastore.Entity(key, exclude_from_indexes=("target",))
    entity.update({"plan": plan, "reason": reason, "target": target, "since": since})
    return entity


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class PlanSummary:
    """A plan's shards added up, and judged at ``now``."""

    plan: str
    total: int = 0
    green: int = 0
    amber: int = 0
    red: int = 0
    failing: int = 0
    no_good: int = 0
    oldest_good_at: datetime | None = None
    newest_good_at: datetime | None = None
    drills: dict[str, int] = field(default_factory=dict)
    restore_buckets: dict[str, int] = field(default_factory=dict)  # cumulative, Prometheus style (le -> targets)
    restore_sum: float = 0.0
    members: list[str] | None = None  # every target's name, when the plan is small
    built: bool = True  # False: no shard exists (data older than summaries): rebuild first

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": self.total,
            "green": self.green,
            "amber": self.amber,
            "red": self.red,
            "failing": self.failing,
            "no_good_copy": self.no_good,
            "oldest_good_at": self.oldest_good_at.isoformat() if self.oldest_good_at else None,
            "drills": dict(self.drills),
        }


def judge(plan: str, shards: Iterable[Shard], rpo_hours: float | None, now: datetime) -> PlanSummary:
    summary = PlanSummary(plan)
    good: dict[int, int] = {}
    failing: dict[str, int] = {}
    restore: dict[str, int] = {}
    members: list[str] | None = []
    for shard in shards:
        summary.total += shard.total
        for minute, count in shard.good.items():
            good[int(minute)] = good.get(int(minute), 0) + count
        for minute, count in shard.failing.items():
            failing[minute] = failing.get(minute, 0) + count
        for status, count in shard.drills.items():
            summary.drills[status] = summary.drills.get(status, 0) + count
        for bucket, count in shard.restore.items():
            restore[bucket] = restore.get(bucket, 0) + count
        summary.restore_sum += shard.restore_sum
        members = None if members is None or shard.members is None else members + shard.members
    summary.members = sorted(members) if members is not None else None
    summary.no_good = summary.total - sum(good.values())
    summary.failing = sum(failing.values())
    if good:
        summary.oldest_good_at = datetime.fromtimestamp(min(good) * 60, UTC)
        summary.newest_good_at = datetime.fromtimestamp(max(good) * 60, UTC)
    red = summary.no_good
    amber = 0
    if rpo_hours is None:
        amber = sum(c for m, c in failing.items() if m != "none")
    else:
        red_before = _minute(now - timedelta(hours=rpo_hours)) or 0
        amber_before = _minute(now - timedelta(hours=rpo_hours) * AMBER_FRACTION) or 0
        red += sum(c for m, c in good.items() if m < red_before)
        amber += sum(c for m, c in good.items() if red_before <= m < amber_before)
        amber += sum(c for m, c in failing.items() if m != "none" and int(m) >= amber_before)
    summary.red, summary.amber = red, amber
    summary.green = summary.total - red - amber
    running = 0
    for bound in (*(f"{b:g}" for b in RESTORE_BUCKETS), "+Inf"):
        running += restore.get(bound, 0)
        summary.restore_buckets[bound] = running
    return summary


def built_key(client: Any, namespace: str, plan: str) -> Any:
    """Marks a plan whose shards count every target (written by ``rebuild``): shards of a plan without it may
    hold only the targets that ran since summaries were introduced."""
    return client.key(SUMMARY_KIND, f"{plan}#built", namespace=namespace)


def read_shards(
    client: Any, namespace: str, plans: list[str], require_built: bool = True
) -> dict[str, list[Shard] | None]:
    """{plan: its shards, or None when its summary was never built (unless ``require_built`` is false)}: one
    batched lookup for every plan."""
    keys = []
    for plan in plans:
        keys.append(built_key(client, namespace, plan))
        keys.extend(shard_key(client, namespace, plan, i) for i in range(SHARDS))
    found: dict[str, list[Shard]] = {}
    built: set[str] = set()
    for start in range(0, len(keys), 1000):
        for entity in client.get_multi(keys[start : start + 1000]):
            if entity.key.name.endswith("#built"):
                built.add(entity["plan"])
            else:
                found.setdefault(entity["plan"], []).append(Shard.from_json(entity.get("data")))
    return {plan: found.get(plan, []) if plan in built or not require_built else None for plan in plans}


def rebuild(client: Any, namespace: str, plan: str, states: Iterable[Any]) -> None:
    """Write ``plan``'s shards afresh from its target states, and the attention entities they imply. For data
    recorded before summaries existed; runs finishing meanwhile may be counted twice until the next rebuild."""
    shards = [Shard() for _ in range(SHARDS)]
    attention = []
    for state in states:
        part = Contribution.of(state)
        if part is None:
            continue
        shards[shard_of(plan, state.target)].apply(state.target, None, part)
        if part.needs_attention:
            key = attention_key(client, namespace, plan, STATE_REASON, state.target)
            attention.append(attention_entity(client, key, plan, STATE_REASON, state.target, state.last_run_at))
    entities = [shard_entity(client, shard_key(client, namespace, plan, i), plan, s) for i, s in enumerate(shards)]
    marker = datastore_entity(built_key(client, namespace, plan))
    marker.update({"plan": plan, "built_at": datetime.now(UTC)})
    entities.append(marker)
    for start in range(0, len(entities), 400):
        client.put_multi(entities[start : start + 400])
    for start in range(0, len(attention), 400):
        client.put_multi(attention[start : start + 400])


def attention_targets(client: Any, namespace: str, plan: str, limit: int) -> list[str]:
    """Up to ``limit`` names of ``plan``'s targets that need attention (failing, no good copy, stale)."""
    from google.cloud.datastore.query import PropertyFilter

    query = client.query(kind=ATTENTION_KIND, namespace=namespace)
    query.add_filter(filter=PropertyFilter("plan", "=", plan))
    names: list[str] = []
    for entity in query.fetch(limit=limit * 2):
        if entity["target"] not in names:
            names.append(entity["target"])
    return names[:limit]


def running_key(client: Any, namespace: str, run_id: str) -> Any:
    from services.catalog import key_name

    return client.key(RUNNING_KIND, key_name(run_id, "running"), namespace=namespace)


def running_entity(client: Any, key: Any, record: Any) -> Any:
    from google.cloud import datastore

    entity = datastore.Entity(key, exclude_from_indexes=("target", "run_id"))
    entity.update(
        {
            "plan": record.plan,
            "target": record.target,
            "run_id": record.run_id,
            "started": record.started or record.created,
            "purpose": record.purpose,
        }
    )
    return entity


@dataclass
class Running:
    target: str
    run_id: str
    started: datetime | None
    purpose: str


def running(client: Any, namespace: str, plan: str, limit: int = 1000) -> list[Running]:
    """Runs of ``plan`` begun and not finished (a small kind: only what is in flight)."""
    from google.cloud.datastore.query import PropertyFilter

    query = client.query(kind=RUNNING_KIND, namespace=namespace)
    query.add_filter(filter=PropertyFilter("plan", "=", plan))
    return [
        Running(e["target"], e["run_id"], e.get("started"), e.get("purpose") or "backup")
        for e in query.fetch(limit=limit)
    ]
