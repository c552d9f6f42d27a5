"""Datastore kind against the real Datastore emulator (discovery, export) and the GCS emulator (pre-flight)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.cloud import datastore as ds

from kinds.datastore import exports as kind
from services.catalog import NAMESPACE as CATALOG_NAMESPACE
from services.errors import PermanentError, TargetGone
from services.kinds import Done, RunContext, Target
from services.plans import parse_plan
from tests.fixtures.emulators import make_bucket
from tests.helpers import Clock, make_runtime


def seed(client: ds.Client, kind_name: str, namespace: str | None = None, count: int = 2) -> None:
    for i in range(count):
        entity = ds.Entity(client.key(kind_name, f"{kind_name}-{i}", namespace=namespace))
        entity.update({"n": i, "label": f"{kind_name} number {i}"})
        client.put(entity)


def plan_of(**overrides):
    raw = {
        "kind": "datastore",
        "destination": {"bucket": "exports-bucket", "prefix": "nightly"},
        "options": {"location": "us-central1"},
    }
    raw.update(overrides)
    return parse_plan("ds-test", raw)


@pytest.fixture
def rt(tmp_path, datastore, gcs, datastore_emulator):
    return make_runtime(
        tmp_path,
        datastore_admin_endpoint=datastore_emulator["url"],
        export_local_root=tmp_path / "emulator-exports",
    )


def test_discovers_kinds_in_every_namespace_and_skips_bookkeeping(rt, datastore):
    seed(datastore, "Customer")
    seed(datastore, "Order")
    seed(datastore, "Invoice", namespace="acme")
    seed(datastore, "BackupRun", namespace=CATALOG_NAMESPACE)

    page = kind.KIND.enumerate(plan_of(), None, rt)

    assert sorted(t.key for t in page.targets) == ["Customer", "Order", "acme/Invoice"]
    assert page.next_page_token is None
    invoice = next(t for t in page.targets if t.key == "acme/Invoice")
    assert invoice.params == {"project": "test-project", "namespaces": ["acme"], "kinds": ["Invoice"]}


def test_explicit_kinds_and_namespaces_are_used_as_given(rt, datastore):
    seed(datastore, "Customer")
    seed(datastore, "Order")

    plan = plan_of(select={"kinds": ["Order"], "namespaces": [""]})
    page = kind.KIND.enumerate(plan, None, rt)

    assert [t.key for t in page.targets] == ["Order"]


def test_grouping_packs_at_most_100_combinations_per_request():
    pairs = [(ns, f"Kind{k:03d}") for ns in ("", "a", "b") for k in range(30)] + [
        ("c", f"Other{k}") for k in range(150)
    ]

    groups = kind.group_pairs(pairs)

    assert all(len(namespaces) * len(kinds) <= kind.MAX_COMBINATIONS for namespaces, kinds in groups)
    covered = {(ns, k) for namespaces, kinds in groups for ns in namespaces for k in kinds}
    assert covered == set(pairs)
    # the three namespaces holding the same 30 kinds share one request; "c" needs two (150 kinds)
    assert len(groups) == 3


def test_export_of_one_kind_lands_under_the_timestamped_prefix(rt, datastore, gcs):
    seed(datastore, "Customer", count=3)
    seed(datastore, "Order", count=5)
    make_bucket(gcs, "exports-bucket", location="us-central1")
    plan = plan_of()
    target = next(t for t in kind.KIND.enumerate(plan, None, rt).targets if t.key == "Customer")
    run = RunContext(run_id="r1", plan=plan.name, target_key=target.key, period=Clock()())

    outcome = kind.KIND.start(plan, target, run, rt)

    assert isinstance(outcome, Done)
    assert outcome.output.startswith("gs://exports-bucket/nightly/20261123t020005z/Customer/")
    assert outcome.output.endswith(".overall_export_metadata")
    names = [b.name for b in gcs.list_blobs("exports-bucket")]
    assert any("kind_Customer" in n for n in names)
    assert not any("kind_Order" in n for n in names)


def test_kind_that_vanished_since_enumeration_is_skipped(rt, datastore, gcs):
    make_bucket(gcs, "exports-bucket")
    plan = plan_of()
    target = Target("Ghost", {"project": "test-project", "namespaces": [""], "kinds": ["Ghost"]})
    run = RunContext(run_id="r2", plan=plan.name, target_key="Ghost", period=Clock()())

    with pytest.raises(TargetGone, match="Ghost"):
        kind.KIND.start(plan, target, run, rt)


@pytest.mark.parametrize(
    ("bucket_location", "storage_class", "message"),
    [
        ("europe-west1", "STANDARD", "is in EUROPE-WEST1, but the Datastore database is in us-central1"),
        ("us-central1", "NEARLINE", "default storage class NEARLINE"),
        ("us-central1", "COLDLINE", "default storage class COLDLINE"),
        ("us-central1", "ARCHIVE", "default storage class ARCHIVE"),
    ],
)
def test_preflight_refuses_an_incompatible_bucket_and_says_what_to_change(
    rt, gcs, bucket_location, storage_class, message
):
    make_bucket(gcs, "exports-bucket", location=bucket_location, storage_class=storage_class)

    with pytest.raises(PermanentError) as raised:
        kind.check_bucket(rt, "exports-bucket", "us-central1")

    assert message in str(raised.value)
    assert "gs://exports-bucket" in str(raised.value)


def test_preflight_accepts_same_region_and_containing_multi_region(rt, gcs):
    make_bucket(gcs, "regional", location="us-central1")
    make_bucket(gcs, "multi", location="US")

    kind.check_bucket(rt, "regional", "us-central1")  # raises PermanentError if refused
    kind.check_bucket(rt, "multi", "us-central1")
    kind.check_bucket(rt, "multi", "nam5")
    with pytest.raises(PermanentError, match="is in US, but the Datastore database is in europe-west1"):
        kind.check_bucket(rt, "multi", "europe-west1")


def test_preflight_names_a_missing_bucket(rt, gcs):
    with pytest.raises(PermanentError, match="gs://nowhere does not exist"):
        kind.check_bucket(rt, "nowhere", "us-central1")


def test_restore_exports_what_it_overwrites_first_then_brings_the_export_back(rt, datastore, gcs):
    seed(datastore, "Customer", count=3)
    make_bucket(gcs, "exports-bucket", location="us-central1")
    plan = plan_of()
    target = kind.KIND.resolve(plan, "Customer", rt)
    done = kind.KIND.start(plan, target, RunContext("r1", plan.name, "Customer", Clock()()), rt)
    assert isinstance(done, Done)
    changed = datastore.get(datastore.key("Customer", "Customer-1"))
    changed["label"] = "edited after the backup"
    datastore.put(changed)
    datastore.delete(datastore.key("Customer", "Customer-2"))

    result = kind.restore(rt, done.output, kinds=["Customer"], safety_url_prefix="gs://exports-bucket/safety/t1")

    assert result.imported_from == done.output  # (the emulator reports no entity counts: the data is checked below)
    safety = Path(result.safety_export)  # the emulator exports to its local folder for the bucket
    assert safety.is_relative_to(rt.settings.export_local_root / "exports-bucket" / "safety" / "t1")
    assert kind.count_local_export(safety.parent)["Customer"]["entities"] == 2  # the data as the restore found it
    restored = {e.key.name: e["label"] for e in datastore.query(kind="Customer").fetch()}
    assert restored == {f"Customer-{i}": f"Customer number {i}" for i in range(3)}


def test_restore_of_a_folder_without_one_export_names_what_it_found(rt, gcs):
    make_bucket(gcs, "exports-bucket", location="us-central1")

    with pytest.raises(PermanentError, match=r"expected one \.overall_export_metadata under gs://exports-bucket/x"):
        kind.restore(rt, "gs://exports-bucket/x")
