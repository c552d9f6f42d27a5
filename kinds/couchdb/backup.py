"""Backup of one CouchDB database, streamed end to end, in as many parts as the time budget needs.

Memory is bounded by one ``_changes`` page and one fetched chunk of documents, never by the size of the database:
``_changes`` pages -> ``_bulk_get?revs=true&attachments=true`` in chunks (or ``_changes?include_docs`` in winning
mode) -> ``_bulk_docs`` lines -> gzip -> a local file or a Cloud Storage upload.

A backup is begun (``begin_backup``: the database's info and ``_security``, where the feed starts), written in
parts (``backup_part``: from the feed's ``since`` onwards until the deadline, each part one gzip member in a file
of its own), and finished (``finish_backup``: the parts joined into the data file, read back and checked against
what each part wrote, then the manifest). ``BackupState`` is the checkpoint between parts: the manifest so far
(counts, the ``since`` sequence reached) and the parts written. A part stops only at the end of a ``_changes``
page, so the sequence it records covers everything it wrote.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, TypeVar
from urllib.parse import quote

from kinds.couchdb.format import BackupOptions, BatchWriter, Manifest, encode_doc
from kinds.couchdb.http import CouchServer, HttpRefused
from kinds.couchdb.store import Store, read_back
from services.errors import PermanentError

T = TypeVar("T")
PART_SUFFIX = ".part-"  # <data file>.part-00003: one part of a backup still being written


def utc_stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def backup_prefix(plan: str, database: str) -> str:
    """Where the backups of ``database`` by ``plan`` live; the name is percent-encoded ('/' is legal in it)."""
    return f"{plan}/{quote(database, safe='')}/"


def backup_name(plan: str, database: str, period: datetime, mode: str, incremental: bool) -> str:
    return f"{backup_prefix(plan, database)}{utc_stamp(period)}-{mode}{'-incr' if incremental else ''}"


# ----------------------------------------------------------------------------------------- reading


@dataclass
class _Hashing:
    """The file a part is written to, seen through its SHA-256 and length as the bytes go by."""

    raw: IO[bytes]
    count: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.sha256.update(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def _leaf_refs(rows: list[dict[str, Any]], all_leaves: bool) -> list[tuple[str, str]]:
    refs: list[tuple[str, str]] = []
    for row in rows:
        changes = row.get("changes") or []
        for change in changes if all_leaves else changes[:1]:
            refs.append((row["id"], change["rev"]))
    return refs


def _fetch_chunks(
    server: CouchServer, db: str, refs: list[tuple[str, str]], opts: BackupOptions
) -> Iterator[list[dict[str, Any]]]:
    """The documents for ``refs``, in order, in chunks sized so one chunk stays near ``read_bytes`` in memory, with
    up to ``opts.fetchers`` chunks requested at once: over a link with latency the round trips overlap instead of
    adding up (memory: at most that many chunks held)."""
    chunk = min(opts.batch_docs, 200)
    i = 0
    in_flight: collections.deque[Future[list[dict[str, Any]]]] = collections.deque()
    with ThreadPoolExecutor(max_workers=max(1, opts.fetchers), thread_name_prefix="couchdb-fetch") as pool:
        try:
            while i < len(refs) or in_flight:
                while i < len(refs) and len(in_flight) < max(1, opts.fetchers):
                    part = refs[i : i + chunk]
                    # Keep a document's leaves together: verification groups consecutive rows of one id.
                    while i + len(part) < len(refs) and refs[i + len(part)][0] == part[-1][0]:
                        part.append(refs[i + len(part)])
                    i += len(part)
                    in_flight.append(pool.submit(server.bulk_get, db, part, attachments=opts.attachments))
                docs = in_flight.popleft().result()
                yield docs
                # Attachments make documents vary from bytes to megabytes: aim later chunks at the byte budget.
                attachment_chars = sum(
                    len(a.get("data", "")) for d in docs for a in (d.get("_attachments") or {}).values()
                )
                per_doc = 1024 + attachment_chars // max(1, len(docs))
                chunk = max(1, min(opts.batch_docs, opts.read_bytes // per_doc))
        finally:
            for future in in_flight:
                future.cancel()


@dataclass
class _Chunk:
    docs: list[dict[str, Any]]
    seq: Any = None  # set on the last chunk of a _changes page: everything up to it has been read


def doc_chunks(
    server: CouchServer, db: str, since: Any, opts: BackupOptions, *, with_history: bool
) -> Iterator[_Chunk]:
    """The documents changed since ``since``, chunk by chunk.

    Full mode: every leaf via ``_bulk_get?revs=true``. Winning mode reads documents straight from
    ``_changes?include_docs=true`` (one request per page, no ``_revisions``), except in an increment: there each
    document needs its history, or restoring it on top of the full backup would start a second branch (a
    spurious conflict) instead of extending the first."""
    if opts.mode == "winning" and not with_history:
        for rows in server.changes_with_docs(
            db, since, attachments=opts.attachments, page_size=opts.page_size, page_bytes=opts.read_bytes
        ):
            yield _Chunk([row["doc"] for row in rows if row.get("doc")], rows[-1]["seq"])
        return
    all_leaves = opts.mode == "full"
    # The next page of the feed is read while this one's documents are fetched: one round trip less per page.
    pages = prefetched(server.changes(db, since, all_leaves=all_leaves, page_size=opts.page_size))
    try:
        for rows in pages:
            held: list[dict[str, Any]] | None = None  # one chunk behind, so the page's last chunk carries its seq
            for docs in _fetch_chunks(server, db, _leaf_refs(rows, all_leaves), opts):
                if held is not None:
                    yield _Chunk(held)
                held = docs
            yield _Chunk(held or [], rows[-1]["seq"])
    finally:
        pages.close()  # type: ignore[attr-defined]


def prefetched(chunks: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Read ahead in a thread: the server works on the next chunk (or page) while this process deals with the
    current one. At most ``depth`` wait, so memory stays bounded."""
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        slots.put(("chunk", chunk), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            slots.put(("error", exc))

    reader = threading.Thread(target=produce, name="couchdb-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            slots.get_nowait()  # a reader waiting to hand over its next item sees the stop at once
        reader.join(timeout=5)


@dataclass
class Part:
    """One part of a backup's data file as it was written: its name, size, SHA-256 and lines."""

    name: str
    bytes: int
    sha256: str
    lines: int


@dataclass
class BackupState:
    """The checkpoint of a backup between parts: ``manifest`` so far (its ``seq`` is where the next part starts)
    and the parts written. ``feed_done`` once a part read the changes feed to its end."""

    manifest: Manifest
    parts: list[Part] = field(default_factory=list)
    feed_done: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": asdict(self.manifest),
            "parts": [asdict(p) for p in self.parts],
            "feed_done": self.feed_done,
        }

    @classmethod
    def from_json(cls, raw: Any) -> BackupState:
        try:
            manifest = Manifest(**raw["manifest"])
            parts = [Part(**p) for p in raw["parts"]]
            return cls(manifest=manifest, parts=parts, feed_done=bool(raw["feed_done"]))
        except (KeyError, TypeError) as exc:
            raise PermanentError(f"a CouchDB backup checkpoint that this service did not write ({exc})") from None


def begin_backup(
    server: CouchServer,
    db: str,
    name: str,
    opts: BackupOptions,
    *,
    plan: str = "",
    previous: Manifest | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> BackupState:
    """The checkpoint of a backup of ``db`` called ``name`` that has written nothing yet. With ``previous``, only
    changes since ``previous.seq`` are stored (an increment on top of it)."""
    if previous is not None and previous.name == name:
        raise PermanentError(f"backup {name} cannot be an increment on top of itself")
    info = server.db_info(db)
    try:
        security = server.get_json(server.db_path(db, "_security"))
    except HttpRefused:
        security = None  # reading _security needs admin rights; without them the backup still has the data
    since: Any = previous.seq if previous is not None else 0
    manifest = Manifest(
        name=name,
        database=db,
        mode=opts.mode,
        attachments=opts.attachments,
        incremental=previous is not None,
        since=since,
        seq=since,
        previous=previous.name if previous is not None else None,
        chain_length=previous.chain_length + 1 if previous is not None else 1,
        plan=plan,
        server=server.url,
        batch_docs=opts.batch_docs,
        batch_bytes=opts.batch_bytes,
        security=security,
        source_doc_count=info.get("doc_count"),
        started=now().isoformat(),
    )
    return BackupState(manifest=manifest)


def backup_part(
    server: CouchServer, store: Store, state: BackupState, opts: BackupOptions, *, deadline: float | None = None
) -> None:
    """Write the next part: the changes since ``state.manifest.seq``, until the feed ends (``feed_done``) or, at
    the end of a ``_changes`` page, ``deadline`` (time.monotonic()) has passed. At least one page is read."""
    manifest = state.manifest
    chunks = prefetched(doc_chunks(server, manifest.database, manifest.seq, opts, with_history=manifest.incremental))
    try:
        write_part(store, state, opts, chunks, deadline=deadline)
    finally:
        chunks.close()  # type: ignore[attr-defined]


def write_part(
    store: Store, state: BackupState, opts: BackupOptions, chunks: Iterable[_Chunk], *, deadline: float | None = None
) -> None:
    """Write ``chunks`` as the next part of ``state``'s backup, stopping after a chunk that carries a sequence once
    ``deadline`` has passed (then ``feed_done`` is False)."""
    manifest = state.manifest
    # Named after this backup's beginning too: a run that took over from a stalled one never writes its parts.
    began = hashlib.sha256(manifest.started.encode()).hexdigest()[:8]
    part_name = f"{manifest.data_name}{PART_SUFFIX}{began}-{len(state.parts):05d}"
    # Counted here and added to the manifest only with the part: a part that fails half way changes nothing.
    docs = deleted = attachments = 0
    seq = manifest.seq
    ended = True
    with store.open_write(part_name) as raw:
        hashing = _Hashing(raw)
        # mtime=0 keeps the output a pure function of the documents (same input, same bytes).
        with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=6, mtime=0) as gz:  # type: ignore[arg-type]
            batches = BatchWriter(gz, opts.batch_docs, opts.batch_bytes)  # type: ignore[arg-type]
            for chunk in chunks:
                for doc in chunk.docs:
                    batches.add(encode_doc(doc))
                    if doc.get("_deleted"):
                        deleted += 1
                    attachments += len(doc.get("_attachments") or ())
                docs += len(chunk.docs)
                if chunk.seq is not None:
                    seq = chunk.seq
                    if deadline is not None and time.monotonic() >= deadline:
                        ended = False
                        break
            batches.flush()
    state.parts.append(Part(part_name, hashing.count, hashing.sha256.hexdigest(), batches.lines))
    manifest.seq = seq
    manifest.docs += docs
    manifest.deleted += deleted
    manifest.attachment_count += attachments
    manifest.batches += batches.lines
    manifest.bytes_uncompressed += batches.bytes
    state.feed_done = ended


def finish_backup(
    store: Store, state: BackupState, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> Manifest:
    """Join the parts into the data file, read it back (each part's bytes must be what was written, every gzip
    member whole, the line count right), then write the manifest: from then on it is a backup."""
    manifest = state.manifest
    parts = state.parts
    if not parts:
        raise PermanentError(f"backup {manifest.name} has no parts to finish")
    if all(store.exists(p.name) for p in parts):
        store.compose([p.name for p in parts], manifest.data_name)
    elif not store.exists(manifest.data_name):
        # Neither the parts nor what they were joined into: this backup cannot be finished, only begun again.
        raise PermanentError(f"backup {store.url(manifest.name)}: its parts are gone before they were joined")
    cuts, offset = [], 0
    for part in parts[:-1]:
        offset += part.bytes
        cuts.append(offset)
    found = read_back(store, manifest.data_name, cuts)
    expected = [p.sha256 for p in parts]
    if found.pieces != expected or found.lines != manifest.batches:
        raise PermanentError(
            f"backup {store.url(manifest.data_name)} does not match what was written"
            f" ({sum(a != b for a, b in zip(found.pieces, expected, strict=False))} of {len(parts)} parts differ,"
            f" lines {found.lines} vs {manifest.batches})"
        )
    manifest.bytes = offset + parts[-1].bytes
    manifest.sha256 = found.sha256
    manifest.finished = now().isoformat()
    store.write_bytes(manifest.manifest_name, manifest.to_bytes())
    return manifest


def backup_database(
    server: CouchServer,
    db: str,
    store: Store,
    name: str,
    opts: BackupOptions,
    *,
    plan: str = "",
    previous: Manifest | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Manifest:
    """One backup of ``db`` as ``name`` in one go (no budget: a single part), returning its manifest."""
    state = begin_backup(server, db, name, opts, plan=plan, previous=previous, now=now)
    while not state.feed_done:
        backup_part(server, store, state, opts)
    return finish_backup(store, state, now)


def import_documents(
    store: Store,
    name: str,
    database: str,
    pages: Iterable[list[dict[str, Any]]],
    *,
    mode: str,
    source: str,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Manifest:
    """A backup called ``name`` of ``database`` holding the documents of ``pages`` as another tool saved them
    (``source`` says which), written and checked like any backup: from then on it restores and verifies as one."""
    opts = BackupOptions(mode=mode)
    manifest = Manifest(
        name=name,
        database=database,
        mode=mode,
        attachments=True,
        incremental=False,
        since=0,
        seq=0,
        plan="import",
        server=source,
        batch_docs=opts.batch_docs,
        batch_bytes=opts.batch_bytes,
        started=now().isoformat(),
    )
    state = BackupState(manifest=manifest)
    write_part(store, state, opts, (_Chunk(docs) for docs in pages))
    return finish_backup(store, state, now)
