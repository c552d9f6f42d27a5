"""The `backup` command group, through Flask's CLI runner (the same code path as `flask --app main backup`)."""

from __future__ import annotations

import json

from main import create_app
from services.queue import LocalQueue
from tests.helpers import make_runtime
from tests.test_datastore import seed


def cli(tmp_path, datastore_emulator, *args):
    rt = make_runtime(tmp_path, datastore_admin_endpoint=datastore_emulator["url"])
    app = create_app(rt, queue=LocalQueue(tmp_path / "queue.sqlite3"))
    runner = app.test_cli_runner()
    return runner.invoke(args=["backup", *args], obj={"runtime": rt})


def test_plans_lists_every_plan(tmp_path, datastore_emulator):
    result = cli(tmp_path, datastore_emulator, "plans")

    assert result.exit_code == 0
    assert "datastore-nightly" in result.output and "datastore" in result.output


def test_dry_run_describes_each_target_and_enqueues_nothing(tmp_path, datastore, datastore_emulator):
    seed(datastore, "Customer")
    seed(datastore, "Order")

    result = cli(tmp_path, datastore_emulator, "run", "datastore-nightly", "--dry-run")

    assert result.exit_code == 0, result.output
    assert "would export Customer" in result.output and "would export Order" in result.output
    assert "2 target(s); nothing was changed" in result.output
    assert LocalQueue(tmp_path / "queue.sqlite3").tasks() == []


def test_run_enqueues_one_task_per_target(tmp_path, datastore, datastore_emulator):
    seed(datastore, "Customer")

    result = cli(tmp_path, datastore_emulator, "run", "datastore-nightly", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["enqueued"] == 1
    assert [t["path"] for t in LocalQueue(tmp_path / "queue.sqlite3").tasks()] == ["/tasks/datastore-nightly"]


def test_unknown_plan_is_a_usage_error_listing_the_plans(tmp_path, datastore_emulator):
    result = cli(tmp_path, datastore_emulator, "run", "nope")

    assert result.exit_code == 2
    assert "no plan named 'nope'; plans: datastore-nightly" in result.output
