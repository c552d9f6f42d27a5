"""Telling people how backups are doing: on failure, on success (opt-in), when a target goes stale or recovers,
and a daily digest.

Sending is itself a queued task (queue ``notify``, ``POST /tasks/_notify``), so a slow or failing channel never
fails or delays a backup run: ``run_finished`` only logs and records an alert event. Events are grouped by plan
and cause before anything is sent (services/alerts.py): 300 targets failing for one reason are one message.

The notify task sends one message to each channel the plan names:
- Pub/Sub: a JSON message (plan, target, status, error, output, run_id, count, targets ...) with attributes plan /
  status / kind for subscription filters.
- A webhook (Slack or Google Chat incoming webhook): ``{"text": ...}``. Its URL is a secret: the plan names an
  environment variable (``notify.webhook_env``) holding either the URL or a Secret Manager version
  (``sm://projects/P/secrets/S/versions/V`` or ``projects/P/secrets/S/versions/V``), read through ``rt.secrets``.
Each channel that succeeded is remembered (``NotificationSent`` in the catalog namespace), so a retry caused by one
channel's 5xx does not send the message again on the channel that already had it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

from services.catalog import FAILED, NAMESPACE, SUCCEEDED
from services.errors import PermanentError, TransientError
from services.queue import TaskSpec, make_queue

log = logging.getLogger("backup.notify")

NOTIFY_QUEUE = "notify"
NOTIFY_PATH = "/tasks/_notify"
SENT_KIND = "NotificationSent"
# How long a channel's "already sent" record must outlive its message (a redelivered task within it sends nothing).
SENT_RECORD_TTL = timedelta(days=2)
WEBHOOK_TIMEOUT_SECONDS = 10.0
PUBLISH_TIMEOUT_SECONDS = 30.0
MAX_TEXT = 3000  # Slack cuts section text at 3000 characters; Google Chat allows more

FAILURE, SUCCESS, STALE, RECOVERED, DIGEST = "failure", "success", "stale", "recovered", "digest"
MESSAGE_KINDS = (FAILURE, SUCCESS, STALE, RECOVERED, DIGEST)

_TASK_NAME_UNSAFE = re.compile(r"[^a-z0-9-]+")
_SECRET_VERSION = re.compile(r"^projects/[^/]+/secrets/[^/]+(/versions/[^/]+)?$")


@dataclass(frozen=True)
class Message:
    """One notification, as queued in the task body and as published to Pub/Sub."""

    kind: str  # one of MESSAGE_KINDS
    plan: str
    target: str
    status: str  # the run status ("failed", "succeeded"), or "stale" / "recovered" / "digest"
    text: str  # what a person reads in chat
    at: str  # ISO time the event was noticed
    error: str | None = None
    output: str | None = None  # where the backup lives
    run_id: str | None = None
    link: str | None = None  # the run's page (or the plan's status) on the status site
    key: str = ""  # what the message is: also the task name
    count: int = 1  # how many targets the message is about (a grouped alert)
    targets: tuple[str, ...] = ()  # the first of them, by name

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_json(cls, raw: Any) -> Message:
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
        for name in ("kind", "plan", "target", "status", "text", "at", "key"):
            if not isinstance(raw.get(name), str) or not raw[name]:
                raise ValueError(f"'{name}' must be a non-empty string")
        if raw["kind"] not in MESSAGE_KINDS:
            raise ValueError(f"'kind' must be one of {', '.join(MESSAGE_KINDS)}, got {raw['kind']!r}")
        count = raw.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("'count' must be a whole number of targets")
        targets = raw.get("targets", [])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError("'targets' must be a list of target names")
        known = set(cls.__dataclass_fields__) - {"count", "targets"}
        texts = {k: (str(v) if v is not None else None) for k, v in raw.items() if k in known}
        return cls(**texts, count=count, targets=tuple(targets))  # type: ignore[arg-type]

    def pubsub_body(self) -> bytes:
        body = {
            "kind": self.kind,
            "plan": self.plan,
            "target": self.target,
            "status": self.status,
            "error": self.error,
            "output": self.output,
            "run_id": self.run_id,
            "at": self.at,
            "text": self.text,
            "count": self.count,
            "targets": list(self.targets),
        }
        return json.dumps(body, sort_keys=True).encode()

    def pubsub_attributes(self) -> dict[str, str]:
        return {"plan": self.plan, "status": self.status, "kind": self.kind, "target": self.target[:1024]}


def collapse_key(kind: str, plan: str, target: str, status: str, fingerprint: str, bucket: str) -> str:
    """A Cloud Tasks task id ([A-Za-z0-9_-], <= 500 chars) that is the same for messages saying the same thing."""
    digest = hashlib.sha256("\n".join((kind, plan, target, status, fingerprint, bucket)).encode()).hexdigest()[:20]
    slug = _TASK_NAME_UNSAFE.sub("-", f"{plan}-{kind}-{target}".lower()).strip("-")[:80]
    return f"{digest}-notify-{slug}"


def has_channels(plan: Any) -> bool:
    return bool(plan.notify.pubsub_topic or plan.notify.webhook_env)


def run_link(rt: Any, run_id: str | None) -> str | None:
    """The run's page, when the service knows its own public URL (``BACKUP_SERVICE_URL``)."""
    base = rt.settings.service_url
    if not run_id or (rt.settings.on_app_engine and _is_loopback_url(base)):
        return None
    return f"{base}/runs/{run_id}"


