"""Google API errors sorted into retry or stop, in one place for every kind (STYLE.md practice 8).

Whatever client raised it (google-api-core for the gRPC/proto-plus clients, googleapiclient's ``HttpError`` for the
discovery clients, ``requests`` for a plain HTTP call), an error is judged by the same rules:

- 429, quota and rate-limit reasons, 408, 5xx, a 409 that is a conflict (another operation in flight), a resource
  not ready yet, a dropped connection: ``TransientError``; the queue retries with its backoff.
- 404: ``TargetGone`` when the thing missing is the target itself (``gone_means_skip``), else ``PermanentError``.
- 401/403: ``PermanentError`` naming the missing permission (from the API's message, or the one the caller says
  the call needs) and where to grant it.
- anything else in 4xx: ``PermanentError`` with the API's own message kept.

A 409 "already exists" is not an error to classify: callers that create something by a deterministic name pass
409 through (``passthrough``) and treat it as "an earlier delivery made it".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

import requests
from google.api_core import exceptions as core
from googleapiclient.errors import HttpError

from services.errors import PermanentError, TargetGone, TransientError

RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded", "RESOURCE_EXHAUSTED"})
NOT_READY_REASONS = frozenset({"resourceNotReady", "resourceInUseByAnotherResource", "FAILED_PRECONDITION"})
ALREADY_EXISTS_REASONS = frozenset({"alreadyExists", "ALREADY_EXISTS"})
_PERMISSION = re.compile(r"'([a-z]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_.]+)'")  # as APIs quote it: 'compute.disks.list'

_TRANSIENT_CORE = (
    core.TooManyRequests,
    core.ResourceExhausted,
    core.ServiceUnavailable,
    core.InternalServerError,
    core.BadGateway,
    core.GatewayTimeout,
    core.DeadlineExceeded,
    core.Aborted,
    core.Conflict,
)


@dataclass(frozen=True)
class ApiProblem:
    """What an API said, whatever shape its error body had: HTTP status, the first reason (or google.rpc status
    name), the message, and ``Retry-After`` seconds when given."""

    status: int
    reason: str
    message: str
    retry_after: float | None = None

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and (self.reason in ALREADY_EXISTS_REASONS or "already exists" in self.message)


def problem_of(exc: HttpError) -> ApiProblem:
    """Status, reason and message of a googleapiclient error (Compute style ``errors[0].reason`` or the newer
    ``status`` field), with the raw body as the message when it is not JSON."""
    status = int(exc.resp.status)
    reason, message = "", ""
    try:
        error = json.loads(exc.content).get("error", {})
        message = str(error.get("message", ""))
        details = error.get("errors") or []
        if details and isinstance(details[0], dict):
            reason = str(details[0].get("reason", ""))
        reason = reason or str(error.get("status", ""))
    except (ValueError, AttributeError, TypeError):
        content = exc.content
        message = content.decode("utf-8", "replace")[:300] if isinstance(content, bytes) else str(exc)
    retry_after = exc.resp.get("retry-after") if hasattr(exc.resp, "get") else None
    seconds = float(retry_after) if isinstance(retry_after, str) and retry_after.isdigit() else None
    return ApiProblem(status, reason, message or f"HTTP {status}", seconds)


def judge(
    problem: ApiProblem,
    doing: str,
    *,
    gone_means_skip: bool = False,
    where: str = "",
    permission: str | None = None,
) -> Exception:
    """The service error for an API's answer. ``where`` (e.g. "in project p1") and ``permission`` (what the call
    needs) only make the message more useful."""
    status, reason, message = problem.status, problem.reason, problem.message
    place = f" {where}" if where else ""
    if status == 429 or reason in RATE_LIMIT_REASONS:
        return TransientError(
            f"{doing}: rate limited{place}: {message}", rate_limited=True, retry_after=problem.retry_after
        )
    if status >= 500 or status == 408:
        return TransientError(f"{doing}: the API answered {status}{place}: {message}")
    if reason in NOT_READY_REASONS and status in (400, 409):
        return TransientError(f"{doing}: busy, will retry{place}: {message}")
    if status == 409 and not problem.already_exists:
        return TransientError(f"{doing}: conflicting operation in progress{place}: {message}")
    if status == 404:
        if gone_means_skip:
            return TargetGone(f"{doing}: not found{place}: {message}")
        return PermanentError(f"{doing}: not found{place}: {message}")
    if status in (401, 403):
        found = _PERMISSION.search(message)
        needs = found.group(1) if found else permission or "(the API did not name it)"
        grant = f" Grant the service account a role with it{place}." if where else ""
        return PermanentError(f"{doing}: permission denied{place}: missing {needs}.{grant} API said: {message}")
    return PermanentError(f"{doing}: the API answered {status} {reason}{place}: {message}".replace("  ", " "))


def classify(
    exc: BaseException,
    doing: str,
    gone_means_skip: bool = False,
    *,
    where: str = "",
    permission: str | None = None,
) -> Exception:
    """The service error for ``exc`` raised while ``doing`` (a phrase like "exporting Customer")."""
    if isinstance(exc, HttpError):
        return judge(problem_of(exc), doing, gone_means_skip=gone_means_skip, where=where, permission=permission)
    if isinstance(exc, requests.RequestException):
        return TransientError(f"{doing}: cannot reach the API: {exc}")
    if isinstance(exc, core.GoogleAPICallError):
        message = exc.message or str(exc)
        if isinstance(exc, _TRANSIENT_CORE) and not isinstance(exc, core.AlreadyExists):
            limited = isinstance(exc, (core.TooManyRequests, core.ResourceExhausted))
            return TransientError(f"{doing}: {message}", rate_limited=limited)
        code = int(exc.code) if exc.code is not None else 0
        reason = getattr(exc, "reason", None) or ""
        return judge(
            ApiProblem(code, str(reason), message),
            doing,
            gone_means_skip=gone_means_skip,
            where=where,
            permission=permission,
        )
    if isinstance(exc, core.RetryError):
        return TransientError(f"{doing}: still failing when retries ran out: {exc.cause or exc}")
    return PermanentError(f"{doing}: unexpected {type(exc).__name__}: {exc}")


def execute(
    request: Any,
    doing: str,
    *,
    where: str = "",
    permission: str | None = None,
    gone_means_skip: bool = False,
    passthrough: tuple[int, ...] = (),
) -> Any:
    """Run one googleapiclient request (no client-side retries: the queue retries). Errors become service errors,
    except HTTP statuses in ``passthrough``, which the caller handles itself (raised as the original HttpError)."""
    try:
        return request.execute(num_retries=0)
    except HttpError as exc:
        if int(exc.resp.status) in passthrough:
            raise
        raise classify(exc, doing, gone_means_skip, where=where, permission=permission) from exc
    except requests.RequestException as exc:
        raise TransientError(f"{doing}: cannot reach the API: {exc}") from exc


def encode_page_token(project: str, api_token: str) -> str:
    """A fan-out page token across several projects' listings: which project, and the API's own page token."""
    raw = json.dumps({"project": project, "api_token": api_token}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_page_token(token: str, projects: tuple[str, ...], what: str) -> tuple[int, str]:
    """(index in ``projects``, API page token) from ``encode_page_token``; PermanentError for a token this service
    did not issue, or one naming a project the plan no longer lists."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(token.encode()))
        project, api_token = str(raw["project"]), str(raw["api_token"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise PermanentError(f"{what} page token {token[:40]!r} is not one this service issued") from None
    if project not in projects:
        raise PermanentError(f"{what} page token names project {project!r}, which the plan no longer lists")
    return projects.index(project), api_token


def next_page_token(projects: tuple[str, ...], index: int, api_token: str | None) -> str | None:
    """Where a listing across ``projects`` goes on after project ``index``'s page: its next page, else the next
    project's first page, else nowhere."""
    if api_token:
        return encode_page_token(projects[index], api_token)
    if index + 1 < len(projects):
        return encode_page_token(projects[index + 1], "")
    return None
