"""Restore drills end to end through the worker: the hourly cron enqueues the due ones, each restores the newest
good backup into scratch, checks it, times it, removes the scratch and records the result on its target."""

from __future__ import annotations

import json

import pytest

from services.catalog import FAILED, SUCCEEDED
from services.plans import parse_plan
from tests.fixtures.compute import FAKE_COMPUTE_ENDPOINT
from tests.service_harness import Service

LABEL = "backup-generations"


@pytest.fixture
def disk_service(tmp_path, datastore, compute_fake, compute_clock, compute_responses):
    compute_responses.add_passthru("http://127.0.0.1")

    def build(**drill):
        raw = {"kind": "disks", "select": {"projects": ["proj-alpha"]}, "drill": {"every": "7d", **drill}}
        plan = parse_plan("disk-nightly", raw)
        return Service(
            tmp_path, datastore, {"disk-nightly": plan}, compute_clock, endpoints={"compute": FAKE_COMPUTE_ENDPOINT}
        )

    return build


def _back_up(svc, key):
    assert svc.run(svc.task("disk-nightly", key)).get_json()["status"] == SUCCEEDED


def _drill_all(svc):
    scheduled, answers = svc.run_drills()
    return scheduled[0], answers


KEY = "projects/proj-alpha/zones/us-east1-b/disks/db"


def test_a_drill_restores_the_newest_snapshot_into_a_scratch_disk_and_records_how_long(disk_service, compute_fake):
    source = compute_fake.add_disk("proj-alpha", "db", zone="us-east1-b", labels={LABEL: "3"})
    svc = disk_service()
    _back_up(svc, KEY)

    scheduled, answers = _drill_all(svc)

    assert scheduled["enqueued"] == 1 and [a.get_json()["status"] for a in answers] == [SUCCEEDED]
    (state,) = svc.catalog.target_states("disk-nightly")
    assert state.last_drill_status == SUCCEEDED and state.last_drill_seconds == 20.0  # two 10 s polls to READY
    drill = svc.catalog.get(state.last_drill_run_id)
    assert any("against the snapshot's 10 GB" in line for line in drill.stats["checked"])
    assert [n for n in compute_fake.deleted_disks if n.startswith("drill-")]  # the scratch disk is gone again
    assert [d["name"] for d in compute_fake.disks.values()] == ["db"] and source["labels"] == {LABEL: "3"}
    assert state.last_good_run_id != state.last_drill_run_id  # a drill is not a backup
    assert svc.cron("/cron/_drills").get_json()["plans"][0]["enqueued"] == 0  # done for this drill period


def test_a_restore_that_does_not_match_its_snapshot_fails_the_drill_and_still_cleans_up(disk_service, compute_fake):
    compute_fake.add_disk("proj-alpha", "db", zone="us-east1-b", labels={LABEL: "3"})
    svc = disk_service()
    _back_up(svc, KEY)
    compute_fake.damaged_snapshots.update(name for _p, name in compute_fake.snapshots)

    _scheduled, answers = _drill_all(svc)

    assert answers[0].status_code == 200 and answers[0].get_json()["status"] == FAILED
    (state,) = svc.catalog.target_states("disk-nightly")
    assert (
        state.last_drill_status == FAILED and "restored 5 GB where the snapshot holds 10 GB" in state.last_drill_error
    )
    assert state.last_status == SUCCEEDED  # the backup itself stays good in the summary
    assert not [d for d in compute_fake.disks.values() if d["name"].startswith("drill-")]