# ------------------------------------------------------------------------------------------------- enqueueing


def status_link(rt: Any, plan: str) -> str | None:
    """The plan's part of the status page, when the service knows its own public URL."""
    base = rt.settings.service_url
    if rt.settings.on_app_engine and _is_loopback_url(base):
        return None
    return f"{base}/?plan={plan}"


def run_finished(rt: Any, plan: Any, record: Any, queue: Any = None) -> None:
    """Called by the worker when a run ends. Logs the outcome and, when the plan has a channel, records an alert
    event (grouped and sent by services/alerts.py); a good run resolves the target's earlier failure. Never raises:
    the backup's outcome is already recorded and must stand."""
    from services import alerts
    from services.catalog import DRILL

    drill = getattr(record, "purpose", None) == DRILL
    labels = {"plan": plan.name, "target": record.target, "run_id": record.run_id}
    what = "restore drill" if drill else "backup"
    if record.status == FAILED:
        log.error("%s failed: plan %s, target %s: %s", what, plan.name, record.target, record.error, extra=labels)
    elif record.status == SUCCEEDED:
        log.info("%s succeeded: plan %s, target %s -> %s", what, plan.name, record.target, record.output, extra=labels)
    if not has_channels(plan):
        return
    try:
        if record.status == FAILED and plan.notify.on_failure:
            alerts.record(
                rt, plan, alerts.FAILURE, record.target, record.error, record.run_id, None, drill=drill, queue=queue
            )
        elif record.status == SUCCEEDED:
            alerts.resolve(rt, plan, alerts.FAILURE, record.target, drill=drill)
            if plan.notify.on_success and not drill:
                alerts.record(
                    rt,
                    plan,
                    alerts.SUCCESS,
                    record.target,
                    None,
                    record.run_id,
                    record.output,
                    record.run_id,
                    queue=queue,
                )
    except Exception:  # the run is recorded either way; the stale check still sees a target that stops working
        log.exception("could not record the %s alert for %s/%s", record.status, plan.name, record.target, extra=labels)


def fanout_succeeded(rt: Any, plan: Any) -> None:
    """A fan-out step listed the plan's targets: an earlier failed fan-out is resolved (not repeated). Never raises."""
    from services import alerts
    from services.stale import FANOUT_TARGET

    if not (has_channels(plan) and plan.notify.on_failure):
        return
    try:
        alerts.resolve(rt, plan, alerts.FAILURE, FANOUT_TARGET)
    except Exception:
        log.exception("could not resolve the fan-out alert of %s", plan.name, extra={"plan": plan.name})


def enqueue_message(rt: Any, plan: Any, message: Message, queue: Any = None) -> bool:
    """Queue ``message`` for the plan's channels. True if a new task was created; False if the plan has no channel,
    an identical message is already queued or sent in this window, or the queue could not be reached (logged)."""
    if not has_channels(plan):
        return False
    try:
        queue = queue or rt.client("queue", lambda: make_queue(rt.settings))
        created = queue.enqueue_many(
            [TaskSpec(queue=NOTIFY_QUEUE, path=NOTIFY_PATH, payload=message.to_json(), name=message.key)]
        )[0]
    except Exception:  # the run is recorded either way; a lost notification is logged, never raised into the run
        log.exception(
            "could not queue the %s notification for %s/%s",
            message.kind,
            message.plan,
            message.target,
            extra=_labels(message),
        )
        return False
    if not created:
        log.info("notification %s collapsed: an identical one was already queued", message.key)
    return bool(created)


