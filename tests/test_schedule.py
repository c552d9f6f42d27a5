"""App Engine schedule syntax: schedule periods (which name tasks) and next firing times (local cron)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.errors import ConfigError
from services.schedule import Schedule

UTC = UTC


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_daily_schedule_period_and_next_fire():
    schedule = Schedule.parse("every day 02:00")

    assert schedule.period_start(at("2026-11-23T01:59:00")) == at("2026-11-22T02:00:00")
    assert schedule.period_start(at("2026-11-23T02:00:00")) == at("2026-11-23T02:00:00")
    assert schedule.next_fire(at("2026-11-23T02:00:00")) == at("2026-11-24T02:00:00")


def test_synchronized_interval_is_aligned_to_midnight():
    schedule = Schedule.parse("every 15 minutes synchronized")

    assert schedule.period_start(at("2026-11-23T10:44:59")) == at("2026-11-23T10:30:00")
    assert schedule.next_fire(at("2026-11-23T10:44:59")) == at("2026-11-23T10:45:00")
    assert Schedule.parse("every 5 hours synchronized").next_fire(at("2026-11-23T21:00:00")) == at(
        "2026-11-24T00:00:00"
    )


def test_plain_interval_fires_counted_from_the_last_run_but_its_period_is_aligned():
    schedule = Schedule.parse("every 15 minutes")

    assert schedule.next_fire(at("2026-11-23T10:44:59")) == at("2026-11-23T10:59:59")
    assert schedule.period_start(at("2026-11-23T10:44:59")) == at("2026-11-23T10:30:00")


def test_weekday_schedule_in_a_time_zone_across_daylight_saving():
    schedule = Schedule.parse("every monday,thursday 09:30", "America/New_York")

    # Monday 2026-11-02 09:30 EST = 14:30 UTC (DST ended on 2026-11-01)
    assert schedule.next_fire(at("2026-10-30T00:00:00")) == at("2026-11-02T14:30:00")
    # Thursday 2026-10-29 09:30 EDT = 13:30 UTC
    assert schedule.period_start(at("2026-11-01T00:00:00")) == at("2026-10-29T13:30:00")


@pytest.mark.parametrize("text", ["every blursday 02:00", "every day 25:00", "monthly", "every 0 minutes"])
def test_unreadable_schedule_is_refused_with_its_text(text):
    with pytest.raises(ConfigError, match="schedule"):
        Schedule.parse(text)
