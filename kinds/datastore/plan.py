"""A ``datastore`` plan: which kinds and namespaces to export, into which bucket, from which database location.

Example::

    datastore-nightly:
      kind: datastore
      select: {namespaces: all}            # or a list; "" is the default namespace; kinds: [Customer, Order]
      destination:
        bucket: my-exports
        prefix: datastore
        bigquery: {dataset: datastore_history, table_prefix: "", mode: snapshot}   # optional
      options: {location: us-central1, grouping: per-kind}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, StringConstraints, field_validator

from services.plans import STRICT, NonEmptyStr, PlanSections, ProjectId


@dataclass(frozen=True)
class BigQueryTarget:
    """Where exports go in BigQuery (``destination.bigquery`` of a datastore plan)."""

    dataset: str
    project: str | None = None  # None: the exported project
    table_prefix: str = ""
    mode: str = "snapshot"  # "snapshot": a dated table per day; "replace": one table per kind
    location: str | None = None  # the dataset's location; None lets BigQuery find it


@dataclass(frozen=True)
class Settings:
    project: str | None  # None: the service's own project
    location: str  # where the Datastore database lives, e.g. us-central1 or nam5
    bucket: str
    prefix: str
    kinds: tuple[str, ...] | None  # None: every kind found
    namespaces: tuple[str, ...] | None  # None: every namespace found ("" is the default namespace)
    grouped: bool
    bigquery: BigQueryTarget | None = None  # load each export into BigQuery, a table per kind
    drill_database: str = "backup-drill"  # the scratch database restore drills import into (never "(default)")


class Select(BaseModel):
    model_config = STRICT
    kinds: list[NonEmptyStr] | None = None
    namespaces: Any = "all"

    @field_validator("namespaces")
    @classmethod
    def _all_or_names(cls, value: Any) -> Any:
        if value == "all" or (isinstance(value, list) and all(isinstance(n, str) for n in value)):
            return value
        raise ValueError("expected 'all' or a list of namespace names ('' is the default)")


class BigQuery(BaseModel):
    model_config = STRICT
    dataset: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{1,1024}$")]
    project: ProjectId | None = None
    table_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{0,100}$")] = ""
    mode: Literal["snapshot", "replace"] = "snapshot"
    location: NonEmptyStr | None = None


class Destination(BaseModel):
    model_config = STRICT
    bucket: NonEmptyStr
    prefix: NonEmptyStr = "datastore"
    bigquery: BigQuery | None = None

    @field_validator("bucket")
    @classmethod
    def _bare_bucket_name(cls, value: str) -> str:
        if value.startswith("gs://") or "/" in value:
            raise ValueError("expected a bucket name without gs:// or a path")
        return value


class Options(BaseModel):
    model_config = STRICT
    project: NonEmptyStr | None = None
    location: NonEmptyStr
    grouping: Literal["per-kind", "grouped"] = "per-kind"
    drill_database: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{2,62}$")] = "backup-drill"


class Sections(PlanSections[Settings]):
    default_queue = "datastore-exports"
    select: Select
    destination: Destination
    options: Options

    def settings(self) -> Settings:
        namespaces = self.select.namespaces
        return Settings(
            project=self.options.project,
            location=self.options.location,
            bucket=self.destination.bucket,
            prefix=self.destination.prefix.strip("/"),
            kinds=tuple(self.select.kinds) if self.select.kinds else None,
            namespaces=None if namespaces == "all" else tuple(namespaces),
            grouped=self.options.grouping == "grouped",
            bigquery=BigQueryTarget(**bigquery.model_dump()) if (bigquery := self.destination.bigquery) else None,
            drill_database=self.options.drill_database,
        )
