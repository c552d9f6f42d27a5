"""The stale-backup check over the Datastore emulator with a clock the test moves: a plan that never ran, a failed
fan-out, a target that disappeared, and recovery, each notified exactly once."""

from __future__ import annotations

from datetime import timedelta

from main import create_app
from services import notify, worker
from services.catalog import NAMESPACE, SUCCEEDED, Catalog
from services.errors import PermanentError
from services.queue import LocalQueue
from services.stale import PLAN_UNIT, STALE_KIND, check_stale
from tests.alerting import AUTH, finished_run, make_plan, sent_messages
from tests.helpers import Clock, make_runtime

HOOK = {"OPS_CHAT_WEBHOOK": "https://chat.example/hook"}


def setup(tmp_path, datastore, *plans):
    clock = Clock()
    rt = make_runtime(tmp_path, plans={p.name: p for p in plans}, clock=clock, environ=HOOK)
    return clock, rt, Catalog(datastore), LocalQueue(tmp_path / "queue.sqlite3")


def good_run(catalog: Catalog, plan: str, target: str, at) -> None:
    catalog.save(finished_run(plan, target, SUCCEEDED, at))


def test_a_plan_that_never_ran_goes_stale_once_its_rpo_has_passed(tmp_path, datastore):
    plan = make_plan("nightly", rpo_hours=26, webhook_env="OPS_CHAT_WEBHOOK")
    no_rpo = make_plan("adhoc", rpo_hours=None, webhook_env="OPS_CHAT_WEBHOOK")
    clock, rt, catalog, queue = setup(tmp_path, datastore, plan, no_rpo)

    first = check_stale(rt, catalog, queue=queue)
    clock.advance(hours=25)
    within = check_stale(rt, catalog, queue=queue)
    clock.advance(hours=2)
    past = check_stale(rt, catalog, queue=queue)
    clock.advance(hours=1)
    repeat = check_stale(rt, catalog, queue=queue)

    assert first.checked == 1 and first.changes == [] and within.changes == []
    assert [(c.plan, c.target, c.change) for c in past.changes] == [("nightly", PLAN_UNIT, notify.STALE)]
    assert "no run of this plan recorded" in past.changes[0].reason
    assert repeat.changes == [] and repeat.stale == ["nightly/(plan)"]
    [message] = sent_messages(rt, queue)
    assert (message["kind"], message["plan"], message["target"]) == ("stale", "nightly", PLAN_UNIT)


def test_failed_fanout_leaves_targets_stale_and_says_why(tmp_path, datastore):
    plan = make_plan("nightly", rpo_hours=26, webhook_env="OPS_CHAT_WEBHOOK")
    clock, rt, catalog, queue = setup(tmp_path, datastore, plan)
    good_run(catalog, "nightly", "Customer", clock.now)
    good_run(catalog, "nightly", "Order", clock.now)
    clock.advance(hours=24)

    def fanout_fails():
        raise PermanentError("listing kinds: 403 the service account lost datastore.viewer")

    worker.answer_fanout(rt, catalog, fanout_fails, plan)
    early = check_stale(rt, catalog, queue=queue)
    clock.advance(hours=3)  # 27 h since the last good copies, RPO 26 h
    app = create_app(rt, queue=queue, catalog=catalog)
    denied = app.test_client().get("/cron/_stale")
    answer = app.test_client().get("/cron/_stale", headers=AUTH)

    assert early.changes == []
    assert denied.status_code == 401
    assert answer.status_code == 200
    changes = {c["target"]: c for c in answer.get_json()["changes"]}
    assert set(changes) == {"Customer", "Order"}
    assert all(c["change"] == "stale" for c in changes.values())
    assert all("the service account lost datastore.viewer" in c["reason"] for c in changes.values())
    assert all("last good copy 27.0 h ago" in c["reason"] for c in changes.values())
    [stale_message] = [m for m in sent_messages(rt, queue) if m["kind"] == "stale"]
    assert (stale_message["count"], sorted(stale_message["targets"])) == (2, ["Customer", "Order"])
    assert "2 targets of plan `nightly`" in stale_message["text"]


def test_a_plan_whose_fanout_always_failed_is_stale_as_a_whole(tmp_path, datastore):
    plan = make_plan("nightly", rpo_hours=12)
    clock, rt, catalog, queue = setup(tmp_path, datastore, plan)
    check_stale(rt, catalog, queue=queue)  # first seen now

    def fanout_fails():
        raise PermanentError("destination bucket demo-backups does not exist")

    worker.answer_fanout(rt, catalog, fanout_fails, plan)
    clock.advance(hours=13)
    report = check_stale(rt, catalog, queue=queue)

    [change] = report.changes
    assert change.target == PLAN_UNIT
    assert "destination bucket demo-backups does not exist" in change.reason
    assert sent_messages(rt, queue) == []  # no channel configured: logged only


