"""Run records: every task's outcome, kept in Datastore in the service's own namespace.

``BackupRun`` (key: the run id, which is the task name) holds one run of one target; ``TargetState`` (key: plan
and target) holds the last good and last failed run of a target, so "when was the last good copy?" is one lookup;
``ManualTrigger`` (key: plan and period) records that an authenticated admin started a plan by hand, which is what
lets a worker accept that period. The namespace keeps these bookkeeping kinds out of the user's data and out of
Datastore kind discovery.

Every delivery must leave a record, whatever its body says, so keys are never taken on trust: a name Datastore
would refuse (empty, reserved ``__x__``, over the key size limit) is stored under a derived key with the original
kept as a property. Records change only in transactions that re-read what is stored (``update``), so a duplicate
delivery working from an older state can never write over a newer one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from services import summary

NAMESPACE = "backup-scheduler"
RUN_KIND = "BackupRun"
TARGET_KIND = "TargetState"
TRIGGER_KIND = "ManualTrigger"
BOOKKEEPING_KINDS = frozenset({RUN_KIND, TARGET_KIND, TRIGGER_KIND})
MAX_LOG_LINES = 200
TREND_DAYS = 90
MAX_KEY_BYTES = 500  # Datastore allows 1,500 bytes per key name; run ids are task names (at most 500 characters)
_RESERVED_NAME = re.compile(r"^__.*__$")
_CONTENTION_ATTEMPTS = 3

RUNNING, PENDING, SUCCEEDED, FAILED, SKIPPED = "running", "pending", "succeeded", "failed", "skipped"
BACKUP, DRILL = "backup", "drill"
FINAL_STATUSES = frozenset({SUCCEEDED, FAILED, SKIPPED})


@dataclass
class RunRecord:
    run_id: str
    plan: str
    target: str
    kind: str
    period: datetime
    params: dict[str, Any] = field(default_factory=dict)  # the target's params, so a poll needs only the run id
    status: str = RUNNING
    created: datetime | None = None
    started: datetime | None = None
    ended: datetime | None = None
    attempts: int = 0
    error: str | None = None
    output: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None  # a long operation in flight (what poll needs)
    log: list[str] = field(default_factory=list)
    step: int = 0  # counts state changes (started, each poll, final): a write from an older step is stale
    purpose: str = BACKUP  # BACKUP, or DRILL: a restore of the newest good backup into scratch, checked and timed

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("period", "created", "started", "ended"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass
class TargetState:
    plan: str
    target: str
    last_status: str | None = None
    last_run_id: str | None = None
    last_run_at: datetime | None = None
    last_run_period: datetime | None = None
    last_good_run_id: str | None = None
    last_good_at: datetime | None = None
    last_good_output: str | None = None
    last_good_period: datetime | None = None
    last_failure_run_id: str | None = None
    last_failure_at: datetime | None = None
    last_error: str | None = None
    last_drill_run_id: str | None = None
    last_drill_at: datetime | None = None
    last_drill_status: str | None = None
    last_drill_seconds: float | None = None  # how long the restore took
    last_drill_error: str | None = None
    # {day: {kind: [entities, bytes]}} of the last good run of each day, TREND_DAYS days: the status page's chart,
    # read with the target instead of from the run history
    trend: dict[str, dict[str, list[int | None]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in (
            "last_run_at",
            "last_run_period",
            "last_good_at",
            "last_good_period",
            "last_failure_at",
            "last_drill_at",
        ):
            data[key] = data[key].isoformat() if data[key] else None
        return data

    def record_run(self, record: RunRecord) -> None:
        """Fold a final run into this target's summary. A run of an older period that ends late (a slow poll, a
        redelivered task) updates the failure fields but never moves "last run" or "last good" back in time. A
        drill only updates the drill fields: restoring a backup says nothing about the next backup."""
        at = record.ended or record.started
        if record.purpose == DRILL:
            if self.last_drill_at is None or (at is not None and at >= self.last_drill_at):
                self.last_drill_run_id = record.run_id
                self.last_drill_at = at
                self.last_drill_status = record.status
                seconds = record.stats.get("restored_in_seconds")
                self.last_drill_seconds = float(seconds) if isinstance(seconds, int | float) else None
                self.last_drill_error = record.error
            return
        if self.last_run_period is None or record.period >= self.last_run_period:
            self.last_status = record.status
            self.last_run_id = record.run_id
            self.last_run_at = at
            self.last_run_period = record.period
        if record.status == SUCCEEDED and (self.last_good_period is None or record.period >= self.last_good_period):
            self.last_good_run_id = record.run_id
            self.last_good_at = at
            self.last_good_output = record.output
            self.last_good_period = record.period
        if record.status == SUCCEEDED and isinstance(record.stats.get("kinds"), dict):
            self._add_trend(record)
        elif record.status == FAILED:
            self.last_failure_run_id = record.run_id
            self.last_failure_at = at
            self.last_error = record.error

    def _add_trend(self, record: RunRecord) -> None:
        figures: dict[str, list[int | None]] = {}
        for kind, numbers in record.stats["kinds"].items():
            if isinstance(numbers, dict):
                figures[str(kind)] = [_whole(numbers.get("entities")), _whole(numbers.get("bytes"))]
        day = record.period.date().isoformat()
        self.trend[day] = figures
        for old in sorted(self.trend)[:-TREND_DAYS]:
            del self.trend[old]


def _whole(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class ManualTrigger:
    """A plan started by hand: who started it, when, and any options the trigger allows (sqlsync step ranges)."""

    plan: str
    period: datetime
    by: str
    options: dict[str, Any] = field(default_factory=dict)


class StaleRecord(Exception):
    """A write lost to a newer state of the same run (written by another delivery). Carries what is stored."""

    def __init__(self, stored: RunRecord):
        super().__init__(f"run {stored.run_id} moved on to {stored.status} (step {stored.step})")
        self.stored = stored


def key_name(raw: str, prefix: str) -> str:
    """``raw`` as a Datastore key name, or a derived one when Datastore would refuse ``raw`` (empty, reserved
    ``__name__``, too long). The derived name is stable, so the same raw value always finds the same entity."""
    if raw and len(raw.encode()) <= MAX_KEY_BYTES and not _RESERVED_NAME.match(raw):
        return raw
    return f"{prefix}-sha256-{hashlib.sha256(raw.encode()).hexdigest()}"


_JSON_FIELDS = ("stats", "state", "params")
# Only plan, status, kind and the times are filtered or ordered on; everything else stays out of the indexes
# (an indexed string may not exceed 1,500 bytes, and target keys and ids come from outside).
_UNINDEXED = ("stats", "state", "params", "log", "error", "output", "target", "run_id")
# plan_created ("plan|time") is indexed: a plan's runs by time through a built-in single-property index


class Catalog:
    """Reads and writes run records through a google.cloud.datastore client."""

    def __init__(self, client: Any, namespace: str = NAMESPACE):
        self.client = client
        self.namespace = namespace

    def _run_key(self, run_id: str) -> Any:
        return self.client.key(RUN_KIND, key_name(run_id, "run"), namespace=self.namespace)

    def _target_key(self, plan: str, target: str) -> Any:
        return self.client.key(TARGET_KIND, key_name(f"{plan}/{target}", "target"), namespace=self.namespace)

    def _trigger_key(self, plan: str, period: datetime) -> Any:
        return self.client.key(
            TRIGGER_KIND, key_name(f"{plan}/{period.isoformat()}", "trigger"), namespace=self.namespace
        )

    def _to_entity(self, record: RunRecord) -> Any:
        from google.cloud import datastore

        entity = datastore.Entity(self._run_key(record.run_id), exclude_from_indexes=_UNINDEXED)
        data = asdict(record)
        for name in _JSON_FIELDS:
            data[name] = json.dumps(data[name]) if data[name] is not None else None
        data["log"] = "\n".join(record.log[-MAX_LOG_LINES:])
        entity.update(data)
        entity["plan_created"] = plan_created(record.plan, record.created or record.period)
        return entity

    def _from_entity(self, entity: Any) -> RunRecord:
        data = dict(entity)
        for name in _JSON_FIELDS:
            data[name] = json.loads(data[name]) if data.get(name) else (None if name == "state" else {})
        data["log"] = data["log"].split("\n") if data.get("log") else []
        data.setdefault("run_id", entity.key.name)  # records written before run_id was a property
        known = RunRecord.__dataclass_fields__
        return RunRecord(**{k: v for k, v in data.items() if k in known})

    def get(self, run_id: str) -> RunRecord | None:
        entity = self.client.get(self._run_key(run_id))
        return self._from_entity(entity) if entity is not None else None

    def begin(self, record: RunRecord) -> tuple[RunRecord, bool]:
        """Create ``record`` unless a run of that id exists. Returns (the stored record, created?).
        A transaction makes two deliveries of the same task agree on which one created it."""
        with self.client.transaction():
            existing = self.client.get(self._run_key(record.run_id))
            if existing is not None:
                return self._from_entity(existing), False
            entities = [self._to_entity(record)]
            if not record.final and summary.is_real_target(record.target):
                key = summary.running_key(self.client, self.namespace, record.run_id)
                entities.append(summary.running_entity(self.client, key, record))
            self.client.put_multi(entities)
        return record, True

    def save(self, record: RunRecord) -> RunRecord:
        """Store a record no other delivery writes (a refused task, a failed fan-out). A final record is folded
        into its target's summary in the same transaction."""
        return self._write(record.run_id, lambda _stored: record)

    def update(self, record: RunRecord, *, advance: bool) -> RunRecord:
        """Store ``record``: a change one delivery made to the state it read at ``record.step``. The stored record
        is read again in the transaction; if another delivery has moved it on since (a later step, or a final
        status), nothing is written and StaleRecord carries what is stored. ``advance`` marks a change of state
        (started, pending, final), which takes the next step, so a second delivery working from the same step
        finds its own write stale. Returns what was stored."""
        read_at = record.step

        def change(stored: RunRecord | None) -> RunRecord:
            if stored is not None and (stored.step != read_at or stored.final):
                raise StaleRecord(stored)
            return replace(record, step=read_at + 1) if advance else record

        return self._write(record.run_id, change)

    def _write(self, run_id: str, change: Callable[[RunRecord | None], RunRecord]) -> RunRecord:
        from google.api_core import exceptions as core

        for attempt in range(_CONTENTION_ATTEMPTS):
            try:
                with self.client.transaction():
                    existing = self.client.get(self._run_key(run_id))
                    record = change(self._from_entity(existing) if existing is not None else None)
                    entities = [self._to_entity(record)]
                    gone: list[Any] = []
                    if record.final:
                        key = self._target_key(record.plan, record.target)
                        found = self.client.get(key)
                        state = (
                            _target_from_entity(found) if found is not None else TargetState(record.plan, record.target)
                        )
                        before = summary.Contribution.of(_target_from_entity(found) if found is not None else None)
                        state.record_run(record)
                        entities.append(self._target_entity(key, state))
                        self._fold_into_summary(state, before, entities, gone)
                        gone.append(summary.running_key(self.client, self.namespace, record.run_id))
                    self.client.put_multi(entities)
                    if gone:
                        self.client.delete_multi(gone)
                return record
            except core.Aborted:
                # Contention with another delivery's transaction: try again on what it wrote. Past the last
                # attempt the Aborted goes up and the task is answered 503 (the queue retries it).
                if attempt + 1 == _CONTENTION_ATTEMPTS:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _fold_into_summary(
        self, state: TargetState, before: summary.Contribution | None, entities: list[Any], gone: list[Any]
    ) -> None:
        """Move the target's contribution in its plan's summary shard, and put or remove its attention entity, in
        the transaction that changes its state (services/summary.py)."""
        after = summary.Contribution.of(state)
        if after is None or before == after:
            return
        shard_key = summary.shard_key(
            self.client, self.namespace, state.plan, summary.shard_of(state.plan, state.target)
        )
        stored = self.client.get(shard_key)
        shard = summary.Shard.from_json(stored.get("data") if stored is not None else None)
        shard.apply(state.target, before, after)
        entities.append(summary.shard_entity(self.client, shard_key, state.plan, shard))
        was = before is not None and before.needs_attention
        if was != after.needs_attention:
            key = summary.attention_key(self.client, self.namespace, state.plan, summary.STATE_REASON, state.target)
            if after.needs_attention:
                entities.append(
                    summary.attention_entity(
                        self.client, key, state.plan, summary.STATE_REASON, state.target, state.last_run_at
                    )
                )
            else:
                gone.append(key)

    def rebuild_summary(self, plan: str) -> None:
        """Count every target of ``plan`` into its summary afresh (data recorded before summaries existed)."""
        summary.rebuild(self.client, self.namespace, plan, self.target_states(plan))

    def record_trigger(self, trigger: ManualTrigger) -> None:
        """Remember that an authenticated admin started ``trigger.plan`` for ``trigger.period``."""
        from google.cloud import datastore

        entity = datastore.Entity(self._trigger_key(trigger.plan, trigger.period), exclude_from_indexes=("options",))
        entity.update(
            {"plan": trigger.plan, "period": trigger.period, "by": trigger.by, "options": json.dumps(trigger.options)}
        )
        self.client.put(entity)

    def trigger(self, plan: str, period: datetime) -> ManualTrigger | None:
        entity = self.client.get(self._trigger_key(plan, period))
        if entity is None:
            return None
        return ManualTrigger(
            plan=entity["plan"], period=entity["period"], by=entity["by"], options=json.loads(entity["options"] or "{}")
        )

    def _target_entity(self, key: Any, state: TargetState) -> Any:
        from google.cloud import datastore

        entity = datastore.Entity(
            key, exclude_from_indexes=("last_error", "last_good_output", "target", "last_drill_error", "trend")
        )
        entity.update(asdict(state))
        entity["trend"] = json.dumps(state.trend, sort_keys=True) if state.trend else None
        return entity

    def recent_runs(self, limit: int = 50, plan: str | None = None, scan: int = 5000) -> list[RunRecord]:
        """Newest first. A plan's runs are read through ``plan_created`` (plan, then creation time, in one indexed
        string: Datastore's built-in single-property index answers it, no index.yaml to deploy), so the answer is
        exact however many runs other plans have. Records written before that property existed are looked for
        among the newest ``scan`` runs when the indexed ones are fewer than ``limit``."""
        if plan is None:
            query = self.client.query(kind=RUN_KIND, namespace=self.namespace, order=["-created"])
            return [self._from_entity(e) for e in query.fetch(limit=limit)]
        records = list(self.runs_of_plan(plan, limit=limit))
        if len(records) < limit:
            seen = {r.run_id for r in records}
            query = self.client.query(kind=RUN_KIND, namespace=self.namespace, order=["-created"])
            for entity in query.fetch(limit=scan):
                if entity.get("plan") == plan and "plan_created" not in entity:
                    record = self._from_entity(entity)
                    if record.run_id not in seen:
                        records.append(record)
            records.sort(key=lambda r: r.created or r.period, reverse=True)
        return records[:limit]

    def runs_of_plan(
        self, plan: str, since: datetime | None = None, limit: int | None = None, newest_first: bool = True
    ) -> Iterator[RunRecord]:
        """Runs of ``plan`` created at or after ``since``, read a page at a time (never all held at once)."""
        from google.cloud.datastore.query import PropertyFilter

        order = "-plan_created" if newest_first else "plan_created"
        query = self.client.query(kind=RUN_KIND, namespace=self.namespace, order=[order])
        low = plan_created(plan, since) if since is not None else f"{plan}|"
        query.add_filter(filter=PropertyFilter("plan_created", ">=", low))
        query.add_filter(filter=PropertyFilter("plan_created", "<", f"{plan}|~"))
        for entity in query.fetch(limit=limit):
            yield self._from_entity(entity)

    def target_page(self, plan: str, size: int, cursor: str | None = None) -> tuple[list[str], str | None]:
        """One page of ``plan``'s target names in key order, and the cursor of the next page (None at the end)."""
        import base64

        query = self.client.query(kind=TARGET_KIND, namespace=self.namespace)
        query.add_filter(filter=_eq("plan", plan))
        start = base64.urlsafe_b64decode(cursor.encode()) if cursor else None
        iterator = query.fetch(limit=size, start_cursor=start)
        page = next(iterator.pages)
        names = [entity["target"] for entity in page if summary.is_real_target(entity["target"])]
        token = iterator.next_page_token
        more = token is not None and len(names) > 0
        return names, base64.urlsafe_b64encode(token).decode() if more and isinstance(token, bytes) else None

    def target_state(self, plan: str, target: str) -> TargetState | None:
        entity = self.client.get(self._target_key(plan, target))
        return _target_from_entity(entity) if entity is not None else None

    def target_states_for(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], TargetState]:
        """The summaries of the given (plan, target) pairs that exist, looked up by key in batches."""
        found: dict[tuple[str, str], TargetState] = {}
        unique = sorted(set(pairs))
        for start in range(0, len(unique), 500):
            keys = [self._target_key(plan, target) for plan, target in unique[start : start + 500]]
            for entity in self.client.get_multi(keys):
                state = _target_from_entity(entity)
                found[(state.plan, state.target)] = state
        return found

    def active_drills(self, plan: str) -> list[RunRecord]:
        """Drills of ``plan`` started and not yet finished (each may hold a scratch restore)."""
        found: list[RunRecord] = []
        for status in (RUNNING, PENDING):
            query = self.client.query(kind=RUN_KIND, namespace=self.namespace)
            query.add_filter(filter=_eq("status", status))
            found.extend(r for r in map(self._from_entity, query.fetch()) if r.plan == plan and r.purpose == DRILL)
        return found

    def runs_since(self, plan: str, since: datetime) -> list[RunRecord]:
        """Runs of ``plan`` created at or after ``since``, oldest first (one equality filter: no composite index)."""
        query = self.client.query(kind=RUN_KIND, namespace=self.namespace)
        query.add_filter(filter=_eq("plan", plan))
        runs = [r for r in map(self._from_entity, query.fetch()) if (r.created or r.period) >= since]
        return sorted(runs, key=lambda r: r.created or r.period)

    def runs_for(self, plan: str, target: str) -> list[RunRecord]:
        query = self.client.query(kind=RUN_KIND, namespace=self.namespace)
        query.add_filter(filter=_eq("plan", plan))
        return sorted(
            (r for r in map(self._from_entity, query.fetch()) if r.target == target),
            key=lambda r: r.created or r.period,
        )

    def target_states(self, plan: str | None = None) -> list[TargetState]:
        query = self.client.query(kind=TARGET_KIND, namespace=self.namespace)
        if plan:
            query.add_filter(filter=_eq("plan", plan))
        return sorted((_target_from_entity(e) for e in query.fetch()), key=lambda s: (s.plan, s.target))


def plan_created(plan: str, at: datetime) -> str:
    """``plan|2026-11-23T02:00:05.000000``: sorts by plan, then by time (UTC, fixed width)."""
    return f"{plan}|{at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%f')}"


def _eq(name: str, value: Any) -> Any:
    from google.cloud.datastore.query import PropertyFilter

    return PropertyFilter(name, "=", value)


def _target_from_entity(entity: Any) -> TargetState:
    known = TargetState.__dataclass_fields__
    data = {k: v for k, v in dict(entity).items() if k in known}
    data["trend"] = json.loads(data["trend"]) if data.get("trend") else {}
    return TargetState(**data)
