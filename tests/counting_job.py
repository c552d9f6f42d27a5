"""A job kind for tests of budgeted chunks: it works through ``select.items`` items of ``options.seconds_each``
each, checkpointing its position whenever the task's budget runs out, and remembers which chunk did which item."""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.kinds import Done, Pending, Target, TargetPage

KIND = "counting"
DEFAULT_QUEUE = "backups"
EXECUTION = "job"


@dataclass(frozen=True)
class Settings:
    items: int
    seconds_each: float


def parse_settings(fields):
    select, options = fields.section("select"), fields.section("options")
    settings = Settings(select.int("items", 10), options.float("seconds_each", 0.01))
    select.done()
    options.done()
    return settings


def enumerate_targets(plan, page_token, rt):
    return TargetPage([Target("counter")])


def start(plan, target, run, rt):
    return poll(plan, target, {"next": 0, "chunks": []}, run, rt)


def poll(plan, target, state, run, rt):
    done_here = []
    position = state["next"]
    while position < plan.settings.items:
        if run.out_of_time(reserve=plan.settings.seconds_each) and done_here:
            return Pending({"next": position, "chunks": [*state["chunks"], done_here]}, delay_seconds=0)
        time.sleep(plan.settings.seconds_each)
        done_here.append(position)
        position += 1
    chunks = [*state["chunks"], done_here]
    return Done(output=f"mem://counted-{position}", stats={"chunks": chunks})
