"""Directory copies into a Cloud Storage bucket: a manifest per copy, file contents stored once by checksum.

The same idea as kinds/directory/copies.py, adapted to object storage, where a hard link does not exist and every
request is paid for::

    gs://BUCKET/PREFIX/.backup-lock                  a lease: one run (copy or retention) at a time
    gs://BUCKET/PREFIX/.sweep-pending                retention started deleting and has not swept yet
    gs://BUCKET/PREFIX/objects/<sha256>              a file's content, stored once whatever its name or copy
    gs://BUCKET/PREFIX/<stamp>/.backup-log.txt       what the run did, including what it cost
    gs://BUCKET/PREFIX/<stamp>/.backup-manifest.tsv  every entry with its sha256; written last: marks it complete

- **Pay for what changed.** A file whose size, mtime, mode and owner match the previous manifest keeps its
  checksum and costs no request at all; a changed file is hashed, and uploaded only when no object has that
  checksum yet. An incremental copy makes a constant handful of requests (lease, listing, previous manifest,
  log, manifest) plus one per changed file. File names never become object names, so any name a file system
  holds (not UTF-8, control characters, 255 bytes, paths longer than 1,024 bytes) is kept, in the manifest only.
- **Each copy stands on its own.** Its manifest names every object it needs; verify and restore read that
  manifest and those objects, nothing of other copies.
- **Retention is mark and sweep.** The manifests of doomed copies are deleted first (so a copy half deleted
  never looks complete), then the objects no remaining complete manifest references are deleted. A crash at any
  point leaves at worst unreferenced objects, which the next sweep removes; never a complete copy with a
  missing object. The lease keeps a sweep from running while a copy is uploading objects it has not yet
  referenced.
- **Every run records its cost**: objects written, bytes uploaded, HTTP requests made (counted on the client's
  session, so retries count too).
- Copies made before this layout (format 1: ``<stamp>/<path>`` objects, one per file per copy) are still
  verified, restored and pruned as they are; the first run after them uploads every file once into ``objects/``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kinds.directory import copies as dircopy
from kinds.directory.copies import (
    FORMAT,
    FORMAT_V1,
    LOG_NAME,
    MANIFEST_NAME,
    STAMP_PATTERN,
    CopyStats,
    Entry,
    Manifest,
    Progress,
)
from services.errors import PermanentError, TransientError
from services.kinds import Done, RunContext

STALE_AFTER = timedelta(hours=24)  # a prefix without a manifest this old is an abandoned copy
OBJECTS = "objects/"
LEASE_NAME = ".backup-lock"
SWEEP_PENDING = ".sweep-pending"  # present while a retention run owes a sweep (it died, or is running)
LEASE_SECONDS = 900.0  # a lease not renewed for this long belongs to a run that died
LEASE_RENEW_SECONDS = 240.0
SMALL_UPLOAD = 8 << 20  # read whole, hashed and uploaded from memory: the bytes hashed are the bytes sent
HEADER_BYTES = 65536


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

    def object_name(self, sha256: str) -> str:
        return f"{self.prefix}{OBJECTS}{sha256}"

    def url(self, name: str = "") -> str:
        return f"gs://{self.bucket}/{self.prefix}{name}"


@dataclass
class Cost:
    """What a run cost in Cloud Storage terms."""

    requests: int = 0
    objects_written: int = 0
    objects_deleted: int = 0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "objects_written": self.objects_written,
            "objects_deleted": self.objects_deleted,
            "bytes_uploaded": self.bytes_uploaded,
            "bytes_downloaded": self.bytes_downloaded,
        }


@dataclass
class BucketCopyResult:
    url: str
    stamp: str
    previous: str | None
    stats: CopyStats
    already_done: bool = False
    cost: Cost = field(default_factory=Cost)


@dataclass
class BucketPruneResult:
    deleted: list[str] = field(default_factory=list)  # URLs of the copies deleted
    cost: Cost = field(default_factory=Cost)


class RequestMeter:
    """Counts the HTTP requests this run makes through a storage client's session (every upload, download,
    listing, delete and retry), and only those: requests from threads not registered here are not counted,
    so two runs sharing one client each count their own."""

    def __init__(self, client: Any):
        self._session = client._http  # the requests Session every storage call goes through
        self._threads: set[int] = set()
        self._lock = threading.Lock()
        self.count = 0

    def register(self) -> None:
        """Count the calling thread's requests (pool threads call this as their initializer)."""
        self._threads.add(threading.get_ident())

    def _hook(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() in self._threads:
            with self._lock:
                self.count += 1
        return response

    def __enter__(self) -> RequestMeter:
        self.register()
        self._session.hooks.setdefault("response", []).append(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ValueError):
            self._session.hooks["response"].remove(self._hook)


class BucketLease:
    """An exclusive lease on a copy place, held in ``PREFIX/.backup-lock`` and renewed in the background.

    Taken with a generation precondition (create only if absent), so two runs cannot both hold it. A lease not
    renewed for ``LEASE_SECONDS`` is taken over (its holder died). Released by deleting it."""

    def __init__(self, client: Any, place: BucketPlace, meter: RequestMeter | None = None):
        self.blob = client.bucket(place.bucket).blob(place.prefix + LEASE_NAME)
        self.place = place
        self.meter = meter
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> str:
        now = time.time()
        return json.dumps({"holder": self.holder, "taken": now, "expires": now + LEASE_SECONDS})

    def __enter__(self) -> BucketLease:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            held = json.loads(self.blob.download_as_bytes(checksum=None) or b"{}")
        except NotFound:
            held = None
        except ValueError:
            held = {}
        if held is not None:
            if float(held.get("expires", 0)) > time.time():
                raise dircopy.CopyBusy(
                    f"{self.place.url()}: another copy or retention run holds {LEASE_NAME} ({held.get('holder')})"
                )
            with contextlib.suppress(NotFound):
                self.blob.delete()  # its holder stopped renewing it: it died
        try:
            self.blob.upload_from_string(self._body(), content_type="application/json", if_generation_match=0)
        except PreconditionFailed:
            raise dircopy.CopyBusy(f"{self.place.url()}: another run took {LEASE_NAME} just now") from None
        self.generation = self.blob.generation
        self._renewer = threading.Thread(target=self._renew, name="gcscopy-lease", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        if self.meter is not None:
            self.meter.register()
        while not self._stop.wait(LEASE_RENEW_SECONDS):
            with contextlib.suppress(Exception):  # a failed renewal is retried at the next interval
                self.blob.upload_from_string(
                    self._body(), content_type="application/json", if_generation_match=self.generation
                )
                self.generation = self.blob.generation

    def __exit__(self, *exc: object) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with contextlib.suppress(NotFound, PreconditionFailed):
            self.blob.delete(if_generation_match=self.generation)


# --- reading what is in the bucket -------------------------------------------------------------------------------


def _stamps(client: Any, place: BucketPlace) -> list[str]:
    """Stamp-named "folders" directly under the prefix, oldest first."""
    iterator = client.list_blobs(place.bucket, prefix=place.prefix, delimiter="/")
    for _ in iterator.pages:
        pass  # prefixes are collected while paging
    names = [p[len(place.prefix) :].rstrip("/") for p in iterator.prefixes]
    return sorted(n for n in names if STAMP_PATTERN.match(n))


def _read_manifest(client: Any, place: BucketPlace, name: str, cost: Cost | None = None) -> Manifest | None:
    """The manifest of the copy ``name``, or None when it has none of ours (an incomplete or foreign prefix)."""
    from google.api_core.exceptions import NotFound

    blob = client.bucket(place.bucket).blob(place.copy_prefix(name) + MANIFEST_NAME)
    try:
        data = blob.download_as_bytes(checksum=None)
    except NotFound:
        return None
    if cost is not None:
        cost.bytes_downloaded += len(data)
    try:
        return dircopy.parse_manifest(data, place.url(name + "/" + MANIFEST_NAME))
    except ValueError:
        return None


def _read_header(client: Any, place: BucketPlace, name: str) -> dict[str, Any] | None:
    """Only the header of a copy's manifest (one ranged read), or None when the copy has no manifest of ours."""
    from google.api_core.exceptions import NotFound

    blob = client.bucket(place.bucket).blob(place.copy_prefix(name) + MANIFEST_NAME)
    try:
        data = blob.download_as_bytes(start=0, end=HEADER_BYTES - 1, checksum=None)
        if b"\n" not in data and len(data) >= HEADER_BYTES:
            data = blob.download_as_bytes(checksum=None)
    except NotFound:
        return None
    try:
        header = json.loads(data.partition(b"\n")[0] or b"{}")
    except ValueError:
        return None
    return header if isinstance(header, dict) and header.get("format") in dircopy.FORMATS else None


def complete_copies(client: Any, place: BucketPlace) -> list[str]:
    """Stamps of our complete copies (manifest present and ours), oldest first."""
    return [name for name in _stamps(client, place) if _read_header(client, place, name) is not None]


# --- copying -----------------------------------------------------------------------------------------------------


class _Uploader:
    """Stores file contents as ``objects/<sha256>`` for one run: each checksum is uploaded at most once, and not
    at all when the previous copy already references it (so the object exists: retention keeps every object a
    complete copy references, and the lease keeps retention out while we run)."""

    def __init__(self, client: Any, place: BucketPlace, known: set[str], legacy: dict[str, str], cost: Cost):
        self.bucket = client.bucket(place.bucket)
        self.place = place
        self.known = known
        self.legacy = legacy  # sha256 -> object of a format-1 copy holding that content (copied server-side)
        self.cost = cost
        self._lock = threading.Lock()
        self._claims: dict[str, threading.Event] = {}

    def store(self, sha256: str, send: Any) -> bool:
        """Make sure ``objects/<sha256>`` exists; ``send(blob)`` uploads it. Returns True when this call wrote it."""
        while True:
            with self._lock:
                if sha256 in self.known:
                    return False
                claim = self._claims.get(sha256)
                if claim is None:
                    claim = self._claims[sha256] = threading.Event()
                    break
            claim.wait()  # another thread is storing the same content; use its object when it is done
        try:
            wrote = self._write(sha256, send)
            with self._lock:
                self.known.add(sha256)
            return wrote
        finally:
            with self._lock:
                del self._claims[sha256]
            claim.set()

    def _write(self, sha256: str, send: Any) -> bool:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        blob = self.bucket.blob(self.place.object_name(sha256))
        try:
            old = self.legacy.get(sha256)
            if old is not None:
                with contextlib.suppress(NotFound):
                    self.bucket.copy_blob(self.bucket.blob(old), self.bucket, blob.name, if_generation_match=0)
                    with self._lock:
                        self.cost.objects_written += 1
                    return True
            sent = send(blob)
        except PreconditionFailed:
            return False  # already there (uploaded by a run that did not finish): same name, same content
        with self._lock:
            self.cost.objects_written += 1
            self.cost.bytes_uploaded += sent
        return True


def _crc32c(data: bytes | memoryview, value: int = 0) -> int:
    import google_crc32c

    return int(google_crc32c.extend(value, bytes(data)))


def _store_file(path: str, uploader: _Uploader) -> tuple[str, int, bool]:
    """Hash one source file and store its content. Returns (sha256, size, whether this call uploaded it).
    The bytes uploaded are the bytes hashed: small files go up from memory; large ones are read twice, and the
    server checks the second read against the first's crc32c (a file that changed in between is refused, not
    stored under a wrong name)."""
    fd, st = dircopy.open_source_file(path)
    try:
        if st.st_size <= SMALL_UPLOAD:
            chunks = []
            while data := os.read(fd, max(st.st_size + 1, 1 << 16)):
                chunks.append(data)
            body = b"".join(chunks)
            sha256 = hashlib.sha256(body).hexdigest()

            def send_bytes(blob: Any) -> int:
                blob.upload_from_string(body, content_type="application/octet-stream", if_generation_match=0)
                return len(body)

            return sha256, len(body), uploader.store(sha256, send_bytes)
        digest = hashlib.sha256()
        crc = 0
        size = 0
        buf = bytearray(dircopy.CHUNK)
        view = memoryview(buf)
        while n := os.readv(fd, [buf]):
            digest.update(view[:n])
            crc = _crc32c(view[:n], crc)
            size += n
        sha256 = digest.hexdigest()

        def send_stream(blob: Any) -> int:
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(fd, "rb", closefd=False) as stream:
                blob.upload_from_file(
                    stream,
                    size=size,
                    content_type="application/octet-stream",
                    if_generation_match=0,
                    crc32c_checksum_value=base64.b64encode(crc.to_bytes(4, "big")).decode(),
                )
            return size

        return sha256, size, uploader.store(sha256, send_stream)
    finally:
        os.close(fd)


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
    ad_hoc: bool = False,
) -> BucketCopyResult:
    """Copy ``source`` to ``url/<stamp(when)>/``. Idempotent for the same ``when`` (``ad_hoc``: never reuses a
    name, takes the next free second). CopyBusy while another run holds the lease."""
    source = Path(source)
    if not source.is_dir():
        raise dircopy.CopyError(f"source {source} is not a directory (is the share mounted on this machine?)")
    place = BucketPlace.parse(url)
    cost = Cost()
    with RequestMeter(client) as meter, BucketLease(client, place, meter):
        result = _copy_under_lease(
            source, client, place, when, threads, on_progress, progress_every, allow_empty, ad_hoc, cost, meter
        )
    cost.requests = meter.count
    result.cost = cost
    return result


def _copy_under_lease(
    source: Path,
    client: Any,
    place: BucketPlace,
    when: datetime,
    threads: int,
    on_progress: dircopy.ProgressCallback | None,
    progress_every: float,
    allow_empty: bool,
    ad_hoc: bool,
    cost: Cost,
    meter: RequestMeter,
) -> BucketCopyResult:
    bucket = client.bucket(place.bucket)
    stamps = _stamps(client, place)
    if ad_hoc:
        while dircopy.stamp(when) in stamps:
            when = when.replace(microsecond=0) + timedelta(seconds=1)
            wait = (when - datetime.now(UTC)).total_seconds()
            if wait > 0:
                time.sleep(min(wait, 1.0))
    name = dircopy.stamp(when)
    if name in stamps:
        done = _read_manifest(client, place, name, cost)
        if done is not None:
            stats = CopyStats.from_summary(done.header.get("stats", {}))
            return BucketCopyResult(place.url(name), name, done.header.get("previous"), stats, already_done=True)
    previous_name = None
    previous = None
    for candidate in reversed(stamps):
        if candidate != name:
            previous = _read_manifest(client, place, candidate, cost)
            if previous is not None:
                previous_name = candidate
                break
    before_entries = previous.entries if previous else {}
    current_layout = previous is not None and previous.header["format"] == FORMAT
    known = {e.sha256 for e in before_entries.values() if e.sha256} if current_layout else set()
    legacy = (
        {e.sha256: place.copy_prefix(previous_name or "") + e.path for e in before_entries.values() if e.sha256}
        if previous is not None and not current_layout
        else {}
    )

    stats = CopyStats()
    root_st = source.stat()
    items = list(dircopy._walk(source, stats))
    if not items and not allow_empty and any(e.kind != "d" for e in before_entries.values()):
        raise dircopy.CopyError(f"{source} is empty but the previous copy {previous_name} has files; is it mounted?")
    entries: list[Entry] = []
    files = []
    for item in items:
        if item.kind == "d":
            entries.append(dircopy._entry(item))
            stats.directories += 1
        elif item.kind == "l":
            try:
                target = dircopy._readlink(f"{source}/{item.rel}")
            except FileNotFoundError:
                dircopy._vanished(stats, item.rel)
                continue
            except OSError as exc:
                stats.errors.append(f"{item.rel}: {exc.strerror or exc}")
                continue
            entries.append(dircopy._entry(item, target=target))
            stats.symlinks += 1
        elif item.kind == "f":
            before = before_entries.get(item.rel)
            if current_layout and before is not None and before.same_file_as(item.st):
                entries.append(dircopy._entry(item, sha256=before.sha256, size=before.size))
                stats.files_linked += 1
                stats.bytes_linked += before.size
            else:
                files.append(item)
        else:
            rdev = str(item.st.st_rdev) if item.kind in "cb" else None
            entries.append(dircopy._entry(item, target=rdev))
            stats.specials += 1

    uploader = _Uploader(client, place, known, legacy, cost)

    def store(item: dircopy._Item) -> tuple[dircopy._Item, Entry | None, bool, str | None, str | None]:
        """(item, entry, whether its content was written now, error, why it vanished)."""
        try:
            sha256, size, wrote = _store_file(f"{source}/{item.rel}", uploader)
            return item, dircopy._entry(item, sha256=sha256, size=size), wrote, None, None
        except FileNotFoundError:
            return item, None, False, None, "vanished before it could be copied"
        except dircopy.ChangedType as exc:
            return item, None, False, None, f"was a file when listed, {exc.strerror} when copied; not in this copy"
        except OSError as exc:
            return item, None, False, f"{item.rel}: {exc.strerror or exc}", None
        except Exception as exc:  # noqa: BLE001 - a refused upload is this file's error, the copy goes on
            from google.api_core.exceptions import BadRequest, GoogleAPICallError

            if isinstance(exc, BadRequest):
                return item, None, False, None, "changed while it was uploaded; not in this copy"
            if isinstance(exc, GoogleAPICallError) and getattr(exc, "code", 500) < 500:
                return item, None, False, f"{item.rel}: Cloud Storage refused it: {exc}", None
            raise

    started = datetime.now(UTC)
    t0 = time.monotonic()
    last_report = 0.0
    done_files = done_bytes = 0
    total_bytes = sum(i.st.st_size for i in files)
    with ThreadPoolExecutor(
        max_workers=max(1, threads), thread_name_prefix="gcscopy", initializer=meter.register
    ) as pool:
        for item, entry, wrote, error, vanished in pool.map(store, files):
            done_files += 1
            done_bytes += item.st.st_size
            if error:
                stats.errors.append(error)
            if vanished:
                dircopy._vanished(stats, item.rel, vanished)
            if entry is not None:
                entries.append(entry)
                if wrote:
                    stats.files_copied += 1
                    stats.bytes_copied += entry.size
                else:  # changed metadata, or content some copy already holds: nothing uploaded
                    stats.files_linked += 1
                    stats.bytes_linked += entry.size
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
        "finished": datetime.now(UTC).isoformat(),
        "stats": stats.summary(),
        "root": dircopy.root_attributes(root_st),
        "errors": stats.errors[: dircopy.MAX_HEADER_ERRORS],
        "destination": place.url(name),
        "objects": place.url(OBJECTS),
        "cost_before_manifest": {**cost.to_json(), "requests": meter.count},
    }
    lines = [json.dumps(header, sort_keys=True)] + [e.to_line() for e in sorted(entries, key=lambda e: e.path)]
    log_text = _log_text(header, stats, cost, meter.count)
    bucket.blob(place.copy_prefix(name) + LOG_NAME).upload_from_string(log_text, content_type="text/plain")
    manifest = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    bucket.blob(place.copy_prefix(name) + MANIFEST_NAME).upload_from_string(manifest, content_type="text/plain")
    cost.bytes_uploaded += len(manifest) + len(log_text)
    return BucketCopyResult(place.url(name), name, place.url(previous_name) if previous_name else None, stats)


