"""A ``couchdb`` plan: which server (named through environment variables or a secret, never written in the plan),
which databases, where their backups go and how they are taken.

Example::

    couch-nightly:
      kind: couchdb
      retention: {keep: 14, min_keep: 3}
      server: {url_env: COUCHDB_URL, user_env: COUCHDB_USER, password_env: COUCHDB_PASSWORD}
      select: {databases: ["orders", "customer-*"]}
      destination: {url: gs://acme-backups/couchdb}
      options: {mode: full, incremental: true, full_every: 7, reads_per_second: 20}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from kinds.couchdb.format import BackupOptions
from services.plans import STRICT, NonEmptyStr, PlanSections
from services.secrets import SECRET_VERSION


@dataclass(frozen=True)
class ServerSettings:
    """Where the server is and how to log in, as names of environment variables (or a Secret Manager secret
    version for the password). The values are read through the runtime's secrets only when a worker needs them."""

    url_env: str = "COUCHDB_URL"
    user_env: str | None = "COUCHDB_USER"
    password_env: str | None = "COUCHDB_PASSWORD"
    password_secret: str | None = None  # projects/P/secrets/S/versions/V


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    databases: tuple[str, ...]
    destination: str
    backup: BackupOptions
    incremental: bool = False
    full_every: int = 7  # in an incremental plan, a new full backup after this many backups in a chain
    reads_per_second: float | None = None
    drill_sample: int = 100  # documents a restore drill compares revision by revision


def _secret_version(value: str) -> str:
    if not SECRET_VERSION.match(value):
        raise ValueError("expected projects/PROJECT/secrets/NAME/versions/VERSION")
    return value


def _destination(value: str) -> str:
    if not (value.startswith("gs://") or value.startswith("/") or value.startswith("file:///")):
        raise ValueError("expected gs://BUCKET/PREFIX or an absolute local path")
    if value.startswith("gs://") and len(value) <= len("gs://"):
        raise ValueError("expected gs://BUCKET/PREFIX or an absolute local path")
    return value


class Server(BaseModel):
    model_config = STRICT
    url_env: NonEmptyStr = "COUCHDB_URL"
    user_env: NonEmptyStr | None = "COUCHDB_USER"
    password_env: NonEmptyStr | None = "COUCHDB_PASSWORD"
    password_secret: Annotated[str, AfterValidator(_secret_version)] | None = None


class Select(BaseModel):
    model_config = STRICT
    databases: list[NonEmptyStr] = Field(min_length=1)


class Destination(BaseModel):
    model_config = STRICT
    url: Annotated[str, AfterValidator(_destination)]


class Options(BaseModel):
    model_config = STRICT
    mode: Literal["full", "winning"] = "full"
    attachments: bool = True
    batch_docs: int = Field(500, ge=1, le=10000)
    batch_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024, le=60 * 1024 * 1024)
    page_size: int = Field(2000, ge=1, le=10000)
    fetchers: int = Field(4, ge=1, le=16)
    incremental: bool = False
    full_every: int = Field(7, ge=1, le=1000)
    drill_sample: int = Field(100, ge=1, le=100_000)
    reads_per_second: float | None = Field(None, ge=0.1)


class Sections(PlanSections[Settings]):
    default_queue = "backups"
    select: Select
    server: Server
    destination: Destination
    options: Options

    def settings(self) -> Settings:
        options = self.options
        written = options.model_dump(
            include={"mode", "attachments", "batch_docs", "batch_bytes", "page_size", "fetchers"}
        )
        return Settings(
            server=ServerSettings(**self.server.model_dump()),
            databases=tuple(self.select.databases),
            destination=self.destination.url,
            backup=BackupOptions(**written),
            incremental=options.incremental,
            full_every=options.full_every,
            reads_per_second=options.reads_per_second,
            drill_sample=options.drill_sample,
        )
