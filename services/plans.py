"""plans.yaml: what to back up, where to, how much to keep, whom to tell. Read once, validated into typed objects.

The common fields of a plan are read here; everything specific to a kind of target (``select``, ``destination``,
``options``) is read by that kind's ``parse_settings``. An error names the file, the plan and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from services.errors import ConfigError
from services.fields import Fields
from services.kinds import KIND_MODULES, kind_module

PLAN_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")


@dataclass(frozen=True)
class Retention:
    """How many good backups to keep per target. ``keep=None`` keeps everything; ``min_keep`` is a floor
    that no pruning ever goes below, whatever a label or setting says."""

    keep: int | None = None
    min_keep: int = 1


@dataclass(frozen=True)
class Notify:
    on_failure: bool = True
    on_success: bool = False
    digest: bool = False
    pubsub_topic: str | None = None
    webhook_env: str | None = None


@dataclass(frozen=True)
class Plan:
    name: str
    kind: str
    settings: Any
    description: str = ""
    queue: str = "backups"
    fanout_page_size: int = 200
    rpo_hours: float | None = None
    retention: Retention = field(default_factory=Retention)
    notify: Notify = field(default_factory=Notify)


def parse_plan(name: str, raw: Any, source: str = "plans.yaml") -> Plan:
    where = f"{source}: plan '{name}'"
    if not PLAN_NAME.match(name):
        raise ConfigError(f"{where}: a plan name is 1-40 lowercase letters, digits or '-', starting with a letter")
    fields = Fields(raw, where)
    kind = fields.str("kind")
    if kind not in KIND_MODULES:
        raise fields.error("kind", f"expected one of {', '.join(sorted(KIND_MODULES))}", kind)
    module = kind_module(kind)
    retention = fields.section("retention")
    notify = fields.section("notify")
    plan = Plan(
        name=name,
        kind=kind,
        settings=None,
        description=fields.str("description", ""),
        queue=fields.str("queue", module.DEFAULT_QUEUE),
        fanout_page_size=fields.int("fanout_page_size", 200, minimum=1, maximum=5000),
        rpo_hours=fields.float("rpo_hours", None, minimum=0.1),
        retention=Retention(
            keep=retention.int("keep", None, minimum=1, maximum=10000),
            min_keep=retention.int("min_keep", 1, minimum=1, maximum=10000),
        ),
        notify=Notify(
            on_failure=notify.bool("on_failure", True),
            on_success=notify.bool("on_success", False),
            digest=notify.bool("digest", False),
            pubsub_topic=notify.str("pubsub_topic", None),
            webhook_env=notify.str("webhook_env", None),
        ),
    )
    retention.done()
    notify.done()
    settings = module.parse_settings(fields)
    fields.done()
    if plan.retention.keep is not None and plan.retention.keep < plan.retention.min_keep:
        raise ConfigError(f"{where}, field 'retention.keep': must be >= retention.min_keep ({plan.retention.min_keep})")
    return replace(plan, settings=settings)


def parse_plans(raw: Any, source: str = "plans.yaml") -> dict[str, Plan]:
    if not isinstance(raw, dict) or not isinstance(raw.get("plans"), dict) or not raw["plans"]:
        raise ConfigError(f"{source}: expected a top-level 'plans:' mapping with at least one plan")
    unknown = sorted(set(raw) - {"plans"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level field '{unknown[0]}' (expected only 'plans')")
    return {str(name): parse_plan(str(name), body, source) for name, body in raw["plans"].items()}


def load_plans(path: str | Path) -> dict[str, Plan]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read plans file ({exc.strerror})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_plans(raw, str(path.name))
