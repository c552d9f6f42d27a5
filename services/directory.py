"""Kind ``directory``: timestamped copies of a directory tree (a mounted NFS/Filestore share, or any path).

One target per configured source path. ``start`` runs the copy synchronously, so it must run on a worker that
has the share mounted (a VM, or Cloud Run with an NFS volume, or the CLI). Copies go to a local destination
(``DEST/<stamp>/``, see services/dircopy.py) or to a bucket (``gs://bucket/prefix/<stamp>/...``, see
services/gcscopy.py). Retention keeps ``retention.keep`` complete copies per source, never fewer than
``retention.min_keep``, never the newest, and only after the new copy finished without errors.

Example plan::

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
from pathlib import Path, PurePosixPath
from typing import Any

from services import dircopy
from services.errors import PermanentError, TransientError
from services.fields import Fields
from services.kinds import Done, Outcome, RunContext, Target, TargetPage

KIND = "directory"
DEFAULT_QUEUE = "directory"


@dataclass(frozen=True)
class Settings:
    paths: tuple[str, ...]
    dest_path: str | None = None
    dest_bucket: str | None = None  # "gs://bucket/prefix"
    threads: int = dircopy.DEFAULT_THREADS
    walkers: int = dircopy.WALKERS
    sync: bool = True
    allow_empty: bool = False
    progress_seconds: float = 30.0


def parse_settings(fields: Fields) -> Settings:
    select = fields.section("select", required=True)
    paths = select.str_list("paths")
    select.done()
    if not paths:
        raise select.error("paths", "expected at least one source path")
    for path in paths:
        if not os.path.isabs(path):
            raise select.error("paths", "expected absolute paths", path)
    names = [PurePosixPath(p).name for p in paths]
    if len(paths) > 1 and len(set(names)) != len(names):
        raise select.error("paths", "with several paths, their last components must differ (each gets DEST/<name>)")

    destination = fields.section("destination", required=True)
    dest_path = destination.str("path", None)
    dest_bucket = destination.str("bucket", None)
    destination.done()
    if (dest_path is None) == (dest_bucket is None):
        raise destination.error("path", "set exactly one of destination.path or destination.bucket")
    if dest_path is not None and not os.path.isabs(dest_path):
        raise destination.error("path", "expected an absolute path", dest_path)
    if dest_bucket is not None and (not dest_bucket.startswith("gs://") or len(dest_bucket) <= len("gs://")):
        raise destination.error("bucket", "expected gs://BUCKET[/PREFIX]", dest_bucket)

    options = fields.section("options")
    settings = Settings(
        paths=tuple(paths),
        dest_path=dest_path,
        dest_bucket=dest_bucket.rstrip("/") if dest_bucket else None,
        threads=options.int("threads", dircopy.DEFAULT_THREADS, minimum=1, maximum=64),
        walkers=options.int("walkers", dircopy.WALKERS, minimum=1, maximum=16),
        sync=options.bool("sync", True),
        allow_empty=options.bool("allow_empty", False),
        progress_seconds=options.float("progress_seconds", 30.0, minimum=1.0),
    )
    options.done()
    return settings


def destination_for(settings: Settings, source: str) -> str:
    """Where copies of ``source`` go: the destination itself for a single source, else DEST/<name>."""
    base = settings.dest_path or settings.dest_bucket or ""
    if len(settings.paths) == 1:
        return base
    return f"{base.rstrip('/')}/{PurePosixPath(source).name}"


def enumerate_targets(plan: Any, page_token: str | None, rt: Any) -> TargetPage:
    settings: Settings = plan.settings
    return TargetPage(
        [Target(key=path, params={"source": path, "dest": destination_for(settings, path)}) for path in settings.paths]
    )


def resolve_target(plan: Any, key: str, rt: Any) -> Target:
    """The source ``key`` names, with its destination as the plan says: only the plan's own paths are copied,
    and only into the plan's own destination, whatever a task body claims."""
    settings: Settings = plan.settings
    if key not in settings.paths:
        raise PermanentError(f"refused: {key[:200]!r} is not one of plan {plan.name}'s paths")
    return Target(key=key, params={"source": key, "dest": destination_for(settings, key)})


def describe(plan: Any, target: Target, rt: Any) -> str:
    dest = target.params["dest"]
    name = dircopy.stamp(rt.now())
    if dest.startswith("gs://"):
        return (
            f"copy {target.key} to {dest}/{name}/ (a manifest; only changed contents uploaded to {dest}/objects/),"
            f" keep {plan.retention.keep or 'all'}"
        )
    copies = dircopy.complete_copies(Path(dest))
    previous = copies[-1].name if copies else "none: full copy"
    return (
        f"copy {target.key} to {dest}/{name}/ (link against {previous}; {len(copies)} complete copies now,"
        f" keep {plan.retention.keep or 'all'}, floor {plan.retention.min_keep})"
    )


def _progress_logger(run: RunContext, source: str) -> dircopy.ProgressCallback:
    def log(progress: dircopy.Progress) -> None:
        run.log(
            f"{source}: {progress.files_done}/{progress.files_total} files,"
            f" {progress.bytes_done / 2**20:.1f}/{progress.bytes_total / 2**20:.1f} MiB"
        )

    return log


def start(plan: Any, target: Target, run: RunContext, rt: Any) -> Outcome:
    settings: Settings = plan.settings
    source = target.params["source"]
    dest = target.params["dest"]
    if dest.startswith("gs://"):
        from services import gcscopy

        return gcscopy.run_plan_copy(plan, settings, source, dest, run, rt)
    try:
        result = dircopy.copy_tree(
            Path(source),
            Path(dest),
            run.period,
            threads=settings.threads,
            walkers=settings.walkers,
            sync=settings.sync,
            allow_empty=settings.allow_empty,
            on_progress=_progress_logger(run, source),
            progress_every=settings.progress_seconds,
            clock=rt.now,
        )
    except dircopy.CopyBusy as exc:
        raise TransientError(str(exc)) from exc
    except (dircopy.CopyError, OSError) as exc:
        raise PermanentError(f"directory copy of {source} into {dest} failed: {exc}") from exc
    stats = result.stats.summary()
    if result.stats.errors:
        # The copy is complete as far as it could read, but not confirmed good: nothing is pruned.
        shown = "; ".join(result.stats.errors[:5])
        raise PermanentError(
            f"copy {result.path} finished with {len(result.stats.errors)} errors (see {dircopy.LOG_NAME}): {shown}"
        )
    try:
        pruned = dircopy.prune(Path(dest), plan.retention.keep, plan.retention.min_keep)
    except dircopy.CopyBusy as exc:
        raise TransientError(f"copy {result.path} is done but retention must wait: {exc}") from exc
    for path in pruned:
        run.log(f"retention: deleted {path}")
    stats["pruned"] = [p.name for p in pruned]
    verb = "already complete" if result.already_done else "complete"
    run.log(
        f"{result.path} {verb}: {result.stats.files_copied} copied, {result.stats.files_linked} linked,"
        f" {result.stats.files_deleted} deleted, {result.stats.bytes_copied} bytes in {result.stats.duration_seconds} s"
    )
    return Done(output=str(result.path), stats=stats, message=f"copy {result.path} {verb}")


def poll(plan: Any, target: Target, state: dict[str, Any], run: RunContext, rt: Any) -> Outcome:
    # start() finishes the copy itself; a poll can only come from a confused or replayed task.
    raise PermanentError("directory copies finish in start(); there is no operation to poll")
