"""The one seam for values that come from outside the plans: environment variables and Secret Manager.

Plans never hold a password or a webhook URL; they name where one is (``password_env: COUCH_PASSWORD``,
``secret: projects/p/secrets/s/versions/3``). Everything below the Runtime asks here, so tests give a Runtime
its own environment and nothing reads ``os.environ`` behind their back. Secret Manager versions are read with the
google-cloud-secret-manager client (REST transport, endpoint overridable as ``BACKUP_SECRETMANAGER_ENDPOINT``)
and cached for a few minutes: a rotated secret is picked up without a restart, and a busy fan-out does not call
Secret Manager once per task.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from services.errors import PermanentError

SECRET_VERSION = re.compile(r"^projects/[^/]+/secrets/[^/]+/versions/[^/]+$")
CACHE_SECONDS = 300.0


class Secrets:
    """Environment variables (a snapshot taken when the Runtime was made) and Secret Manager versions."""

    def __init__(
        self,
        environ: Mapping[str, str],
        credentials: Callable[[], Any],
        endpoint: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._environ = dict(environ)
        self._credentials = credentials
        self._endpoint = endpoint
        self._clock = clock
        self._cache: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._client: Any = None

    def env(self, name: str, default: str | None = None) -> str | None:
        """The environment variable ``name`` (stripped), or ``default`` when it is unset or empty."""
        value = self._environ.get(name, "").strip()
        return value or default

    def require_env(self, name: str, what: str) -> str:
        """The environment variable ``name``; PermanentError saying which variable and what it is for."""
        value = self.env(name)
        if value is None:
            raise PermanentError(f"environment variable {name} ({what}) is not set")
        return value

    def secret(self, version: str) -> str:
        """The text of Secret Manager secret version ``version`` (``projects/P/secrets/S/versions/V``)."""
        if not SECRET_VERSION.match(version):
            raise PermanentError(f"{version!r} is not a secret version (projects/P/secrets/S/versions/V)")
        with self._lock:
            cached = self._cache.get(version)
            if cached and self._clock() - cached[0] < CACHE_SECONDS:
                return cached[1]
        value = self._access(version)
        with self._lock:
            self._cache[version] = (self._clock(), value)
        return value

    def _access(self, version: str) -> str:
        from services.gcp_errors import classify

        try:
            # No retries here: a task that cannot read its secret answers 503 and the queue retries it.
            response = self._secret_manager().access_secret_version(name=version, retry=None, timeout=30)
        except Exception as exc:  # API errors, and requests' connection errors through the REST transport
            raise classify(exc, f"reading Secret Manager version {version}") from exc
        data: bytes = response.payload.data
        return data.decode().strip()

    def _secret_manager(self) -> Any:
        with self._lock:
            if self._client is None:
                from google.api_core.client_options import ClientOptions
                from google.cloud import secretmanager

                options = ClientOptions(api_endpoint=self._endpoint) if self._endpoint else None
                self._client = secretmanager.SecretManagerServiceClient(
                    credentials=self._credentials(), transport="rest", client_options=options
                )
            return self._client
