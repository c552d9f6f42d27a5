"""HTTP access to a CouchDB-API server (Apache CouchDB, Cloudant, pouchdb-server) for the couchdb kind.

One ``CouchServer`` per server: a pooled ``requests.Session``, credentials kept out of every URL we print,
token buckets that cap requests per second (Cloudant Lite allows 10 writes and 20 reads a second and answers
429 beyond), and retries of 429 / 5xx / dropped connections that honour ``Retry-After`` before backing off.

What is left after the retries is judged by the same rules as every Google API (services/gcp_errors.py): a 404
is ``TargetGone`` (the database asked for is not there: a backup's target deleted since it was listed), 401/403
and other 4xx are permanent (``HttpRefused``, which keeps the status: a 413 makes a restore split its batch),
and 429/5xx that outlast the retries are transient.
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from services.errors import PermanentError, TargetGone, TransientError
from services.gcp_errors import ApiProblem, judge

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def redact_url(url: str) -> str:
    """``url`` without its user and password, safe for logs, errors and manifests."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """Separate ``https://user:pass@host`` into the bare URL and the (user, password) pair."""
    parts = urlsplit(url)
    if parts.username is None:
        return url.rstrip("/"), None
    from urllib.parse import unquote

    auth = (unquote(parts.username), unquote(parts.password or ""))
    return redact_url(url).rstrip("/"), auth


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, with bursts of at most ``burst``.

    Thread-safe. ``rate=None`` means unlimited. The clock and sleep are injectable for tests."""

    def __init__(
        self,
        rate: float | None,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until one is available. Returns the seconds waited."""
        if self.rate is None:
            return 0.0
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return waited
                shortfall = (1.0 - self._tokens) / self.rate
            self._sleep(shortfall)
            waited += shortfall


