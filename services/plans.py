"""plans.yaml: what to back up, where to, how much to keep, whom to tell. Read once, validated into typed objects.

Each plan is checked by a pydantic model: the fields every plan has (below) plus its kind's ``select`` /
``destination`` / ``options`` (``kinds/<kind>/plan.py``), chosen by ``kind`` (a discriminated union). Models are
strict (``"7"`` is not a number, ``"false"`` is not a boolean) and refuse unknown fields (a typo like ``retension``
is an error, not a silent default). Every error reads the same way, naming the file, the plan and the field:
``plans.yaml: plan 'nightly', field 'retention.keep': expected an integer, got '7'``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, Union
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from services.errors import ConfigError
from services.yamlfile import load_yaml

PLAN_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
PROJECT_ID = re.compile(r"^(?:[a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
S = TypeVar("S")


def _matching(pattern: re.Pattern[str], expected: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(expected)
        return value

    return AfterValidator(check)


def _http_url(value: str) -> str:
    if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
        raise ValueError("expected an http(s) URL such as https://compute.googleapis.com")
    return value


# Field types shared by kinds' plan sections, each with the message a wrong value gets.
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
ProjectId = Annotated[str, _matching(PROJECT_ID, "expected Google Cloud project ids (e.g. my-project-123)")]
LabelKey = Annotated[str, _matching(LABEL_KEY, "expected a label key (lowercase letter, then letters, digits, - or _)")]
HttpUrl = Annotated[str, AfterValidator(_http_url)]


class FieldError(ValueError):
    """A value that is wrong only together with others (checked after the types): names its field."""

    def __init__(self, field_path: str, message: str, got: Any = ...):
        super().__init__(message)
        self.field_path = field_path
        self.message = message
        self.got = got


class Retention(BaseModel):
    """How many good backups to keep per target. ``keep=None`` keeps everything; ``min_keep`` is a floor that no
    pruning ever goes below, whatever a label or setting says."""

    model_config = STRICT
    keep: int | None = Field(None, ge=1, le=10000)
    min_keep: int = Field(1, ge=1, le=10000)


class Notify(BaseModel):
    model_config = STRICT
    on_failure: bool = True
    on_success: bool = False
    digest: bool = False
    pubsub_topic: NonEmptyStr | None = None
    webhook_env: NonEmptyStr | None = None
    # Grouping (services/alerts.py): wait before the first message of a group, then at most one message per
    # interval, and a reminder of what still fails every repeat_hours.
    group_wait_seconds: int = Field(30, ge=0, le=3600)
    group_interval_seconds: int = Field(300, ge=1, le=86400)
    repeat_hours: float = Field(6, ge=0.5, le=720)


_DURATION = re.compile(r"^([1-9][0-9]{0,4})([hd])$")


def _duration(value: str) -> str:
    if not _DURATION.match(value):
        raise ValueError("expected a whole number of hours or days, such as 12h or 7d")
    return value


class Drill(BaseModel):
    """A restore drill on a schedule: the newest good backup of each target is restored into a scratch place,
    checked and timed, and the scratch removed. ``every`` is how often (``7d``, ``12h``)."""

    model_config = STRICT
    every: Annotated[str, AfterValidator(_duration)] = "7d"
    keep_scratch: bool = False  # leave the scratch restore for a person to look at (labelled, cleaned next time)
    max_bytes: int | None = Field(None, ge=1)  # refuse (as a failed drill) to restore a backup bigger than this
    max_scratch: int = Field(1, ge=1, le=20)  # drills of this plan in flight at once, each with its scratch

    @property
    def interval(self) -> timedelta:
        found = _DURATION.match(self.every)
        assert found is not None
        count, unit = int(found.group(1)), found.group(2)
        return timedelta(hours=count) if unit == "h" else timedelta(days=count)


class CommonFields(BaseModel):
    """The fields of every plan, whatever its kind."""

    model_config = STRICT
    description: str = ""
    queue: NonEmptyStr | None = None
    fanout_page_size: int = Field(200, ge=1, le=5000)
    rpo_hours: float | None = Field(None, ge=0.1)
    retention: Retention = Retention()
    notify: Notify = Notify()
    drill: Drill | None = None


class PlanSections(BaseModel, Generic[S]):
    """A kind's part of a plan: its ``select`` / ``destination`` / ``options`` fields, and ``settings()``, which
    turns them into the kind's settings (raising FieldError for combinations that do not work)."""

    model_config = STRICT
    default_queue: ClassVar[str] = "backups"

    @model_validator(mode="before")
    @classmethod
    def _absent_sections_are_empty(cls, data: Any) -> Any:
        """A section left out reads as an empty one, so a required field inside it is named (``options.location:
        is required``) rather than the whole section."""
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        for name, info in cls.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel) and filled.get(name) is None:
                filled[name] = {}
        return filled

    def settings(self) -> S:
        raise NotImplementedError


@dataclass(frozen=True)
class Plan(Generic[S]):
    name: str
    kind: str
    settings: S
    description: str = ""
    queue: str = "backups"
    fanout_page_size: int = 200
    rpo_hours: float | None = None
    retention: Retention = field(default_factory=Retention)
    notify: Notify = field(default_factory=Notify)
    drill: Drill | None = None


def _plan_validator(registry: Mapping[str, type[PlanSections[Any]]]) -> TypeAdapter[Any]:
    """One model per kind (the common fields, the kind's sections, ``kind`` fixed to its name), and a union of
    them chosen by ``kind``. Built from the registry at run time, so mypy sees only ``Any`` here."""
    models: list[Any] = []
    for name, sections in sorted(registry.items()):
        tag: Any = Literal[name]
        models.append(create_model(f"{name}_plan", __base__=(CommonFields, sections), kind=(tag, ...)))
    if len(models) == 1:
        return TypeAdapter(models[0])
    union: Any = Annotated[Union[tuple(models)], Field(discriminator="kind")]  # noqa: UP007
    return TypeAdapter(union)


