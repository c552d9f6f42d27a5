"""Queues that deliver tasks to ``/tasks/...``: Cloud Tasks in production, a local queue everywhere else.

Both take the same ``TaskSpec`` and both answer ``enqueue_many`` with whether each task was new: a task whose
name already exists counts as queued, which is what makes a second cron fire harmless.

queue.yaml is the one source of retry policy: Cloud Tasks reads it at deploy time, the local queue reads it here.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from services.errors import ConfigError
from services.runtime import Settings, utcnow
from services.yamlfile import load_yaml

log = logging.getLogger(__name__)

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class TaskSpec:
    """One task: POST ``path`` with ``payload`` as JSON, on ``queue``, not before ``schedule_time``."""

    queue: str
    path: str
    payload: dict[str, Any]
    name: str | None = None
    schedule_time: datetime | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """queue.yaml ``retry_parameters``, with the Cloud Tasks defaults where a field is absent."""

    min_backoff: float = 0.1
    max_backoff: float = 3600.0
    max_doublings: int = 16
    task_retry_limit: int | None = None  # None: retry forever (Cloud Tasks' default)
    task_age_limit: float | None = None

    def delay(self, retry_count: int) -> float:
        """Seconds to wait before retry number ``retry_count + 1`` (0-based count of failures so far minus one).

        The interval doubles ``max_doublings`` times from ``min_backoff``, then grows linearly by the last doubled
        interval, and never exceeds ``max_backoff`` (the Cloud Tasks rule)."""
        if retry_count <= self.max_doublings:
            interval = self.min_backoff * 2**retry_count
        else:
            interval = self.min_backoff * 2**self.max_doublings * (retry_count - self.max_doublings + 1)
        return float(min(interval, self.max_backoff))

    def gives_up_after(self, attempts: int, first_attempt: datetime, now: datetime) -> bool:
        """True when a task that has failed ``attempts`` times must not be tried again."""
        if self.task_retry_limit is not None and attempts > self.task_retry_limit:
            return True
        if self.task_age_limit is not None and (now - first_attempt).total_seconds() > self.task_age_limit:
            # Cloud Tasks needs both limits reached when both are set; with only an age limit, age decides.
            return self.task_retry_limit is None or attempts > self.task_retry_limit
        return False


@dataclass(frozen=True)
class QueueConfig:
    name: str
    rate: str = "5/s"
    max_concurrent_requests: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if text and text[-1] in _DURATION_UNITS:
        try:
            return float(text[:-1]) * _DURATION_UNITS[text[-1]]
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected seconds or a duration like '30s', '2h', '7d', got {value!r}")


def load_queue_configs(path: str | Path) -> dict[str, QueueConfig]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read queue file: {exc}") from exc
    raw = load_yaml(text, path.name) or {}
    configs = {}
    for entry in raw.get("queue") or []:
        name = entry.get("name")
        where = f"{path.name}: queue {name!r}"
        if name in configs:
            raise ConfigError(f"{where} is defined twice; only one may stay")
        retry = entry.get("retry_parameters") or {}
        policy = RetryPolicy(
            min_backoff=_seconds(retry.get("min_backoff_seconds", 0.1), f"{where} min_backoff_seconds"),
            max_backoff=_seconds(retry.get("max_backoff_seconds", 3600), f"{where} max_backoff_seconds"),
            max_doublings=int(retry.get("max_doublings", 16)),
            task_retry_limit=int(retry["task_retry_limit"]) if "task_retry_limit" in retry else None,
            task_age_limit=_seconds(retry["task_age_limit"], f"{where} task_age_limit")
            if "task_age_limit" in retry
            else None,
        )
        configs[name] = QueueConfig(
            name=name,
            rate=str(entry.get("rate", "5/s")),
            max_concurrent_requests=entry.get("max_concurrent_requests"),
            retry=policy,
        )
    return configs


class TaskQueue(Protocol):
    def enqueue_many(self, tasks: Sequence[TaskSpec]) -> list[bool]:
        """Create ``tasks``; for each, True if it was created, False if a task of that name already existed."""
        ...


def enqueue(queue: TaskQueue, task: TaskSpec) -> bool:
    return queue.enqueue_many([task])[0]


# --------------------------------------------------------------------------------------------------- Cloud Tasks


class CloudTasksQueue:
    """Cloud Tasks through google-cloud-tasks. App Engine targets by default (relative URI, routed to this
    service); HTTP targets with an OIDC token for hosting elsewhere. Creates are sent concurrently."""

    def __init__(self, settings: Settings, client: Any = None, concurrency: int = 32):
        self.settings = settings
        self._client = client
        self._lock = threading.Lock()
        self.concurrency = concurrency

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = make_tasks_client(self.settings, pool_size=self.concurrency)
            return self._client

    def build_task(self, spec: TaskSpec) -> Any:
        from google.cloud import tasks_v2
        from google.protobuf import timestamp_pb2

        body = json.dumps(spec.payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        on_worker = spec.queue in self.settings.worker_queues
        if on_worker and not self.settings.worker_url:
            raise ConfigError(
                f"queue {spec.queue!r} runs on the Cloud Run worker, and BACKUP_WORKER_URL is not set (docs/deploy.md)"
            )
        if self.settings.tasks_target == "appengine" and not on_worker:
            task = tasks_v2.Task(
                app_engine_http_request=tasks_v2.AppEngineHttpRequest(
                    http_method=tasks_v2.HttpMethod.POST,
                    relative_uri=spec.path,
                    headers=headers,
                    body=body,
                    app_engine_routing=tasks_v2.AppEngineRouting(service=self.settings.gae_service),
                )
            )
        else:
            if not self.settings.tasks_service_account:
                raise ConfigError("BACKUP_TASKS_SERVICE_ACCOUNT is required for HTTP task targets (OIDC identity)")
            base = self.settings.worker_url if on_worker else self.settings.service_url
            assert base is not None
            task = tasks_v2.Task(
                http_request=tasks_v2.HttpRequest(
                    http_method=tasks_v2.HttpMethod.POST,
                    url=base + spec.path,
                    headers=headers,
                    body=body,
                    oidc_token=tasks_v2.OidcToken(
                        service_account_email=self.settings.tasks_service_account,
                        # The worker checks tokens against its own URL; the app against its audience setting.
                        audience=base if on_worker else self.settings.tasks_audience or self.settings.service_url,
                    ),
                )
            )
        if spec.name:
            task.name = self.client.task_path(
                self.settings.project, self.settings.tasks_location, spec.queue, spec.name
            )
        if spec.schedule_time is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(spec.schedule_time.astimezone(UTC).replace(tzinfo=None))
            task.schedule_time = stamp
        return task

    def _create(self, spec: TaskSpec) -> bool:
        from google.api_core import exceptions, retry

        parent = self.client.queue_path(self.settings.project, self.settings.tasks_location, spec.queue)
        # The create call itself is retried on transient errors; a retried create that had in fact succeeded
        # answers AlreadyExists for a named task, which is the same as success.
        policy = retry.Retry(
            predicate=retry.if_exception_type(
                exceptions.ServiceUnavailable,
                exceptions.InternalServerError,
                exceptions.TooManyRequests,
                exceptions.ResourceExhausted,
                exceptions.DeadlineExceeded,
            ),
            initial=0.2,
            maximum=5.0,
            timeout=60.0,
        )
        try:
            self.client.create_task(parent=parent, task=self.build_task(spec), retry=policy, timeout=30.0)
        except exceptions.Conflict:  # AlreadyExists over gRPC; a plain 409 Conflict over REST
            return False
        return True

    def enqueue_many(self, tasks: Sequence[TaskSpec]) -> list[bool]:
        if len(tasks) <= 1:
            return [self._create(task) for task in tasks]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(tasks))) as pool:
            return list(pool.map(self._create, tasks))


def make_tasks_client(settings: Settings, pool_size: int = 32) -> Any:
    """A CloudTasksClient. ``BACKUP_TASKS_ENDPOINT`` overrides where it connects:
    ``http://host:port`` a local REST stand-in (anonymous credentials), ``grpc://host:port`` a local gRPC emulator
    (insecure channel), any other value a private endpoint (Private Service Connect) with normal credentials."""
    from google.api_core.client_options import ClientOptions
    from google.cloud import tasks_v2

    endpoint = settings.tasks_endpoint
    if endpoint and endpoint.startswith("grpc://"):
        import grpc
        from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

        channel = grpc.insecure_channel(endpoint[len("grpc://") :])
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    if endpoint and endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        client = tasks_v2.CloudTasksClient(
            transport="rest", client_options=ClientOptions(api_endpoint=endpoint), credentials=AnonymousCredentials()
        )
    else:
        options = ClientOptions(api_endpoint=endpoint) if endpoint else None
        client = tasks_v2.CloudTasksClient(transport=settings.tasks_transport, client_options=options)
    _widen_rest_pool(client, pool_size)
    return client


def _widen_rest_pool(client: Any, pool_size: int) -> None:
    """requests keeps 10 connections per host by default; concurrent creates need as many as threads."""
    session = getattr(getattr(client, "_transport", None), "_session", None)
    if session is None:
        return
    import requests.adapters

    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)


# --------------------------------------------------------------------------------------------------- local queue


class LocalQueue:
    """A durable queue in one SQLite file: the embedded default off App Engine.

    Task names are unique forever in the file (Cloud Tasks remembers names for a while after a task ran; here we
    are stricter), so the same dedup-by-name logic is exercised locally. ``LocalDispatcher`` delivers the tasks.
    """

    def __init__(self, path: str | Path, clock: Any = utcnow):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                """CREATE TABLE IF NOT EXISTS tasks (
                    name TEXT PRIMARY KEY, queue TEXT NOT NULL, path TEXT NOT NULL, payload TEXT NOT NULL,
                    eta REAL NOT NULL, created REAL NOT NULL, first_attempt REAL,
                    attempts INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'pending',
                    last_status INTEGER, last_error TEXT)"""
            )
            db.execute("CREATE INDEX IF NOT EXISTS tasks_due ON tasks (state, eta)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def enqueue_many(self, tasks: Sequence[TaskSpec]) -> list[bool]:
        now = self.clock().timestamp()
        created = []
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            for spec in tasks:
                eta = spec.schedule_time.timestamp() if spec.schedule_time else now
                cursor = db.execute(
                    "INSERT OR IGNORE INTO tasks (name, queue, path, payload, eta, created) VALUES (?,?,?,?,?,?)",
                    (spec.name or uuid.uuid4().hex, spec.queue, spec.path, json.dumps(spec.payload), eta, now),
                )
                created.append(cursor.rowcount == 1)
            db.execute("COMMIT")
        return created

    def claim_due(self, limit: int) -> list[dict[str, Any]]:
        """Mark up to ``limit`` due tasks as running and return them (oldest ETA first)."""
        now = self.clock().timestamp()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT name, queue, path, payload, eta, attempts, first_attempt FROM tasks"
                " WHERE state = 'pending' AND eta <= ? ORDER BY eta LIMIT ?",
                (now, limit),
            ).fetchall()
            for row in rows:
                db.execute(
                    "UPDATE tasks SET state = 'running', first_attempt = COALESCE(first_attempt, ?) WHERE name = ?",
                    (now, row[0]),
                )
            db.execute("COMMIT")
        keys = ("name", "queue", "path", "payload", "eta", "attempts", "first_attempt")
        return [dict(zip(keys, row, strict=True)) | {"first_attempt": row[6] or now} for row in rows]

    def settle(self, name: str, *, state: str, status: int | None, error: str | None, eta: float | None = None) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE tasks SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?,"
                " eta = COALESCE(?, eta) WHERE name = ?",
                (state, status, error, eta, name),
            )

    def requeue_running(self) -> int:
        """Tasks left 'running' by a dispatcher that died go back to pending (delivered at least once)."""
        with self._connect() as db:
            return db.execute("UPDATE tasks SET state = 'pending' WHERE state = 'running'").rowcount

    def tasks(self, state: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT name, queue, path, payload, eta, attempts, state, last_status, last_error FROM tasks"
        args: tuple[Any, ...] = ()
        if state:
            query += " WHERE state = ?"
            args = (state,)
        keys = ("name", "queue", "path", "payload", "eta", "attempts", "state", "last_status", "last_error")
        with self._connect() as db:
            return [dict(zip(keys, row, strict=True)) for row in db.execute(query + " ORDER BY created", args)]

    def pending_count(self) -> int:
        with self._connect() as db:
            count: int = db.execute("SELECT COUNT(*) FROM tasks WHERE state IN ('pending', 'running')").fetchone()[0]
            return count


class LocalDispatcher:
    """Delivers due tasks of a ``LocalQueue`` over HTTP to the local server, as Cloud Tasks would: the same
    ``X-AppEngine-*`` headers, and retries with the backoff of the task's queue in queue.yaml. Because App Engine
    headers are never trusted off App Engine, it also authenticates with the local token. Tasks of the queues in
    ``routes`` go to that queue's own server (the local stand-in of the Cloud Run worker)."""

    def __init__(
        self,
        queue: LocalQueue,
        base_url: str,
        token: str | None,
        configs: dict[str, QueueConfig],
        concurrency: int = 4,
        poll_interval: float = 0.2,
        request_timeout: float = 600.0,
        routes: dict[str, str] | None = None,
    ):
        self.queue = queue
        self.base_url = base_url.rstrip("/")
        self.routes = {name: url.rstrip("/") for name, url in (routes or {}).items()}
        self.token = token
        self.configs = configs
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="local-queue")
        self._in_flight = threading.Semaphore(concurrency)

    def start(self) -> LocalDispatcher:
        self.queue.requeue_running()
        self._thread = threading.Thread(target=self._loop, name="local-queue-dispatcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            claimed = 0
            while self._in_flight.acquire(blocking=False):
                tasks = self.queue.claim_due(1)
                if not tasks:
                    self._in_flight.release()
                    break
                claimed += 1
                self._pool.submit(self._deliver_and_release, tasks[0])
            if not claimed:
                self._stop.wait(self.poll_interval)

    def _deliver_and_release(self, task: dict[str, Any]) -> None:
        try:
            self.deliver(task)
        finally:
            self._in_flight.release()

    def deliver(self, task: dict[str, Any]) -> None:
        import requests

        headers = {
            "Content-Type": "application/json",
            "X-AppEngine-QueueName": task["queue"],
            "X-AppEngine-TaskName": task["name"],
            "X-AppEngine-TaskRetryCount": str(task["attempts"]),
            "X-AppEngine-TaskExecutionCount": str(task["attempts"]),
            "X-AppEngine-TaskETA": f"{task['eta']:.6f}",
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        status: int | None = None
        error: str | None = None
        try:
            base = self.routes.get(task["queue"], self.base_url)
            response = requests.post(
                base + task["path"], data=task["payload"], headers=headers, timeout=self.request_timeout
            )
            status = response.status_code
            if 200 <= status < 300:
                self.queue.settle(task["name"], state="done", status=status, error=None)
                return
            error = response.text[:500]
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {exc}"
        policy = self.configs.get(task["queue"], QueueConfig(task["queue"])).retry
        attempts = task["attempts"] + 1
        now = time.time()
        first = datetime.fromtimestamp(task["first_attempt"], UTC)
        if policy.gives_up_after(attempts, first, datetime.fromtimestamp(now, UTC)):
            log.error("local queue: task %s gave up after %d attempts: %s", task["name"], attempts, error)
            self.queue.settle(task["name"], state="failed", status=status, error=error)
            return
        delay = policy.delay(attempts - 1)
        log.info("local queue: task %s answered %s, retry in %.1fs", task["name"], status, delay)
        self.queue.settle(task["name"], state="pending", status=status, error=error, eta=now + delay)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until nothing is pending or running (tests and the CLI's --wait use it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue.pending_count() == 0:
                return True
            time.sleep(0.05)
        return False


def make_queue(settings: Settings) -> TaskQueue:
    if settings.queue_backend == "cloudtasks":
        return CloudTasksQueue(settings)
    return LocalQueue(settings.local_queue_db)
