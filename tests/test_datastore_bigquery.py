"""Datastore exports loaded into BigQuery: real exports from the Datastore emulator, mirrored into the GCS emulator,
loaded by the real google-cloud-bigquery client into a stateful fake of the BigQuery REST API (tests/fakes_bigquery.py),
all through the worker's HTTP endpoints with its follow-up polls."""

from __future__ import annotations

import json
import re

import pytest
import responses
from google.cloud import datastore as ds

from services.catalog import FAILED, SUCCEEDED
from services.plans import parse_plan
from tests.fakes_bigquery import BigQueryFake
from tests.fixtures.emulators import make_bucket
from tests.helpers import Clock
from tests.service_harness import Service

ENDPOINT = "https://bigquery.fake.test"
SEEDED = {"Customer": 7, "Order": 3}


@pytest.fixture
def bigquery(gcs):
    def exists(uri):
        bucket, name = re.match(r"^gs://([^/]+)/(.+)$", uri).groups()
        return gcs.bucket(bucket).blob(name).exists()

    def rows_for(uri):
        return SEEDED[re.search(r"kind_([^/]+)/", uri).group(1)]

    fake = BigQueryFake(exists, rows_for)
    fake.add_dataset("test-project", "history")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.add_passthru("http://127.0.0.1")
        mocked.add_passthru("http://localhost")
        for method in ("GET", "POST"):
            mocked.add_callback(method, re.compile(re.escape(ENDPOINT) + ".*"), callback=fake.callback)
        yield fake


@pytest.fixture
def service(tmp_path, datastore, gcs, datastore_emulator):
    make_bucket(gcs, "exports-bucket", "us-central1")
    for kind, count in SEEDED.items():
        for i in range(count):
            entity = ds.Entity(datastore.key(kind, f"{kind}-{i}"))
            entity.update({"n": i, "note": "x" * (50 * i)})
            datastore.put(entity)

    def build(bigquery_settings):
        raw = {
            "kind": "datastore",
            "select": {"namespaces": [""]},
            "destination": {"bucket": "exports-bucket", "bigquery": bigquery_settings},
            "options": {"location": "us-central1"},
        }
        plan = parse_plan("ds-nightly", raw)
        return Service(
            tmp_path,
            datastore,
            {"ds-nightly": plan},
            Clock(),
            datastore_admin_endpoint=datastore_emulator["url"],
            export_local_root=tmp_path / "exports",
            endpoints={"bigquery": ENDPOINT},
        )

    return build


def test_each_kind_is_loaded_into_a_dated_table_after_its_export(service, bigquery):
    svc = service({"dataset": "history", "table_prefix": "ds_"})

    answers = {kind: svc.run(svc.task("ds-nightly", kind)) for kind in SEEDED}

    assert {k: a.get_json()["status"] for k, a in answers.items()} == {"Customer": SUCCEEDED, "Order": SUCCEEDED}
    assert set(bigquery.tables) == {
        ("test-project", "history", "ds_Customer_20261123"),
        ("test-project", "history", "ds_Order_20261123"),
    }
    loads = [job["configuration"]["load"] for job in bigquery.inserted]
    assert {load["writeDisposition"] for load in loads} == {"WRITE_TRUNCATE"}
    assert all(
        re.search(r"/default_namespace/kind_\w+/default_namespace_kind_\w+\.export_metadata$", u)
        for load in loads
        for u in load["sourceUris"]
    )
    record = svc.catalog.get(svc.task("ds-nightly", "Customer").name)
    assert record.stats["bigquery"] == {"Customer": {"table": "test-project.history.ds_Customer_20261123", "rows": 7}}
    assert record.stats["kinds"] == {"Customer": {"entities": 7, "bytes": record.stats["bytes"]}}
    assert record.output.startswith("gs://exports-bucket/")


def test_replace_mode_keeps_one_table_per_kind(service, bigquery):
    svc = service({"dataset": "history", "mode": "replace"})

    for _ in range(2):
        svc.clock.advance(days=1)
        assert svc.run(svc.task("ds-nightly", "Order")).get_json()["status"] == SUCCEEDED

    assert set(bigquery.tables) == {("test-project", "history", "Order")}
    assert len(bigquery.inserted) == 2


def test_a_failed_load_fails_the_run_with_bigquerys_message_and_keeps_the_export(service, bigquery):
    bigquery.failing_tables.add("Customer_20261123")
    svc = service({"dataset": "history"})
    task = svc.task("ds-nightly", "Customer")

    answer = svc.run(task)

    assert answer.status_code == 200 and answer.get_json()["status"] == FAILED
    record = svc.catalog.get(task.name)
    assert "loading Customer into test-project.history.Customer_20261123 failed (invalid)" in record.error
    assert "is corrupt" in record.error
    exports = [b.name for b in svc.rt.storage().list_blobs("exports-bucket") if b.name.endswith("_metadata")]
    assert any("/Customer/" in name for name in exports)


def test_a_missing_dataset_is_a_permanent_failure_naming_it(service, bigquery):
    svc = service({"dataset": "nowhere"})
    task = svc.task("ds-nightly", "Order")

    answer = svc.run(task)

    assert answer.get_json()["status"] == FAILED
    assert "Not found: Dataset test-project:nowhere" in svc.catalog.get(task.name).error


def test_a_redelivered_poll_does_not_load_twice(service, bigquery):
    svc = service({"dataset": "history"})
    task = svc.task("ds-nightly", "Order")
    svc.post(task.path, task.payload)
    export_poll = svc.queue.tasks("pending")[-1]

    first = svc.post(export_poll["path"], json.loads(export_poll["payload"]))
    again = svc.post(export_poll["path"], json.loads(export_poll["payload"]))

    assert first.get_json()["status"] in ("pending", SUCCEEDED)
    assert again.get_json().get("duplicate") is True
    assert len(bigquery.inserted) == 1


@pytest.mark.parametrize(
    ("bigquery_settings", "field"),
    [
        ({"dataset": "has-dash"}, "destination.bigquery.dataset"),
        ({"dataset": "ok", "mode": "append"}, "destination.bigquery.mode"),
        ({"dataset": "ok", "tables": "x"}, "destination.bigquery.tables"),
    ],
)
def test_bad_bigquery_settings_name_the_field(bigquery_settings, field):
    from services.errors import ConfigError

    raw = {
        "kind": "datastore",
        "destination": {"bucket": "b", "bigquery": bigquery_settings},
        "options": {"location": "us-central1"},
    }
    with pytest.raises(ConfigError, match=f"field '{re.escape(field)}'"):
        parse_plan("ds", raw)


def _log(records: list[bytes], block: int = 32768) -> bytes:
    """A LevelDB log as its writer lays it out: fragments behind 7-byte headers, split at 32 KiB block ends."""
    out = bytearray()
    for record in records:
        rest, first = record, True
        while True:
            room = block - len(out) % block
            if room < 7:
                out += bytes(room)
                continue
            piece, rest = rest[: room - 7], rest[room - 7 :]
            kind = (1 if not rest else 2) if first else (4 if not rest else 3)
            out += b"\0\0\0\0" + len(piece).to_bytes(2, "little") + bytes([kind]) + piece
            first = False
            if not rest:
                break
    return bytes(out)


@pytest.mark.parametrize("sizes", [[], [10], [100] * 500, [70_000, 5, 40_000], [32768 - 7 - 3, 1, 2]])
def test_entities_are_counted_from_the_log_records_of_an_export(sizes):
    from kinds.datastore.exports import leveldb_log_records

    assert leveldb_log_records(_log([b"e" * n for n in sizes])) == len(sizes)
