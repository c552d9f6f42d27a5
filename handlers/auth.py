"""Who may call what (DESIGN.md "Auth").

- cron routes: ``X-Appengine-Cron: true`` on App Engine (App Engine strips it from outside requests), or an admin.
- task routes: ``X-AppEngine-QueueName`` on App Engine, or a Google-signed OIDC token from the queue's service
  account (audience and email checked), or an admin.
- admin: an IAP JWT, or a Google ID token whose verified email is on the allowlist, or (set explicitly by the
  operator, for local runs and the local queue) the bearer token in ``BACKUP_LOCAL_TOKEN``.

Off App Engine, App Engine headers are never trusted.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Response, jsonify, request

from handlers import runtime

log = logging.getLogger(__name__)

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
IAP_CERTS_URL = "https://www.gstatic.com/iap/verify/public_key"
GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
IAP_ISSUER = "https://cloud.google.com/iap"
_CERTS_TTL = 3600.0


@dataclass(frozen=True)
class Caller:
    kind: str  # "cron", "queue", "admin"
    identity: str


class Denied(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_certs_cache: dict[str, tuple[float, dict[str, str]]] = {}
_certs_lock = threading.Lock()


def _certs(url: str) -> dict[str, str]:
    """Public keys for token signatures, cached for an hour (Google rotates them daily)."""
    import requests

    with _certs_lock:
        cached = _certs_cache.get(url)
        if cached and time.monotonic() - cached[0] < _CERTS_TTL:
            return cached[1]
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    data = response.json()  # {key id: PEM certificate or key}, the format of both Google endpoints above
    with _certs_lock:
        _certs_cache[url] = (time.monotonic(), data)
    return data


def verify_jwt(token: str, certs_url: str, audience: str | None, issuers: tuple[str, ...]) -> dict[str, Any]:
    """Verify signature, expiry, audience and issuer of ``token``; return its claims or raise Denied(403)."""
    from google.auth import exceptions as auth_exceptions
    from google.auth import jwt

    if not audience:
        raise Denied(403, "token verification needs an audience and none is configured")
    try:
        claims = jwt.decode(token, certs=_certs(certs_url), audience=audience, clock_skew_in_seconds=30)
    except (ValueError, auth_exceptions.GoogleAuthError) as exc:
        raise Denied(403, f"token rejected: {exc}") from None
    if claims.get("iss") not in issuers:
        raise Denied(403, f"token rejected: issuer {claims.get('iss')!r} is not trusted here")
    return claims


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return None


def _check_admin() -> Caller:
    settings = runtime().settings
    iap = request.headers.get("X-Goog-IAP-JWT-Assertion")
    if iap:
        claims = verify_jwt(iap, settings.endpoint("iap_certs") or IAP_CERTS_URL, settings.iap_audience, (IAP_ISSUER,))
        return Caller("admin", str(claims.get("email", claims.get("sub"))))
    token = _bearer()
    if token is None:
        raise Denied(401, "authentication required: an IAP JWT, a Google ID token, or the local token")
    if settings.local_token and hmac.compare_digest(token.encode(), settings.local_token.encode()):
        return Caller("admin", "local-token")
    claims = _verify_google_id_token(token)
    email = str(claims.get("email", "")).lower()
    if not claims.get("email_verified") or email not in settings.admin_emails:
        raise Denied(403, f"{email or 'this identity'} is not on the admin allowlist (BACKUP_ADMIN_EMAILS)")
    return Caller("admin", email)


def _verify_google_id_token(token: str) -> dict[str, Any]:
    settings = runtime().settings
    audience = settings.tasks_audience or settings.service_url
    return verify_jwt(token, settings.oidc_certs_url or GOOGLE_CERTS_URL, audience, GOOGLE_ISSUERS)


def _check_cron() -> Caller:
    settings = runtime().settings
    if settings.on_app_engine and request.headers.get("X-Appengine-Cron") == "true":
        return Caller("cron", "app-engine-cron")
    return _check_admin()


def _check_queue() -> Caller:
    settings = runtime().settings
    if settings.on_app_engine and request.headers.get("X-AppEngine-QueueName"):
        return Caller("queue", request.headers["X-AppEngine-QueueName"])
    token = _bearer()
    if (
        token
        and settings.tasks_service_account
        and not (settings.local_token and hmac.compare_digest(token.encode(), settings.local_token.encode()))
    ):
        claims = _verify_google_id_token(token)
        email = str(claims.get("email", "")).lower()
        if claims.get("email_verified") and email == settings.tasks_service_account.lower():
            return Caller("queue", email)
    return _check_admin()


def _guard(check: Callable[[], Caller]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                check()
            except Denied as denied:
                log.warning("denied %s %s: %s", request.method, request.path, denied)
                response: Response = jsonify({"error": str(denied)})
                response.status_code = denied.status
                if denied.status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="backup-scheduler"'
                return response
            return view(*args, **kwargs)

        return wrapped

    return decorator


cron_only = _guard(_check_cron)
queue_only = _guard(_check_queue)
admin_only = _guard(_check_admin)
