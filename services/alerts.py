"""Alerts grouped the way Alertmanager groups them: one message for many targets that fail for the same reason.

When one cause (a revoked role, a bucket switched to COLDLINE, a failed listing) hits 300 targets, a person needs
one message that says "300 targets of disks-prod: permission denied ..." with a few names, not 300 messages queued
behind a 2/s notify queue. So an event is never sent on its own:

1. ``record`` stores the event durably (``AlertEvent``: one entity per plan, stage and target, marked pending) and
   queues a *flush* of its group. A group is (plan, stage, cause): the cause is the error with numbers, ids and the
   target's own name blanked, so "disk-0042: permission denied" and "disk-0043: permission denied" are one group.
2. The flush runs ``wait`` after the first event (30 s by default), so the rest of a burst joins it. It reads every
   pending event of the group, queues *one* message for the plan's channels (the notify task in services/notify.py)
   and only then marks those events sent. A queue that refuses the message leaves them pending: the flush task is
   retried, and the hourly sweep queues flushes for anything left pending, so an alert is never lost.
3. After a message, the group sends again at most once per ``interval`` (5 min): events arriving in between wait
   for the next flush. A group still firing is repeated after ``repeat`` (6 h), listing what still fails.

A failure event is resolved (deleted) when the target's next run succeeds; a stale event when the target recovers
(which records a "recovered" event, grouped the same way). Success and recovery events are sent once and removed.
Flush tasks are named after the group and a time slot, so a burst of events queues one flush, not one per event.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.catalog import FAILED, NAMESPACE, key_name

log = logging.getLogger("backup.alerts")

EVENT_KIND = "AlertEvent"
GROUP_KIND = "AlertGroup"
FLUSH_PATH = "/tasks/_notify/flush"

FAILURE, SUCCESS, STALE, RECOVERED = "failure", "success", "stale", "recovered"
FIRING = frozenset({FAILURE, STALE})  # stay until resolved, repeated every repeat interval
SAMPLE = 5  # names shown in a grouped message
PUBSUB_SAMPLE = 50  # names carried in a grouped Pub/Sub message
_MARK_BATCH = 400

_TASK_NAME_UNSAFE = re.compile(r"[^a-z0-9-]+")
_VOLATILE = re.compile(r"0x[0-9a-f]+|[0-9a-f]{8,}|\d+")


@dataclass(frozen=True)
class Timing:
    """Alertmanager's group_wait, group_interval and repeat_interval, from the plan's ``notify`` section."""

    wait: timedelta = timedelta(seconds=30)
    interval: timedelta = timedelta(minutes=5)
    repeat: timedelta = timedelta(hours=6)

    @classmethod
    def of(cls, plan: Any) -> Timing:
        settings = plan.notify
        return cls(
            wait=timedelta(seconds=settings.group_wait_seconds),
            interval=timedelta(seconds=settings.group_interval_seconds),
            repeat=timedelta(hours=settings.repeat_hours),
        )


@dataclass
class Event:
    plan: str
    stage: str  # FAILURE, SUCCESS, STALE or RECOVERED
    target: str
    group: str
    error: str | None
    run_id: str | None
    output: str | None
    at: datetime
    pending: bool = True
    episode: str = ""  # a stale episode (when the last good copy was): a new episode is news
    drill: bool = False


def cause(error: str | None, target: str) -> str:
    """What an error says once the target's own name and the numbers that change from run to run are blanked:
    the same cause on many targets gives the same text."""
    if not error:
        return ""
    text = error.lower()
    names = {target.lower(), target.lower().rsplit("/", 1)[-1]}
    for name in sorted((n for n in names if len(n) >= 3), key=len, reverse=True):
        text = text.replace(name, "<target>")
    return " ".join(_VOLATILE.sub("#", text).split())[:500]


def group_id(plan: str, stage: str, fingerprint: str, drill: bool = False) -> str:
    """A readable, task-name-safe id of (plan, stage, cause)."""
    digest = hashlib.sha256("\n".join((plan, stage, fingerprint, "drill" if drill else "")).encode()).hexdigest()
    slug = _TASK_NAME_UNSAFE.sub("-", f"{plan}-{'drill-' if drill else ''}{stage}".lower()).strip("-")[:60]
    return f"{slug}-{digest[:16]}"


def _family(stage: str, drill: bool) -> str:
    return f"drill-{stage}" if drill else stage


def _event_key(client: Any, plan: str, stage: str, target: str, drill: bool) -> Any:
    return client.key(EVENT_KIND, key_name(f"{plan}/{_family(stage, drill)}/{target}", "alert"), namespace=NAMESPACE)


def _group_key(client: Any, group: str) -> Any:
    return client.key(GROUP_KIND, group, namespace=NAMESPACE)


def _to_event(entity: Any) -> Event:
    known = Event.__dataclass_fields__
    return Event(**{k: v for k, v in dict(entity).items() if k in known})


def _entity(client: Any, key: Any, event: Event) -> Any:
    from google.cloud import datastore

    entity = datastore.Entity(key, exclude_from_indexes=("target", "error", "output", "run_id", "episode"))
    entity.update(event.__dict__)
    return entity


# ------------------------------------------------------------------------------------------------ recording


def record(
    rt: Any,
    plan: Any,
    stage: str,
    target: str,
    error: str | None = None,
    run_id: str | None = None,
    output: str | None = None,
    episode: str = "",
    drill: bool = False,
    queue: Any = None,
) -> bool:
    """Store one target's event and make sure a flush of its group is queued. False when the event is already
    known (the same target, stage, cause and episode): the group's messages cover it. Raises when the event
    cannot be stored; a flush that cannot be queued is logged and left to the sweep."""
    client = rt.datastore()
    fingerprint = cause(error, target)
    group = group_id(plan.name, stage, fingerprint, drill)
    key = _event_key(client, plan.name, stage, target, drill)
    existing = client.get(key)
    if existing is not None and existing.get("group") == group and existing.get("episode", "") == episode:
        return False
    event = Event(plan.name, stage, target, group, error, run_id, output, rt.now(), True, episode, drill)
    client.put(_entity(client, key, event))
    try:
        schedule_flush(rt, plan, group, rt.now() + Timing.of(plan).wait, queue)
    except Exception:  # the event is stored: the sweep queues its flush later
        log.exception("could not queue the flush of alert group %s; the hourly sweep will", group)
    return True


def resolve(rt: Any, plan: Any, stage: str, target: str, drill: bool = False) -> None:
    """The target no longer has this problem (a good run after failures, a recovery): its event is removed, so it
    is neither repeated nor counted."""
    client = rt.datastore()
    client.delete(_event_key(client, plan.name, stage, target, drill))


def recovered(
    rt: Any, plan: Any, target: str, run_id: str | None, output: str | None, episode: str, queue: Any = None
) -> bool:
    """A stale target has a good copy again. Its stale event is removed; if that event was already reported, a
    recovery event is recorded (grouped like any other), else nothing was said and nothing needs saying. True when
    a recovery will be reported."""
    client = rt.datastore()
    key = _event_key(client, plan.name, STALE, target, False)
    stale = client.get(key)
    if stale is None or stale.get("pending"):
        client.delete(key)
        return False
    record(rt, plan, RECOVERED, target, None, run_id, output, episode, queue=queue)
    client.delete(key)
    return True


def _slot(at: datetime, seconds: float) -> int:
    """``at`` rounded up to a multiple of ``seconds`` (as a Unix time): events in one slot share a flush task."""
    step = max(seconds, 1.0)
    return int(math.ceil(at.timestamp() / step) * step)


def schedule_flush(rt: Any, plan: Any, group: str, at: datetime, queue: Any = None, repeat: bool = False) -> bool:
    """Queue the flush of ``group`` at ``at`` (rounded up to the wait). True if a new task was created."""
    from services.notify import NOTIFY_QUEUE
    from services.queue import TaskSpec, make_queue

    slot = _slot(at, Timing.of(plan).wait.total_seconds())
    queue = queue or rt.client("queue", lambda: make_queue(rt.settings))
    name = f"{group}-{'repeat' if repeat else 'flush'}-{slot}"
    payload = {"plan": plan.name, "group": group, "repeat": repeat}
    when = datetime.fromtimestamp(slot, UTC)
    return bool(
        queue.enqueue_many(
            [TaskSpec(queue=NOTIFY_QUEUE, path=FLUSH_PATH, payload=payload, name=name, schedule_time=when)]
        )[0]
    )


# ------------------------------------------------------------------------------------------------ flushing


@dataclass
class FlushResult:
    group: str
    sent: int = 0  # events covered by the message queued now
    firing: int = 0
    deferred_until: datetime | None = None
    message_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "sent": self.sent,
            "firing": self.firing,
            "deferred_until": self.deferred_until.isoformat() if self.deferred_until else None,
            "message": self.message_key,
        }


def _events(client: Any, group: str, pending_only: bool) -> list[tuple[Any, Event]]:
    from google.cloud.datastore.query import PropertyFilter

    query = client.query(kind=EVENT_KIND, namespace=NAMESPACE)
    query.add_filter(filter=PropertyFilter("group", "=", group))
    if pending_only:
        query.add_filter(filter=PropertyFilter("pending", "=", True))
    return [(entity.key, _to_event(entity)) for entity in query.fetch()]


def flush(rt: Any, plan_name: str, group: str, repeat: bool = False, queue: Any = None) -> FlushResult:
    """Send one message for the pending events of ``group`` (all its firing events when ``repeat``), unless the
    group sent one less than an interval ago: then a flush is queued for when it may send again."""
    from services import notify
    from services.queue import TaskSpec, make_queue

    result = FlushResult(group)
    plan = rt.plans.get(plan_name)
    if plan is None:
        log.warning("alert group %s of unknown plan %s dropped (removed from plans.yaml?)", group, plan_name)
        return result
    client = rt.datastore()
    timing = Timing.of(plan)
    now = rt.now()
    stored = client.get(_group_key(client, group))
    last_sent = stored.get("last_sent_at") if stored is not None else None
    if not repeat and last_sent is not None and now < last_sent + timing.interval - timedelta(seconds=1):
        result.deferred_until = last_sent + timing.interval
        schedule_flush(rt, plan, group, result.deferred_until, queue)
        return result
    events = _events(client, group, pending_only=not repeat)
    if repeat:
        events = _still_firing(rt, client, events)
        if not events:  # everything in the group has recovered: nothing to repeat, now or later
            client.delete(_group_key(client, group))
    if not events:
        return result
    events.sort(key=lambda item: (item[1].at, item[1].target))
    result.firing = len(events) if repeat else _count(client, group)
    message = group_message(rt, plan, [e for _, e in events], result.firing, repeat)
    queue = queue or rt.client("queue", lambda: make_queue(rt.settings))
    # Queued first, marked after: a queue that refuses the message leaves every event pending (and this task
    # answers 503, so it is retried).
    queue.enqueue_many(
        [TaskSpec(queue=notify.NOTIFY_QUEUE, path=notify.NOTIFY_PATH, payload=message.to_json(), name=message.key)]
    )
    _mark_sent([(key, event) for key, event in events if event.pending], client)
    _save_group(client, group, plan.name, events[0][1], now, result.firing)
    result.sent = len(events)
    result.message_key = message.key
    log.info("alert group %s: one message for %d target(s)", group, len(events), extra={"plan": plan.name})
    return result


def _count(client: Any, group: str) -> int:
    from google.cloud.datastore.query import PropertyFilter

    query = client.query(kind=EVENT_KIND, namespace=NAMESPACE)
    query.add_filter(filter=PropertyFilter("group", "=", group))
    query.keys_only()
    return sum(1 for _ in query.fetch())


def _mark_sent(events: list[tuple[Any, Event]], client: Any) -> None:
    """Firing events stay (to be repeated, and resolved later) but are no longer pending; one-shot events
    (success, recovered) are done."""
    done = [key for key, event in events if event.stage not in FIRING]
    keep = [(key, event) for key, event in events if event.stage in FIRING]
    for start in range(0, len(done), _MARK_BATCH):
        client.delete_multi(done[start : start + _MARK_BATCH])
    for start in range(0, len(keep), _MARK_BATCH):
        batch = []
        for key, event in keep[start : start + _MARK_BATCH]:
            event.pending = False
            batch.append(_entity(client, key, event))
        client.put_multi(batch)


def _save_group(client: Any, group: str, plan: str, first: Event, now: datetime, firing: int) -> None:
    from google.cloud import datastore

    entity = datastore.Entity(_group_key(client, group), exclude_from_indexes=("error",))
    entity.update({"plan": plan, "stage": first.stage, "error": first.error, "last_sent_at": now, "firing": firing})
    client.put(entity)


def _still_firing(rt: Any, client: Any, events: list[tuple[Any, Event]]) -> list[tuple[Any, Event]]:
    """For a reminder: failure events whose target has since had a good run are resolved here (deleted), so a
    reminder never lists a target that is fine."""
    from services.catalog import Catalog

    states = Catalog(client).target_states_for([(e.plan, e.target) for _, e in events if e.stage == FAILURE])
    failing: list[tuple[Any, Event]] = []
    gone = []
    for key, event in events:
        state = states.get((event.plan, event.target)) if event.stage == FAILURE else None
        status = (state.last_drill_status if event.drill else state.last_status) if state else FAILED
        if status == FAILED:
            failing.append((key, event))
        else:
            gone.append(key)
    for start in range(0, len(gone), _MARK_BATCH):
        client.delete_multi(gone[start : start + _MARK_BATCH])
    return failing


_TITLES = {
    FAILURE: ("*Backup failed*", "*Backups failed*"),
    STALE: ("*Backup stale*", "*Backups stale*"),
    RECOVERED: ("Backup recovered", "Backups recovered"),
    SUCCESS: ("Backup succeeded", "Backups succeeded"),
}


def group_message(rt: Any, plan: Any, events: list[Event], firing: int, repeat: bool) -> Any:
    """One message for ``events`` (oldest first) of one group: the cause once, a few names, the count."""
    from services import notify

    first = events[0]
    count = len(events)
    single, many = _TITLES[first.stage]
    if first.drill and first.stage == FAILURE:
        single, many = "*Restore drill failed*", "*Restore drills failed*"
    if repeat:
        single, many = f"Still: {single}", f"Still: {many}"
    detail = first.error or ("good copy again" if first.stage == RECOVERED else "no error message")
    if first.stage == SUCCESS:
        detail = first.output or "(no output)"
    if count == 1:
        text = f"{single}: plan `{plan.name}`, target `{first.target}`\n{detail}"
        link = notify.run_link(rt, first.run_id)
    else:
        names = ", ".join(f"`{e.target}`" for e in events[:SAMPLE])
        more = f" and {count - SAMPLE:,} more" if count > SAMPLE else ""
        text = f"{many}: {count:,} targets of plan `{plan.name}`: {detail}\n{names}{more}"
        if firing > count:
            text += f"\n({firing:,} targets of this plan fail this way in all)"
        link = notify.status_link(rt, plan.name)
    if link:
        text += f"\n{link}"
    digest = hashlib.sha256("\n".join(sorted(f"{e.target}\n{e.at.isoformat()}" for e in events)).encode())
    return notify.Message(
        kind=first.stage,
        plan=plan.name,
        target=first.target if count == 1 else f"({count} targets)",
        status=FAILED if first.stage == FAILURE else first.stage,
        text=text,
        at=rt.now().isoformat(),
        error=first.error,
        output=first.output if count == 1 else None,
        run_id=first.run_id if count == 1 else None,
        link=link,
        key=f"{first.group}-{'repeat' if repeat else 'msg'}-{digest.hexdigest()[:16]}",
        count=count,
        targets=tuple(e.target for e in events[:PUBSUB_SAMPLE]),
    )


# ------------------------------------------------------------------------------------------------ sweeping


@dataclass
class SweepResult:
    flushes: int = 0  # flushes queued again for events left pending
    repeats: int = 0  # reminders queued for groups still firing

    def to_json(self) -> dict[str, int]:
        return {"flushes": self.flushes, "repeats": self.repeats}


def sweep(rt: Any, queue: Any = None) -> SweepResult:
    """Run by the hourly stale check: queue a flush for every group with events still pending (a flush that could
    not be queued, or one that failed for good), and a reminder for every firing group whose last message is older
    than its repeat interval."""
    from google.cloud.datastore.query import PropertyFilter

    client = rt.datastore()
    now = rt.now()
    result = SweepResult()
    query = client.query(kind=EVENT_KIND, namespace=NAMESPACE)
    query.add_filter(filter=PropertyFilter("pending", "=", True))
    waiting: dict[str, str] = {}
    for entity in query.fetch():
        event = _to_event(entity)
        plan = rt.plans.get(event.plan)
        if plan is not None and event.at <= now - Timing.of(plan).wait:
            waiting.setdefault(event.group, event.plan)
    for group, plan_name in sorted(waiting.items()):
        if schedule_flush(rt, rt.plans[plan_name], group, now, queue):
            result.flushes += 1
    for entity in client.query(kind=GROUP_KIND, namespace=NAMESPACE).fetch():
        plan = rt.plans.get(entity.get("plan"))
        if plan is None or entity.get("stage") not in FIRING or not entity.get("last_sent_at"):
            continue
        due = entity["last_sent_at"] + Timing.of(plan).repeat
        if now < due:
            continue
        if not _has_events(client, entity.key.name):  # every target moved on (resolved, or another cause)
            client.delete(entity.key)
        elif schedule_flush(rt, plan, entity.key.name, due, queue, repeat=True):
            result.repeats += 1
    return result


def _has_events(client: Any, group: str) -> bool:
    from google.cloud.datastore.query import PropertyFilter

    query = client.query(kind=EVENT_KIND, namespace=NAMESPACE)
    query.add_filter(filter=PropertyFilter("group", "=", group))
    query.keys_only()
    return any(True for _ in query.fetch(limit=1))
