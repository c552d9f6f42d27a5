"""``backup doctor`` against a project with three mistakes (a missing permission, a bucket of the wrong class, a
missing queue): each is named with the command that fixes it. The bucket is a real one in the GCS emulator; the
APIs without a stand-in (Service Usage, Resource Manager, Cloud Tasks admin, App Engine admin, bucket IAM) are a
small stateful fake behind `responses`."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from click.testing import CliRunner
from google.auth.credentials import AnonymousCredentials

import cli
from commands.errors import EXIT_FAILED
from services import doctor
from services.plans import parse_plan
from tests.fixtures.emulators import make_bucket
from tests.helpers import make_runtime

FAKE = "https://gcp.fake"
PROJECT = "demo-prod"


class FakeProject:
    """Enabled APIs, the permissions the service account holds per resource, the queues that exist."""

    def __init__(self):
        self.enabled = {
            "cloudtasks.googleapis.com",
            "datastore.googleapis.com",
            "appengine.googleapis.com",
            "compute.googleapis.com",
        }
        everything = set(doctor.CORE_PERMISSIONS) | set(doctor.PROJECT_PERMISSIONS["datastore"])
        self.held = {
            f"projects/{PROJECT}": everything,
            "projects/prod-app-1": set(doctor.PROJECT_PERMISSIONS["disks"]) - {"compute.snapshots.create"},
            "b/exports-bucket": set(doctor.BUCKET_PERMISSIONS),
        }
        self.queues = {"fanout", "polls", "notify", "backups"}  # datastore-exports was never deployed

    def install(self, mocked: responses.RequestsMock) -> None:
        mocked.add_callback("GET", re.compile(rf"{FAKE}/v1/projects/[^/]+/services:batchGet.*"), self.batch_get)
        mocked.add_callback("POST", re.compile(rf"{FAKE}/v1/projects/[^/:]+:testIamPermissions"), self.test_project)
        mocked.add_callback("GET", re.compile(r".*/storage/v1/b/[^/]+/iam/testPermissions.*"), self.test_bucket)
        mocked.add_callback("GET", re.compile(rf"{FAKE}/v2/projects/.+/queues/[^/]+$"), self.queue)
        mocked.add_callback("GET", re.compile(rf"{FAKE}/v1/apps/[^/]+$"), self.app)

    def batch_get(self, request):
        names = parse_qs(urlsplit(request.url).query)["names"]
        services = []
        for name in names:
            api = name.rsplit("/", 1)[-1]
            state = "ENABLED" if api in self.enabled else "DISABLED"
            services.append({"name": name, "config": {"name": api}, "state": state})
        return 200, {}, json.dumps({"services": services})

    def test_project(self, request):
        project = urlsplit(request.url).path.split("/")[3].split(":")[0]
        wanted = json.loads(request.body)["permissions"]
        held = self.held.get(f"projects/{project}", set())
        return 200, {}, json.dumps({"permissions": [p for p in wanted if p in held]})

    def test_bucket(self, request):
        bucket = urlsplit(request.url).path.split("/")[4]
        wanted = parse_qs(urlsplit(request.url).query)["permissions"]
        held = self.held.get(f"b/{bucket}", set())
        return 200, {}, json.dumps({"permissions": [p for p in wanted if p in held]})

    def queue(self, request):
        name = urlsplit(request.url).path.rsplit("/", 1)[-1]
        if name not in self.queues:
            return 404, {}, json.dumps({"error": {"code": 404, "message": f"Queue {name} not found"}})
        return 200, {}, json.dumps({"name": name, "state": "RUNNING"})

    def app(self, request):
        return 200, {}, json.dumps({"id": PROJECT, "defaultHostname": f"{PROJECT}.uc.r.appspot.com"})


def plans():
    datastore_plan = parse_plan(
        "datastore-nightly",
        {
            "kind": "datastore",
            "queue": "datastore-exports",
            "destination": {"bucket": "exports-bucket"},
            "options": {"location": "us-central1"},
        },
    )
    disks_plan = parse_plan("disks-prod", {"kind": "disks", "select": {"projects": ["prod-app-1"]}})
    return {p.name: p for p in (datastore_plan, disks_plan)}


@pytest.fixture
def project(tmp_path, gcs, gcs_emulator):
    make_bucket(gcs, "exports-bucket", "us-central1", storage_class="NEARLINE")
    import os

    endpoints = {api: FAKE for api in ("serviceusage", "cloudresourcemanager", "cloudtasks", "appengine")}
    endpoints["storage"] = os.environ["STORAGE_EMULATOR_HOST"]
    rt = make_runtime(
        tmp_path,
        plans=plans(),
        project=PROJECT,
        endpoints=endpoints,
        credentials=AnonymousCredentials(),
        admin_emails=("ops@example.com",),
        environ={"BACKUP_SERVICE_URL": f"https://{PROJECT}.uc.r.appspot.com"},
    )
    fake = FakeProject()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.add_passthru(os.environ["STORAGE_EMULATOR_HOST"])
        fake.install(mocked)
        yield rt, fake


def test_each_mistake_is_named_with_its_fix(project):
    rt, _fake = project

    result = CliRunner().invoke(cli.backup, ["doctor", "--as-me"], obj={"runtime": rt})

    assert result.exit_code == EXIT_FAILED, result.output
    out = result.stdout
    assert "PROBLEM  permissions  project prod-app-1: missing compute.snapshots.create" in out
    service_account = f"{PROJECT}@appspot.gserviceaccount.com"
    grant = f"gcloud projects add-iam-policy-binding prod-app-1 --member=serviceAccount:{service_account}"
    assert f"{grant} --role=roles/compute.storageAdmin" in out
    assert "PROBLEM  bucket       gs://exports-bucket: storage class NEARLINE" in out
    assert "gcloud storage buckets update gs://exports-bucket --default-storage-class=STANDARD" in out
    assert "PROBLEM  queue        datastore-exports: not found in us-central1" in out
    assert f"gcloud app deploy queue.yaml --project={PROJECT}" in out
    assert f"ok       permissions  project {PROJECT}" in out
    assert "3 problem(s)" in out


def test_a_fixed_project_has_no_problems(project):
    rt, fake = project
    fake.held["projects/prod-app-1"] |= {"compute.snapshots.create"}
    fake.queues.add("datastore-exports")
    bucket = rt.storage().get_bucket("exports-bucket")
    bucket.storage_class = "STANDARD"
    bucket.patch()

    report = doctor.diagnose(
        rt,
        list(rt.plans.values()),
        doctor.Apis(rt, AnonymousCredentials()),
        "me",
        doctor.queues_in_use(plans().values()),
    )

    assert [f"{f.check} {f.subject}: {f.detail}" for f in report.problems] == []


def test_a_disabled_api_and_an_unset_webhook_are_named(project):
    rt, fake = project
    fake.enabled.discard("compute.googleapis.com")
    hooked = parse_plan(
        "disks-prod",
        {"kind": "disks", "select": {"projects": ["prod-app-1"]}, "notify": {"webhook_env": "OPS_CHAT_WEBHOOK"}},
    )

    report = doctor.diagnose(rt, [hooked], doctor.Apis(rt, AnonymousCredentials()), "me", {})

    problems = {f.subject: f for f in report.problems}
    assert problems["compute.googleapis.com"].fix == [
        f"gcloud services enable compute.googleapis.com --project={PROJECT}"
    ]
    assert problems["$OPS_CHAT_WEBHOOK"].detail == "not set"
