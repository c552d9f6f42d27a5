"""Jobs (our own code doing the work) run in budgeted chunks: a task stops at its budget, saves a checkpoint and
answers Pending; the follow-up task on the plan's own queue resumes it. The CLI's driver runs the same chunks."""

from __future__ import annotations

import json

import pytest

import kinds
from main import create_app
from services import jobs
from services.catalog import SUCCEEDED, Catalog
from services.fanout import backup_task, current_period
from services.kinds import Done, RunContext, Target
from services.plans import parse_plan
from services.queue import LocalQueue
from tests import counting_job
from tests.helpers import LOCAL_TOKEN, Clock, make_runtime

AUTH = {"Authorization": f"Bearer {LOCAL_TOKEN}"}


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setitem(kinds.REGISTRY, "counting", counting_job.REGISTRATION)
    return parse_plan("counter", {"kind": "counting", "select": {"items": 12}, "options": {"seconds_each": 0.05}})


def test_a_job_larger_than_its_budget_finishes_through_continuations(tmp_path, datastore, counting):
    clock = Clock()
    rt = make_runtime(tmp_path, plans={"counter": counting}, clock=clock, job_budget_seconds=0.2)
    queue = LocalQueue(tmp_path / "q.sqlite3", clock=clock)
    client = create_app(rt, queue=queue).test_client()
    task = backup_task(counting, Target("counter"), current_period(rt, counting))

    answer = client.post(task.path, json=task.payload, headers=AUTH)
    continuations = []
    while pending := queue.tasks("pending"):
        continuations.append(pending[0])
        queue.settle(pending[0]["name"], state="done", status=200, error=None)
        answer = client.post(pending[0]["path"], json=json.loads(pending[0]["payload"]), headers=AUTH)

    assert answer.get_json()["status"] == SUCCEEDED
    record = Catalog(datastore).get(task.name)
    chunks = record.stats["chunks"]
    assert len(chunks) >= 3  # 12 items of 0.05 s in 0.2 s budgets
    assert [item for chunk in chunks for item in chunk] == list(range(12))  # each item once, in order
    assert {c["queue"] for c in continuations} == {"backups"}  # the plan's queue, not the operation polls'
    assert len(continuations) == len(chunks) - 1


def test_the_driver_runs_the_same_chunks_in_one_process(tmp_path, counting):
    rt = make_runtime(tmp_path, plans={"counter": counting})
    run = RunContext(run_id="r", plan="counter", target_key="counter", period=Clock()())

    outcome = jobs.drive(
        counting_job.KIND, counting, Target("counter"), run, rt, budget_seconds=0.2, sleep=lambda s: None
    )
    unbudgeted = jobs.drive(counting_job.KIND, counting, Target("counter"), run, rt)

    assert isinstance(outcome, Done) and len(outcome.stats["chunks"]) >= 3
    assert [i for chunk in outcome.stats["chunks"] for i in chunk] == list(range(12))
    assert unbudgeted.stats["chunks"] == [list(range(12))]


@pytest.mark.parametrize("text", ["-1", "3301", "eight", ""])
def test_a_budget_outside_the_request_deadline_stops_start_up_naming_the_setting(text):
    from services.errors import ConfigError
    from services.runtime import Settings

    with pytest.raises(ConfigError, match=r"BACKUP_JOB_BUDGET_SECONDS: expected seconds from 0 to 3300"):
        Settings.from_env({"BACKUP_JOB_BUDGET_SECONDS": text})
    assert Settings.from_env({"BACKUP_JOB_BUDGET_SECONDS": "0"}).job_budget_seconds == 0.0
