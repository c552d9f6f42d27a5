"""A ``directory`` plan: the source paths (a mounted share) and where their timestamped copies go.

Example::

    share-hourly:
      kind: directory
      select:
        paths: [/mnt/share/projects]
      destination:
        path: /mnt/backups/projects      # or  bucket: gs://my-backups/projects
      options:
        threads: 4
        walkers: 1        # more for a share on NFS, where each lstat waits on the server
      retention: {keep: 48, min_keep: 3}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydantic import BaseModel, Field, field_validator

from kinds.directory.copies import DEFAULT_THREADS, WALKERS
from services.plans import STRICT, FieldError, NonEmptyStr, PlanSections


@dataclass(frozen=True)
class Settings:
    paths: tuple[str, ...]
    dest_path: str | None = None
    dest_bucket: str | None = None  # "gs://bucket/prefix"
    threads: int = DEFAULT_THREADS
    walkers: int = WALKERS
    sync: bool = True
    allow_empty: bool = False
    progress_seconds: float = 30.0
    drill_sample: int = 20  # files a restore drill restores and checks by checksum


class Select(BaseModel):
    model_config = STRICT
    paths: list[NonEmptyStr] = Field(min_length=1)

    @field_validator("paths")
    @classmethod
    def _absolute_and_distinct(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not os.path.isabs(path):
                raise ValueError(f"expected absolute paths, got {path!r}")
        names = [PurePosixPath(p).name for p in paths]
        if len(paths) > 1 and len(set(names)) != len(names):
            raise ValueError("with several paths, their last components must differ (each gets DEST/<name>)")
        return paths


class Destination(BaseModel):
    model_config = STRICT
    path: NonEmptyStr | None = None
    bucket: NonEmptyStr | None = None


class Options(BaseModel):
    model_config = STRICT
    threads: int = Field(DEFAULT_THREADS, ge=1, le=64)
    walkers: int = Field(WALKERS, ge=1, le=16)
    sync: bool = True
    allow_empty: bool = False
    progress_seconds: float = Field(30.0, ge=1.0)
    drill_sample: int = Field(20, ge=1, le=100_000)


class Sections(PlanSections[Settings]):
    default_queue = "directory"
    select: Select
    destination: Destination
    options: Options

    def settings(self) -> Settings:
        path, bucket = self.destination.path, self.destination.bucket
        if (path is None) == (bucket is None):
            raise FieldError("destination.path", "set exactly one of destination.path or destination.bucket")
        if path is not None and not os.path.isabs(path):
            raise FieldError("destination.path", "expected an absolute path", path)
        if bucket is not None and (not bucket.startswith("gs://") or len(bucket) <= len("gs://")):
            raise FieldError("destination.bucket", "expected gs://BUCKET[/PREFIX]", bucket)
        return Settings(
            paths=tuple(self.select.paths),
            dest_path=path,
            dest_bucket=bucket.rstrip("/") if bucket else None,
            threads=self.options.threads,
            walkers=self.options.walkers,
            sync=self.options.sync,
            allow_empty=self.options.allow_empty,
            progress_seconds=self.options.progress_seconds,
            drill_sample=self.options.drill_sample,
        )
