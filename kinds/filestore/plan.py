"""A ``filestore`` plan: the projects whose Filestore instances carrying a label are backed up (the label's value:
how many backups to keep).

Example::

    shares-nightly:
      kind: filestore
      select: {projects: [prod-files], label: backup-keep}
      retention: {min_keep: 2}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from services.plans import STRICT, HttpUrl, LabelKey, PlanSections, ProjectId

DEFAULT_LABEL_KEY = "backup-keep"
POLL_SECONDS = 60.0  # backups of large shares take many minutes; a minute between looks is plenty


@dataclass(frozen=True)
class FilestoreSettings:
    projects: tuple[str, ...] = ()  # empty: the service's own project
    label_key: str = DEFAULT_LABEL_KEY
    endpoint: str | None = None
    poll_seconds: float = POLL_SECONDS
    # A scratch instance restore drills restore into (it must carry the label backup-scheduler-drill=<plan>);
    # without one, a drill checks the backup's state and size only.
    drill_instance: str | None = None


class Select(BaseModel):
    model_config = STRICT
    projects: list[ProjectId] = []
    label: LabelKey = DEFAULT_LABEL_KEY


class Options(BaseModel):
    model_config = STRICT
    endpoint: HttpUrl | None = None
    poll_seconds: float = Field(POLL_SECONDS, ge=1.0)
    drill_instance: (
        Annotated[str, StringConstraints(pattern=r"^projects/[^/]+/locations/[^/]+/instances/[^/]+$")] | None
    ) = None


class Sections(PlanSections[FilestoreSettings]):
    default_queue = "filestore"
    select: Select
    options: Options

    def settings(self) -> FilestoreSettings:
        return FilestoreSettings(
            tuple(self.select.projects),
            self.select.label,
            self.options.endpoint,
            self.options.poll_seconds,
            self.options.drill_instance,
        )
