"""Directory copies into a Cloud Storage bucket: ``gs://bucket/prefix/<stamp>/<path>``.

The same idea as services/dircopy.py, adapted to object storage:

- Every copy is a complete set of objects under its own stamp prefix, so it can be restored or deleted on its
  own. A file unchanged since the previous complete copy is not uploaded again: it is copied server-side from the
  previous copy's object (no bytes leave the bucket). "Unchanged" means same size, mtime, mode and owner as in
  the previous manifest, or, when only the metadata changed, the same sha256 (the file is hashed to find out).
  We chose server-side copies over a manifest that points into older copies because retention then stays
  trivial: deleting one stamp prefix can never break another copy.
- Symlinks, directories, modes, owners and times live in the manifest only (objects have no such things).
- ``<stamp>/.backup-manifest.tsv`` is uploaded last and is what makes a copy complete; the log
  (``.backup-log.txt``) is uploaded just before it. Retention deletes a copy's manifest first, so a copy that is
  half deleted never looks complete either.
- Prefixes without a manifest are interrupted copies. One older than ``STALE_AFTER`` is deleted by the next run;
  a younger one may belong to a run still in progress and is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from google.api_core.exceptions import NotFound

from services import dircopy
from services.dircopy import FORMAT, LOG_NAME, MANIFEST_NAME, STAMP_PATTERN, CopyStats, Entry, Progress
from services.errors import PermanentError, TransientError
from services.kinds import Done, RunContext

STALE_AFTER = timedelta(hours=24)


@dataclass(frozen=True)
class BucketPlace:
    bucket: str
    prefix: str  # "" or "some/prefix/" (always ending in "/")

    @classmethod
    def parse(cls, url: str) -> BucketPlace:
        if not url.startswith("gs://"):
            raise ValueError(f"expected gs://BUCKET[/PREFIX], got {url!r}")
        bucket, _, prefix = url[len("gs://") :].partition("/")
        if not bucket:
            raise ValueError(f"expected gs://BUCKET[/PREFIX], got {url!r}")
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")

    def copy_prefix(self, name: str) -> str:
        return f"{self.prefix}{name}/"

    def url(self, name: str = "") -> str:
        return f"gs://{self.bucket}/{self.prefix}{name}"


@dataclass
class BucketCopyResult:
    url: str
    stamp: str
    previous: str | None
    stats: CopyStats
    already_done: bool = False


def _stamps(client: Any, place: BucketPlace) -> list[str]:
    """Stamp-named "folders" directly under the prefix, oldest first."""
    iterator = client.list_blobs(place.bucket, prefix=place.prefix, delimiter="/")
    for _ in iterator.pages:
        pass  # prefixes are collected while paging
    names = [p[len(place.prefix) :].rstrip("/") for p in iterator.prefixes]
    return sorted(n for n in names if STAMP_PATTERN.match(n))


def _read_manifest(client: Any, place: BucketPlace, name: str) -> dircopy.Manifest | None:
    blob = client.bucket(place.bucket).blob(place.copy_prefix(name) + MANIFEST_NAME)
    try:
        text = blob.download_as_bytes().decode("utf-8", "surrogateescape")
    except NotFound:
        return None
    lines = text.splitlines()
    header = json.loads(lines[0]) if lines else {}
    if header.get("format") != FORMAT:
        return None
    entries = {e.path: e for e in (Entry.from_line(line) for line in lines[1:] if line)}
    return dircopy.Manifest(header, entries)


def complete_copies(client: Any, place: BucketPlace) -> list[str]:
    """Stamps of our complete copies (manifest present and ours), oldest first."""
    return [name for name in _stamps(client, place) if _read_manifest(client, place, name) is not None]


def _hash_path(path: str) -> str:
    return dircopy._hash_file(path)[0]


def copy_tree_to_bucket(
    source: Path,
    client: Any,
    url: str,
    when: datetime,
    *,
    threads: int = dircopy.DEFAULT_THREADS,
    on_progress: dircopy.ProgressCallback | None = None,
    progress_every: float = 30.0,
    allow_empty: bool = False,
) -> BucketCopyResult:
    """Copy ``source`` to ``url/<stamp(when)>/``. Idempotent for the same ``when``."""
    source = Path(source)
    if not source.is_dir():
        raise dircopy.CopyError(f"source {source} is not a directory (is the share mounted on this machine?)")
    place = BucketPlace.parse(url)
    bucket = client.bucket(place.bucket)
    name = dircopy.stamp(when)
    if _read_manifest(client, place, name) is not None:
        return BucketCopyResult(place.url(name), name, None, CopyStats(), already_done=True)

    stamps = _stamps(client, place)
    complete = [s for s in stamps if s != name and _read_manifest(client, place, s) is not None]
    for stale in stamps:
        age = when - datetime.strptime(stale, "%Y%m%dT%H%M%SZ").replace(tzinfo=when.tzinfo)
        if stale not in complete and stale != name and age > STALE_AFTER:
            _delete_prefix(client, place, stale)
    previous_name = complete[-1] if complete else None
    previous = _read_manifest(client, place, previous_name) if previous_name else None
    before_entries = previous.entries if previous else {}

    stats = CopyStats()
    items = list(dircopy._walk(source, stats))
    if not items and not allow_empty and any(e.kind != "d" for e in before_entries.values()):
        raise dircopy.CopyError(f"{source} is empty but the previous copy {previous_name} has files; is it mounted?")
    files = [i for i in items if i.kind == "f"]
    total_bytes = sum(i.st.st_size for i in files)
    entries: list[Entry] = []
    for item in items:
        if item.kind == "d":
            entries.append(dircopy._entry(item))
        elif item.kind == "l":
            entries.append(dircopy._entry(item, target=os.readlink(source / item.rel)))
            stats.symlinks += 1
    stats.directories = sum(1 for i in items if i.kind == "d")

    def store(item: dircopy._Item) -> tuple[dircopy._Item, Entry | None, bool, str | None]:
        """Upload one file, or copy it server-side from the previous copy when unchanged."""
        key = place.copy_prefix(name) + item.rel
        path = str(source / item.rel)
        before = before_entries.get(item.rel)
        try:
            sha256 = None
            if before is not None and before.sha256 and not before.same_file_as(item.st):
                sha256 = _hash_path(path)  # metadata changed; the content may not have
            if before is not None and before.sha256 and (before.same_file_as(item.st) or sha256 == before.sha256):
                old = bucket.blob(place.copy_prefix(previous_name or "") + item.rel)
                bucket.copy_blob(old, bucket, key)
                return item, dircopy._entry(item, sha256=before.sha256, size=before.size), True, None
            # Hash first, then upload: the file is read twice, but never held in memory whole.
            sha256 = sha256 or _hash_path(path)
            bucket.blob(key).upload_from_filename(path, content_type="application/octet-stream")
            return item, dircopy._entry(item, sha256=sha256), False, None
        except FileNotFoundError:
            return item, None, False, None
        except OSError as exc:
            return item, None, False, f"{item.rel}: {exc.strerror or exc}"

    started = datetime.now(when.tzinfo)
    t0 = time.monotonic()
    last_report = 0.0
    done_files = done_bytes = 0
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gcscopy") as pool:
        for item, entry, reused, error in pool.map(store, files):
            done_files += 1
            done_bytes += item.st.st_size
            if error:
                stats.errors.append(error)
            if entry is not None:
                entries.append(entry)
                if reused:
                    stats.files_linked += 1
                    stats.bytes_linked += entry.size
                else:
                    stats.files_copied += 1
                    stats.bytes_copied += entry.size
            if on_progress is not None and time.monotonic() - last_report >= progress_every:
                last_report = time.monotonic()
                on_progress(Progress(done_files, len(files), done_bytes, total_bytes))
    seen = {e.path for e in entries}
    stats.files_deleted = sum(1 for p, e in before_entries.items() if e.kind != "d" and p not in seen)
    stats.duration_seconds = round(time.monotonic() - t0, 3)
    header = {
        "format": FORMAT,
        "stamp": name,
        "source": str(source),
        "previous": previous_name,
        "started": started.isoformat(),
        "finished": datetime.now(when.tzinfo).isoformat(),
        "stats": stats.summary(),
        "destination": place.url(name),
    }
    lines = [json.dumps(header, sort_keys=True)] + [e.to_line() for e in sorted(entries, key=lambda e: e.path)]
    log_text = _log_text(header, stats)
    bucket.blob(place.copy_prefix(name) + LOG_NAME).upload_from_string(log_text, content_type="text/plain")
    manifest = "\n".join(lines) + "\n"
    bucket.blob(place.copy_prefix(name) + MANIFEST_NAME).upload_from_string(
        manifest.encode("utf-8", "surrogateescape"), content_type="text/plain"
    )
    return BucketCopyResult(place.url(name), name, place.url(previous_name) if previous_name else None, stats)


def _log_text(header: dict[str, Any], stats: CopyStats) -> str:
    lines = [
        f"backup-scheduler directory copy {header['stamp']} to {header['destination']}",
        f"source:    {header['source']}",
        f"previous:  {header['previous'] or '(none: full upload)'}",
        f"duration:  {stats.duration_seconds:.2f} s",
        f"uploaded:  {stats.files_copied} files, {stats.bytes_copied} bytes",
        f"reused:    {stats.files_linked} files, {stats.bytes_linked} bytes (server-side copies of unchanged files)",
        f"deleted:   {stats.files_deleted} files",
        f"errors:    {len(stats.errors)}",
    ]
    return "\n".join(lines + [f"  error: {e}" for e in stats.errors]) + "\n"


def _delete_prefix(client: Any, place: BucketPlace, name: str) -> None:
    bucket = client.bucket(place.bucket)
    prefix = place.copy_prefix(name)
    manifest = bucket.blob(prefix + MANIFEST_NAME)
    if manifest.exists():
        manifest.delete()  # first, so the copy stops looking complete before its files go
    for blob in client.list_blobs(place.bucket, prefix=prefix):
        blob.delete()


def prune_bucket_copies(client: Any, url: str, keep: int | None, min_keep: int) -> list[str]:
    """Delete our oldest complete copies beyond ``keep`` (never below ``min_keep``, never the newest)."""
    if keep is None:
        return []
    place = BucketPlace.parse(url)
    copies = complete_copies(client, place)
    doomed = copies[: max(0, len(copies) - max(keep, min_keep, 1))]
    for name in doomed:
        _delete_prefix(client, place, name)
    return [place.url(n) for n in doomed]


def run_plan_copy(plan: Any, settings: Any, source: str, dest: str, run: RunContext, rt: Any) -> Done:
    """The ``directory`` kind's start() for a gs:// destination: copy, then retention, errors mapped."""
    from google.api_core import exceptions as gexc

    client = rt.storage()
    try:
        result = copy_tree_to_bucket(
            Path(source),
            client,
            dest,
            run.period,
            threads=settings.threads,
            on_progress=lambda p: run.log(f"{source}: {p.files_done}/{p.files_total} files uploaded or reused"),
            progress_every=settings.progress_seconds,
            allow_empty=settings.allow_empty,
        )
        if result.stats.errors:
            raise PermanentError(f"copy {result.url} finished with {len(result.stats.errors)} errors; pruned nothing")
        pruned = prune_bucket_copies(client, dest, plan.retention.keep, plan.retention.min_keep)
    except dircopy.CopyError as exc:
        raise PermanentError(str(exc)) from exc
    except (gexc.TooManyRequests, gexc.ServerError, gexc.ServiceUnavailable) as exc:
        raise TransientError(f"Cloud Storage: {exc}", rate_limited=isinstance(exc, gexc.TooManyRequests)) from exc
    except gexc.NotFound as exc:
        raise PermanentError(f"destination bucket of {dest} not found: {exc}") from exc
    except gexc.Forbidden as exc:
        raise PermanentError(f"Cloud Storage denied access to {dest}: {exc}") from exc
    for url in pruned:
        run.log(f"retention: deleted {url}")
    stats = result.stats.summary()
    stats["pruned"] = pruned
    verb = "already complete" if result.already_done else "complete"
    return Done(output=result.url, stats=stats, message=f"copy {result.url} {verb}")