def _log_text(header: dict[str, Any], stats: CopyStats, cost: Cost, requests: int) -> str:
    lines = [
        f"backup-scheduler directory copy {header['stamp']} to {header['destination']}",
        f"source:    {dircopy._escape(header['source'])}",
        f"previous:  {header['previous'] or '(none: full upload)'}",
        f"duration:  {stats.duration_seconds:.2f} s",
        f"cost:      {requests} requests before this log and the manifest, {cost.objects_written} objects written,"
        f" {cost.bytes_uploaded} bytes uploaded, {cost.bytes_downloaded} bytes of manifests read",
        *dircopy.log_lines(stats),
    ]
    return "\n".join(lines) + "\n"


# --- retention ---------------------------------------------------------------------------------------------------


def _delete_objects(client: Any, place: BucketPlace, prefix: str, cost: Cost, keep: set[str] | None = None) -> None:
    from google.api_core.exceptions import NotFound

    for blob in client.list_blobs(place.bucket, prefix=prefix):
        if keep is not None and blob.name[len(prefix) :] in keep:
            continue
        with contextlib.suppress(NotFound):
            blob.delete()
            cost.objects_deleted += 1


def _delete_copy(client: Any, place: BucketPlace, name: str, cost: Cost) -> None:
    """Delete one copy's prefix, its manifest first so it stops looking complete before anything else goes."""
    from google.api_core.exceptions import NotFound

    with contextlib.suppress(NotFound):
        client.bucket(place.bucket).blob(place.copy_prefix(name) + MANIFEST_NAME).delete()
        cost.objects_deleted += 1
    _delete_objects(client, place, place.copy_prefix(name), cost)


