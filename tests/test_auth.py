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


def test_local_token_is_refused_on_app_engine():
    from services.errors import ConfigError
    from services.runtime import Settings

    with pytest.raises(ConfigError, match="BACKUP_LOCAL_TOKEN is set on App Engine"):
        Settings.from_env({"GAE_ENV": "standard", "GOOGLE_CLOUD_PROJECT": "p", "BACKUP_LOCAL_TOKEN": "x"})


def test_unreachable_signing_keys_are_a_503_not_a_crash(tmp_path, datastore):
    from services.queue import LocalQueue
    from tests.helpers import free_port

    rt = make_runtime(
        tmp_path, service_url=SERVICE_URL, admin_emails=(ADMIN,), oidc_certs_url=f"http://127.0.0.1:{free_port()}/certs"
    )
    client = create_app(rt, queue=LocalQueue(tmp_path / "q.sqlite3")).test_client()
    well_formed = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"

    response = call(client, "GET", "/admin/plans", {"Authorization": f"Bearer {well_formed}"})

    assert response.status_code == 503
    assert "cannot fetch token signing keys" in response.get_json()["error"]


def test_email_verified_must_be_true_not_just_truthy(client_for, issuer):
    client = client_for()
    as_string = issuer.token(ADMIN, SERVICE_URL, verified="false")

    response = call(client, "GET", "/admin/plans", {"Authorization": f"Bearer {as_string}"})

    assert response.status_code == 403
    assert "not verified" in response.get_json()["error"]


def test_iap_identities_are_admins_only_when_allowlisted_by_email_or_domain(client_for, issuer, tmp_path):
    iap = "/projects/1/apps/test-project"
    stranger = issuer.token("intern@elsewhere.com", iap, issuer="https://cloud.google.com/iap")
    colleague = issuer.token("ops@example.com", iap, issuer="https://cloud.google.com/iap")

    denied = call(client_for(), "GET", "/admin/plans", {"X-Goog-IAP-JWT-Assertion": stranger})
    not_listed = call(client_for(), "GET", "/admin/plans", {"X-Goog-IAP-JWT-Assertion": colleague})

    assert denied.status_code == 403 and "not on the admin allowlist" in denied.get_json()["error"]
    assert not_listed.status_code == 403
    from services.queue import LocalQueue

    rt = make_runtime(
        tmp_path,
        admin_emails=("@example.com",),
        iap_audience=iap,
        endpoints={"iap_certs": issuer.certs_url},
    )
    by_domain = create_app(rt, queue=LocalQueue(tmp_path / "q2.sqlite3")).test_client()
    assert call(by_domain, "GET", "/admin/plans", {"X-Goog-IAP-JWT-Assertion": colleague}).status_code == 200
    assert call(by_domain, "GET", "/admin/plans", {"X-Goog-IAP-JWT-Assertion": stranger}).status_code == 403


def test_the_local_token_works_only_over_loopback(client_for):
    client = client_for()
    token = {"Authorization": f"Bearer {LOCAL_TOKEN}"}

    from_afar = client.get("/admin/plans", headers=token, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    forwarded = client.get("/admin/plans", headers=token | {"X-Forwarded-For": "203.0.113.9"})
    local = client.get("/admin/plans", headers=token)

    assert from_afar.status_code == 403 and forwarded.status_code == 403
    assert local.status_code == 200


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"K_SERVICE": "backup-worker", "BACKUP_LOCAL_TOKEN": "x"}, "BACKUP_LOCAL_TOKEN is set on Cloud Run"),
        ({"K_SERVICE": "backup-worker"}, "BACKUP_TASKS_AUDIENCE is not set"),
        ({"GAE_ENV": "standard", "GOOGLE_CLOUD_PROJECT": "p"}, "BACKUP_SERVICE_URL is not set"),
        (
            {
                "GAE_ENV": "standard",
                "GOOGLE_CLOUD_PROJECT": "p",
                "BACKUP_SERVICE_URL": "https://x",
                "BACKUP_CREDENTIALS": "anonymous",
            },
            "BACKUP_CREDENTIALS=anonymous is for local stand-ins",
        ),
        ({"BACKUP_CREDENTIALS": "none"}, "BACKUP_CREDENTIALS: expected 'default' or 'anonymous', got 'none'"),
    ],
)
def test_deployed_settings_that_would_weaken_auth_stop_start_up(env, message):
    from services.errors import ConfigError
    from services.runtime import Settings

    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_refusals_do_not_tell_the_caller_what_would_be_accepted(client_for, issuer):
    wrong_audience = issuer.token(ADMIN, "https://elsewhere.example.com")

    response = call(client_for(), "GET", "/admin/plans", {"Authorization": f"Bearer {wrong_audience}"})

    assert response.status_code == 403
    body = response.get_data(as_text=True)
    assert "wrong audience" in body
    assert SERVICE_URL not in body and "projects/1" not in body


def test_starting_a_plan_refuses_cross_site_requests(client_for):
    client = client_for()
    token = {"Authorization": f"Bearer {LOCAL_TOKEN}"}
    path = "/admin/plans/datastore-nightly/run?dry_run=1"

    form = client.post(path, headers=token, data={"x": "1"})
    cross_site = client.post(path, headers=token | {"Sec-Fetch-Site": "cross-site"}, json={})
    foreign_origin = client.post(path, headers=token | {"Origin": "https://evil.example"}, json={})

    assert [r.status_code for r in (form, cross_site, foreign_origin)] == [403, 403, 403]
    assert "X-Backup-Client" in form.get_json()["error"]


@pytest.mark.parametrize("query", ["dry_run=yes", "dry_run", "dry-run=1", "dry_run=2", "dryrun=true"])
def test_dry_run_accepts_only_known_spellings(client_for, query):
    client = client_for()

    response = client.post(
        f"/admin/plans/datastore-nightly/run?{query}",
        headers={"Authorization": f"Bearer {LOCAL_TOKEN}", "X-Backup-Client": "test"},
    )

    assert response.status_code == 400
    assert "dry_run" in response.get_json()["error"]