def _split_copy_url(url: str) -> tuple[BucketPlace, str]:
    """``gs://bucket/prefix/<stamp>`` -> (place of the copies, stamp)."""
    place = BucketPlace.parse(url)
    parent, _, name = place.prefix.rstrip("/").rpartition("/")
    if not STAMP_PATTERN.match(name):
        raise dircopy.CopyError(f"{url}: expected gs://BUCKET/PREFIX/<stamp> of one copy")
    return BucketPlace(place.bucket, f"{parent}/" if parent else ""), name


def _manifest_or_fail(client: Any, place: BucketPlace, name: str, url: str) -> dircopy.Manifest:
    manifest = _read_manifest(client, place, name)
    if manifest is None:
        raise dircopy.CopyError(f"{url}: no manifest of ours (not a complete copy made by this service)")
    return manifest


def verify_bucket_copy(client: Any, url: str, *, threads: int = dircopy.DEFAULT_THREADS) -> dircopy.VerifyReport:
    """Download every object of a bucket copy and compare it with the manifest (sha256 and size); list objects
    the manifest does not know."""
    place, name = _split_copy_url(url)
    manifest = _manifest_or_fail(client, place, name, url)
    bucket = client.bucket(place.bucket)
    prefix = place.copy_prefix(name)
    report = dircopy.VerifyReport(Path(name))
    files = [e for e in manifest.entries.values() if e.kind == "f"]

    def check(entry: Entry) -> str | None:
        try:
            data = bucket.blob(prefix + entry.path).download_as_bytes()
        except NotFound:
            return f"{entry.path}: missing"
        if len(data) != entry.size:
            return f"{entry.path}: {len(data)} bytes, manifest says {entry.size}"
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            return f"{entry.path}: content differs from the manifest (sha256 {digest}, expected {entry.sha256})"
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gcsverify") as pool:
        for entry, problem in zip(files, pool.map(check, files), strict=True):
            report.files_checked += 1
            report.bytes_checked += entry.size
            if problem:
                report.problems.append(problem)
    known = {prefix + e.path for e in files} | {prefix + MANIFEST_NAME, prefix + LOG_NAME}
    for blob in client.list_blobs(place.bucket, prefix=prefix):
        if blob.name not in known:
            report.problems.append(f"{blob.name[len(prefix) :]}: in the copy but not in its manifest")
    return report