def retry_after_seconds(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Parse a ``Retry-After`` header: delta seconds or an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


@dataclass
class RetryPolicy:
    attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0  # a server asking for longer than this is treated as an outage


DEFAULT_RETRY = RetryPolicy()


class CouchServer:
    """One CouchDB-API server. Every request goes through ``request`` (rate limits, retries, clear errors)."""

    def __init__(
        self,
        url: str,
        auth: tuple[str, str] | None = None,
        writes_per_second: float | None = None,
        reads_per_second: float | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        bare, url_auth = split_credentials(url)
        self.url = bare
        self.session = requests.Session()
        self.session.auth = auth or url_auth
        self.session.headers.update({"Accept": "application/json", "User-Agent": "backup-scheduler-couchdb"})
        self.write_bucket = TokenBucket(writes_per_second, sleep=sleep)
        self.read_bucket = TokenBucket(reads_per_second, sleep=sleep)
        self.retry = retry or DEFAULT_RETRY
        self.timeout = timeout
        self._sleep = sleep
        self.retries = 0  # how many requests were retried, for stats and tests
        # After a 429/5xx with Retry-After, no thread sends anything before this time (time.monotonic()):
        # a server that asked us to wait means all of us, not just the request that was refused.
        self._not_before = 0.0
        self._pause_lock = threading.Lock()

    def close(self) -> None:
        self.session.close()

    def db_path(self, db: str, *rest: str) -> str:
        # Database names may contain '/', '+', '$', '(' ...: each must be percent-encoded in the path.
        return "/".join([quote(db, safe=""), *rest])

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: bytes | None = None,
        write: bool = False,
        stream: bool = False,
        ok_statuses: tuple[int, ...] = (),
    ) -> requests.Response:
        """Send one request with rate limiting and retries. 2xx (or a status in ``ok_statuses``) is returned;
        404 raises TargetGone; other 4xx PermanentError; 429/5xx after the last attempt TransientError."""
        url = f"{self.url}/{path}"
        headers = {"Content-Type": "application/json"} if body is not None else None
        bucket = self.write_bucket if write else self.read_bucket
        for attempt in range(1, self.retry.attempts + 1):
            self._wait_for_pause()
            bucket.acquire()
            try:
                resp = self.session.request(
                    method, url, params=params, data=body, headers=headers, stream=stream, timeout=self.timeout
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self.retry.attempts:
                    raise TransientError(f"{method} {redact_url(url)}: {type(exc).__name__}") from None
                self._backoff(attempt, None)
                continue
            if resp.status_code < 300 or resp.status_code in ok_statuses:
                return resp
            if resp.status_code in RETRYABLE_STATUS:
                wait = retry_after_seconds(resp.headers.get("Retry-After"))
                resp.close()
                if attempt == self.retry.attempts or (wait is not None and wait > self.retry.max_retry_after):
                    raise TransientError(
                        f"{method} {redact_url(url)}: HTTP {resp.status_code} after {attempt} attempts",
                        rate_limited=resp.status_code == 429,
                        retry_after=wait,
                    )
                self._backoff(attempt, wait)
                continue
            refused = _judged(resp, f"{method} {redact_url(url)}")
            resp.close()
            raise refused
        raise AssertionError("unreachable")  # the loop returns or raises

    def _wait_for_pause(self) -> None:
        with self._pause_lock:
            remaining = self._not_before - time.monotonic()
        if remaining > 0:
            self._sleep(remaining)

    def _backoff(self, attempt: int, retry_after: float | None) -> None:
        self.retries += 1
        if retry_after is not None:
            # The server said when: waiting less would only earn another 429, for every thread.
            with self._pause_lock:
                self._not_before = max(self._not_before, time.monotonic() + retry_after)
            self._wait_for_pause()
            return
        delay = min(self.retry.max_delay, self.retry.base_delay * 2 ** (attempt - 1))
        self._sleep(delay * random.uniform(0.5, 1.0))

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        resp = self.request("GET", path, params=params)
        return resp.json()

    def post_json(self, path: str, payload: Any, *, write: bool, params: dict[str, Any] | None = None) -> Any:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return self.request("POST", path, params=params, body=body, write=write).json()

    def all_dbs(self) -> list[str]:
        return list(self.get_json("_all_dbs"))

    def db_info(self, db: str) -> dict[str, Any]:
        return self.get_json(self.db_path(db))

    def changes(self, db: str, since: Any, *, all_leaves: bool, page_size: int) -> Iterator[list[dict[str, Any]]]:
        """Pages of ``_changes`` rows from ``since`` to the end of the feed as it was when each page was read.

        ``style=all_docs`` lists every leaf revision (conflicts and deleted leaves included)."""
        while True:
            params: dict[str, Any] = {
                "limit": page_size,
                "since": json.dumps(since) if not isinstance(since, str) else since,
            }
            if all_leaves:
                params["style"] = "all_docs"
            page = self.get_json(self.db_path(db, "_changes"), params)
            rows = page.get("results", [])
            if not rows:
                return
            yield rows
            since = page.get("last_seq", rows[-1]["seq"])
            if len(rows) < page_size:
                return

    def changes_with_docs(
        self, db: str, since: Any, *, attachments: bool, page_size: int, page_bytes: int
    ) -> Iterator[list[dict[str, Any]]]:
        """Pages of ``_changes?include_docs=true`` rows: each row's ``doc`` is the winning revision (tombstones
        included), without ``_revisions``. One request per page, the cheapest read a server offers.

        Documents range from bytes to megabytes, so the page length adapts to stay near ``page_bytes``."""
        limit = min(page_size, 100)
        while True:
            params: dict[str, Any] = {"limit": limit, "since": since, "include_docs": "true"}
            if attachments:
                params["attachments"] = "true"
            resp = self.request("GET", self.db_path(db, "_changes"), params=params)
            size = len(resp.content)
            page = resp.json()
            rows = page.get("results", [])
            if not rows:
                return
            yield rows
            since = page.get("last_seq", rows[-1]["seq"])
            if len(rows) < limit:
                return
            limit = max(1, min(page_size, page_bytes // max(1, size // len(rows))))

    def bulk_get(self, db: str, refs: list[tuple[str, str]], *, attachments: bool) -> list[dict[str, Any]]:
        """The documents at the given (id, rev) pairs with their ``_revisions`` history, in request order."""
        params = {"revs": "true"}
        if attachments:
            params["attachments"] = "true"
        payload = {"docs": [{"id": doc_id, "rev": rev} for doc_id, rev in refs]}
        answer = self.post_json(self.db_path(db, "_bulk_get"), payload, write=False, params=params)
        docs: list[dict[str, Any]] = []
        for result in answer.get("results", []):
            for entry in result.get("docs", []):
                if "ok" in entry:
                    docs.append(entry["ok"])
                # A revision gone since _changes listed it (compacted, purged) is not ours to invent: skip it.
        return docs


class HttpRefused(PermanentError):
    """A 4xx other than 404/429: retrying cannot help. ``status`` lets callers treat 413 specially."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _judged(resp: requests.Response, doing: str) -> Exception:
    """The service error for a refusal that retrying will not change: CouchDB's ``{"error", "reason"}`` body read
    as an API problem and judged like any API's, a 404 meaning the database (the target) is gone."""
    error, reason = "", resp.reason or ""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error, reason = str(body.get("error", "")), str(body.get("reason", "")) or reason
    judged = judge(
        ApiProblem(resp.status_code, error, reason or f"HTTP {resp.status_code}"), doing, gone_means_skip=True
    )
    if isinstance(judged, PermanentError) and not isinstance(judged, TargetGone):
        return HttpRefused(str(judged), resp.status_code)
    return judged