def prune_bucket_copies(
    client: Any, url: str, keep: int | None, min_keep: int, *, now: datetime | None = None
) -> BucketPruneResult:
    """Delete our oldest complete copies beyond ``keep`` (never below ``min_keep``, never the newest) and
    prefixes of copies abandoned more than ``STALE_AFTER`` ago; then, if anything went, sweep the objects no
    remaining complete copy references. Holds the lease (CopyBusy while a copy runs)."""
    result = BucketPruneResult()
    if keep is None:
        return result
    place = BucketPlace.parse(url)
    now = now or datetime.now(UTC)
    with RequestMeter(client) as meter, BucketLease(client, place, meter):
        stamps = _stamps(client, place)
        headers = {name: _read_header(client, place, name) for name in stamps}
        complete = [name for name in stamps if headers[name] is not None]
        doomed = complete[: max(0, len(complete) - max(keep, min_keep, 1))]
        abandoned = [
            name
            for name in stamps
            if headers[name] is None
            and now - datetime.strptime(name, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) > STALE_AFTER
        ]
        pending = client.bucket(place.bucket).blob(place.prefix + SWEEP_PENDING)
        owed = doomed or abandoned or pending.exists()
        if owed:
            # Written before anything is deleted: a run that dies from here on leaves the sweep to the next one.
            pending.upload_from_string(b"", content_type="text/plain")
        for name in doomed + abandoned:
            _delete_copy(client, place, name, result.cost)
        result.deleted = [place.url(n) for n in doomed]
        if owed:
            _sweep(client, place, [n for n in complete if n not in doomed], result.cost)
            pending.delete()
    result.cost.requests = meter.count
    return result


