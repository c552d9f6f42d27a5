"""Everything a service needs from its surroundings, read once: settings from the environment, the plans,
the clock, and lazily created clients. Handlers, the CLI and tests each build one ``Runtime``."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.errors import ConfigError

if TYPE_CHECKING:
    from services.plans import Plan

ROOT = Path(__file__).resolve().parent.parent


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Settings:
    """Deployment settings. On App Engine most come from app.yaml ``env_variables``; locally from the
    environment with embedded defaults, so ``make run`` needs none."""

    project: str
    on_app_engine: bool
    tasks_location: str = "us-central1"
    queue_backend: str = "local"  # "cloudtasks" | "local"
    tasks_endpoint: str | None = None  # Cloud Tasks emulator / Private Service Connect
    tasks_transport: str = "grpc"  # "grpc" | "rest"
    tasks_target: str = "appengine"  # "appengine" | "http"
    gae_service: str = "default"  # the App Engine service tasks are routed to
    service_url: str = "http://127.0.0.1:8080"  # where HTTP targets and the local queue send tasks
    tasks_service_account: str | None = None  # OIDC identity for HTTP targets
    tasks_audience: str | None = None
    local_token: str | None = None
    admin_emails: tuple[str, ...] = ()
    iap_audience: str | None = None
    oidc_certs_url: str | None = None  # override for tests and air-gapped setups
    plans_path: Path = ROOT / "plans.yaml"
    queue_yaml: Path = ROOT / "queue.yaml"
    cron_yaml: Path = ROOT / "cron.yaml"
    local_queue_db: Path = ROOT / ".local" / "queue.sqlite3"
    datastore_admin_endpoint: str | None = None
    export_local_root: Path | None = None  # emulator exports land on local disk, mirrored into the bucket
    retry_error_threshold: int = 3
    endpoints: dict[str, str] = field(default_factory=dict)
    # A job's task (our own code doing the work) stops, checkpoints and continues in a follow-up task after this
    # long: below App Engine's 10-minute request deadline, with room to save the checkpoint.
    job_budget_seconds: float = 480.0
    # Queues whose tasks run on the Cloud Run worker (the tools App Engine lacks: a mounted share, the mariadb
    # client), at worker_url; every other queue's tasks run on App Engine (or service_url for HTTP targets).
    worker_url: str | None = None
    worker_queues: tuple[str, ...] = ("directory", "sqlsync")
    # BACKUP_CREDENTIALS=anonymous: Google API clients send no credentials, for local stand-ins only (make run);
    # refused on App Engine and Cloud Run.
    anonymous_credentials: bool = False
    # The environment as it was read, for the variables plans name (a server URL, a password): read through
    # Runtime.secrets, never from os.environ further down.
    environ: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def endpoint(self, api: str) -> str | None:
        """API endpoint override for ``api`` (``compute``, ``sqladmin``, ``file`` ...) from the environment."""
        return self.endpoints.get(api)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        on_app_engine = env.get("GAE_ENV", "").startswith("standard")
        project = env.get("BACKUP_PROJECT") or env.get("GOOGLE_CLOUD_PROJECT") or env.get("DATASTORE_PROJECT_ID")
        if not project:
            if on_app_engine:
                raise ConfigError("GOOGLE_CLOUD_PROJECT is not set (App Engine always sets it)")
            project = "demo-backups"
        endpoints = {
            key[len("BACKUP_") : -len("_ENDPOINT")].lower(): value
            for key, value in env.items()
            if key.startswith("BACKUP_") and key.endswith("_ENDPOINT") and value
        }

        def path(name: str, default: Path) -> Path:
            return Path(env[name]) if env.get(name) else default

        threshold = env.get("BACKUP_RETRY_ERROR_THRESHOLD", "3")
        if not threshold.isdigit():
            raise ConfigError(f"BACKUP_RETRY_ERROR_THRESHOLD: expected a whole number, got {threshold!r}")
        budget_text = env.get("BACKUP_JOB_BUDGET_SECONDS", "480")
        try:
            budget = float(budget_text)
        except ValueError:
            budget = -1.0
        if not 0 <= budget <= 3300:  # 0: every task does one smallest unit of work, then hands on (try resumes)
            raise ConfigError(
                f"BACKUP_JOB_BUDGET_SECONDS: expected seconds from 0 to 3300 (under the request deadline), got"
                f" {budget_text!r}"
            )
        worker_url = (env.get("BACKUP_WORKER_URL") or "").rstrip("/") or None
        if worker_url is not None and not worker_url.startswith(("https://", "http://")):
            raise ConfigError(f"BACKUP_WORKER_URL: expected the worker's https:// URL, got {worker_url!r}")
        backend = env.get("BACKUP_QUEUE_BACKEND") or ("cloudtasks" if on_app_engine else "local")
        if backend not in ("cloudtasks", "local"):
            raise ConfigError(f"BACKUP_QUEUE_BACKEND: expected 'cloudtasks' or 'local', got {backend!r}")
        target = env.get("BACKUP_TASKS_TARGET", "appengine")
        if target not in ("appengine", "http"):
            raise ConfigError(f"BACKUP_TASKS_TARGET: expected 'appengine' or 'http', got {target!r}")
        transport = env.get("BACKUP_TASKS_TRANSPORT", "grpc")
        if transport not in ("grpc", "rest"):
            raise ConfigError(f"BACKUP_TASKS_TRANSPORT: expected 'grpc' or 'rest', got {transport!r}")
        on_cloud_run = bool(env.get("K_SERVICE"))
        if (on_app_engine or on_cloud_run) and env.get("BACKUP_LOCAL_TOKEN"):
            where = "App Engine" if on_app_engine else "Cloud Run"
            raise ConfigError(
                f"BACKUP_LOCAL_TOKEN is set on {where}: it is for local runs only (make run); admins use IAP or a"
                " Google ID token (BACKUP_ADMIN_EMAILS). Remove it from the deployment's environment"
            )
        credentials = env.get("BACKUP_CREDENTIALS", "default")
        if credentials not in ("default", "anonymous"):
            raise ConfigError(f"BACKUP_CREDENTIALS: expected 'default' or 'anonymous', got {credentials!r}")
        if (on_app_engine or on_cloud_run) and credentials == "anonymous":
            raise ConfigError("BACKUP_CREDENTIALS=anonymous is for local stand-ins; remove it from the deployment")
        if on_cloud_run and not env.get("BACKUP_TASKS_AUDIENCE"):
            raise ConfigError(
                "BACKUP_TASKS_AUDIENCE is not set: on the Cloud Run worker it must be the worker's own URL, the"
                " audience of the OIDC tokens its queues send (docs/deploy.md)"
            )
        if on_app_engine and not (env.get("BACKUP_SERVICE_URL") or env.get("BACKUP_TASKS_AUDIENCE")):
            # Google ID tokens are checked against this audience; a default would accept tokens minted for
            # another service (or a well-known local address) and refuse the ones minted for this one.
            raise ConfigError(
                "BACKUP_SERVICE_URL is not set: on App Engine it must be this service's own URL"
                " (e.g. https://PROJECT_ID.REGION_ID.r.appspot.com), the audience admins and queues mint ID tokens"
                " for. Set it in app.yaml env_variables (docs/deploy.md)"
            )
        return cls(
            project=project,
            on_app_engine=on_app_engine,
            tasks_location=env.get("BACKUP_TASKS_LOCATION", "us-central1"),
            queue_backend=backend,
            tasks_endpoint=env.get("BACKUP_TASKS_ENDPOINT") or None,
            tasks_transport=transport,
            tasks_target=target,
            gae_service=env.get("GAE_SERVICE", "default"),
            service_url=env.get("BACKUP_SERVICE_URL", "http://127.0.0.1:8080").rstrip("/"),
            tasks_service_account=env.get("BACKUP_TASKS_SERVICE_ACCOUNT") or None,
            tasks_audience=env.get("BACKUP_TASKS_AUDIENCE") or None,
            local_token=env.get("BACKUP_LOCAL_TOKEN") or None,
            admin_emails=tuple(e.strip().lower() for e in env.get("BACKUP_ADMIN_EMAILS", "").split(",") if e.strip()),
            iap_audience=env.get("BACKUP_IAP_AUDIENCE") or None,
            oidc_certs_url=env.get("BACKUP_OIDC_CERTS_URL") or None,
            plans_path=path("BACKUP_PLANS", ROOT / "plans.yaml"),
            queue_yaml=path("BACKUP_QUEUE_YAML", ROOT / "queue.yaml"),
            cron_yaml=path("BACKUP_CRON_YAML", ROOT / "cron.yaml"),
            local_queue_db=path("BACKUP_LOCAL_QUEUE_DB", ROOT / ".local" / "queue.sqlite3"),
            datastore_admin_endpoint=env.get("BACKUP_DATASTORE_ADMIN_ENDPOINT") or None,
            export_local_root=Path(env["BACKUP_EXPORT_LOCAL_ROOT"]) if env.get("BACKUP_EXPORT_LOCAL_ROOT") else None,
            retry_error_threshold=int(threshold),
            endpoints=endpoints,
            job_budget_seconds=budget,
            worker_url=worker_url,
            worker_queues=tuple(
                q.strip() for q in env.get("BACKUP_WORKER_QUEUES", "directory,sqlsync").split(",") if q.strip()
            ),
            anonymous_credentials=credentials == "anonymous",
            environ=env,
        )


class Runtime:
    """Settings + plans + clock + clients. Clients are created on first use and shared (they are thread-safe)."""

    def __init__(
        self,
        settings: Settings,
        plans: dict[str, Any] | None = None,
        clock: Callable[[], datetime] = utcnow,
        credentials: Any = None,
    ):
        self.settings = settings
        self._plans = plans
        self.clock = clock
        self._credentials = credentials
        self._lock = threading.RLock()  # a factory may ask for another client
        self._clients: dict[str, Any] = {}

    def now(self) -> datetime:
        return self.clock()

    @property
    def plans(self) -> dict[str, Plan[Any]]:
        if self._plans is None:
            from services.plans import load_plans

            self._plans = load_plans(self.settings.plans_path)
        return self._plans

    def client(self, name: str, factory: Callable[[], Any]) -> Any:
        """The shared client called ``name``, created by ``factory`` the first time it is asked for."""
        with self._lock:
            if name not in self._clients:
                self._clients[name] = factory()
            return self._clients[name]

    @property
    def given_credentials(self) -> Any:
        """The credentials this Runtime was built with, or None to let each client find its own (ADC)."""
        return self._credentials

    def credentials(self) -> Any:
        """Credentials for Google APIs built with googleapiclient: the ones given (tests pass anonymous
        credentials for local fakes; BACKUP_CREDENTIALS=anonymous does the same for make run), else Application
        Default Credentials."""
        if self._credentials is None and self.settings.anonymous_credentials:
            from google.auth.credentials import AnonymousCredentials

            self._credentials = AnonymousCredentials()
        if self._credentials is None:
            import google.auth

            self._credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        return self._credentials

    @property
    def secrets(self) -> Any:
        """Environment variables and Secret Manager versions, through one seam (services/secrets.py)."""
        from services.secrets import Secrets

        return self.client(
            "secrets",
            lambda: Secrets(self.settings.environ, self.credentials, self.settings.endpoint("secretmanager")),
        )

    def datastore(self) -> Any:
        from google.cloud import datastore

        return self.client("datastore", lambda: datastore.Client(project=self.settings.project))

    def storage(self) -> Any:
        from google.cloud import storage  # type: ignore[attr-defined]

        return self.client("storage", lambda: storage.Client(project=self.settings.project))
