"""A kind for worker tests whose targets say, in their params, what start() and poll() do. It exercises the
worker's status-code contract without any cloud API; the real kinds are tested against their stand-ins."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from services.errors import PermanentError, TargetGone, TransientError
from services.kinds import Done, Execution, Kind, Pending, Target, TargetPage, find_by_listing
from services.plans import STRICT, NonEmptyStr, PlanSections

calls: Counter = Counter()
hooks: dict = {}  # key -> function(call number) returning an outcome, for targets whose params say "hook"
REGISTRATION = ("tests.scripted_kind:Sections", "tests.scripted_kind:KIND")


@dataclass(frozen=True)
class Settings:
    targets: tuple[str, ...]


class Select(BaseModel):
    model_config = STRICT
    targets: list[NonEmptyStr]


class Sections(PlanSections[Settings]):
    select: Select

    def settings(self) -> Settings:
        return Settings(tuple(self.select.targets))


def _act(what: str, key: str):
    if what == "done":
        return Done(output=f"mem://{key}", stats={"items": 3})
    if what == "pending":
        return Pending({"operation": f"op-{key}"}, delay_seconds=30)
    if what == "transient":
        raise TransientError(f"{key}: backend busy")
    if what == "limited":
        raise TransientError(f"{key}: quota", rate_limited=True)
    if what == "permanent":
        raise PermanentError(f"{key}: permission denied on bucket")
    if what == "gone":
        raise TargetGone(f"{key}: deleted since enumeration")
    raise RuntimeError(f"{key}: a bug")


class Scripted:
    name = "scripted"
    default_queue = "backups"
    execution: Execution = "operation"

    def enumerate(self, plan, page_token, rt):
        start = int(page_token or 0)
        names = plan.settings.targets[start : start + plan.fanout_page_size]
        more = start + plan.fanout_page_size < len(plan.settings.targets)
        return TargetPage(
            [Target(n, {"do": n.split("-")[0]}) for n in names], str(start + len(names)) if more else None
        )

    def resolve(self, plan, key, rt):
        return find_by_listing(self, plan, key, rt)

    def start(self, plan, target, run, rt):
        calls[("start", target.key)] += 1
        if target.params["do"] == "hook":
            return hooks[target.key](calls[("start", target.key)])
        return _act(target.params["do"], target.key)

    def poll(self, plan, target, state, run, rt):
        calls[("poll", target.key)] += 1
        polls = state["_polls"]
        return Done(output=f"mem://{target.key}", stats={"polls": polls}) if polls >= 1 else Pending(state, 30)

    def describe(self, plan, target, rt):
        return f"would run {target.key}"


KIND: Kind[Any] = Scripted()