def _sweep(client: Any, place: BucketPlace, remaining: list[str], cost: Cost) -> None:
    """Mark every object a remaining complete copy references, then delete the others."""
    referenced: set[str] = set()
    for name in remaining:
        manifest = _read_manifest(client, place, name, cost)
        if manifest is None:
            # Unreadable now although its header was ours a moment ago: delete nothing rather than guess.
            raise dircopy.CopyError(f"{place.url(name)}: manifest could not be read during retention; swept nothing")
        if manifest.header["format"] == FORMAT:
            referenced.update(e.sha256 for e in manifest.entries.values() if e.sha256)
    _delete_objects(client, place, place.prefix + OBJECTS, cost, keep=referenced)


# --- the kind ----------------------------------------------------------------------------------------------------


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
            on_progress=lambda p: run.log(f"{source}: {p.files_done}/{p.files_total} files stored or reused"),
            progress_every=settings.progress_seconds,
            allow_empty=settings.allow_empty,
        )
        run.log(
            f"{result.url}: {result.cost.requests} requests, {result.cost.objects_written} objects written,"
            f" {result.cost.bytes_uploaded} bytes uploaded"
        )
        if result.stats.errors:
            shown = "; ".join(result.stats.errors[:5])
            raise PermanentError(
                f"copy {result.url} finished with {len(result.stats.errors)} errors; pruned nothing: {shown}"
            )
        pruned = prune_bucket_copies(client, dest, plan.retention.keep, plan.retention.min_keep, now=run.period)
    except dircopy.CopyBusy as exc:
        raise TransientError(str(exc)) from exc
    except dircopy.CopyError as exc:
        raise PermanentError(str(exc)) from exc
    except (gexc.TooManyRequests, gexc.ServerError, gexc.ServiceUnavailable, gexc.RetryError) as exc:
        # RetryError: the client's own retries of a timeout or 5xx ran out; the queue tries the run again later.
        raise TransientError(f"Cloud Storage: {exc}", rate_limited=isinstance(exc, gexc.TooManyRequests)) from exc
    except gexc.NotFound as exc:
        raise PermanentError(f"destination bucket of {dest} not found: {exc}") from exc
    except gexc.Forbidden as exc:
        raise PermanentError(f"Cloud Storage denied access to {dest}: {exc}") from exc
    for url in pruned.deleted:
        run.log(f"retention: deleted {url}")
    stats = result.stats.summary()
    stats["pruned"] = pruned.deleted
    stats["cost"] = result.cost.to_json()
    stats["retention_cost"] = pruned.cost.to_json()
    verb = "already complete" if result.already_done else "complete"
    return Done(output=result.url, stats=stats, message=f"copy {result.url} {verb}")


