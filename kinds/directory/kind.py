"""Kind ``directory``: timestamped copies of a directory tree (a mounted NFS/Filestore share, or any path).

One target per configured source path. A ``job`` kind: the copy is made by this code, on the worker that has
the share mounted (the Cloud Run worker with an NFS or GCS volume, or the CLI), in parts of at most the task's
budget: a part that runs out of time leaves a checkpoint and the next task goes on from it. Copies go to a local
destination (``DEST/<stamp>/``, see kinds/directory/copies.py) or to a bucket (``gs://bucket/prefix/<stamp>/...``, see
kinds/directory/bucket.py). Retention keeps ``retention.keep`` complete copies per source, never fewer than
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

from pathlib import Path, PurePosixPath
from typing import Any

from kinds.directory import copies as dircopy
from kinds.directory.plan import Settings
from services.errors import PermanentError, TransientError
from services.kinds import Done, DrillsIn, Execution, Outcome, Pending, RunContext, Target, TargetPage
from services.plans import Plan

# The part of a task's budget kept for what follows the walk: waiting for the copies in flight, writing the
# manifest or the checkpoint.
FINISH_RESERVE_SECONDS = 20.0


def destination_for(settings: Settings, source: str) -> str:
    """Where copies of ``source`` go: the destination itself for a single source, else DEST/<name>."""
    base = settings.dest_path or settings.dest_bucket or ""
    if len(settings.paths) == 1:
        return base
    return f"{base.rstrip('/')}/{PurePosixPath(source).name}"


def enumerate_targets(plan: Plan[Settings], page_token: str | None, rt: Any) -> TargetPage:
    settings: Settings = plan.settings
    return TargetPage(
        [Target(key=path, params={"source": path, "dest": destination_for(settings, path)}) for path in settings.paths]
    )


def resolve_target(plan: Plan[Settings], key: str, rt: Any) -> Target:
    """The source ``key`` names, with its destination as the plan says: only the plan's own paths are copied,
    and only into the plan's own destination, whatever a task body claims."""
    settings: Settings = plan.settings
    if key not in settings.paths:
        raise PermanentError(f"refused: {key[:200]!r} is not one of plan {plan.name}'s paths")
    return Target(key=key, params={"source": key, "dest": destination_for(settings, key)})


def describe(plan: Plan[Settings], target: Target, rt: Any) -> str:
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


def copy_part(plan: Plan[Settings], target: Target, run: RunContext, rt: Any) -> Outcome:
    """Copy as much as this task's budget allows: ``Pending`` with the copy checkpointed, or, once the copy is
    complete and had no errors, retention and ``Done``."""
    settings = plan.settings
    source = target.params["source"]
    dest = target.params["dest"]
    if dest.startswith("gs://"):
        from kinds.directory import bucket as gcscopy

        return gcscopy.run_plan_copy(plan, settings, source, dest, run, rt)
    reserve = min(FINISH_RESERVE_SECONDS, run.time_left() / 4)
    deadline = None if run.deadline is None else run.deadline - reserve
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
            deadline=deadline,
        )
    except dircopy.CopyBusy as exc:
        raise TransientError(str(exc)) from exc
    except (dircopy.CopyError, OSError) as exc:
        raise PermanentError(f"directory copy of {source} into {dest} failed: {exc}") from exc
    if result.partial:
        run.log(
            f"{result.path}: part done ({result.stats.files_copied} copied, {result.stats.files_linked} linked so"
            " far); going on in a follow-up task"
        )
        return Pending({"copying": result.stamp}, delay_seconds=0)
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


class Directory(DrillsIn):
    """The ``directory`` kind: timestamped copies of a share, made by this code in budgeted parts."""

    name = "directory"
    default_queue = "directory"
    execution: Execution = "job"
    drill_module = "kinds.directory.drill"

    # The module's functions keep the contract themselves (kinds/checked.py has mypy hold them to it).
    enumerate = staticmethod(enumerate_targets)
    resolve = staticmethod(resolve_target)
    start = staticmethod(copy_part)
    describe = staticmethod(describe)

    def poll(self, plan: Plan[Settings], target: Target, state: dict[str, Any], run: RunContext, rt: Any) -> Outcome:
        # The copy's own checkpoint (beside its in-progress folder) says where it stopped; the same call goes on.
        return copy_part(plan, target, run, rt)


KIND = Directory()
