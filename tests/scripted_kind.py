"""A kind for worker tests whose targets say, in their params, what start() and poll() do. It exercises the
worker's status-code contract without any cloud API; the real kinds are tested against their stand-ins."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from services.errors import PermanentError, TargetGone, TransientError
from services.kinds import Done, Pending, Target, TargetPage

KIND = "scripted"
DEFAULT_QUEUE = "backups"
calls: Counter = Counter()
hooks: dict = {}  # key -> function(call number) returning an outcome, for targets whose params say "hook"


@dataclass(frozen=True)
class Settings:
    targets: tuple[str, ...]


def parse_settings(fields):
    select = fields.section("select")
    settings = Settings(tuple(select.str_list("targets")))
    select.done()
    return settings


def enumerate_targets(plan, page_token, rt):
    start = int(page_token or 0)
    names = plan.settings.targets[start : start + plan.fanout_page_size]
    more = start + plan.fanout_page_size < len(plan.settings.targets)
    return TargetPage([Target(n, {"do": n.split("-")[0]}) for n in names], str(start + len(names)) if more else None)


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


def start(plan, target, run, rt):
    calls[("start", target.key)] += 1
    if target.params["do"] == "hook":
        return hooks[target.key](calls[("start", target.key)])
    return _act(target.params["do"], target.key)


def poll(plan, target, state, run, rt):
    calls[("poll", target.key)] += 1
    polls = state["_polls"]
    return Done(output=f"mem://{target.key}", stats={"polls": polls}) if polls >= 1 else Pending(state, 30)