def restore_bucket_copy(client: Any, url: str, target: Path, *, threads: int = dircopy.DEFAULT_THREADS) -> Any:
    """Download a bucket copy into ``target`` (missing or empty), checking each file's sha256 before it is
    renamed into place, then set modes and times and recreate symlinks from the manifest."""
    place, name = _split_copy_url(url)
    manifest = _manifest_or_fail(client, place, name, url)
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise dircopy.CopyError(f"restore target {target} is not an empty directory; restore into an empty one")
    target.mkdir(parents=True, exist_ok=True)
    bucket = client.bucket(place.bucket)
    prefix = place.copy_prefix(name)
    result = dircopy.RestoreResult(target)
    entries = sorted(manifest.entries.values(), key=lambda e: e.path)
    for entry in entries:
        if entry.kind == "d":
            (target / entry.path).mkdir(mode=0o700, parents=True, exist_ok=True)

    def fetch(entry: Entry) -> str | None:
        dst = target / entry.path
        tmp = dst.with_name(f".restore-{dst.name}")
        try:
            data = bucket.blob(prefix + entry.path).download_as_bytes()
        except NotFound:
            return f"{entry.path}: object missing from the copy"
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            return f"{entry.path}: checksum mismatch in the copy; not restored"
        tmp.write_bytes(data)
        os.chmod(tmp, entry.mode)
        os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns))
        os.rename(tmp, dst)
        return None

    files = [e for e in entries if e.kind == "f"]
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gcsrestore") as pool:
        for entry, error in zip(files, pool.map(fetch, files), strict=True):
            if error:
                result.errors.append(error)
            else:
                result.files += 1
                result.bytes += entry.size
    for entry in entries:
        if entry.kind == "l":
            os.symlink(entry.target or "", target / entry.path)
            os.utime(target / entry.path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
            result.symlinks += 1
    for entry in reversed(entries):
        if entry.kind == "d":
            os.chmod(target / entry.path, entry.mode)
            os.utime(target / entry.path, ns=(entry.mtime_ns, entry.mtime_ns))
            result.directories += 1
    return result