# --- verify and restore ------------------------------------------------------------------------------------------


def _split_copy_url(url: str) -> tuple[BucketPlace, str]:
    """``gs://bucket/prefix/<stamp>`` -> (place of the copies, stamp)."""
    place = BucketPlace.parse(url)
    parent, _, name = place.prefix.rstrip("/").rpartition("/")
    if not STAMP_PATTERN.match(name):
        raise dircopy.CopyError(f"{url}: expected gs://BUCKET/PREFIX/<stamp> of one copy")
    return BucketPlace(place.bucket, f"{parent}/" if parent else ""), name


def _manifest_or_fail(client: Any, place: BucketPlace, name: str, url: str) -> Manifest:
    manifest = _read_manifest(client, place, name)
    if manifest is None:
        raise dircopy.CopyError(f"{url}: no manifest of ours (not a complete copy made by this service)")
    return manifest


def _object_of(place: BucketPlace, name: str, manifest: Manifest, entry: Entry) -> str:
    """The object holding ``entry``'s content: by checksum (format 2) or by path under the copy (format 1)."""
    if manifest.header["format"] == FORMAT_V1:
        object_name = place.copy_prefix(name) + entry.path
        try:
            object_name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("this name cannot be an object name (not UTF-8); format 1 could not store it") from None
        return object_name
    return place.object_name(entry.sha256 or "")


