"""A kind with N synthetic targets, generated page by page (nothing held in memory), for fan-out benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from services.kinds import Execution, Kind, Target, TargetPage, find_by_listing
from services.plans import STRICT, PlanSections

REGISTRATION = ("bench.synthetic_kind:Sections", "bench.synthetic_kind:KIND")


@dataclass(frozen=True)
class Settings:
    count: int


class Select(BaseModel):
    model_config = STRICT
    count: int = Field(ge=1)


class Sections(PlanSections[Settings]):
    select: Select

    def settings(self) -> Settings:
        return Settings(self.select.count)


class Synthetic:
    name = "synthetic"
    default_queue = "backups"
    execution: Execution = "operation"

    def enumerate(self, plan: Any, page_token: str | None, rt: Any) -> TargetPage:
        start = int(page_token or 0)
        end = min(start + plan.fanout_page_size, plan.settings.count)
        targets = [Target(f"projects/p/zones/z{i % 100}/disks/disk-{i:06d}", {"n": i}) for i in range(start, end)]
        return TargetPage(targets, str(end) if end < plan.settings.count else None)

    def resolve(self, plan: Any, key: str, rt: Any) -> Target:
        return find_by_listing(self, plan, key, rt)

    def start(self, plan: Any, target: Target, run: Any, rt: Any) -> Any:
        raise NotImplementedError("the fan-out benchmark only enumerates")

    poll = start  # type: ignore[assignment]

    def describe(self, plan: Any, target: Target, rt: Any) -> str:
        return f"would back up {target.key}"


KIND: Kind[Any] = Synthetic()