# ------------------------------------------------------------------------------------------------- sending


@dataclass
class SendResult:
    """What the notify task did on each channel: "sent", "already sent", or an error text."""

    channels: dict[str, str]
    retry: bool = False  # a channel failed in a way a retry may fix

    def to_json(self) -> dict[str, Any]:
        return {"channels": self.channels, "retry": self.retry}


def deliver(rt: Any, message: Message) -> SendResult:
    """Send ``message`` on every channel of its plan that has not had it yet. A channel failing permanently is
    logged and not retried; a transient failure makes ``retry`` true (the task answers 503)."""
    plan = rt.plans.get(message.plan)
    if plan is None:
        log.warning("notification for unknown plan %s dropped (removed from plans.yaml?)", message.plan)
        return SendResult({})
    senders: dict[str, Any] = {}
    if plan.notify.pubsub_topic:
        senders["pubsub"] = lambda: publish(rt, topic_path(rt, plan.notify.pubsub_topic), message)
    if plan.notify.webhook_env:
        senders["webhook"] = lambda: post_webhook(rt, plan.notify.webhook_env, message)
    result = SendResult({})
    for channel, send in senders.items():
        if _already_sent(rt, message.key, channel):
            result.channels[channel] = "already sent"
            continue
        try:
            send()
        except TransientError as exc:
            log.warning("notify %s via %s will be retried: %s", message.key, channel, exc, extra=_labels(message))
            result.channels[channel] = f"retry: {exc}"
            result.retry = True
            continue
        except PermanentError as exc:
            log.error("notify %s via %s failed for good: %s", message.key, channel, exc, extra=_labels(message))
            result.channels[channel] = f"failed: {exc}"
            continue
        _mark_sent(rt, message.key, channel, message)
        result.channels[channel] = "sent"
    return result


def _labels(message: Message) -> dict[str, Any]:
    return {"plan": message.plan, "target": message.target, "run_id": message.run_id}


def _sent_key(rt: Any, key: str, channel: str) -> Any:
    return rt.datastore().key(SENT_KIND, f"{key}/{channel}", namespace=NAMESPACE)


def _already_sent(rt: Any, key: str, channel: str) -> bool:
    return rt.datastore().get(_sent_key(rt, key, channel)) is not None


def _mark_sent(rt: Any, key: str, channel: str, message: Message) -> None:
    from google.cloud import datastore

    entity = datastore.Entity(_sent_key(rt, key, channel), exclude_from_indexes=("target",))
    now = rt.now()
    # expire_at is for a Datastore TTL policy: the record only has to outlive redeliveries of its task.
    entity.update(
        {
            "plan": message.plan,
            "target": message.target,
            "kind": message.kind,
            "sent_at": now,
            "expire_at": now + SENT_RECORD_TTL,
        }
    )
    rt.datastore().put(entity)


# Pub/Sub -----------------------------------------------------------------------------------------------------


def topic_path(rt: Any, topic: str) -> str:
    """``projects/P/topics/T`` as given, or a bare topic name in this service's project."""
    return topic if topic.startswith("projects/") else f"projects/{rt.settings.project}/topics/{topic}"


def publish(rt: Any, topic: str, message: Message) -> str:
    """Publish and wait for the server's message id. Honours PUBSUB_EMULATOR_HOST (the client does)."""
    from google.api_core import exceptions
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]

    publisher = rt.client("pubsub-publisher", pubsub_v1.PublisherClient)
    try:
        future = publisher.publish(topic, message.pubsub_body(), **message.pubsub_attributes())
        return str(future.result(timeout=PUBLISH_TIMEOUT_SECONDS))
    except (exceptions.NotFound, exceptions.PermissionDenied, exceptions.InvalidArgument) as exc:
        raise PermanentError(f"Pub/Sub topic {topic}: {exc.message}") from exc
    except Exception as exc:  # unavailable, deadline, a timed-out future: the queue retries later
        raise TransientError(f"Pub/Sub topic {topic}: {type(exc).__name__}: {exc}") from exc


