"""The contract every kind of target keeps with the scheduler core, checked by mypy.

A kind (``kinds/<name>/``) registers one object (``KIND``) that satisfies the ``Kind`` protocol below, for its own
settings type ``S`` (the typed ``select`` / ``destination`` / ``options`` of its plans, see services/plans.py):

- ``enumerate``: one page of the plan's targets; ``next_page_token`` when more remain, ``problems`` for parts
  that could not be listed (a project that refuses listing fails alone).
- ``resolve``: the target called ``key``, looked up again from the plan and the live resource. A task body only
  names its target; what to back up, where to, and how much to keep never come from it.
- ``start`` / ``poll``: one step of one backup, idempotent for the same run. An ``operation`` kind starts a cloud
  operation and polls it; a ``job`` kind does the work itself, within ``run.deadline``, and answers ``Pending``
  with a checkpoint that the next ``poll`` resumes from.
- ``describe``: what a run would do (``--dry-run``), read-only.

Outcomes are ``Done`` (confirmed good) or ``Pending`` (follow up later with this state). A target that is gone is
one outcome too: the kind raises ``TargetGone`` from wherever it finds out (services/errors.py), as it raises
``TransientError`` or ``PermanentError``.

Kinds whose backups can be checked and restored also satisfy ``Restorable``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from services.errors import TargetGone

if TYPE_CHECKING:
    from services.plans import Plan
    from services.runtime import Runtime

Execution = Literal["operation", "job"]
S = TypeVar("S")


@dataclass(frozen=True)
class Target:
    """One thing to back up. ``key`` is unique within a plan and readable by a person; ``params`` is what the
    kind found when it listed or resolved the target (stored with the run, so a poll needs only the run id)."""

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
    """Not finished: follow up after ``delay_seconds`` with ``state`` (JSON-serialisable): an operation to poll,
    or a job's checkpoint to resume from."""

    state: dict[str, Any]
    delay_seconds: float = 30.0


Outcome = Done | Pending


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


class Kind(Protocol[S]):
    """What the scheduler core needs of a kind of target (see the module docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def default_queue(self) -> str: ...

    @property
    def execution(self) -> Execution: ...

    def enumerate(self, plan: Plan[S], page_token: str | None, rt: Runtime) -> TargetPage: ...

    def resolve(self, plan: Plan[S], key: str, rt: Runtime) -> Target: ...

    def start(self, plan: Plan[S], target: Target, run: RunContext, rt: Runtime) -> Outcome: ...

    def poll(self, plan: Plan[S], target: Target, state: dict[str, Any], run: RunContext, rt: Runtime) -> Outcome: ...

    def describe(self, plan: Plan[S], target: Target, rt: Runtime) -> str: ...


@dataclass(frozen=True)
class BackupRef:
    """A good backup as its run recorded it: where it is (``output``) and what it held (``stats``)."""

    run_id: str
    output: str
    stats: dict[str, Any]
    period: datetime


# Label (or name part) of every scratch resource a drill makes: a crashed drill's leftovers are found by it and
# removed by the next drill, and nothing carrying it is ever mistaken for real data.
DRILL_LABEL = "backup-scheduler-drill"

# What a drill's earlier step saved (None on the first step).
DrillState = dict[str, Any] | None


class Restorable(Protocol[S]):
    """A kind whose backups can be proven by a restore drill: ``drill`` restores ``backup`` into a scratch place
    (first removing what a crashed drill left behind), checks what came back against what the backup recorded,
    removes the scratch (unless the plan's drill says to keep it) and answers ``Done`` with ``restored_in_seconds``
    and ``checked`` (what was compared) in its stats. A mismatch raises PermanentError naming it. Long restores
    answer ``Pending`` like any step; ``state`` is None on the first step. A drill never touches the source or a
    real restore target."""

    def drill(
        self, plan: Plan[S], target: Target, backup: BackupRef, state: DrillState, run: RunContext, rt: Runtime
    ) -> Outcome: ...


class DrillStep(Protocol[S]):
    """The ``drill`` function of a kind's drill module (see Restorable), held to its signature by mypy."""

    def __call__(
        self, plan: Plan[S], target: Target, backup: BackupRef, state: DrillState, run: RunContext, rt: Runtime
    ) -> Outcome: ...


class DrillsIn:
    """Makes a kind Restorable with the ``drill`` function of its own module ``drill_module``, imported only when a
    drill runs (a backup never loads drill code)."""

    drill_module: str

    def drill(
        self, plan: Plan[Any], target: Target, backup: BackupRef, state: DrillState, run: RunContext, rt: Runtime
    ) -> Outcome:
        step: Outcome = importlib.import_module(self.drill_module).drill(plan, target, backup, state, run, rt)
        return step


def find_by_listing(kind: Kind[S], plan: Plan[S], key: str, rt: Runtime) -> Target:
    """``resolve`` for kinds whose targets are cheap to list: the plan's targets are listed until ``key`` is
    found; a key that is not (or no longer) among them is gone."""
    token: str | None = None
    while True:
        page = kind.enumerate(plan, token, rt)
        for target in page.targets:
            if target.key == key:
                return target
        token = page.next_page_token
        if not token:
            raise TargetGone(f"{key!r} is not a target of plan {plan.name} (deleted since listing, or never one)")
