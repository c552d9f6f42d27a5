"""Kinds still written against the module interface (``parse_settings`` with ``Fields``, module-level
``enumerate_targets`` / ``start`` / ``poll``), kept working behind the Kind contract while they move into their
packages. Temporary: each kind leaves this file when its package has ``plan.py`` and a Kind object of its own."""

from __future__ import annotations

import importlib
import re
from typing import Any

from pydantic import ConfigDict

from services.errors import ConfigError
from services.kinds import Execution, Outcome, RunContext, Target, TargetPage, find_by_listing
from services.plans import FieldError, Plan, PlanSections

_FIELD_ERROR = re.compile(r"field '([^']+)': (.*)$", re.DOTALL)


def _sections(module_path: str, names: tuple[str, ...], queue: str) -> type[PlanSections[Any]]:
    """A sections model that takes the kind's sections as they are and lets its ``parse_settings`` judge them."""
    from services.fields import Fields

    annotations = dict.fromkeys(names, "dict[str, Any] | None")

    def settings(self: Any) -> Any:
        module = importlib.import_module(module_path)
        raw = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        try:
            return module.parse_settings(Fields(raw, ""))
        except ConfigError as exc:
            found = _FIELD_ERROR.search(str(exc))
            if not found:
                raise
            raise FieldError(found.group(1), found.group(2)) from None

    namespace: dict[str, Any] = {
        "__annotations__": annotations,
        "model_config": ConfigDict(extra="forbid", frozen=True),
        "default_queue": queue,
        "settings": settings,
        **dict.fromkeys(names),
    }
    return type(f"{module_path.rsplit('.', 1)[-1]}_sections", (PlanSections,), namespace)


class ModuleKind:
    """The Kind contract over a module with the older function interface."""

    def __init__(self, module_path: str, name: str, queue: str, execution: Execution):
        self._module_path = module_path
        self.name = name
        self.default_queue = queue
        self.execution: Execution = execution

    @property
    def module(self) -> Any:
        return importlib.import_module(self._module_path)

    def enumerate(self, plan: Plan[Any], page_token: str | None, rt: Any) -> TargetPage:
        page: TargetPage = self.module.enumerate_targets(plan, page_token, rt)
        return page

    def resolve(self, plan: Plan[Any], key: str, rt: Any) -> Target:
        own = getattr(self.module, "resolve_target", None)
        return own(plan, key, rt) if own else find_by_listing(self, plan, key, rt)  # type: ignore[no-any-return]

    def start(self, plan: Plan[Any], target: Target, run: RunContext, rt: Any) -> Outcome:
        outcome: Outcome = self.module.start(plan, target, run, rt)
        return outcome

    def poll(self, plan: Plan[Any], target: Target, state: dict[str, Any], run: RunContext, rt: Any) -> Outcome:
        outcome: Outcome = self.module.poll(plan, target, state, run, rt)
        return outcome

    def describe(self, plan: Plan[Any], target: Target, rt: Any) -> str:
        describe = getattr(self.module, "describe", None)
        return describe(plan, target, rt) if describe else f"would back up {target.key}"  # type: ignore[no-any-return]