def test_leftovers_of_a_crashed_drill_are_removed_by_the_next_and_others_left_alone(disk_service, compute_fake):
    compute_fake.add_disk("proj-alpha", "db", zone="us-east1-b", labels={LABEL: "3"})
    compute_fake.add_disk(
        "proj-alpha", "drill-0badf00d-db", zone="us-east1-b", labels={"backup-scheduler-drill": "disk-nightly"}
    )
    compute_fake.add_disk(
        "proj-alpha", "drill-0badf00d-other", zone="us-east1-b", labels={"backup-scheduler-drill": "weekly"}
    )
    svc = disk_service()
    _back_up(svc, KEY)

    _drill_all(svc)

    assert "drill-0badf00d-db" in compute_fake.deleted_disks
    assert ("proj-alpha", "zones/us-east1-b", "drill-0badf00d-other") in compute_fake.disks


def test_a_backup_over_the_drill_size_limit_is_not_restored(disk_service, compute_fake):
    compute_fake.add_disk("proj-alpha", "db", zone="us-east1-b", labels={LABEL: "3"})
    svc = disk_service(max_bytes=2**30)
    _back_up(svc, KEY)

    _scheduled, answers = _drill_all(svc)

    assert answers[0].get_json()["status"] == FAILED
    assert "over drill.max_bytes" in answers[0].get_json()["error"]
    assert not [c for c in compute_fake.calls if c == ("POST", "projects/proj-alpha/zones/us-east1-b/disks")]


def test_drills_wait_for_a_free_scratch_slot(disk_service, compute_fake):
    for name in ("db", "web"):
        compute_fake.add_disk("proj-alpha", name, zone="us-east1-b", labels={LABEL: "3"})
    svc = disk_service(max_scratch=1)
    for name in ("db", "web"):
        _back_up(svc, f"projects/proj-alpha/zones/us-east1-b/disks/{name}")
    first = svc.cron("/cron/_drills").get_json()["plans"][0]
    (task,) = [t for t in svc.queue.tasks("pending") if t["path"].endswith("/drill")]
    svc.post(task["path"], json.loads(task["payload"]))  # started: its scratch disk is being made

    again = svc.cron("/cron/_drills").get_json()["plans"][0]

    assert (first["enqueued"], first["waiting"]) == (1, 1)
    assert (again["enqueued"], again["waiting"]) == (0, 2)


def test_a_forged_drill_task_is_refused_and_recorded(disk_service, compute_fake):
    compute_fake.add_disk("proj-alpha", "db", zone="us-east1-b", labels={LABEL: "3"})
    svc = disk_service()
    _back_up(svc, KEY)

    answer = svc.post(
        "/tasks/disk-nightly/drill",
        {"run_id": "made-up", "period": "2026-11-23T00:00:00+00:00", "target": {"key": KEY}},
    )

    assert answer.status_code == 200 and "refused" in answer.get_json()["error"]
    assert not [c for c in compute_fake.calls if c[0] == "POST" and c[1].endswith("/disks")]


@pytest.fixture
def ds_service(tmp_path, datastore, gcs, datastore_emulator):
    from tests.fixtures.emulators import make_bucket
    from tests.helpers import Clock

    make_bucket(gcs, "exports-bucket", "us-central1")
    for i in range(6):
        datastore.put(ds_entity(datastore, "Customer", i))
    plan = parse_plan(
        "ds-nightly",
        {
            "kind": "datastore",
            "select": {"namespaces": [""], "kinds": ["Customer"]},
            "destination": {"bucket": "exports-bucket"},
            "options": {"location": "us-central1"},
            "drill": {"every": "1d"},
        },
    )
    return Service(
        tmp_path,
        datastore,
        {"ds-nightly": plan},
        Clock(),
        datastore_admin_endpoint=datastore_emulator["url"],
        export_local_root=tmp_path / "exports",
    )


def ds_entity(client, kind, i):
    from google.cloud import datastore as ds

    entity = ds.Entity(client.key(kind, f"{kind}-{i}"))
    entity.update({"n": i})
    return entity


def _scratch_count(project="test-project-drill"):
    from google.cloud import datastore as ds

    query = ds.Client(project=project).query(kind="Customer")
    query.keys_only()
    return len(list(query.fetch()))


