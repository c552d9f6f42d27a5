"""A plan's runs and its daily digest are exact whatever other plans have recorded: they are read through the
indexed ``plan_created`` property, not from the newest few thousand runs of every plan."""

from __future__ import annotations

import json
from datetime import timedelta

from main import create_app
from services import notify
from services.catalog import FAILED, SUCCEEDED, Catalog
from services.queue import LocalQueue
from tests.alerting import AUTH, finished_run, make_plan
from tests.helpers import Clock, make_runtime


def bulk(catalog: Catalog, records) -> None:
    entities = [catalog._to_entity(r) for r in records]
    for start in range(0, len(entities), 400):
        catalog.client.put_multi(entities[start : start + 400])


def test_runs_of_a_weekly_plan_are_found_behind_thousands_of_newer_runs(tmp_path, datastore):
    clock = Clock()
    weekly, hourly = make_plan("weekly"), make_plan("hourly")
    rt = make_runtime(tmp_path, plans={p.name: p for p in (weekly, hourly)}, clock=clock)
    catalog = Catalog(datastore)
    catalog.save(finished_run("weekly", "Customer", SUCCEEDED, clock.now - timedelta(days=2)))
    bulk(
        catalog,
        (
            finished_run("hourly", f"t{i:04d}", SUCCEEDED, clock.now - timedelta(seconds=i), run_id=f"h-{i}")
            for i in range(6000)
        ),
    )
    client = create_app(rt, catalog=catalog).test_client()

    found = client.get("/runs?plan=weekly", headers=AUTH).get_json()
    one = client.get("/runs?plan=hourly&limit=1", headers=AUTH).get_json()
    unknown = client.get("/runs?plan=nope", headers=AUTH)

    assert [r["target"] for r in found["runs"]] == ["Customer"]
    assert [r["run_id"] for r in one["runs"]] == ["h-0"]
    assert len(one["targets"]) <= 1
    assert unknown.status_code == 404 and "no plan named 'nope'" in unknown.get_json()["error"]


def test_the_digest_counts_every_run_of_the_day(tmp_path, datastore):
    clock = Clock()
    plan = make_plan("nightly", digest=True, on_failure=False, webhook_env="OPS_CHAT_WEBHOOK")
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    catalog = Catalog(datastore)
    runs = [
        finished_run("nightly", f"t{i:04d}", SUCCEEDED, clock.now - timedelta(hours=20), run_id=f"ok-{i}")
        for i in range(2290)
    ]
    runs += [
        finished_run("nightly", f"t{i:04d}", FAILED, clock.now - timedelta(hours=2), error="quota", run_id=f"f-{i}")
        for i in range(12)
    ]
    runs += [finished_run("nightly", "old", FAILED, clock.now - timedelta(days=2), error="long ago", run_id="old")]
    bulk(catalog, runs)
    queue = LocalQueue(tmp_path / "queue.sqlite3")

    create_app(rt, queue=queue, catalog=catalog).test_client().get("/cron/_digest", headers=AUTH)

    [message] = [json.loads(t["payload"]) for t in queue.tasks() if t["path"] == notify.NOTIFY_PATH]
    assert "12 failed, 2,290 succeeded in the last 24 h" in message["text"]
    assert "... and 2 more failed targets" in message["text"] and "long ago" not in message["text"]
