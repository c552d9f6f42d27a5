"""``backup doctor``: every plan checked against the live project before the first cron fires, each problem named
with the ``gcloud`` command that fixes it.

Checks, in the order a first deploy needs them:
1. the APIs the plans use are enabled (Service Usage);
2. the service account holds the permissions each plan needs, asked of each resource with ``testIamPermissions``
   (the project of the run records and the queues, each project a plan reads, each bucket it writes);
3. each destination bucket exists, has the STANDARD class and a location Datastore exports into;
4. every queue the plans and the service use exists (Cloud Tasks), with the App Engine target the service runs on;
5. the settings App Engine needs (``BACKUP_SERVICE_URL`` is this app's URL, the IAP audience's form);
6. the Secret Manager versions and environment variables the plans name can be read.

Permissions are those of the identity the checks run as: the service account when ``doctor --as SA`` can
impersonate it (or when run on App Engine), else the caller's own, which the report says. Every Google API is
reached over REST through one authorised session, with the same ``BACKUP_<API>_ENDPOINT`` overrides as the
service (tests point them at fakes). Locally (``make run``), the emulators and the local queue are checked instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

OK, PROBLEM, SKIPPED = "ok", "problem", "skipped"

# What each kind needs: the API, and the permissions per resource with the role that grants them.
API_OF_KIND = {
    "datastore": "datastore.googleapis.com",
    "disks": "compute.googleapis.com",
    "filestore": "file.googleapis.com",
    "sqlsync": "sqladmin.googleapis.com",
}
CORE_APIS = ("cloudtasks.googleapis.com", "datastore.googleapis.com", "appengine.googleapis.com")
CORE_PERMISSIONS = {
    "cloudtasks.tasks.create": "roles/cloudtasks.enqueuer",
    "datastore.entities.create": "roles/datastore.user",
    "datastore.entities.get": "roles/datastore.user",
    "datastore.entities.update": "roles/datastore.user",
}
PROJECT_PERMISSIONS = {
    "datastore": {
        "datastore.databases.export": "roles/datastore.importExportAdmin",
        "datastore.databases.getMetadata": "roles/datastore.importExportAdmin",
        "datastore.databases.import": "roles/datastore.importExportAdmin",
    },
    "disks": {
        "compute.disks.list": "roles/compute.storageAdmin",
        "compute.disks.createSnapshot": "roles/compute.storageAdmin",
        "compute.snapshots.create": "roles/compute.storageAdmin",
        "compute.snapshots.list": "roles/compute.storageAdmin",
        "compute.snapshots.delete": "roles/compute.storageAdmin",
        "compute.snapshots.setLabels": "roles/compute.storageAdmin",
    },
    "filestore": {
        "file.instances.list": "roles/file.editor",
        "file.backups.create": "roles/file.editor",
        "file.backups.list": "roles/file.editor",
        "file.backups.delete": "roles/file.editor",
    },
    "sqlsync": {
        "cloudsql.instances.get": "roles/cloudsql.admin",
        "cloudsql.instances.export": "roles/cloudsql.admin",
        "cloudsql.instances.import": "roles/cloudsql.admin",
    },
}
BUCKET_PERMISSIONS = {
    "storage.buckets.get": "roles/storage.legacyBucketReader",
    "storage.objects.create": "roles/storage.objectAdmin",
    "storage.objects.get": "roles/storage.objectAdmin",
    "storage.objects.list": "roles/storage.objectAdmin",
    "storage.objects.delete": "roles/storage.objectAdmin",
}
# Datastore exports need a STANDARD bucket (no minimum storage duration, no retrieval fees) in a location the
# database can write to: the same region, or the multi-region that contains it.
MULTI_REGION_OF = {"nam5": "us", "eur3": "eu", "us": "us", "eu": "eu"}


@dataclass
class Finding:
    check: str  # "api", "permissions", "bucket", "queue", "settings", "secret", "local"
    subject: str  # what was checked: an API, a resource, a queue, a setting
    status: str  # OK, PROBLEM or SKIPPED
    detail: str = ""
    fix: list[str] = field(default_factory=list)  # commands to run, in order
    plans: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    project: str
    identity: str  # whose permissions were tested
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status == PROBLEM]

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "identity": self.identity,
            "problems": len(self.problems),
            "findings": [f.to_json() for f in self.findings],
        }


class Apis:
    """The REST calls the checks make, through one authorised session; ``endpoint(api)`` honours overrides."""

    def __init__(self, rt: Any, credentials: Any):
        from google.auth.transport.requests import AuthorizedSession

        self.rt = rt
        self.session = AuthorizedSession(credentials)

    def endpoint(self, api: str, default: str) -> str:
        return (self.rt.settings.endpoint(api) or default).rstrip("/")

    def get(self, url: str, **params: Any) -> Any:
        return self.session.get(url, params=params or None, timeout=30)

    def post(self, url: str, body: dict[str, Any]) -> Any:
        return self.session.post(url, json=body, timeout=30)


def _error(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


# ------------------------------------------------------------------------------------------------ checks


def check_apis(apis: Apis, project: str, needed: dict[str, list[str]]) -> list[Finding]:
    """One finding per API the plans (and the service) use, enabled or not."""
    base = apis.endpoint("serviceusage", "https://serviceusage.googleapis.com")
    names = sorted(needed)
    response = apis.get(
        f"{base}/v1/projects/{project}/services:batchGet", names=[f"projects/{project}/services/{n}" for n in names]
    )
    if response.status_code != 200:
        detail = f"could not list enabled APIs: {_error(response)}"
        fix = f"gcloud services enable serviceusage.googleapis.com --project={project}"
        return [Finding("api", "serviceusage.googleapis.com", PROBLEM, detail, [fix])]
    services = response.json().get("services", [])
    enabled = {s["config"]["name"] for s in services if s.get("state") == "ENABLED" and "config" in s}
    findings = []
    for name in names:
        if name in enabled:
            findings.append(Finding("api", name, OK, "enabled", plans=needed[name]))
        else:
            fix = f"gcloud services enable {name} --project={project}"
            findings.append(Finding("api", name, PROBLEM, "not enabled", [fix], needed[name]))
    return findings


def _grant_fixes(kind: str, resource: str, member: str, roles: list[str]) -> list[str]:
    if kind == "project":
        return [f"gcloud projects add-iam-policy-binding {resource} --member={member} --role={r}" for r in roles]
    if kind == "bucket":
        command = f"gcloud storage buckets add-iam-policy-binding gs://{resource} --member={member}"
        return [f"{command} --role={r}" for r in roles]
    if kind == "topic":
        return [f"gcloud pubsub topics add-iam-policy-binding {resource} --member={member} --role={r}" for r in roles]
    return [f"gcloud secrets add-iam-policy-binding {resource} --member={member} --role={r}" for r in roles]


def check_permissions(
    apis: Apis, kind: str, resource: str, wanted: dict[str, str], member: str, plans: list[str]
) -> Finding:
    """``testIamPermissions`` on one resource: the permissions missing, and the grants that add them."""
    if kind == "project":
        base = apis.endpoint("cloudresourcemanager", "https://cloudresourcemanager.googleapis.com")
        response = apis.post(f"{base}/v1/projects/{resource}:testIamPermissions", {"permissions": sorted(wanted)})
    elif kind == "bucket":
        base = apis.endpoint("storage", "https://storage.googleapis.com")
        response = apis.get(f"{base}/storage/v1/b/{quote(resource)}/iam/testPermissions", permissions=sorted(wanted))
    elif kind == "topic":
        base = apis.endpoint("pubsub", "https://pubsub.googleapis.com")
        response = apis.post(f"{base}/v1/{resource}:testIamPermissions", {"permissions": sorted(wanted)})
    else:
        raise ValueError(f"unknown resource kind {kind!r}")
    subject = f"{kind} {resource}"
    if response.status_code == 404:
        detail = f"{kind} {resource} does not exist (or is not visible)"
        return Finding("permissions", subject, PROBLEM, detail, [], plans)
    if response.status_code != 200:
        return Finding("permissions", subject, PROBLEM, f"could not test permissions: {_error(response)}", [], plans)
    held = set(response.json().get("permissions", []))
    missing = sorted(set(wanted) - held)
    if not missing:
        return Finding("permissions", subject, OK, f"all {len(wanted)} permissions held", plans=plans)
    roles = sorted({wanted[p] for p in missing})
    detail = f"missing {', '.join(missing)}"
    return Finding("permissions", subject, PROBLEM, detail, _grant_fixes(kind, resource, member, roles), plans)


def check_bucket(apis: Apis, bucket: str, location: str | None, plans: list[str], project: str) -> Finding:
    """The destination bucket exists, is STANDARD, and (for Datastore exports) is where the database can write."""
    base = apis.endpoint("storage", "https://storage.googleapis.com")
    response = apis.get(f"{base}/storage/v1/b/{quote(bucket)}")
    subject = f"gs://{bucket}"
    region = (location or "us-central1").lower()
    create = (
        f"gcloud storage buckets create gs://{bucket} --project={project} --location={region}"
        " --default-storage-class=STANDARD --uniform-bucket-level-access"
    )
    if response.status_code == 404:
        return Finding("bucket", subject, PROBLEM, "does not exist", [create], plans)
    if response.status_code != 200:
        return Finding("bucket", subject, PROBLEM, f"could not read: {_error(response)}", [], plans)
    data = response.json()
    problems, fixes = [], []
    storage_class = str(data.get("storageClass", "STANDARD")).upper()
    if storage_class != "STANDARD":
        problems.append(f"storage class {storage_class}: exports and copies need STANDARD")
        fixes.append(f"gcloud storage buckets update gs://{bucket} --default-storage-class=STANDARD")
    bucket_location = str(data.get("location", "")).lower()
    if location is not None and bucket_location and not _compatible(location.lower(), bucket_location):
        problems.append(f"location {bucket_location}, the Datastore database is in {location}")
        fixes.append(f"use a bucket in {location}: {create.replace(f'gs://{bucket}', f'gs://{bucket}-{region}')}")
    if problems:
        return Finding("bucket", subject, PROBLEM, "; ".join(problems), fixes, plans)
    return Finding("bucket", subject, OK, f"{storage_class}, {bucket_location or 'location unknown'}", plans=plans)


def _compatible(database: str, bucket: str) -> bool:
    if database == bucket:
        return True
    multi = MULTI_REGION_OF.get(database) or database.split("-")[0]
    return bucket == multi or MULTI_REGION_OF.get(bucket) == multi


def check_queue(apis: Apis, project: str, location: str, queue: str, service: str, users: list[str]) -> Finding:
    """The queue exists in Cloud Tasks (created by ``gcloud app deploy queue.yaml``) and routes to this service."""
    base = apis.endpoint("cloudtasks", "https://cloudtasks.googleapis.com")
    response = apis.get(f"{base}/v2/projects/{project}/locations/{location}/queues/{queue}")
    fix = [f"gcloud app deploy queue.yaml --project={project}"]
    if response.status_code == 404:
        return Finding("queue", queue, PROBLEM, f"not found in {location}", fix, users)
    if response.status_code != 200:
        return Finding("queue", queue, PROBLEM, f"could not read: {_error(response)}", [], users)
    data = response.json()
    if data.get("state") not in (None, "RUNNING"):
        resume = f"gcloud tasks queues resume {queue} --location={location} --project={project}"
        return Finding("queue", queue, PROBLEM, f"state {data.get('state')}", [resume], users)
    routed = ((data.get("appEngineRoutingOverride") or {}).get("service")) or "default"
    if routed != service:
        return Finding("queue", queue, PROBLEM, f"routes to App Engine service {routed!r}, not {service!r}", fix, users)
    return Finding("queue", queue, OK, f"RUNNING in {location}, to service {service!r}", plans=users)


def check_app_settings(apis: Apis, rt: Any, project: str) -> list[Finding]:
    """BACKUP_SERVICE_URL is this App Engine app's own URL (the audience of ID tokens); the IAP audience's form."""
    settings = rt.settings
    base = apis.endpoint("appengine", "https://appengine.googleapis.com")
    response = apis.get(f"{base}/v1/apps/{project}")
    findings = []
    if response.status_code == 404:
        fix = [f"gcloud app create --project={project} --region=REGION"]
        return [Finding("settings", "App Engine app", PROBLEM, "no App Engine app in this project", fix)]
    if response.status_code != 200:
        return [Finding("settings", "App Engine app", PROBLEM, f"could not read: {_error(response)}")]
    app = response.json()
    own_url = f"https://{app.get('defaultHostname', '')}"
    configured = settings.environ.get("BACKUP_SERVICE_URL") or ""
    if configured.rstrip("/") != own_url:
        shown = configured or "not set"
        fix = [f"set BACKUP_SERVICE_URL: {own_url} in app.yaml env_variables, then gcloud app deploy app.yaml"]
        findings.append(Finding("settings", "BACKUP_SERVICE_URL", PROBLEM, f"{shown}; this app is {own_url}", fix))
    else:
        findings.append(Finding("settings", "BACKUP_SERVICE_URL", OK, own_url))
    iap = (app.get("iap") or {}).get("enabled", False)
    audience = settings.iap_audience
    if iap and not audience:
        fix = ["set BACKUP_IAP_AUDIENCE: /projects/PROJECT_NUMBER/apps/" + project + " in app.yaml env_variables"]
        findings.append(Finding("settings", "BACKUP_IAP_AUDIENCE", PROBLEM, "IAP is on but no audience is set", fix))
    elif audience and not (audience.startswith("/projects/") and audience.endswith(f"/apps/{project}")):
        fix = [f"set BACKUP_IAP_AUDIENCE: /projects/PROJECT_NUMBER/apps/{project}"]
        findings.append(Finding("settings", "BACKUP_IAP_AUDIENCE", PROBLEM, f"{audience!r} is not this app's", fix))
    if not settings.admin_emails:
        fix = ["set BACKUP_ADMIN_EMAILS: you@example.com (or @example.com) in app.yaml env_variables"]
        findings.append(Finding("settings", "BACKUP_ADMIN_EMAILS", PROBLEM, "nobody is an admin", fix))
    return findings


def check_secret(rt: Any, env_name: str, member: str, plans: list[str]) -> Finding:
    """An environment variable a plan names is set, and the Secret Manager version it points to can be read."""
    from services.errors import BackupError

    value = rt.secrets.env(env_name)
    if value is None:
        fix = [f"set {env_name} in app.yaml env_variables (a value, or sm://projects/P/secrets/S/versions/latest)"]
        return Finding("secret", f"${env_name}", PROBLEM, "not set", fix, plans)
    name = value.removeprefix("sm://")
    if not name.startswith("projects/") or "/secrets/" not in name:
        return Finding("secret", f"${env_name}", OK, "set (a plain value)", plans=plans)
    if "/versions/" not in name:
        name += "/versions/latest"
    try:
        rt.secrets.secret(name)
    except BackupError as exc:
        secret = name.split("/versions/")[0]
        role = "roles/secretmanager.secretAccessor"
        fix = [f"gcloud secrets add-iam-policy-binding {secret} --member={member} --role={role}"]
        return Finding("secret", f"${env_name}", PROBLEM, f"{name}: {exc}", fix, plans)
    return Finding("secret", f"${env_name}", OK, f"{name} readable", plans=plans)


# ------------------------------------------------------------------------------------------------ the whole


def _settings_of(plan: Any, name: str) -> Any:
    return getattr(plan.settings, name, None)


def secret_envs(plan: Any) -> list[str]:
    """The environment variables a plan names (webhook, passwords): read from its notify and kind settings."""
    names = [plan.notify.webhook_env] if plan.notify.webhook_env else []
    for attribute in ("password_env", "url_env", "user_env", "secret_env"):
        value = _settings_of(plan, attribute)
        if isinstance(value, str) and value:
            names.append(value)
    return names


def default_service_account(project: str) -> str:
    return f"{project}@appspot.gserviceaccount.com"


def diagnose(
    rt: Any,
    plans: list[Any],
    apis: Apis,
    identity: str,
    queue_names: dict[str, list[str]],
    service_account: str | None = None,
) -> Report:
    """Every check for ``plans`` against the project of ``rt``; permissions as tested by ``apis``' identity
    (``identity`` names it), fixes granting to ``service_account`` (the identity the service runs as)."""
    project = rt.settings.project
    member = f"serviceAccount:{service_account or default_service_account(project)}"
    report = Report(project, identity)
    needed: dict[str, list[str]] = {api: ["(service)"] for api in CORE_APIS}
    for plan in plans:
        api = API_OF_KIND.get(plan.kind)
        if api:
            needed.setdefault(api, []).append(plan.name)
        if plan.notify.pubsub_topic:
            needed.setdefault("pubsub.googleapis.com", []).append(plan.name)
        if any(rt.secrets.env(n, "").startswith(("sm://", "projects/")) for n in secret_envs(plan)):
            needed.setdefault("secretmanager.googleapis.com", []).append(plan.name)
    report.findings += check_apis(apis, project, needed)

    project_wants: dict[str, dict[str, str]] = {project: dict(CORE_PERMISSIONS)}
    project_plans: dict[str, list[str]] = {project: ["(service)"]}
    buckets: dict[str, tuple[str | None, list[str]]] = {}
    for plan in plans:
        wanted = PROJECT_PERMISSIONS.get(plan.kind, {})
        projects = _settings_of(plan, "projects") or [_settings_of(plan, "project") or project]
        for where in projects if wanted else []:
            project_wants.setdefault(where, {}).update(wanted)
            project_plans.setdefault(where, []).append(plan.name)
        bucket = _settings_of(plan, "bucket")
        if isinstance(bucket, str) and bucket:
            location = _settings_of(plan, "location") if plan.kind == "datastore" else None
            buckets.setdefault(bucket, (location, []))[1].append(plan.name)
    for where, wanted in sorted(project_wants.items()):
        report.findings.append(check_permissions(apis, "project", where, wanted, member, project_plans[where]))
    for bucket, (location, users) in sorted(buckets.items()):
        finding = check_bucket(apis, bucket, location, users, project)
        report.findings.append(finding)
        if not (finding.status == PROBLEM and finding.detail == "does not exist"):
            report.findings.append(check_permissions(apis, "bucket", bucket, BUCKET_PERMISSIONS, member, users))
    for plan in plans:
        topic = plan.notify.pubsub_topic
        if topic:
            path = topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"
            wanted = {"pubsub.topics.publish": "roles/pubsub.publisher"}
            report.findings.append(check_permissions(apis, "topic", path, wanted, member, [plan.name]))

    for queue, users in sorted(queue_names.items()):
        location = rt.settings.tasks_location
        report.findings.append(check_queue(apis, project, location, queue, rt.settings.gae_service, users))
    report.findings += check_app_settings(apis, rt, project)
    for plan in plans:
        for name in secret_envs(plan):
            report.findings.append(check_secret(rt, name, member, [plan.name]))
    return report


def queues_in_use(plans: list[Any]) -> dict[str, list[str]]:
    """{queue: the plans (or "(service)") that send tasks to it}."""
    from services.deployment import CORE_QUEUES

    used: dict[str, list[str]] = {q: ["(service)"] for q in CORE_QUEUES}
    for plan in plans:
        used.setdefault(plan.queue, []).append(plan.name)
    return used


# ------------------------------------------------------------------------------------------------ locally


def diagnose_local(rt: Any, plans: list[Any], reach: Callable[[str], bool]) -> Report:
    """``make run``: the emulators answer, the demo buckets exist with the right class, the local queue is
    writable, and plans, cron.yaml and queue.yaml agree."""
    import os

    from services.deployment import check_deployment_files
    from services.errors import ConfigError

    report = Report(rt.settings.project, "local (emulators)")
    try:
        check_deployment_files(rt.plans, rt.settings.queue_yaml, rt.settings.cron_yaml)
        report.findings.append(Finding("local", "plans.yaml, cron.yaml, queue.yaml", OK, "agree"))
    except ConfigError as exc:
        report.findings.append(Finding("local", "plans.yaml, cron.yaml, queue.yaml", PROBLEM, str(exc)))
    for variable in ("DATASTORE_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"):
        host = rt.secrets.env(variable)
        if host is None:
            continue
        status = OK if reach(host) else PROBLEM
        fix = [] if status == OK else ["make run"]
        report.findings.append(Finding("local", variable, status, host, fix))
    queue_db = rt.settings.local_queue_db
    writable = os.access(queue_db.parent if not queue_db.exists() else queue_db, os.W_OK)
    report.findings.append(Finding("local", "local queue", OK if writable else PROBLEM, str(queue_db)))
    if rt.secrets.env("STORAGE_EMULATOR_HOST"):
        from google.cloud import storage  # type: ignore[attr-defined]

        client = storage.Client(project=rt.settings.project)
        for plan in plans:
            bucket = _settings_of(plan, "bucket")
            if not isinstance(bucket, str) or not bucket:
                continue
            found = client.lookup_bucket(bucket)
            if found is None:
                missing = Finding("bucket", f"gs://{bucket}", PROBLEM, "not in the GCS emulator", [], [plan.name])
                report.findings.append(missing)
            elif (found.storage_class or "STANDARD") != "STANDARD":
                detail = f"storage class {found.storage_class}: exports and copies need STANDARD"
                report.findings.append(Finding("bucket", f"gs://{bucket}", PROBLEM, detail, [], [plan.name]))
            else:
                report.findings.append(Finding("bucket", f"gs://{bucket}", OK, "STANDARD", plans=[plan.name]))
    for plan in plans:
        for name in secret_envs(plan):
            if rt.secrets.env(name) is None:
                fix = [f"export {name}=... before make run"]
                report.findings.append(Finding("secret", f"${name}", PROBLEM, "not set", fix, [plan.name]))
    return report