def test_a_datastore_drill_imports_into_scratch_and_counts_every_kind(ds_service, datastore):
    assert ds_service.run(ds_service.task("ds-nightly", "Customer")).get_json()["status"] == SUCCEEDED
    datastore.put(ds_entity(datastore, "Customer", 99))  # the live data moves on; the drill restores the backup

    _scheduled, answers = _drill_all_of(ds_service, "ds-nightly")

    assert [a.get_json()["status"] for a in answers] == [SUCCEEDED]
    (state,) = ds_service.catalog.target_states("ds-nightly")
    drill = ds_service.catalog.get(state.last_drill_run_id)
    assert "Customer: 6 entities restored, the export recorded 6" in drill.stats["checked"]
    assert state.last_drill_seconds is not None and state.last_drill_seconds > 0
    assert _scratch_count() == 0  # emptied again
    query = datastore.query(kind="Customer")
    query.keys_only()
    assert len(list(query.fetch())) == 7  # the source was never touched


def test_a_datastore_drill_that_restores_fewer_entities_than_recorded_fails(ds_service):
    task = ds_service.task("ds-nightly", "Customer")
    assert ds_service.run(task).get_json()["status"] == SUCCEEDED
    record = ds_service.catalog.get(task.name)
    record.stats["kinds"]["Customer"]["entities"] = 9  # what the export recorded no longer matches its files
    ds_service.catalog.save(record)

    _scheduled, answers = _drill_all_of(ds_service, "ds-nightly")

    assert answers[0].get_json()["status"] == FAILED
    assert "Customer: 6 entities restored where the export recorded 9" in answers[0].get_json()["error"]
    assert _scratch_count() == 0


def test_leftovers_in_the_scratch_are_cleared_before_the_import(ds_service):
    from google.cloud import datastore as ds

    scratch = ds.Client(project="test-project-drill")
    for i in range(100, 104):  # a crashed drill's entities, with keys the backup does not have
        scratch.put(ds_entity(scratch, "Customer", i))
    assert ds_service.run(ds_service.task("ds-nightly", "Customer")).get_json()["status"] == SUCCEEDED

    _scheduled, answers = _drill_all_of(ds_service, "ds-nightly")

    assert answers[0].get_json()["status"] == SUCCEEDED


def _drill_all_of(svc, plan_name):
    scheduled, answers = svc.run_drills()
    return [p for p in scheduled if p["plan"] == plan_name][0], answers


@pytest.fixture
def share_service(tmp_path, datastore, filestore_fake, filestore_responses):
    from tests.fixtures.filestore import FAKE_FILE_ENDPOINT
    from tests.helpers import Clock

    filestore_responses.add_passthru("http://127.0.0.1")
    source = filestore_fake.add_instance("proj-one", "us-east1-b", "files", {"backup-keep": "3"})

    def build(**options):
        raw = {
            "kind": "filestore",
            "select": {"projects": ["proj-one"]},
            "options": options,
            "drill": {"every": "7d"},
        }
        svc = Service(
            tmp_path, datastore, {"shares": parse_plan("shares", raw)}, Clock(), endpoints={"file": FAKE_FILE_ENDPOINT}
        )
        assert svc.run(svc.task("shares", source)).get_json()["status"] == SUCCEEDED
        return svc

    return build


def test_a_filestore_drill_checks_the_newest_backup(share_service, filestore_fake):
    svc = share_service()

    _scheduled, answers = _drill_all_of(svc, "shares")

    assert [a.get_json()["status"] for a in answers] == [SUCCEEDED]
    (state,) = svc.catalog.target_states("shares")
    drill = svc.catalog.get(state.last_drill_run_id)
    assert any("holds 5368709120 bytes" in line for line in drill.stats["checked"])
    assert state.last_drill_seconds is None and filestore_fake.restores == []  # checked, nothing restored


