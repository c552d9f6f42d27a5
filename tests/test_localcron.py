"""The local cron runner fires each cron.yaml job when its schedule comes, with the local token."""

from __future__ import annotations

from services.localcron import LocalCron
from services.schedule import CronJob, Schedule
from tests.helpers import LOCAL_TOKEN, Clock


def test_fires_due_jobs_once_per_schedule_time(recorder):
    clock = Clock()  # 2026-11-23 02:00:05 UTC
    job = CronJob("/cron/nightly", Schedule.parse("every day 03:00"))
    cron = LocalCron([job], recorder.url, LOCAL_TOKEN, clock=clock)

    assert cron.run_pending() == []
    clock.advance(hours=1)
    assert cron.run_pending() == ["/cron/nightly"]
    assert cron.run_pending() == []

    assert [r["path"] for r in recorder.requests] == ["/cron/nightly"]
    assert recorder.requests[0]["headers"]["Authorization"] == f"Bearer {LOCAL_TOKEN}"
    assert "X-Appengine-Cron" not in recorder.requests[0]["headers"]
