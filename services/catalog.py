"""Run records: every task's outcome, kept in Datastore in the service's own namespace.

``BackupRun`` (key: the run id, which is the task name) holds one run of one target; ``TargetState`` (key: plan
and target) holds the last good and last failed run of a target, so "when was the last good copy?" is one lookup.
The namespace keeps these bookkeeping kinds out of the user's data and out of Datastore kind discovery.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

NAMESPACE = "backup-scheduler"
RUN_KIND = "BackupRun"
TARGET_KIND = "TargetState"
BOOKKEEPING_KINDS = frozenset({RUN_KIND, TARGET_KIND})
MAX_LOG_LINES = 200

RUNNING, PENDING, SUCCEEDED, FAILED, SKIPPED = "running", "pending", "succeeded", "failed", "skipped"
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
    last_good_run_id: str | None = None
    last_good_at: datetime | None = None
    last_good_output: str | None = None
    last_failure_run_id: str | None = None
    last_failure_at: datetime | None = None
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("last_run_at", "last_good_at", "last_failure_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


_JSON_FIELDS = ("stats", "state", "params")
_UNINDEXED = ("stats", "state", "params", "log", "error", "output")


class Catalog:
    """Reads and writes run records through a google.cloud.datastore client."""

    def __init__(self, client: Any, namespace: str = NAMESPACE):
        self.client = client
        self.namespace = namespace

    def _run_key(self, run_id: str) -> Any:
        return self.client.key(RUN_KIND, run_id, namespace=self.namespace)

    def _target_key(self, plan: str, target: str) -> Any:
        return self.client.key(TARGET_KIND, f"{plan}/{target}", namespace=self.namespace)

    def _to_entity(self, record: RunRecord) -> Any:
        from google.cloud import datastore

        entity = datastore.Entity(self._run_key(record.run_id), exclude_from_indexes=_UNINDEXED)
        data = asdict(record)
        data.pop("run_id")
        for name in _JSON_FIELDS:
            data[name] = json.dumps(data[name]) if data[name] is not None else None
        data["log"] = "\n".join(record.log[-MAX_LOG_LINES:])
        entity.update(data)
        return entity

    def _from_entity(self, entity: Any) -> RunRecord:
        data = dict(entity)
        for name in _JSON_FIELDS:
            data[name] = json.loads(data[name]) if data.get(name) else (None if name == "state" else {})
        data["log"] = data["log"].split("\n") if data.get("log") else []
        return RunRecord(run_id=entity.key.name, **data)

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
            self.client.put(self._to_entity(record))
        return record, True

    def save(self, record: RunRecord) -> None:
        """Store ``record``; when it is final, also update its target's last good / last failure."""
        if not record.final:
            self.client.put(self._to_entity(record))
            return
        with self.client.transaction():
            key = self._target_key(record.plan, record.target)
            entity = self.client.get(key)
            state = _target_from_entity(entity) if entity is not None else TargetState(record.plan, record.target)
            at = record.ended or record.started
            state.last_status = record.status
            state.last_run_id = record.run_id
            state.last_run_at = at
            if record.status == SUCCEEDED:
                state.last_good_run_id = record.run_id
                state.last_good_at = at
                state.last_good_output = record.output
            elif record.status == FAILED:
                state.last_failure_run_id = record.run_id
                state.last_failure_at = at
                state.last_error = record.error
            self.client.put_multi([self._to_entity(record), self._target_entity(key, state)])

    def _target_entity(self, key: Any, state: TargetState) -> Any:
        from google.cloud import datastore

        entity = datastore.Entity(key, exclude_from_indexes=("last_error", "last_good_output"))
        entity.update(asdict(state))
        return entity

    def recent_runs(self, limit: int = 50, plan: str | None = None) -> list[RunRecord]:
        """Newest first. Filtering by plan happens here so only built-in single-property indexes are needed."""
        query = self.client.query(kind=RUN_KIND, namespace=self.namespace, order=["-created"])
        records = []
        for entity in query.fetch(limit=None if plan else limit):
            record = self._from_entity(entity)
            if plan is None or record.plan == plan:
                records.append(record)
                if len(records) >= limit:
                    break
        return records

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


def _eq(name: str, value: Any) -> Any:
    from google.cloud.datastore.query import PropertyFilter

    return PropertyFilter(name, "=", value)


def _target_from_entity(entity: Any) -> TargetState:
    known = TargetState.__dataclass_fields__
    return TargetState(**{k: v for k, v in dict(entity).items() if k in known})
