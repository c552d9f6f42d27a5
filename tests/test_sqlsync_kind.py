"""sqlsync as a checked job kind: tasks that run out of budget checkpoint and the next one resumes, the worker
carries a sync through its follow-up tasks, and passwords come only through the runtime's secrets."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kinds.sqlsync.kind import KIND
from kinds.sqlsync.steps import STEPS
from services import jobs
from services.errors import PermanentError
from services.kinds import Pending, RunContext
from services.plans import parse_plan
from services.runtime import Runtime, Settings
from tests.sqlsync_data import SECRET, SECRET_ENV, make_sync_setup, production_rows

PERIOD = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


@pytest.fixture
def sync_setup(mariadb_servers, tmp_path, monkeypatch):
    return make_sync_setup(mariadb_servers, tmp_path, monkeypatch)


def _rows(setup, side, sql):
    server, database = setup[side]
    return server.execute(sql, database=database)


def test_a_spent_budget_checkpoints_after_every_step_and_the_next_task_resumes(sync_setup):
    plan, rt = sync_setup["plan"], sync_setup["rt"]
    target = KIND.resolve(plan, "staging-" + plan.settings.staging.database, rt)
    run = RunContext("r1", plan.name, target.key, PERIOD)
    checkpoints: list[Pending] = []

    done = jobs.drive(KIND, plan, target, run, rt, budget_seconds=0, on_pending=checkpoints.append)

    assert [p.state["step"] for p in checkpoints] == list(STEPS[1:])
    assert [p.state["done"] for p in checkpoints[:2]] == [["check"], ["check", "export-production"]]
    export = checkpoints[1].state["produced"]["export-production"]
    assert export["dump"].endswith("/staging-refresh/20261123T020000Z/production.sql") and export["bytes"] > 0
    assert done.stats["step_reached"] == "cleanup-scratch" and set(done.stats["timings"]) == set(STEPS)
    staged = {r[0] for r in _rows(sync_setup, "staging", "SELECT email FROM accounts WHERE demo = 0")}
    assert len(staged) == 120 and not staged & {o[1] for o in production_rows()}


def test_a_budget_with_room_runs_every_step_in_one_task(sync_setup):
    plan, rt = sync_setup["plan"], sync_setup["rt"]
    target = KIND.enumerate(plan, None, rt).targets[0]
    run = RunContext("r1", plan.name, target.key, PERIOD)
    checkpoints: list[Pending] = []

    jobs.drive(KIND, plan, target, run, rt, budget_seconds=3600, on_pending=checkpoints.append)

    assert checkpoints == []


def test_the_worker_carries_a_sync_through_one_task_per_step(tmp_path, datastore, sync_setup):
    from services.catalog import SUCCEEDED
    from tests.helpers import Clock
    from tests.service_harness import Service

    plan = sync_setup["plan"]
    # A budget of 0: every task's budget is spent by its first step.
    service = Service(
        tmp_path, datastore, {plan.name: plan}, Clock(), environ={SECRET_ENV: SECRET}, job_budget_seconds=0.0
    )
    task = service.task(plan.name, "staging-" + plan.settings.staging.database)

    answer = service.run(task)

    record = service.catalog.get(task.name)
    polls = [t for t in service.queue.tasks() if t["name"].startswith(task.name + "-poll-")]
    assert answer.get_json()["status"] == SUCCEEDED and record.status == SUCCEEDED
    assert len(polls) == len(STEPS) - 1
    assert record.stats["step_reached"] == "cleanup-scratch"
    assert _rows(sync_setup, "staging", "SELECT COUNT(*) FROM accounts") == [(122,)]


def _with_password_users(setup, password):
    for side in ("production", "scratch", "staging"):
        server, _ = setup[side]
        server.execute("CREATE USER IF NOT EXISTS 'sync'@'127.0.0.1' IDENTIFIED BY %s", (password,))
        server.execute("ALTER USER 'sync'@'127.0.0.1' IDENTIFIED BY %s", (password,))
        server.execute("GRANT ALL ON *.* TO 'sync'@'127.0.0.1'")
    raw = setup["raw"]
    for ref in (raw["select"], raw["destination"]["staging"], raw["destination"]["scratch"]):
        ref.update(user="sync", password_env="SQLSYNC_DB_PASSWORD")
    return parse_plan("staging-refresh", raw)


def test_database_passwords_come_from_the_runtimes_secrets_only(sync_setup, monkeypatch):
    plan = _with_password_users(sync_setup, "s3cret-pass")
    monkeypatch.setenv("SQLSYNC_DB_PASSWORD", "s3cret-pass")  # in the process, but not in the runtime's environment
    blind = sync_setup["rt"]
    seeing = Runtime(
        Settings.from_env({SECRET_ENV: SECRET, "SQLSYNC_DB_PASSWORD": "s3cret-pass"}), plans={}, credentials=None
    )

    with pytest.raises(PermanentError, match=r"SQLSYNC_DB_PASSWORD \(the production database password\) is not set"):
        KIND.start(plan, KIND.enumerate(plan, None, blind).targets[0], RunContext("r", plan.name, "t", PERIOD), blind)
    checked = KIND.start(
        plan,
        KIND.enumerate(plan, None, seeing).targets[0],
        RunContext("r", plan.name, "t", PERIOD, options={"stop_at": "check"}),
        seeing,
    )

    assert checked.stats["step_reached"] == "check"


def test_a_checkpoint_that_names_no_step_is_refused(sync_setup):
    plan, rt = sync_setup["plan"], sync_setup["rt"]
    target = KIND.enumerate(plan, None, rt).targets[0]

    with pytest.raises(PermanentError, match="checkpoint names no step of sqlsync"):
        KIND.poll(plan, target, {"step": "skip-masking"}, RunContext("r", plan.name, target.key, PERIOD), rt)


def test_a_collision_in_one_pass_masking_loads_scratch_again_with_the_first_pass(sync_setup, monkeypatch):
    from kinds.sqlsync.masking import Masker

    original = Masker.email_candidate

    def colliding(self, normalised, counter=0, email_domain="example.com"):
        # Two addresses share a first candidate (at 80 bits: odds of about 4e-13 in a million).
        same = "customer.2@real-mail.com" if normalised == "customer.1@real-mail.com" else normalised
        return original(self, same if counter == 0 else normalised, counter, email_domain)

    monkeypatch.setattr(Masker, "email_candidate", colliding)
    plan, rt = sync_setup["plan"], sync_setup["rt"]
    run = RunContext("r1", plan.name, "t", PERIOD, options={"stop_at": "import-scratch"})

    done = KIND.start(plan, KIND.enumerate(plan, None, rt).targets[0], run, rt)

    scratch, scratch_db = sync_setup["scratch"]
    emails = [row[0] for row in scratch.execute("SELECT email FROM accounts", database=scratch_db)]
    assert done.stats["step_reached"] == "import-scratch"
    assert any("masked again with a first pass" in line for line in run.log_lines)
    assert len(emails) == len(set(emails)) == 120 and not set(emails) & {o[1] for o in production_rows()}
