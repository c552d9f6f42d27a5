"""A ``disks`` plan: the projects to look in and the label that selects a disk (its value: how many to keep).

Example::

    disks-nightly:
      kind: disks
      select: {projects: [prod-app-1, prod-db-2], label: backup-generations}
      options: {storage_locations: [eu], guest_flush: false, snapshot_prefix: bk}
      retention: {min_keep: 2}        # a floor no label can go below
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, field_validator

from services.plans import STRICT, HttpUrl, LabelKey, PlanSections, ProjectId

DEFAULT_LABEL_KEY = "backup-generations"
DEFAULT_SNAPSHOT_PREFIX = "bk"
STORAGE_LOCATION = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")
SNAPSHOT_PREFIX = re.compile(r"^[a-z][a-z0-9-]{0,11}$")


@dataclass(frozen=True)
class DiskSettings:
    """The ``disks`` part of a plan: which projects to look in, which label selects a disk, snapshot options."""

    projects: tuple[str, ...]
    label_key: str = DEFAULT_LABEL_KEY
    storage_locations: tuple[str, ...] = ()
    guest_flush: bool = False
    endpoint: str | None = None
    snapshot_prefix: str = DEFAULT_SNAPSHOT_PREFIX


def _storage_location(value: str) -> str:
    if not STORAGE_LOCATION.match(value):
        raise ValueError("expected region or multi-region names such as us or eu")
    return value


def _snapshot_prefix(value: str) -> str:
    if not SNAPSHOT_PREFIX.match(value):
        raise ValueError("expected 1-12 lowercase letters, digits or '-', starting with a letter")
    return value


class Select(BaseModel):
    model_config = STRICT
    projects: list[ProjectId] = Field(min_length=1)
    label: LabelKey = DEFAULT_LABEL_KEY

    @field_validator("projects")
    @classmethod
    def _each_once(cls, projects: list[str]) -> list[str]:
        if len(set(projects)) != len(projects):
            raise ValueError("expected each project once")
        return projects


class Options(BaseModel):
    model_config = STRICT
    storage_locations: list[Annotated[str, AfterValidator(_storage_location)]] = []
    guest_flush: bool = False
    endpoint: HttpUrl | None = None
    snapshot_prefix: Annotated[str, AfterValidator(_snapshot_prefix)] = DEFAULT_SNAPSHOT_PREFIX


class Sections(PlanSections[DiskSettings]):
    select: Select
    options: Options

    def settings(self) -> DiskSettings:
        return DiskSettings(
            projects=tuple(self.select.projects),
            label_key=self.select.label,
            storage_locations=tuple(self.options.storage_locations),
            guest_flush=self.options.guest_flush,
            endpoint=self.options.endpoint,
            snapshot_prefix=self.options.snapshot_prefix,
        )
