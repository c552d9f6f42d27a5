"""app.yaml, cron.yaml and queue.yaml read by the Cloud SDK's own parsers (what `gcloud app deploy` uses), every
cron schedule parsed by App Engine's groc parser, and every cron URL naming a plan that exists."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

from services.plans import load_plans
from services.runtime import ROOT
from services.schedule import Schedule, load_cron
from tests.fixtures.emulators import sdk_root

# Runs in a child process: the SDK's lib/third_party carries its own copies of packages (google, yaml ...) that
# must not shadow this project's in the test process.
_SDK_CHECK = r"""
import json, sys
root = sys.argv[1]
sys.path[:0] = [root + "/lib", root + "/lib/third_party"]
from googlecloudsdk.appengine.api import appinfo, croninfo, queueinfo
from googlecloudsdk.appengine.googlecron import groctimespecification
import pytz
groctimespecification.pytz = pytz  # the module leaves it unset
app = appinfo.LoadSingleAppInfo(open("app.yaml"))
cron = croninfo.LoadSingleCron(open("cron.yaml").read())
queues = queueinfo.LoadSingleQueue(open("queue.yaml").read())
import datetime
start = datetime.datetime(2026, 11, 23, 1, 30, tzinfo=pytz.utc)
schedules = []
for job in cron.cron:
    spec = groctimespecification.GrocTimeSpecification(job.schedule, timezone=job.timezone)
    matches = [m.astimezone(pytz.utc).isoformat() for m in spec.GetMatches(start, 3)]
    schedules.append({"url": job.url, "schedule": job.schedule, "timezone": job.timezone, "next": matches})
print(json.dumps({
    "runtime": app.runtime, "entrypoint": app.entrypoint,
    "cron": schedules,
    "queues": {q.name: {"rate": q.rate, "retry": bool(q.retry_parameters)} for q in queues.queue},
}))
"""


def sdk_view() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _SDK_CHECK, str(sdk_root())], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_sdk_parsers_accept_app_cron_and_queue_yaml():
    view = sdk_view()

    assert view["runtime"].startswith("python3")
    assert "main:app" in view["entrypoint"] and "gunicorn" in view["entrypoint"]
    assert view["cron"], "cron.yaml has no jobs"
    # our local cron agrees with App Engine's own schedule parser on the next three firing times of every job
    for job in view["cron"]:
        schedule = Schedule.parse(job["schedule"], job["timezone"] or "UTC")
        ours, at = [], datetime(2026, 11, 23, 1, 30, tzinfo=UTC)
        for _ in range(3):
            at = schedule.next_fire(at)
            ours.append(at.isoformat())
        assert ours == job["next"], job
    assert {"fanout", "polls", "backups", "datastore-exports", "filestore", "directory"} <= set(view["queues"])
    assert all(q["retry"] for q in view["queues"].values()), "every queue states its retry policy"
    assert view["queues"]["datastore-exports"]["rate"] == "15/m"  # under Datastore's 20 exports+imports a minute


def test_every_cron_url_names_an_existing_plan_or_service_job():
    from main import create_app

    plans = load_plans(ROOT / "plans.yaml")
    jobs = load_cron(ROOT / "cron.yaml")
    routes = {rule.rule for rule in create_app().url_map.iter_rules()}

    plan_jobs = [job.plan for job in jobs if job.plan is not None]
    # Service jobs use names no plan can have (plan names never contain "_").
    service_jobs = [job.url for job in jobs if job.plan is None]

    assert plan_jobs and set(plan_jobs) <= set(plans)
    assert all(url.startswith("/cron/_") and url in routes for url in service_jobs), service_jobs


def test_every_plan_queue_exists_in_queue_yaml():
    from services.queue import load_queue_configs

    queues = load_queue_configs(ROOT / "queue.yaml")

    assert {plan.queue for plan in load_plans(ROOT / "plans.yaml").values()} <= set(queues)