class _HashingWriter:
    """A file-like sink for downloads: hashes what passes and writes it to a descriptor (or nowhere)."""

    def __init__(self, fd: int | None = None):
        self.fd = fd
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        if self.fd is not None:
            dircopy._write_all(self.fd, data)
        return len(data)

    def flush(self) -> None:
        pass


def verify_bucket_copy(client: Any, url: str, *, threads: int = dircopy.DEFAULT_THREADS) -> dircopy.VerifyReport:
    """Download every object a bucket copy's manifest needs and compare it with the manifest (sha256 and size);
    report objects in the copy's prefix the manifest does not know, and the errors recorded when it was made."""
    from google.api_core.exceptions import NotFound

    place, name = _split_copy_url(url)
    manifest = _manifest_or_fail(client, place, name, url)
    bucket = client.bucket(place.bucket)
    prefix = place.copy_prefix(name)
    report = dircopy.VerifyReport(Path(name), recorded_errors=manifest.recorded_errors())
    files = [e for e in manifest.entries.values() if e.kind == "f"]
    by_object: dict[str, list[Entry]] = {}
    for entry in files:
        try:
            by_object.setdefault(_object_of(place, name, manifest, entry), []).append(entry)
        except ValueError as exc:
            report.problems.append(f"{dircopy._escape(entry.path)}: {exc}")

    def check(item: tuple[str, list[Entry]]) -> list[str]:
        object_name, users = item
        sink = _HashingWriter()
        try:
            bucket.blob(object_name).download_to_file(sink, checksum=None)
        except NotFound:
            return [f"{dircopy._escape(e.path)}: object {object_name} missing" for e in users]
        problems = []
        for entry in users:
            shown = dircopy._escape(entry.path)
            if sink.size != entry.size:
                problems.append(f"{shown}: {sink.size} bytes in {object_name}, manifest says {entry.size}")
            elif sink.digest.hexdigest() != entry.sha256:
                problems.append(
                    f"{shown}: content differs from the manifest (sha256 {sink.digest.hexdigest()},"
                    f" expected {entry.sha256})"
                )
        return problems

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gcsverify") as pool:
        for (_object, users), problems in zip(by_object.items(), pool.map(check, by_object.items()), strict=True):
            report.files_checked += len(users)
            report.bytes_checked += sum(e.size for e in users)
            report.problems.extend(problems)
    known = {prefix + MANIFEST_NAME, prefix + LOG_NAME}
    if manifest.header["format"] == FORMAT_V1:
        known |= set(by_object)
    for blob in client.list_blobs(place.bucket, prefix=prefix):
        if blob.name not in known:
            report.problems.append(f"{blob.name[len(prefix) :]}: in the copy but not in its manifest")
    return report


