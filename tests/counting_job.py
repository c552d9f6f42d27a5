"""A job kind for tests of budgeted chunks: it works through ``select.items`` items of ``options.seconds_each``
each, checkpointing its position whenever the task's budget runs out, and remembers which chunk did which item."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from services.kinds import Done, Execution, Kind, Pending, Target, TargetPage
from services.plans import STRICT, PlanSections

REGISTRATION = ("tests.counting_job:Sections", "tests.counting_job:KIND")


@dataclass(frozen=True)
class Settings:
    items: int
    seconds_each: float


class Select(BaseModel):
    model_config = STRICT
    items: int = 10


class Options(BaseModel):
    model_config = STRICT
    seconds_each: float = 0.01


class Sections(PlanSections[Settings]):
    select: Select
    options: Options

    def settings(self) -> Settings:
        return Settings(self.select.items, self.options.seconds_each)


class Counting:
    name = "counting"
    default_queue = "backups"
    execution: Execution = "job"

    def enumerate(self, plan, page_token, rt):
        return TargetPage([Target("counter")])

    def resolve(self, plan, key, rt):
        return Target("counter")

    def start(self, plan, target, run, rt):
        return self.poll(plan, target, {"next": 0, "chunks": []}, run, rt)

    def poll(self, plan, target, state, run, rt):
        done_here = []
        position = state["next"]
        while position < plan.settings.items:
            if run.out_of_time(reserve=plan.settings.seconds_each) and done_here:
                return Pending({"next": position, "chunks": [*state["chunks"], done_here]}, delay_seconds=0)
            time.sleep(plan.settings.seconds_each)
            done_here.append(position)
            position += 1
        return Done(output=f"mem://counted-{position}", stats={"chunks": [*state["chunks"], done_here]})

    def describe(self, plan, target, rt):
        return f"would count {plan.settings.items} items"


KIND: Kind[Any] = Counting()
