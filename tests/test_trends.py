"""Growth over time: Datastore runs record entities per kind (counted from the emulator's export files), and
``backup trends`` shows them day by day."""

from __future__ import annotations

from click.testing import CliRunner
from google.cloud import datastore as ds

from commands.trends import trends_command
from services.plans import parse_plan
from services.trends import kind_trends
from tests.fixtures.emulators import make_bucket
from tests.helpers import Clock
from tests.service_harness import Service


def test_entities_per_kind_are_recorded_and_shown_day_by_day(tmp_path, datastore, gcs, datastore_emulator):
    make_bucket(gcs, "exports-bucket", "us-central1")
    plan = parse_plan(
        "ds-nightly",
        {
            "kind": "datastore",
            "select": {"namespaces": [""], "kinds": ["Customer"]},
            "destination": {"bucket": "exports-bucket"},
            "options": {"location": "us-central1"},
        },
    )
    svc = Service(
        tmp_path,
        datastore,
        {"ds-nightly": plan},
        Clock(),
        datastore_admin_endpoint=datastore_emulator["url"],
        export_local_root=tmp_path / "exports",
    )
    for day, total in enumerate((4, 5, 8)):
        for i in range(total):
            datastore.put(ds.Entity(datastore.key("Customer", f"c{i}")))
        if day:
            svc.clock.advance(days=1)
        assert svc.run(svc.task("ds-nightly", "Customer")).get_json()["status"] == "succeeded"

    trends = kind_trends(svc.catalog, "ds-nightly", svc.clock())
    shown = CliRunner().invoke(trends_command, ["ds-nightly"], obj={"runtime": svc.rt})

    assert [p.entities for p in trends["Customer"]] == [4, 5, 8]
    assert [p.day.isoformat() for p in trends["Customer"]] == ["2026-11-23", "2026-11-24", "2026-11-25"]
    assert shown.exit_code == 0, shown.output
    assert "2026-11-25  Customer" in shown.output and "+60.0%" in shown.output