def restore_bucket_copy(
    client: Any,
    url: str,
    target: Path,
    *,
    subpath: str | None = None,
    overwrite: bool = False,
    safety_dest: Path | None = None,
    threads: int = dircopy.DEFAULT_THREADS,
    on_progress: dircopy.ProgressCallback | None = None,
) -> dircopy.RestoreResult:
    """Download a bucket copy (or its directory ``subpath``) into ``target``: missing or empty, or with
    ``overwrite`` after a safety copy of it into ``safety_dest`` (a local 0700 folder; required then). Each file
    is checked against its sha256 before it is renamed into place; modes, owners, times, symlinks and special
    files come from the manifest. Same rules as a local restore (kinds/directory/copies.py ``restore_entries``)."""
    place, name = _split_copy_url(url)
    manifest = _manifest_or_fail(client, place, name, url)
    target = Path(target)
    prefix = (subpath or "").strip("/")
    dircopy.check_subpath(manifest, prefix, url)
    if overwrite and safety_dest is None:
        raise dircopy.CopyError("restoring a bucket copy over a non-empty target needs --safety-dest (a local folder)")
    safety = dircopy.take_safety_copy(target, overwrite, Path(safety_dest or "."), None, threads)
    target.mkdir(parents=True, exist_ok=True)
    bucket = client.bucket(place.bucket)

    def fetch(entry: Entry, fd: int) -> tuple[str, int]:
        from google.api_core.exceptions import NotFound

        sink = _HashingWriter(fd)
        object_name = _object_of(place, name, manifest, entry)
        try:
            bucket.blob(object_name).download_to_file(sink, checksum=None)
        except NotFound:
            raise ValueError(f"object {object_name} missing from the bucket; not restored") from None
        return sink.digest.hexdigest(), sink.size

    result = dircopy.restore_entries(manifest, target, fetch, subpath=prefix, threads=threads, on_progress=on_progress)
    result.safety_copy = safety
    return result