def test_a_stale_target_recovers_once(tmp_path, datastore):
    plan = make_plan("nightly", rpo_hours=26, webhook_env="OPS_CHAT_WEBHOOK")
    clock, rt, catalog, queue = setup(tmp_path, datastore, plan)
    good_run(catalog, "nightly", "Customer", clock.now)
    clock.advance(hours=30)
    went_stale = check_stale(rt, catalog, queue=queue)
    sent_messages(rt, queue)  # the notify queue flushes the group within a minute
    clock.advance(hours=1)
    good_run(catalog, "nightly", "Customer", clock.now)
    recovered = check_stale(rt, catalog, queue=queue)
    clock.advance(hours=1)
    quiet = check_stale(rt, catalog, queue=queue)

    assert [c.change for c in went_stale.changes] == ["stale"]
    assert [(c.target, c.change) for c in recovered.changes] == [("Customer", "recovered")]
    assert recovered.stale == [] and quiet.changes == []
    assert [m["kind"] for m in sent_messages(rt, queue)] == ["stale", "recovered"]


def test_never_ran_plan_recovers_when_its_first_backup_lands(tmp_path, datastore):
    plan = make_plan("nightly", rpo_hours=6)
    clock, rt, catalog, queue = setup(tmp_path, datastore, plan)
    check_stale(rt, catalog, queue=queue)
    clock.advance(hours=7)
    stale = check_stale(rt, catalog, queue=queue)
    good_run(catalog, "nightly", "Customer", clock.now)
    recovered = check_stale(rt, catalog, queue=queue)

    assert [(c.target, c.change) for c in stale.changes] == [(PLAN_UNIT, "stale")]
    assert [(c.target, c.change) for c in recovered.changes] == [(PLAN_UNIT, "recovered")]
    assert recovered.stale == []


def test_a_target_that_disappeared_goes_stale_and_is_named_as_missing(tmp_path, datastore):
    plan = make_plan("nightly", rpo_hours=26)
    clock, rt, catalog, queue = setup(tmp_path, datastore, plan)
    start = clock.now
    good_run(catalog, "nightly", "Customer", start)
    good_run(catalog, "nightly", "Archived", start)  # the kind is deleted after this run
    for day in (1, 2):
        good_run(catalog, "nightly", "Customer", start + timedelta(days=day))
    clock.advance(days=2, minutes=10)

    report = check_stale(rt, catalog, queue=queue)

    [change] = report.changes
    assert change.target == "Archived"
    assert "not part of the plan's recent runs" in change.reason
    assert report.stale == ["nightly/Archived"]


def test_two_checks_racing_on_the_same_target_queue_one_message(tmp_path, datastore):
    plan = make_plan("nightly", rpo_hours=26, webhook_env="OPS_CHAT_WEBHOOK")
    clock, rt, catalog, queue = setup(tmp_path, datastore, plan)
    good_run(catalog, "nightly", "Customer", clock.now)
    clock.advance(hours=30)
    first = check_stale(rt, catalog, queue=queue)
    # The second checker read the alert state before the first one wrote it: it sees no alert at all.
    datastore.delete_multi([e.key for e in datastore.query(kind=STALE_KIND, namespace=NAMESPACE).fetch()])
    clock.advance(seconds=40)
    second = check_stale(rt, catalog, queue=queue)

    assert [c.change for c in first.changes] == [c.change for c in second.changes] == ["stale"]
    assert [m["kind"] for m in sent_messages(rt, queue)] == ["stale"]


def test_a_stale_alert_resolved_before_it_was_sent_says_nothing_at_all(tmp_path, datastore):
    plan = make_plan("nightly", rpo_hours=26, webhook_env="OPS_CHAT_WEBHOOK")
    clock, rt, catalog, queue = setup(tmp_path, datastore, plan)
    good_run(catalog, "nightly", "Customer", clock.now)
    clock.advance(hours=30)
    check_stale(rt, catalog, queue=queue)
    good_run(catalog, "nightly", "Customer", clock.now)  # before the group's flush ran
    recovered = check_stale(rt, catalog, queue=queue)

    assert [c.change for c in recovered.changes] == ["recovered"]
    assert sent_messages(rt, queue) == []