# Webhook -----------------------------------------------------------------------------------------------------


def webhook_payload(message: Message) -> dict[str, Any]:
    """The body Slack and Google Chat incoming webhooks both accept: a single "text"."""
    text = message.text if len(message.text) <= MAX_TEXT else message.text[: MAX_TEXT - 1] + "…"
    return {"text": text}


def post_webhook(rt: Any, env_name: str, message: Message) -> None:
    import requests

    url = resolve_secret(rt, env_name)
    parsed = urlparse(url)
    if parsed.scheme != "https" and not (parsed.scheme == "http" and _is_loopback_url(url)):
        # The URL is a credential (anyone holding it can post): it never travels in clear text off this machine.
        raise PermanentError(f"webhook URL in ${env_name} must be https:// (got a {parsed.scheme or 'bad'} URL)")
    try:
        response = requests.post(url, json=webhook_payload(message), timeout=WEBHOOK_TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        raise TransientError(f"webhook ${env_name}: {type(exc).__name__}") from exc
    if response.status_code == 429 or response.status_code >= 500:
        raise TransientError(f"webhook ${env_name} answered {response.status_code}")
    if not 200 <= response.status_code < 300:
        # The URL is never logged (it is the secret); the status and the start of the answer are.
        raise PermanentError(f"webhook ${env_name} answered {response.status_code}: {response.text[:200]}")


def _is_loopback_url(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_secret(rt: Any, env_name: str) -> str:
    """The value of environment variable ``env_name`` (from the Runtime's environment); when that is a Secret
    Manager version (``sm://...`` or ``projects/.../secrets/...``), the secret's payload, cached for a few minutes
    by ``rt.secrets`` so a rotated secret is picked up."""
    value = rt.secrets.require_env(env_name, "notify.webhook_env")
    name = value[len("sm://") :] if value.startswith("sm://") else value
    if not _SECRET_VERSION.match(name):
        return str(value)
    if "/versions/" not in name:
        name += "/versions/latest"
    return str(rt.secrets.secret(name))


# ------------------------------------------------------------------------------------------------- digest


def digest_message(rt: Any, plan: Any, catalog: Any, stale_targets: list[str]) -> Message:
    """The day's summary of one plan: every run of the last 24 hours counted by status (read page by page, exact at
    any scale), the first failed targets with their errors, and the targets that are past their RPO."""
    from services.catalog import DRILL

    now = rt.now()
    since = now - timedelta(days=1)
    counts: dict[str, int] = {}
    drills: dict[str, int] = {}
    failed: dict[str, str] = {}  # target -> its latest error
    for run in catalog.runs_of_plan(plan.name, since=since, newest_first=False):
        if run.purpose == DRILL:
            drills[run.status] = drills.get(run.status, 0) + 1
            continue
        counts[run.status] = counts.get(run.status, 0) + 1
        if run.status == FAILED:
            failed[run.target] = run.error or ""
        elif run.status == SUCCEEDED:
            failed.pop(run.target, None)  # fixed since: listed only while its latest run failed
    summary = ", ".join(f"{n:,} {status}" for status, n in sorted(counts.items())) or "no runs"
    lines = [f"*Daily backup digest* for plan `{plan.name}` ({now:%Y-%m-%d}): {summary} in the last 24 h."]
    if drills:
        lines.append("Restore drills: " + ", ".join(f"{n:,} {status}" for status, n in sorted(drills.items())))
    if stale_targets:
        shown = ", ".join(stale_targets[:20])
        more = f" and {len(stale_targets) - 20:,} more" if len(stale_targets) > 20 else ""
        lines.append(f"Past the RPO of {plan.rpo_hours:g} h ({len(stale_targets):,}): {shown}{more}")
    still_failing = sorted(failed.items())
    for target, error in still_failing[:10]:
        lines.append(f"- failed `{target}`: {error[:300]}")
    if len(still_failing) > 10:
        lines.append(f"... and {len(still_failing) - 10:,} more failed targets")
    failed_any = bool(counts.get(FAILED))
    status = "failed" if failed_any or stale_targets else "ok"
    return Message(
        kind=DIGEST,
        plan=plan.name,
        target="(digest)",
        status=status,
        text="\n".join(lines),
        at=now.isoformat(),
        key=collapse_key(DIGEST, plan.name, "(digest)", "", "", f"{now:%Y%m%d}"),
    )
