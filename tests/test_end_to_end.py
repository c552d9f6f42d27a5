"""The whole flow on local parts: cron fires, the local queue delivers tasks over HTTP to the app, each worker
exports its kind through the Datastore emulator's admin API into the GCS emulator, and the runs are recorded."""

from __future__ import annotations

import requests

from main import create_app
from services.catalog import SUCCEEDED, Catalog
from services.queue import LocalDispatcher, LocalQueue, load_queue_configs
from tests.fixtures.emulators import make_bucket
from tests.helpers import LOCAL_TOKEN, make_runtime
from tests.test_datastore import seed


def test_cron_fired_twice_exports_each_kind_exactly_once(tmp_path, datastore, gcs, datastore_emulator, serve):
    seed(datastore, "Customer", count=4)
    seed(datastore, "Order", count=2)
    seed(datastore, "Invoice", namespace="acme", count=1)
    make_bucket(gcs, "demo-backups", location="us-central1")
    queue = LocalQueue(tmp_path / "queue.sqlite3")

    def runtime_for(url: str):
        return make_runtime(
            tmp_path,
            service_url=url,
            datastore_admin_endpoint=datastore_emulator["url"],
            export_local_root=tmp_path / "emulator-exports",
        )

    app = create_app(runtime_for("http://unused"), queue=queue)
    with serve(app) as served:
        app.extensions["backup"]["runtime"] = runtime_for(served.url)
        dispatcher = LocalDispatcher(
            queue,
            served.url,
            LOCAL_TOKEN,
            load_queue_configs(app.extensions["backup"]["runtime"].settings.queue_yaml),
            poll_interval=0.05,
        ).start()
        try:
            auth = {"Authorization": f"Bearer {LOCAL_TOKEN}"}
            first = requests.get(f"{served.url}/cron/datastore-nightly", headers=auth, timeout=30)
            second = requests.get(f"{served.url}/cron/datastore-nightly", headers=auth, timeout=30)
            assert dispatcher.wait_idle(timeout=60)
            runs = requests.get(f"{served.url}/runs?plan=datastore-nightly", headers=auth, timeout=30).json()
        finally:
            dispatcher.stop()

    assert first.status_code == 200
    assert first.json() | {"period": None} == {
        "plan": "datastore-nightly",
        "period": None,
        "targets": 3,
        "enqueued": 3,
        "already_queued": 0,
        "continuation": False,
    }
    assert (second.json()["enqueued"], second.json()["already_queued"]) == (0, 3)
    delivered = [t for t in queue.tasks() if t["path"] == "/tasks/datastore-nightly"]
    assert len(delivered) == 3 and all(t["state"] == "done" for t in delivered)
    records = Catalog(datastore).recent_runs(plan="datastore-nightly")
    assert sorted(r.target for r in records) == ["Customer", "Order", "acme/Invoice"]
    assert all(r.status == SUCCEEDED and r.output.startswith("gs://demo-backups/datastore/") for r in records)
    exported = {b.name.split("/")[-2] for b in gcs.list_blobs("demo-backups") if "/kind_" in b.name}
    assert exported == {"kind_Customer", "kind_Order", "kind_Invoice"}
    assert {t["target"] for t in runs["targets"]} == {"Customer", "Order", "acme/Invoice"}
    assert all(t["last_good_output"] for t in runs["targets"])
