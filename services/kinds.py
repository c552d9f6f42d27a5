"""The one interface every kind of target implements, and the registry of kinds.

A kind is a module (``services/datastore.py``, ``services/disks.py`` ...) that defines:

- ``KIND``: its name in plans.yaml; ``DEFAULT_QUEUE``: the queue.yaml queue its workers use.
- ``parse_settings(fields: Fields) -> Settings``: its part of a plan (``select``, ``destination``, ``options``),
  validated into a frozen dataclass; errors name the plan and field.
- ``enumerate_targets(plan, page_token, rt) -> TargetPage``: one page of targets; ``next_page_token`` when more.
- optionally ``resolve_target(plan, key, rt) -> Target``: the target called ``key``, looked up again from the plan
  and the live resource (a task body only names a target; it is never trusted for what to back up or where).
  Without it, the plan's targets are enumerated until ``key`` is found.
- ``start(plan, target, run, rt) -> Outcome``: begin one backup (idempotent for the same run).
- ``poll(plan, target, state, run, rt) -> Outcome``: check a long operation started by ``start``.
- optionally ``describe(plan, target, rt) -> str``: what a run would do, for ``--dry-run``.

Adding a kind means adding a module and one line to ``KIND_MODULES``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType
from typing import Any

from services.errors import ConfigError, TargetGone

KIND_MODULES: dict[str, str] = {
    "datastore": "services.datastore",
    "couchdb": "services.couchdb",
    "directory": "services.directory",
    "disks": "services.disks",
    "filestore": "services.filestore",
    "sqlsync": "services.sqlsync",
}


@dataclass(frozen=True)
class Target:
    """One thing to back up. ``key`` is unique within a plan and readable by a person; ``params`` is all a
    worker needs (JSON-serialisable), so a task body is self-contained."""

    key: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "params": self.params}

    @classmethod
    def from_json(cls, raw: Any) -> Target:
        if not isinstance(raw, dict) or not isinstance(raw.get("key"), str) or not raw["key"]:
            raise ValueError("target: expected an object with a non-empty string 'key'")
        params = raw.get("params", {})
        if not isinstance(params, dict):
            raise ValueError("target.params: expected an object")
        return cls(key=raw["key"], params=params)


@dataclass(frozen=True)
class ListingProblem:
    """A part of a plan (``where``, e.g. ``projects/p1``) whose targets could not be listed, and why."""

    where: str
    error: str


@dataclass
class TargetPage:
    """One page of targets. ``problems`` are parts of the plan that could not be listed (a project that refuses
    listing): each is recorded as a failed run of its own while the rest of the plan goes ahead."""

    targets: list[Target]
    next_page_token: str | None = None
    problems: list[ListingProblem] = field(default_factory=list)


@dataclass
class Done:
    """The backup is confirmed good. ``output`` is where it lives (a gs:// URL, a snapshot self-link, a path)."""

    output: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    message: str = ""


@dataclass
class Pending:
    """An operation is running; poll again after ``delay_seconds`` with ``state`` (JSON-serialisable)."""

    state: dict[str, Any]
    delay_seconds: float = 30.0


@dataclass
class Skipped:
    """Nothing to do for this target (it vanished, or its own settings say so)."""

    reason: str


Outcome = Done | Pending | Skipped


@dataclass
class RunContext:
    """What a worker knows about the run it is part of. ``log`` lines are kept with the run record."""

    run_id: str
    plan: str
    target_key: str
    period: datetime
    attempt: int = 0
    log_lines: list[str] = field(default_factory=list)
    on_log: Callable[[str], None] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # from the admin trigger's record, never a task body
    deadline: float | None = None  # time.monotonic() by which a job must checkpoint and answer Pending

    def time_left(self) -> float:
        """Seconds of this task's budget left (infinite when there is no budget: the CLI runs a job in one go)."""
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def out_of_time(self, reserve: float = 0.0) -> bool:
        """True once less than ``reserve`` seconds of the budget are left: save a checkpoint and return Pending."""
        return self.time_left() <= reserve

    def log(self, message: str) -> None:
        self.log_lines.append(message)
        if self.on_log is not None:
            self.on_log(message)


def kind_module(name: str) -> ModuleType:
    """Import the module of kind ``name``; ConfigError listing the known kinds if there is none."""
    try:
        module_path = KIND_MODULES[name]
    except KeyError:
        raise ConfigError(f"unknown kind {name!r} (known kinds: {', '.join(sorted(KIND_MODULES))})") from None
    return importlib.import_module(module_path)


def resolve_target(plan: Any, key: str, rt: Any) -> Target:
    """The target of ``plan`` called ``key``, as the plan and the live resource say now. A kind with its own
    ``resolve_target`` looks the one target up directly; otherwise the plan's targets are listed until ``key`` is
    found. A key that is not (or no longer) one of the plan's targets raises TargetGone."""
    module = kind_module(plan.kind)
    own = getattr(module, "resolve_target", None)
    if own is not None:
        target: Target = own(plan, key, rt)
        return target
    token: str | None = None
    while True:
        page = module.enumerate_targets(plan, token, rt)
        for target in page.targets:
            if target.key == key:
                return target
        token = page.next_page_token
        if not token:
            raise TargetGone(f"{key!r} is not a target of plan {plan.name} (deleted since listing, or never one)")
