"""Google API errors sorted into retry or stop, in one place (STYLE.md practice 8): 429 and 5xx are retried,
other 4xx give up with the API's own message kept."""

from __future__ import annotations

from google.api_core import exceptions as core

from services.errors import PermanentError, TargetGone, TransientError

_TRANSIENT = (
    core.TooManyRequests,
    core.ResourceExhausted,
    core.ServiceUnavailable,
    core.InternalServerError,
    core.BadGateway,
    core.GatewayTimeout,
    core.DeadlineExceeded,
    core.Aborted,
)


def classify(exc: Exception, doing: str, gone_means_skip: bool = False) -> Exception:
    """The service error for ``exc`` raised while ``doing`` (a phrase like "exporting Customer")."""
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, _TRANSIENT):
        limited = isinstance(exc, (core.TooManyRequests, core.ResourceExhausted))
        return TransientError(f"{doing}: {message}", rate_limited=limited)
    if isinstance(exc, core.NotFound) and gone_means_skip:
        return TargetGone(f"{doing}: not found ({message})")
    if isinstance(exc, (core.Forbidden, core.PermissionDenied, core.Unauthenticated)):
        return PermanentError(f"{doing}: permission denied: {message}")
    return PermanentError(f"{doing}: {message}")