def test_a_filestore_drill_restores_onto_the_labelled_scratch_instance_only(share_service, filestore_fake):
    scratch = filestore_fake.add_instance("proj-one", "us-east1-b", "drill", {"backup-scheduler-drill": "shares"})
    svc = share_service(drill_instance=scratch)

    _scheduled, answers = _drill_all_of(svc, "shares")

    assert [a.get_json()["status"] for a in answers] == [SUCCEEDED]
    (restore,) = filestore_fake.restores
    (state,) = svc.catalog.target_states("shares")
    assert restore["instance"] == scratch and restore["sourceBackup"] == state.last_good_output
    assert state.last_drill_seconds == 30.0


def test_a_filestore_drill_never_restores_onto_an_unlabelled_instance(share_service, filestore_fake):
    other = filestore_fake.add_instance("proj-one", "us-east1-b", "prod-two", {"team": "x"})
    svc = share_service(drill_instance=other)

    _scheduled, answers = _drill_all_of(svc, "shares")

    assert answers[0].get_json()["status"] == FAILED and "refused" in answers[0].get_json()["error"]
    assert filestore_fake.restores == []


def test_a_filestore_backup_that_holds_nothing_fails_its_drill(share_service, filestore_fake):
    filestore_fake.stored_bytes = 0
    svc = share_service()

    _scheduled, answers = _drill_all_of(svc, "shares")

    assert answers[0].get_json()["status"] == FAILED and "holds no data" in answers[0].get_json()["error"]


@pytest.fixture
def share_copies(tmp_path, datastore):
    from tests.helpers import Clock

    source, dest = tmp_path / "share", tmp_path / "copies"
    for i in range(40):
        (source / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (source / f"d{i % 4}" / f"f{i}.bin").write_bytes(bytes([i]) * (100 + i))
    dest.mkdir()
    raw = {
        "kind": "directory",
        "select": {"paths": [str(source)]},
        "destination": {"path": str(dest)},
        "options": {"sync": False, "drill_sample": 10},
        "drill": {"every": "1d"},
    }
    svc = Service(tmp_path, datastore, {"share": parse_plan("share", raw)}, Clock())
    assert svc.run(svc.task("share", str(source))).get_json()["status"] == SUCCEEDED
    svc.dest = dest
    return svc


def test_a_directory_drill_checks_the_copy_and_restores_a_sample_by_checksum(share_copies):
    import tempfile
    from pathlib import Path

    leftover = Path(tempfile.mkdtemp(prefix="backup-scheduler-drill-share-"))

    _scheduled, answers = _drill_all_of(share_copies, "share")

    assert [a.get_json()["status"] for a in answers] == [SUCCEEDED]
    (state,) = share_copies.catalog.target_states("share")
    drill = share_copies.catalog.get(state.last_drill_run_id)
    assert "10 sampled files restored into scratch" in drill.stats["checked"][-1]
    assert state.last_drill_seconds is not None
    assert not leftover.exists()  # a crashed drill's scratch is removed by the next drill
    assert not list(Path(tempfile.gettempdir()).glob("backup-scheduler-drill-share-*"))


def test_a_damaged_copy_fails_its_drill_naming_the_file(share_copies):
    copy = next(p for p in share_copies.dest.iterdir() if not p.name.startswith("."))
    for victim in copy.rglob("*.bin"):
        victim.write_bytes(b"x" * victim.stat().st_size)  # same size, other content: only checksums tell

    _scheduled, answers = _drill_all_of(share_copies, "share")

    assert answers[0].get_json()["status"] == FAILED
    assert "restored content has sha256" in answers[0].get_json()["error"]


def test_a_copy_missing_a_file_fails_its_drill(share_copies):
    copy = next(p for p in share_copies.dest.iterdir() if not p.name.startswith("."))
    (copy / "d1" / "f1.bin").unlink()

    _scheduled, answers = _drill_all_of(share_copies, "share")

    assert answers[0].get_json()["status"] == FAILED
    assert "d1/f1.bin: No such file or directory" in answers[0].get_json()["error"]
