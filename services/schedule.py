"""App Engine cron schedules: what cron.yaml says, when a job fires next, and which schedule period a moment
belongs to (the period names tasks and backups, so a second cron fire in the same period changes nothing).

Supported syntax (the App Engine forms a backup plan needs):
``every N minutes|hours [synchronized]``, ``every day HH:MM``, ``every monday[,wednesday...] HH:MM``.
Anything else is refused with the text that could not be read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.errors import ConfigError
from services.yamlfile import load_yaml

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_ABBREVIATIONS = {day[:3]: day for day in WEEKDAYS}
_INTERVAL = re.compile(r"^every (\d+) (minutes?|mins?|hours?)( synchronized)?$")
_AT = re.compile(r"^every ([a-z, ]+) (\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class Schedule:
    text: str
    tz: ZoneInfo
    interval: timedelta | None = None  # "every N minutes/hours"
    synchronized: bool = False  # interval fire times aligned to midnight, instead of counted from the last run
    days: frozenset[int] | None = None  # weekday numbers for "every monday 09:00"; all 7 for "every day"
    at: tuple[int, int] | None = None  # (hour, minute)

    @classmethod
    def parse(cls, text: str, tz_name: str = "UTC") -> Schedule:
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"timezone {tz_name!r} is not a known IANA time zone") from None
        normalised = " ".join(text.lower().split())
        match = _INTERVAL.match(normalised)
        if match:
            count = int(match.group(1))
            unit = timedelta(hours=1) if match.group(2).startswith("hour") else timedelta(minutes=1)
            if count < 1:
                raise ConfigError(f"schedule {text!r}: the interval must be at least 1")
            return cls(text=text, tz=tz, interval=count * unit, synchronized=bool(match.group(3)))
        match = _AT.match(normalised)
        if match:
            hour, minute = int(match.group(2)), int(match.group(3))
            if hour > 23 or minute > 59:
                raise ConfigError(f"schedule {text!r}: {hour:02d}:{minute:02d} is not a time of day")
            names = [part.strip() for part in match.group(1).split(",")]
            if names == ["day"]:
                days = frozenset(range(7))
            else:
                try:
                    days = frozenset(WEEKDAYS.index(_ABBREVIATIONS.get(n[:3], n)) for n in names)
                except ValueError:
                    raise ConfigError(f"schedule {text!r}: expected 'day' or weekday names before the time") from None
            return cls(text=text, tz=tz, days=days, at=(hour, minute))
        raise ConfigError(
            f"schedule {text!r} is not understood here: use 'every N minutes', 'every N hours',"
            " 'every day HH:MM' or 'every monday,thursday HH:MM'"
        )

    def period_start(self, at: datetime) -> datetime:
        """The period ``at`` (UTC) falls in: the latest firing time at or before it, with interval schedules aligned
        to midnight so the period does not depend on when cron last ran. All work of one cron fire shares it."""
        local = at.astimezone(self.tz)
        if self.interval is not None:
            midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
            steps = (local - midnight) // self.interval
            return (midnight + steps * self.interval).astimezone(UTC)
        assert self.days is not None and self.at is not None
        candidate = local.replace(hour=self.at[0], minute=self.at[1], second=0, microsecond=0)
        for _ in range(8):
            if candidate <= local and candidate.weekday() in self.days:
                return candidate.astimezone(UTC)
            candidate = _same_wall_time(candidate - timedelta(days=1), self.at, self.tz)
        raise AssertionError("a weekly schedule fires at least once in eight days")

    def next_fire(self, after: datetime) -> datetime:
        """The first firing time strictly after ``after`` (UTC). Like App Engine cron, a plain interval counts from
        ``after`` (the last run); a ``synchronized`` one fires at fixed times from midnight."""
        local = after.astimezone(self.tz)
        if self.interval is not None and not self.synchronized:
            return (after + self.interval).astimezone(UTC)
        if self.interval is not None:
            start = self.period_start(after).astimezone(self.tz)
            following = start + self.interval
            next_midnight = _same_wall_time(start + timedelta(days=1), (0, 0), self.tz)
            return min(following, next_midnight).astimezone(UTC)
        assert self.days is not None and self.at is not None
        candidate = local.replace(hour=self.at[0], minute=self.at[1], second=0, microsecond=0)
        for _ in range(9):
            if candidate > local and candidate.weekday() in self.days:
                return candidate.astimezone(UTC)
            candidate = _same_wall_time(candidate + timedelta(days=1), self.at, self.tz)
        raise AssertionError("a weekly schedule fires at least once in eight days")


def _same_wall_time(day: datetime, at: tuple[int, int], tz: ZoneInfo) -> datetime:
    """``day`` at the wall-clock time ``at`` in ``tz`` (re-resolved, so daylight-saving shifts are honoured)."""
    return datetime(day.year, day.month, day.day, at[0], at[1], tzinfo=tz)


@dataclass(frozen=True)
class CronJob:
    url: str
    schedule: Schedule
    description: str = ""

    @property
    def plan(self) -> str | None:
        """The plan a ``/cron/<plan>`` URL names, or None for other cron URLs."""
        match = re.match(r"^/cron/([a-z0-9-]+)$", self.url.split("?")[0])
        return match.group(1) if match else None


def load_cron(path: str | Path) -> list[CronJob]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read cron file: {exc}") from exc
    raw = load_yaml(text, path.name)
    entries = (raw or {}).get("cron") or []
    jobs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "url" not in entry or "schedule" not in entry:
            raise ConfigError(f"{path.name}: entry {index + 1}: expected 'url' and 'schedule'")
        try:
            schedule = Schedule.parse(str(entry["schedule"]), str(entry.get("timezone", "UTC")))
        except ConfigError as exc:
            raise ConfigError(f"{path.name}: entry {index + 1} ({entry['url']}): {exc}") from None
        jobs.append(CronJob(url=str(entry["url"]), schedule=schedule, description=str(entry.get("description", ""))))
    return jobs


def plan_schedules(jobs: list[CronJob]) -> dict[str, Schedule]:
    return {job.plan: job.schedule for job in jobs if job.plan}
