"""Who may call what (DESIGN.md "Auth").

- cron routes: ``X-Appengine-Cron: true`` on App Engine (App Engine strips it from outside requests), or an admin.
- task routes: ``X-AppEngine-QueueName`` on App Engine, or a Google-signed OIDC token from the queue's service
  account (audience and email checked), or an admin.
- admin: an IAP JWT or a Google ID token whose verified email (or its domain) is on the allowlist, or, in a local
  run only (set by ``make run``, over loopback), the bearer token in ``BACKUP_LOCAL_TOKEN``, which a browser holds
  as an HttpOnly, SameSite=Strict cookie after following the one-time link ``make run`` prints (``/signin``).
- admin routes that change something also refuse cross-site requests (``same_site_only``): an IAP session is a
  cookie a browser sends on its own, so a form on another site must not be able to start a plan.

Off App Engine, App Engine headers are never trusted. Refusals say what is missing, never what would be accepted
(audiences, project numbers).
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import Response, g, jsonify, request

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
    try:
        response = requests.get(url, timeout=10)
        response.raise_for_status()
        data = response.json()  # {key id: PEM certificate or key}, the format of both Google endpoints above
    except (requests.RequestException, ValueError) as exc:
        # Not the caller's fault, and it may pass: 503 lets a queue retry instead of dropping the task.
        raise Denied(503, f"cannot fetch token signing keys from {url}: {exc}") from None
    with _certs_lock:
        _certs_cache[url] = (time.monotonic(), data)
    return data


def verify_jwt(token: str, certs_url: str, audience: str | None, issuers: tuple[str, ...]) -> dict[str, Any]:
    """Verify signature, expiry, audience and issuer of ``token``; return its claims or raise Denied(403)."""
    from google.auth import exceptions as auth_exceptions
    from google.auth import jwt

    if not audience:
        raise Denied(403, "token verification is not configured on this service (no audience); see docs/deploy.md")
    if token.count(".") != 2:
        raise Denied(403, "token rejected: it is neither a Google-signed JWT nor this run's local token")
    try:
        claims = jwt.decode(token, certs=_certs(certs_url), audience=audience, clock_skew_in_seconds=30)
    except (ValueError, auth_exceptions.GoogleAuthError) as exc:
        # google.auth's message names the audiences it expected: logged for the operator, not told to the caller.
        log.info("token rejected: %s", exc)
        raise Denied(403, f"token rejected: {_reason(exc)}") from None
    if claims.get("iss") not in issuers:
        raise Denied(403, "token rejected: not issued by a trusted issuer")
    return claims


def _reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "audience" in text:
        return "it was not minted for this service (wrong audience)"
    if "expired" in text or "too early" in text or "used too" in text:
        return "it has expired or is not valid yet"
    if "signature" in text or "certificate" in text or "key" in text:
        return "its signature does not verify"
    return "it could not be verified"


def allowed_admin(email: str, allowlist: tuple[str, ...]) -> bool:
    """``email`` is an admin when the allowlist names it, or its domain as ``@example.com``."""
    email = email.lower()
    domain = "@" + email.rsplit("@", 1)[-1] if "@" in email else None
    return email in allowlist or (domain is not None and domain in allowlist)


def from_loopback() -> bool:
    """The request came straight from this machine (not through a proxy that forwards for someone else)."""
    if request.headers.get("X-Forwarded-For") or request.headers.get("Forwarded"):
        return False
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def _is_local_token(token: str) -> bool:
    local = runtime().settings.local_token
    return bool(local) and hmac.compare_digest(token.encode(), local.encode()) and from_loopback()


LOCAL_COOKIE = "backup_local"  # set by /signin in a local run: the local token, for a browser


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    settings = runtime().settings
    if settings.local_token and not settings.on_app_engine:
        return request.cookies.get(LOCAL_COOKIE) or None
    return None


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def _check_admin() -> Caller:
    settings = runtime().settings
    iap = request.headers.get("X-Goog-IAP-JWT-Assertion")
    if iap:
        claims = verify_jwt(iap, settings.endpoint("iap_certs") or IAP_CERTS_URL, settings.iap_audience, (IAP_ISSUER,))
        email = str(claims.get("email", "")).lower()
        # IAP lets in whoever its policy allows; being an admin of backups is a narrower list.
        if not email or not allowed_admin(email, settings.admin_emails):
            raise Denied(403, f"{email or 'this identity'} is not on the admin allowlist (BACKUP_ADMIN_EMAILS)")
        return Caller("admin", email)
    token = _bearer()
    if token is None:
        raise Denied(401, "authentication required: an IAP session or a bearer token (Google ID token)")
    if _is_local_token(token):
        return Caller("admin", "local-token")
    if settings.local_token and not _looks_like_jwt(token):
        raise Denied(403, "this is not the local token of this `make run` (.local/token) nor a Google ID token")
    claims = _verify_google_id_token(token)
    email = str(claims.get("email", "")).lower()
    if claims.get("email_verified") is not True:
        raise Denied(403, f"{email or 'this identity'}: the token's email is not verified")
    if not allowed_admin(email, settings.admin_emails):
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
    if token and settings.tasks_service_account and not _is_local_token(token):
        claims = _verify_google_id_token(token)
        email = str(claims.get("email", "")).lower()
        if claims.get("email_verified") is True and email == settings.tasks_service_account.lower():
            return Caller("queue", email)
    return _check_admin()


def _check_same_site() -> None:
    """A state-changing admin request must come from a script or tool, not a cross-site form: it carries a JSON
    body or the ``X-Backup-Client`` header (neither can be sent cross-site without a CORS preflight, which this
    service never grants), and a browser's ``Sec-Fetch-Site`` / ``Origin`` must say it is our own page."""
    json_body = (request.mimetype or "") == "application/json"
    if not json_body and not request.headers.get("X-Backup-Client"):
        raise Denied(403, "refused: send a JSON body (Content-Type: application/json) or an X-Backup-Client header")
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise Denied(403, f"refused: a cross-site request (Sec-Fetch-Site: {site[:20]})")
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc not in _own_hosts():
        raise Denied(403, "refused: the request's Origin is not this service")


def _own_hosts() -> set[str]:
    """This service's host as the request reached it and as configured (TLS may end in front of the app, so the
    scheme is not compared)."""
    return {request.host, urlsplit(runtime().settings.service_url).netloc}


def _guard(check: Callable[[], Caller | None]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                caller = check()
            except Denied as denied:
                log.warning("denied %s %s: %s", request.method, request.path, denied)
                response: Response = jsonify({"error": str(denied)})
                response.status_code = denied.status
                if denied.status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="backup-scheduler"'
                return response
            if caller is not None:
                g.caller = caller
            return view(*args, **kwargs)

        return wrapped

    return decorator


cron_only = _guard(_check_cron)
queue_only = _guard(_check_queue)
admin_only = _guard(_check_admin)
same_site_only = _guard(_check_same_site)
