"""A task body is a claim, not authority: forged or replayed tasks, replayed against the real worker over HTTP.

Each attack here was possible on the code before: a forged label value pruned good snapshots, a forged period or
destination pruned every directory copy, a poll through another plan failed someone else's run, a body chose a
Datastore export's project or a sqlsync step range. Now the worker looks the target up again from the plan and
the live resource, accepts only periods the schedule (or a recorded admin trigger) allows, and records what it
refuses with a 2xx answer.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import kinds
from main import create_app
from services.catalog import FAILED, PENDING, SUCCEEDED, Catalog
from services.fanout import backup_task, current_period, run_id
from services.kinds import Pending, Target
from services.plans import parse_plan
from tests import scripted_kind
from tests.fixtures.compute import FAKE_COMPUTE_ENDPOINT
from tests.helpers import LOCAL_TOKEN
from tests.service_harness import Service

AUTH = {"Authorization": f"Bearer {LOCAL_TOKEN}"}
LABEL = "backup-generations"


# --- disks -------------------------------------------------------------------------------------------------


@pytest.fixture
def disk_service(tmp_path, datastore, compute_fake, compute_clock, compute_responses):
    compute_responses.add_passthru("http://127.0.0.1")
    plan = parse_plan("disk-nightly", {"kind": "disks", "select": {"projects": ["proj-alpha", "proj-beta"]}})
    return Service(
        tmp_path, datastore, {"disk-nightly": plan}, compute_clock, endpoints={"compute": FAKE_COMPUTE_ENDPOINT}
    )


def _disk_key(project: str, zone: str, name: str) -> str:
    return f"projects/{project}/zones/{zone}/disks/{name}"


def test_a_forged_label_value_does_not_prune_good_snapshots(disk_service, compute_fake):
    disk = compute_fake.add_disk("proj-alpha", "db", zone="us-east1-b", labels={LABEL: "5"})
    key = _disk_key("proj-alpha", "us-east1-b", "db")
    for _ in range(5):
        disk_service.clock.advance(days=1)
        assert disk_service.run(disk_service.task("disk-nightly", key)).get_json()["status"] == SUCCEEDED
    assert len(compute_fake.snapshots_of(disk)) == 5

    disk_service.clock.advance(days=1)
    forged = disk_service.task("disk-nightly", key, {"project": "proj-alpha", "name": "db", "label_value": "1"})
    answer = disk_service.run(forged)

    assert answer.get_json()["status"] == SUCCEEDED
    assert len(compute_fake.snapshots_of(disk)) == 5  # one new, the oldest of six pruned: the disk's own label
    assert disk_service.catalog.get(forged.name).params["label_value"] == "5"


@pytest.mark.parametrize(
    "key",
    [
        "projects/proj-alpha/zones/../../global/x/disks/db",
        "projects/proj-evil/zones/us-east1-b/disks/db",
        "projects/proj-alpha/zones/US_EAST/disks/db",
    ],
)
def test_a_disk_key_outside_the_plan_is_refused_and_recorded(disk_service, compute_fake, key):
    compute_fake.add_disk("proj-evil", "db", zone="us-east1-b", labels={LABEL: "1"})
    task = disk_service.task("disk-nightly", key)

    answer = disk_service.post(task.path, task.payload)

    assert answer.status_code == 200
    record = disk_service.catalog.get(task.name)
    assert record.status == FAILED and "refused" in record.error
    assert not [c for c in compute_fake.calls if c[0] == "POST"]  # no snapshot was started anywhere


def test_forged_params_with_a_bad_zone_are_ignored_for_the_disk_compute_has(disk_service, compute_fake):
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    task = disk_service.task(
        "disk-nightly", _disk_key("proj-alpha", "us-east1-b", "web"), {"zone": "../../global/x", "disk_id": "1"}
    )

    assert disk_service.run(task).get_json()["status"] == SUCCEEDED
    assert len(compute_fake.snapshots_of(disk)) == 1


def test_a_label_value_that_only_looks_numeric_fails_the_run_with_a_record(disk_service, compute_fake):
    disk = compute_fake.add_disk("proj-alpha", "odd", zone="us-east1-b", labels={LABEL: "²"})
    task = disk_service.task("disk-nightly", _disk_key("proj-alpha", "us-east1-b", "odd"))

    answer = disk_service.post(task.path, task.payload)

    assert answer.status_code == 200
    record = disk_service.catalog.get(task.name)
    assert record.status == FAILED and "is not a number of snapshots to keep" in record.error
    assert compute_fake.snapshots_of(disk) == []


def test_a_late_confirmation_never_deletes_a_newer_snapshot(disk_service, compute_fake):
    disk = compute_fake.add_disk("proj-alpha", "db", zone="us-east1-b", labels={LABEL: "1"})
    key = _disk_key("proj-alpha", "us-east1-b", "db")
    late = disk_service.task("disk-nightly", key)
    assert disk_service.post(late.path, late.payload).get_json()["status"] == PENDING  # its polls are held back
    held = [t for t in disk_service.queue.tasks("pending") if t["name"].startswith(late.name)]
    for poll in held:
        disk_service.queue.settle(poll["name"], state="done", status=200, error=None)

    disk_service.clock.advance(days=1)
    newer = disk_service.task("disk-nightly", key)
    assert disk_service.run(newer).get_json()["status"] == SUCCEEDED
    newer_snapshot = disk_service.catalog.get(newer.name).stats["snapshot"]
    answer = None
    for _ in range(10):  # the held poll arrives now, a day late, and follows its snapshot to READY
        answer = disk_service.post(held[0]["path"], json.loads(held[0]["payload"]))
        if answer.get_json()["status"] != PENDING:
            break
        held[0] = disk_service.queue.tasks("pending")[-1]
        disk_service.queue.settle(held[0]["name"], state="done", status=200, error=None)

    assert answer.get_json()["status"] == SUCCEEDED
    assert [s["name"] for s in compute_fake.snapshots_of(disk)] == [newer_snapshot]
    (state,) = disk_service.catalog.target_states("disk-nightly")
    assert state.last_good_run_id == newer.name


def test_a_project_that_refuses_listing_fails_alone_and_the_others_are_backed_up(disk_service, compute_fake):
    compute_fake.add_disk("proj-alpha", "db", zone="us-east1-b", labels={LABEL: "1"})
    compute_fake.add_disk("proj-beta", "web", zone="us-east1-c", labels={LABEL: "1"})
    compute_fake.deny("proj-alpha", "compute.disks.list")

    fanned = disk_service.client.get("/cron/disk-nightly", headers=AUTH)
    while continuation := [t for t in disk_service.queue.tasks("pending") if t["path"].endswith("/fanout")]:
        disk_service.queue.settle(continuation[0]["name"], state="done", status=200, error=None)
        disk_service.post(continuation[0]["path"], json.loads(continuation[0]["payload"]))

    assert fanned.status_code == 200
    queued = [json.loads(t["payload"])["target"]["key"] for t in disk_service.queue.tasks() if t["queue"] == "backups"]
    assert queued == [_disk_key("proj-beta", "us-east1-c", "web")]
    failed = [r for r in disk_service.catalog.recent_runs(plan="disk-nightly") if r.status == FAILED]
    assert [r.target for r in failed] == ["projects/proj-alpha (listing)"]
    assert "compute.disks.list" in failed[0].error


# --- directory ---------------------------------------------------------------------------------------------


@pytest.fixture
def dir_service(tmp_path, datastore):
    source, dest = tmp_path / "share", tmp_path / "backups"
    source.mkdir()
    dest.mkdir()
    (source / "a.txt").write_text("precious")
    plan = parse_plan(
        "share-daily",
        {
            "kind": "directory",
            "select": {"paths": [str(source)]},
            "destination": {"path": str(dest)},
            "options": {"sync": False},
            "retention": {"keep": 3},
        },
    )
    from tests.helpers import Clock

    service = Service(tmp_path, datastore, {"share-daily": plan}, Clock())
    service.source, service.dest = source, dest
    return service


def _copies(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def test_future_periods_and_a_chosen_destination_cannot_prune_real_copies(dir_service, tmp_path):
    for _ in range(3):
        dir_service.clock.advance(days=1)
        assert dir_service.run(dir_service.task("share-daily", str(dir_service.source))).status_code == 200
    real = _copies(dir_service.dest)
    assert len(real) == 3
    elsewhere = tmp_path / "attacker"

    answers = []
    for days in range(1, 5):
        forged = dir_service.task(
            "share-daily",
            str(dir_service.source),
            {"source": str(dir_service.source), "dest": str(elsewhere)},
            period=dir_service.clock() + timedelta(days=days),
        )
        answers.append(dir_service.post(forged.path, forged.payload))

    assert {a.status_code for a in answers} == {200}
    assert all("is in the future" in a.get_json()["error"] for a in answers)
    assert _copies(dir_service.dest) == real
    assert not elsewhere.exists()


def test_a_source_outside_the_plan_is_refused_and_nothing_is_copied(dir_service, tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "key").write_text("do not copy")
    forged = dir_service.task("share-daily", str(secrets), {"source": str(secrets), "dest": str(dir_service.dest)})

    answer = dir_service.post(forged.path, forged.payload)

    assert answer.status_code == 200
    assert dir_service.catalog.get(forged.name).status == FAILED
    assert "is not one of plan share-daily's paths" in dir_service.catalog.get(forged.name).error
    assert _copies(dir_service.dest) == []


def test_a_period_long_past_is_refused(dir_service):
    old = dir_service.task("share-daily", str(dir_service.source), period=dir_service.clock() - timedelta(days=9))

    answer = dir_service.post(old.path, old.payload)

    assert answer.status_code == 200
    assert "neither the current" in answer.get_json()["error"]
    assert _copies(dir_service.dest) == []


def test_an_admin_trigger_records_the_period_its_tasks_may_use(dir_service):
    started = dir_service.client.post(
        "/admin/plans/share-daily/run", headers=AUTH | {"X-Backup-Client": "test"}
    ).get_json()
    (task,) = [t for t in dir_service.queue.tasks("pending") if t["path"] == "/tasks/share-daily"]

    answer = dir_service.post(task["path"], json.loads(task["payload"]))

    assert started["enqueued"] == 1
    assert answer.get_json()["status"] == SUCCEEDED
    assert len(_copies(dir_service.dest)) == 1


def test_a_run_id_that_does_not_match_its_claim_is_refused(dir_service):
    task = dir_service.task("share-daily", str(dir_service.source))
    for forged_id in ("__x__", "someone-elses-run", "a" * 400):
        answer = dir_service.post(task.path, task.payload | {"run_id": forged_id})

        assert answer.status_code == 200
        assert answer.get_json()["status"] == FAILED
        assert dir_service.catalog.get(answer.get_json()["run_id"]).error.startswith("refused: run id")
    assert _copies(dir_service.dest) == []


# --- polls, and records that survive any key -------------------------------------------------------------------


@pytest.fixture
def scripted_service(tmp_path, datastore, monkeypatch):
    monkeypatch.setitem(kinds.REGISTRY, "scripted", scripted_kind.REGISTRATION)
    scripted_kind.calls.clear()
    scripted_kind.hooks.clear()
    plans = {
        name: parse_plan(name, {"kind": "scripted", "select": {"targets": ["pending-a", "hook-b"]}})
        for name in ("alpha", "beta")
    }
    from tests.helpers import Clock

    return Service(tmp_path, datastore, plans, Clock())


def test_a_poll_through_another_plan_is_refused_and_leaves_the_run_alone(scripted_service):
    task = scripted_service.task("alpha", "pending-a")
    scripted_service.post(task.path, task.payload)
    poll = json.loads(scripted_service.queue.tasks("pending")[-1]["payload"])

    answer = scripted_service.post("/tasks/beta/poll", poll)

    assert answer.status_code == 200 and "belongs to plan 'alpha'" in answer.get_json()["error"]
    record = scripted_service.catalog.get(task.name)
    assert record.status == PENDING and record.state is not None
    assert scripted_service.post("/tasks/alpha/poll", poll).get_json()["status"] == PENDING
    assert scripted_service.catalog.get(task.name).state["_polls"] == 1


def test_a_duplicate_delivery_that_fails_cannot_overwrite_the_run_another_started(scripted_service):
    """Two deliveries of one task race: the second reads the run, the first starts the backup (Pending) and
    saves, then the second's start fails with a transient error. Its write is stale and must not hide the
    operation in flight (which left runs "running" forever)."""
    task = scripted_service.task("alpha", "hook-b")
    first_answer = {}

    def start(call):
        if call == 1:  # the second delivery, still inside start(), lets the first one run to Pending
            first_answer["body"] = scripted_service.post(task.path, task.payload).get_json()
            from services.errors import TransientError

            raise TransientError("hook-b: backend busy")
        return Pending({"operation": "op-hook-b"}, delay_seconds=30)

    scripted_kind.hooks["hook-b"] = start

    losing = scripted_service.post(task.path, task.payload)

    assert first_answer["body"]["status"] == PENDING
    assert losing.status_code == 200 and losing.get_json()["duplicate"] is True
    record = scripted_service.catalog.get(task.name)
    assert record.status == PENDING and record.state["operation"] == "op-hook-b"
    polls = [t for t in scripted_service.queue.tasks("pending") if t["path"] == "/tasks/alpha/poll"]
    assert len(polls) == 1


def test_every_malformed_or_oversized_delivery_is_recorded_and_answered_2xx(scripted_service):
    long_plan = "p" * 2000
    bodies = [
        ("/tasks/alpha", {"run_id": "", "period": "2026-11-23T00:00:00+00:00", "target": {"key": "pending-a"}}),
        ("/tasks/alpha", {"run_id": "x", "period": "2026-11-23T00:00:00+00:00"}),
        ("/tasks/alpha/poll", {"run_id": "__x__"}),
        ("/tasks/alpha/poll", {"run_id": ""}),
        (f"/tasks/{long_plan}", {"run_id": "r"}),
        ("/tasks/alpha", {"blob": "x" * (2 << 20)}),
    ]

    answers = [scripted_service.post(path, body) for path, body in bodies]

    assert [a.status_code for a in answers] == [200] * len(bodies)
    for answer in answers:
        record = scripted_service.catalog.get(answer.get_json()["run_id"])
        assert record.status == FAILED and record.error
    assert "over" in answers[-1].get_json()["error"]


def test_a_target_key_over_the_datastore_key_limit_still_leaves_a_record(scripted_service):
    plan = scripted_service.rt.plans["alpha"]
    key = "k" * 2000
    period = current_period(scripted_service.rt, plan)
    task = backup_task(plan, Target(key, {}), period)

    answer = scripted_service.post(task.path, task.payload)

    assert answer.status_code == 200
    record = scripted_service.catalog.get(run_id("alpha", key, period))
    assert record.target == key and record.status == "skipped"
    assert [s.target for s in scripted_service.catalog.target_states("alpha")] == [key]


# --- datastore and sqlsync --------------------------------------------------------------------------------------


def test_a_datastore_task_cannot_choose_the_export_project(tmp_path, datastore, gcs, datastore_emulator):
    from google.cloud import datastore as ds

    from tests.fixtures.emulators import make_bucket
    from tests.helpers import Clock

    make_bucket(gcs, "exports-bucket", "us-central1")
    for kind_name in ("Customer", "Order"):
        entity = ds.Entity(datastore.key(kind_name, "one"))
        entity.update({"name": "one"})
        datastore.put(entity)
    plan = parse_plan(
        "ds-nightly",
        {
            "kind": "datastore",
            "select": {"namespaces": [""]},
            "destination": {"bucket": "exports-bucket"},
            "options": {"location": "us-central1"},
        },
    )
    service = Service(
        tmp_path,
        datastore,
        {"ds-nightly": plan},
        Clock(),
        datastore_admin_endpoint=datastore_emulator["url"],
        export_local_root=tmp_path / "exports",
    )
    forged = service.task("ds-nightly", "Customer", {"project": "victim-project", "kinds": ["Secret"]})
    bare = service.task("ds-nightly", "Order")  # no params at all: a KeyError (500) before

    answers = [service.run(forged), service.run(bare)]

    assert [a.get_json()["status"] for a in answers] == [SUCCEEDED, SUCCEEDED]
    record = service.catalog.get(forged.name)
    assert record.params == {"project": "test-project", "namespaces": [""], "kinds": ["Customer"]}
    assert record.output.startswith("gs://exports-bucket/datastore/") and "/Customer/" in record.output
    assert "/Order/" in service.catalog.get(bare.name).output


def test_a_sqlsync_task_cannot_choose_its_steps(tmp_path, datastore, mariadb_servers, monkeypatch):
    from tests.helpers import Clock
    from tests.sqlsync_data import SECRET, SECRET_ENV, make_sync_setup, production_rows

    setup = make_sync_setup(mariadb_servers, tmp_path, monkeypatch, mask_mode="in-place")
    plan = setup["plan"]
    service = Service(tmp_path, datastore, {plan.name: plan}, Clock(), environ={SECRET_ENV: SECRET})
    key = f"{plan.settings.staging.role}-{plan.settings.staging.database}"
    forged = service.task(plan.name, key, {"start_at": "export-scratch", "stop_at": "import-staging"})

    answer = service.run(forged)

    assert answer.get_json()["status"] == SUCCEEDED
    record = service.catalog.get(forged.name)
    assert record.stats["step_reached"] == "cleanup-scratch"
    assert {"check", "mask"} <= set(record.stats["timings"])
    server, database = setup["staging"]
    staged = {r[0] for r in server.execute("SELECT email FROM accounts WHERE demo = 0", database=database)}
    assert staged and not staged & {o[1] for o in production_rows()}


class ContendedClient:
    """The real Datastore client, with another writer rewriting the same entities (as they are stored) between a
    transaction's read and its commit ``times`` times: the emulator then aborts the commit, as Datastore does
    under contention."""

    def __init__(self, client: Any, times: int):
        from google.cloud import datastore as ds

        self._client = client
        self._rival = ds.Client(project=client.project, namespace=client.namespace)
        self.times = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_multi(self, entities: Any) -> None:
        if self.times > 0 and self._client.current_transaction is not None:
            self.times -= 1
            stored = [e for e in self._rival.get_multi([e.key for e in entities]) if e is not None]
            self._rival.put_multi(stored)
        self._client.put_multi(entities)


@pytest.mark.parametrize(("contended", "status"), [(1, 200), (10, 503)])
def test_contention_on_run_records_is_retried_then_answered_503(scripted_service, datastore, contended, status):
    client = ContendedClient(datastore, times=contended)
    app = create_app(scripted_service.rt, queue=scripted_service.queue, catalog=Catalog(client))
    task = scripted_service.task("alpha", "pending-a")

    answer = app.test_client().post(task.path, json=task.payload, headers=AUTH)

    assert answer.status_code == status
    if status == 503:
        assert "run records unavailable" in answer.get_json()["error"]
    else:
        assert scripted_service.catalog.get(task.name).status == PENDING
