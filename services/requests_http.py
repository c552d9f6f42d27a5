"""An httplib2-shaped transport for googleapiclient that sends requests with ``requests``.

googleapiclient talks to an ``http`` object with httplib2's ``request(uri, method, body, headers)`` interface.
We give it this adapter instead of httplib2 for three reasons:

- one authorised ``requests`` session per thread (httplib2 objects are not thread-safe, and a worker may serve
  several tasks at once), with token refresh handled by ``google.auth``;
- a timeout on every call, so a hung connection becomes a retryable error instead of a stuck request;
- tests fake the API at the network edge with ``responses``, which intercepts ``requests``: the real
  googleapiclient still builds every URL, query and body and parses every error.
"""

from __future__ import annotations

import threading
from typing import Any

import httplib2
from google.auth.transport.requests import AuthorizedSession

DEFAULT_TIMEOUT_SECONDS = 60.0


class RequestsHttp:
    """Drop-in for ``httplib2.Http`` as far as googleapiclient uses it (``request`` only)."""

    def __init__(self, credentials: Any, timeout: float = DEFAULT_TIMEOUT_SECONDS):
        self.credentials = credentials
        self.timeout = timeout
        self._local = threading.local()

    def _session(self) -> AuthorizedSession:
        session = getattr(self._local, "session", None)
        if session is None:
            session = AuthorizedSession(self.credentials)
            self._local.session = session
        return session

    def request(
        self,
        uri: str,
        method: str = "GET",
        body: Any = None,
        headers: dict[str, str] | None = None,
        **_ignored: Any,  # httplib2's redirections / connection_type: requests handles both itself
    ) -> tuple[httplib2.Response, bytes]:
        response = self._session().request(method, uri, data=body, headers=headers, timeout=self.timeout)
        info = {key.lower(): value for key, value in response.headers.items()}
        info["status"] = str(response.status_code)
        # requests has already decoded any gzip body; a stale content-encoding header would make a reader
        # try to decode it twice.
        info.pop("content-encoding", None)
        return httplib2.Response(info), response.content


def discovery_client(rt: Any, api: str, version: str, endpoint: str | None) -> Any:
    """The googleapiclient client of ``api`` ``version`` for ``endpoint`` (None: Google's), built once per Runtime
    from the discovery document bundled with the library (no network call to build it), over ``RequestsHttp``."""
    from googleapiclient import discovery

    def build() -> Any:
        return discovery.build(
            api,
            version,
            http=RequestsHttp(rt.credentials()),
            static_discovery=True,
            cache_discovery=False,
            client_options={"api_endpoint": endpoint} if endpoint else None,
        )

    return rt.client(f"{api}-{version}:{endpoint or 'default'}", build)
