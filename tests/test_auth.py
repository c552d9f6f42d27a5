"""Auth on every route: nothing without credentials, App Engine headers trusted only on App Engine, signed Google
ID tokens checked for signature, audience, issuer and email, and the local token for local runs."""

from __future__ import annotations

import pytest

from main import create_app
from tests.helpers import LOCAL_TOKEN, make_runtime

SERVICE_URL = "https://backup.example.com"
TASKS_SA = "tasks@test-project.iam.gserviceaccount.com"
ADMIN = "sre@example.com"

ROUTES = [
    ("GET", "/cron/datastore-nightly"),
    ("POST", "/tasks/datastore-nightly"),
    ("POST", "/tasks/datastore-nightly/poll"),
    ("POST", "/tasks/datastore-nightly/fanout"),
    ("POST", "/admin/plans/datastore-nightly/run"),
    ("GET", "/admin/plans"),
    ("GET", "/runs"),
    ("GET", "/runs/some-run"),
]


@pytest.fixture
def client_for(tmp_path, issuer, datastore):

    def build(on_app_engine: bool = False):
        from services.queue import LocalQueue

        rt = make_runtime(
            tmp_path,
            on_app_engine=on_app_engine,
            service_url=SERVICE_URL,
            tasks_service_account=TASKS_SA,
            admin_emails=(ADMIN,),
            oidc_certs_url=issuer.certs_url,
            iap_audience="/projects/1/apps/test-project",
            endpoints={"iap_certs": issuer.certs_url},
        )
        return create_app(rt, queue=LocalQueue(tmp_path / "q.sqlite3")).test_client()

    return build


def call(client, method, path, headers=None):
    return client.open(path, method=method, headers=headers or {}, json={})


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_no_credentials_is_401_with_a_challenge(client_for, method, path):
    response = call(client_for(), method, path)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_spoofed_app_engine_headers_are_ignored_off_app_engine(client_for, method, path):
    spoofed = {"X-Appengine-Cron": "true", "X-AppEngine-QueueName": "backups"}

    response = call(client_for(on_app_engine=False), method, path, spoofed)

    assert response.status_code == 401


def test_app_engine_headers_are_trusted_on_app_engine_for_their_own_routes(client_for):
    client = client_for(on_app_engine=True)

    assert call(client, "GET", "/cron/no-such-plan", {"X-Appengine-Cron": "true"}).status_code == 404
    assert call(client, "POST", "/tasks/no-such-plan", {"X-AppEngine-QueueName": "backups"}).status_code == 200
    # ... but never for admin routes
    assert call(client, "GET", "/admin/plans", {"X-Appengine-Cron": "true"}).status_code == 401
    assert call(client, "GET", "/runs", {"X-AppEngine-QueueName": "backups"}).status_code == 401


def test_admin_by_google_id_token_from_an_allowlisted_email(client_for, issuer):
    client = client_for()
    allowed = issuer.token(ADMIN, SERVICE_URL)
    stranger = issuer.token("intern@example.com", SERVICE_URL)
    unverified = issuer.token(ADMIN, SERVICE_URL, verified=False)
    wrong_audience = issuer.token(ADMIN, "https://elsewhere.example.com")
    expired = issuer.token(ADMIN, SERVICE_URL, expires_in=-3600)

    def admin_get(token):
        return call(client, "GET", "/admin/plans", {"Authorization": f"Bearer {token}"})

    assert admin_get(allowed).status_code == 200
    assert admin_get(stranger).status_code == 403
    assert "not on the admin allowlist" in admin_get(stranger).get_json()["error"]
    assert admin_get(unverified).status_code == 403
    assert admin_get(wrong_audience).status_code == 403
    assert admin_get(expired).status_code == 403
    assert admin_get("not-a-jwt").status_code == 403


def test_a_token_signed_by_another_key_is_rejected(client_for, issuer):
    from tests.fixtures.tokens import Issuer

    forger = Issuer()
    try:
        forged = forger.token(ADMIN, SERVICE_URL)
        response = call(client_for(), "GET", "/admin/plans", {"Authorization": f"Bearer {forged}"})
    finally:
        forger.server.shutdown()
        forger.server.server_close()

    assert response.status_code == 403


def test_queue_routes_accept_the_queue_service_account_only(client_for, issuer):
    client = client_for()
    queue_token = issuer.token(TASKS_SA, SERVICE_URL)
    other_sa = issuer.token("other@test-project.iam.gserviceaccount.com", SERVICE_URL)

    ok = call(client, "POST", "/tasks/no-such-plan", {"Authorization": f"Bearer {queue_token}"})
    denied = call(client, "POST", "/tasks/no-such-plan", {"Authorization": f"Bearer {other_sa}"})
    # the queue's identity is not an admin
    not_admin = call(client, "GET", "/admin/plans", {"Authorization": f"Bearer {queue_token}"})

    assert ok.status_code == 200
    assert denied.status_code == 403
    assert not_admin.status_code == 403


def test_iap_assertion_is_verified_with_its_audience(client_for, issuer):
    client = client_for()
    good = issuer.token(ADMIN, "/projects/1/apps/test-project", issuer="https://cloud.google.com/iap")
    wrong_issuer = issuer.token(ADMIN, "/projects/1/apps/test-project")

    assert call(client, "GET", "/admin/plans", {"X-Goog-IAP-JWT-Assertion": good}).status_code == 200
    assert call(client, "GET", "/admin/plans", {"X-Goog-IAP-JWT-Assertion": wrong_issuer}).status_code == 403


def test_local_token_is_accepted_and_a_wrong_one_is_not(client_for):
    client = client_for()

    assert call(client, "GET", "/admin/plans", {"Authorization": f"Bearer {LOCAL_TOKEN}"}).status_code == 200
    assert call(client, "GET", "/admin/plans", {"Authorization": "Bearer guess"}).status_code == 403
