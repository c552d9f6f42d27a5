"""The restore drill of a directory copy: the newest copy checked against its own manifest, and a sample of its
files restored into a scratch folder and compared by checksum.

- Every entry of the manifest must be in the copy as recorded (type and size; a local copy is looked at with
  ``lstat``, a bucket copy's contents must be among its objects), and the copy must not carry errors recorded when
  it was made.
- ``options.drill_sample`` files, picked by a hash of the drill's run id (a different sample each drill, the same
  one on a redelivery), are restored into ``<tmp>/backup-scheduler-drill-<plan>-*`` (0700) and their sha256 compared
  with the manifest; ``restored_in_seconds`` is how long that took.
- The scratch folder is removed (unless ``drill.keep_scratch``); folders a crashed drill of this plan left are
  removed first. The copy and the source are only read.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from google.api_core.exceptions import GoogleAPIError

from kinds.directory import copies as dircopy
from kinds.directory.plan import Settings
from services.errors import PermanentError
from services.kinds import BackupRef, Done, DrillState, DrillStep, Outcome, RunContext, Target
from services.plans import Plan
from services.runtime import Runtime

SCRATCH_PREFIX = "backup-scheduler-drill-"


def drill(
    plan: Plan[Settings], target: Target, backup: BackupRef, state: DrillState, run: RunContext, rt: Runtime
) -> Outcome:
    assert plan.drill is not None
    _remove_leftovers(plan)
    bucket = backup.output.startswith("gs://")
    manifest = _bucket_manifest(backup.output, rt) if bucket else dircopy.read_manifest(Path(backup.output))
    problems = [f"recorded when the copy was made: {e}" for e in manifest.recorded_errors()]
    entries = [e for e in manifest.entries.values() if e.path]
    size = sum(e.size for e in entries if e.kind == "f")
    checked = [f"copy {backup.output}: {len(entries)} entries, {size} bytes of files in its manifest"]
    if plan.drill.max_bytes is not None and size > plan.drill.max_bytes:
        raise PermanentError(f"the copy holds {size} bytes, over drill.max_bytes ({plan.drill.max_bytes}); not drilled")
    problems += (
        _missing_from_bucket(backup.output, manifest, rt) if bucket else _missing_locally(backup.output, entries)
    )
    sample = _sample([e for e in entries if e.kind == "f"], plan.settings.drill_sample, run.run_id)
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{plan.name}-"))
    began = time.monotonic()
    try:
        for entry in sample:
            shown = dircopy._escape(entry.path)
            restored = scratch / hashlib.sha256(entry.path.encode("utf-8", "surrogateescape")).hexdigest()
            try:
                if bucket:
                    _download(backup.output, manifest, entry, restored, rt)
                else:
                    shutil.copyfile(f"{backup.output}/{entry.path}", restored, follow_symlinks=False)
            except (OSError, LookupError, GoogleAPIError) as exc:
                problems.append(f"{shown}: cannot be restored ({exc})")
                continue
            digest = hashlib.sha256(restored.read_bytes()).hexdigest()
            if digest != entry.sha256:
                problems.append(f"{shown}: restored content has sha256 {digest}, the manifest {entry.sha256}")
        seconds = round(time.monotonic() - began, 3)
    finally:
        if not plan.drill.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    checked.append(f"{len(sample)} sampled files restored into scratch in {seconds} s, sha256 compared")
    if problems:
        raise PermanentError(f"drill failed: {'; '.join(problems[:20])}")
    run.log(f"drill: {backup.output} checked; {len(sample)} files restored and compared in {seconds} s")
    return Done(output="drill", stats={"restored_in_seconds": seconds, "checked": checked, "passed": True})


def _sample(files: list[dircopy.Entry], count: int, seed: str) -> list[dircopy.Entry]:
    ranked = sorted(
        files, key=lambda e: hashlib.sha256(f"{seed}\n{e.path}".encode("utf-8", "surrogateescape")).digest()
    )
    return ranked[:count]


def _missing_locally(copy: str, entries: list[dircopy.Entry]) -> list[str]:
    """Entries not in the local copy as the manifest records them (type, and size for files)."""
    problems = []
    for entry in entries:
        try:
            st = dircopy._lstat(f"{copy}/{entry.path}")
        except OSError as exc:
            problems.append(f"{dircopy._escape(entry.path)}: {exc.strerror}")
            continue
        if dircopy.kind_of(st.st_mode) != entry.kind or (entry.kind == "f" and st.st_size != entry.size):
            problems.append(f"{dircopy._escape(entry.path)}: not the {entry.kind} of {entry.size} bytes recorded")
    return problems


def _bucket_manifest(url: str, rt: Runtime) -> dircopy.Manifest:
    from kinds.directory import bucket

    place, name = bucket._split_copy_url(url)
    return bucket._manifest_or_fail(rt.storage(), place, name, url)


def _missing_from_bucket(url: str, manifest: dircopy.Manifest, rt: Runtime) -> list[str]:
    """File contents the manifest needs that are not among the bucket's objects (one listing, no downloads)."""
    from kinds.directory import bucket

    place, name = bucket._split_copy_url(url)
    needed = {}
    for entry in manifest.entries.values():
        if entry.kind == "f":
            needed[bucket._object_of(place, name, manifest, entry)] = entry
    prefixes = {object_name.rsplit("/", 1)[0] + "/" for object_name in needed}
    present = {blob.name for prefix in prefixes for blob in rt.storage().list_blobs(place.bucket, prefix=prefix)}
    return [f"{dircopy._escape(e.path)}: object {o} missing" for o, e in needed.items() if o not in present]


def _download(url: str, manifest: dircopy.Manifest, entry: dircopy.Entry, into: Path, rt: Runtime) -> None:
    from kinds.directory import bucket

    place, name = bucket._split_copy_url(url)
    object_name = bucket._object_of(place, name, manifest, entry)
    rt.storage().bucket(place.bucket).blob(object_name).download_to_filename(str(into), checksum=None)


def _remove_leftovers(plan: Plan[Settings]) -> None:
    for leftover in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}{plan.name}-*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


_SIGNATURE: DrillStep[Settings] = drill  # mypy holds it to the contract
