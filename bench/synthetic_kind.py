"""A kind with N synthetic targets, generated page by page (nothing held in memory), for fan-out benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

from services.kinds import Target, TargetPage

KIND = "synthetic"
DEFAULT_QUEUE = "backups"


@dataclass(frozen=True)
class Settings:
    count: int


def parse_settings(fields):
    select = fields.section("select")
    settings = Settings(select.int("count", minimum=1))
    select.done()
    return settings


def enumerate_targets(plan, page_token, rt):
    start = int(page_token or 0)
    end = min(start + plan.fanout_page_size, plan.settings.count)
    targets = [Target(f"projects/p/zones/z{i % 100}/disks/disk-{i:06d}", {"n": i}) for i in range(start, end)]
    return TargetPage(targets, str(end) if end < plan.settings.count else None)