_validators: dict[tuple[tuple[str, int], ...], TypeAdapter[Any]] = {}


def parse_plan(name: str, raw: Any, source: str = "plans.yaml") -> Plan[Any]:
    from kinds import plan_sections

    where = f"{source}: plan '{name}'"
    if not PLAN_NAME.match(name):
        raise ConfigError(f"{where}: a plan name is 1-40 lowercase letters, digits or '-', starting with a letter")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {raw!r}")
    registry = plan_sections()
    key = tuple(sorted((n, id(s)) for n, s in registry.items()))
    validator = _validators.get(key) or _validators.setdefault(key, _plan_validator(registry))
    try:
        model = validator.validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}, {describe_error(exc, raw, registry)}") from None
    sections = registry[model.kind]
    try:
        settings = model.settings()
        if model.retention.keep is not None and model.retention.keep < model.retention.min_keep:
            raise FieldError("retention.keep", f"must be >= retention.min_keep ({model.retention.min_keep})")
    except FieldError as exc:
        got = "" if exc.got is ... else f", got {exc.got!r}"
        raise ConfigError(f"{where}, field '{exc.field_path}': {exc.message}{got}") from None
    return Plan(
        name=name,
        kind=model.kind,
        settings=settings,
        description=model.description,
        queue=model.queue or sections.default_queue,
        fanout_page_size=model.fanout_page_size,
        rpo_hours=model.rpo_hours,
        retention=model.retention,
        notify=model.notify,
        drill=model.drill,
    )


def describe_error(exc: ValidationError, raw: Any, registry: Mapping[str, type[BaseModel]]) -> str:
    """The first problem pydantic found, in this project's words: ``field 'a.b': expected ..., got ...``."""
    error = exc.errors(include_url=False)[0]
    kind = raw.get("kind") if isinstance(raw, dict) else None
    loc = [str(part) for part in error["loc"]]
    if loc and loc[0] == kind and len(registry) > 1:
        loc = loc[1:]  # the discriminated union puts the tag first
    if error["type"] in ("union_tag_invalid", "union_tag_not_found") or loc == ["kind"]:
        got = "" if kind is None else f", got {kind!r}"
        return f"field 'kind': expected one of {', '.join(sorted(registry))}{got}"
    item = bool(loc) and loc[-1].isdigit()
    while loc and loc[-1].isdigit():  # a list item's error is the list's: report it on the list, as given
        loc = loc[:-1]
    path = ".".join(loc) or "(top)"
    if error["type"] in ("missing", "extra_forbidden"):
        return f"field '{path}': {_expected(error, loc, kind, registry, item)}"
    given = _value_at(raw, loc) if item else error["input"]
    return f"field '{path}': {_expected(error, loc, kind, registry, item)}, got {given!r}"


def _value_at(raw: Any, loc: list[str]) -> Any:
    for part in loc:
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


_EXPECTED = {
    "missing": "is required",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false (unquoted)",
    "bool_parsing": "expected true or false (unquoted)",
    "string_type": "expected a non-empty string",
    "string_too_short": "expected a non-empty string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
}
_BOUNDS = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}


def _expected(error: Any, loc: list[str], kind: Any, registry: Mapping[str, type[BaseModel]], item: bool) -> str:
    problem, ctx = error["type"], error.get("ctx") or {}
    if item or problem == "list_type":
        string_items = item and problem in ("string_type", "string_too_short")
        return (
            "expected a list of non-empty strings"
            if string_items or problem == "list_type"
            else (f"expected a list whose items are valid: {_expected(error, loc, kind, registry, item=False)}")
        )
    if problem in _EXPECTED:
        return _EXPECTED[problem]
    if problem == "extra_forbidden":
        known = _known_fields(loc[:-1], kind, registry)
        return f"unknown field (known here: {', '.join(known) or 'none'})"
    if problem in _BOUNDS:
        number = "an integer" if isinstance(error["input"], int) else "a number"
        return f"expected {number} {_BOUNDS[problem]} {next(iter(ctx.values()))}"
    if problem == "literal_error":
        return "expected one of " + str(ctx.get("expected", "")).replace(" or ", ", ").replace("'", "")
    if problem in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"]).lower()


def _known_fields(loc: list[str], kind: Any, registry: Mapping[str, type[BaseModel]]) -> list[str]:
    model: Any = registry.get(kind) if isinstance(kind, str) else None
    fields = dict(CommonFields.model_fields) | (dict(model.model_fields) if model else {})
    for part in loc:
        annotation = fields[part].annotation if part in fields else None
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return []
        fields = dict(sub.model_fields)
    return sorted(fields) if loc else sorted([*fields, "kind"])


def parse_plans(raw: Any, source: str = "plans.yaml") -> dict[str, Plan[Any]]:
    if not isinstance(raw, dict) or not isinstance(raw.get("plans"), dict) or not raw["plans"]:
        raise ConfigError(f"{source}: expected a top-level 'plans:' mapping with at least one plan")
    unknown = sorted(set(raw) - {"plans"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level field '{unknown[0]}' (expected only 'plans')")
    return {str(name): parse_plan(str(name), body, source) for name, body in raw["plans"].items()}


def load_plans(path: str | Path) -> dict[str, Plan[Any]]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read plans file ({exc.strerror})") from exc
    return parse_plans(load_yaml(text, str(path.name)), str(path.name))
