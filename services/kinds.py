"""The one interface every kind of target implements, and the registry of kinds.

A kind is a module (``services/datastore.py``, ``services/disks.py`` ...) that defines:

- ``KIND``: its name in plans.yaml; ``DEFAULT_QUEUE``: the queue.yaml queue its workers use.
- ``parse_settings(fields: Fields) -> Settings``: its part of a plan (``select``, ``destination``, ``options``),
  validated into a frozen dataclass; errors name the plan and field.
- ``enumerate_targets(plan, page_token, rt) -> TargetPage``: one page of targets; ``next_page_token`` when more.
- ``start(plan, target, run, rt) -> Outcome``: begin one backup (idempotent for the same run).
- ``poll(plan, target, state, run, rt) -> Outcome``: check a long operation started by ``start``.
- optionally ``describe(plan, target, rt) -> str``: what a run would do, for ``--dry-run``.

Adding a kind means adding a module and one line to ``KIND_MODULES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType
from typing import Any

from services.errors import ConfigError

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


@dataclass
class TargetPage:
    targets: list[Target]
    next_page_token: str | None = None


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
