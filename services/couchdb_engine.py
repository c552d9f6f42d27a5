"""Backup, restore and verify of one CouchDB database, streamed end to end.

Used by the ``couchdb`` kind (services/couchdb.py) and the CLI (commands/couchdb.py). Memory is bounded by one
``_changes`` page and one fetched chunk of documents, never by the size of the database:

- backup: ``_changes`` pages -> ``_bulk_get?revs=true&attachments=true`` in chunks -> ``_bulk_docs`` lines ->
  gzip -> a local file or a Cloud Storage upload; read back and checksummed before the manifest is written.
- restore: data file lines (full backup, then each increment in order) -> ``POST _bulk_docs`` with a
  writes-per-second limit, lines split on 413 or when over the restore's own limits, and a checkpoint after
  every line so a crashed restore resumes where it stopped.
- verify: both sides reduced to (id, rev, deleted, attachment digests) rows in an on-disk SQLite file, then
  compared with SQL, so even verification does not hold the database in memory.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import queue
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from services.couchdb_format import (
    DATA_SUFFIX,
    MANIFEST_SUFFIX,
    BatchWriter,
    Manifest,
    decode_line,
    encode_doc,
    encode_line,
    iter_lines,
)
from services.couchdb_http import CouchServer, HttpRefused
from services.couchdb_store import Store
from services.errors import PermanentError, TargetGone

Progress = Callable[[int], None]  # called with the number of documents just processed


@dataclass(frozen=True)
class BackupOptions:
    mode: str = "full"  # "winning": winning revisions; "full": every leaf with history, conflicts, tombstones
    attachments: bool = True
    batch_docs: int = 500
    batch_bytes: int = 8 * 1024 * 1024
    page_size: int = 2000  # _changes rows per request, at most
    read_bytes: int = 4 * 1024 * 1024  # aim of one read (a _changes page with documents, a _bulk_get chunk)


@dataclass(frozen=True)
class RestoreOptions:
    batch_docs: int = 500
    batch_bytes: int = 8 * 1024 * 1024  # Cloudant refuses request bodies over 64 MB; stay well below
    overwrite: bool = False
    concurrency: int = 4  # _bulk_docs requests in flight (the writes-per-second limit applies to all of them)


@dataclass
class RestoreResult:
    database: str
    backups: list[str]
    batches_sent: int = 0  # _bulk_docs requests that succeeded (after splitting)
    lines_done: int = 0  # backup lines applied in this run
    lines_skipped: int = 0  # lines a previous, interrupted run had already applied
    docs: int = 0
    splits: int = 0  # lines split because of 413 or the restore's limits
    resumed: bool = False
    safety_backup: str | None = None


@dataclass
class VerifyResult:
    database: str
    ok: bool
    expected: dict[str, int] = field(default_factory=dict)
    actual: dict[str, int] = field(default_factory=dict)
    differing_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.ok:
            return f"{self.database}: verified {self.actual['docs']} docs, {self.actual['deleted']} deleted, " + (
                f"{self.actual['revisions']} revisions, {self.actual['attachments']} attachments"
            )
        return (
            f"{self.database}: MISMATCH expected {self.expected} got {self.actual};"
            f" first differing ids: {', '.join(self.differing_ids) or '(counts only)'}"
        )


def utc_stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def backup_prefix(plan: str, database: str) -> str:
    """Where the backups of ``database`` by ``plan`` live; the name is percent-encoded ('/' is legal in it)."""
    return f"{plan}/{quote(database, safe='')}/"


def backup_name(plan: str, database: str, period: datetime, mode: str, incremental: bool) -> str:
    return f"{backup_prefix(plan, database)}{utc_stamp(period)}-{mode}{'-incr' if incremental else ''}"


# --------------------------------------------------------------------------------------------------- backup


class _HashingWriter:
    """Passes bytes through to ``raw`` while counting them and computing their SHA-256."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.count += len(data)
        self.raw.write(data)
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
    """The documents for ``refs``, in chunks sized so one chunk stays near ``read_bytes`` in memory."""
    chunk = min(opts.batch_docs, 200)
    i = 0
    while i < len(refs):
        part = refs[i : i + chunk]
        # Keep a document's leaves together: verification groups consecutive rows of one id.
        while i + len(part) < len(refs) and refs[i + len(part)][0] == part[-1][0]:
            part.append(refs[i + len(part)])
        i += len(part)
        docs = server.bulk_get(db, part, attachments=opts.attachments)
        yield docs
        # Attachments make documents vary from bytes to megabytes: aim the next chunk at the byte budget.
        attachment_chars = sum(len(a.get("data", "")) for d in docs for a in (d.get("_attachments") or {}).values())
        per_doc = 1024 + attachment_chars // max(1, len(docs))
        chunk = max(1, min(opts.batch_docs, opts.read_bytes // per_doc))


@dataclass
class _Chunk:
    docs: list[dict[str, Any]]
    seq: Any = None  # set on the last chunk of a _changes page: everything up to it has been read


def _doc_chunks(
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
    for rows in server.changes(db, since, all_leaves=all_leaves, page_size=opts.page_size):
        held: list[dict[str, Any]] | None = None  # one chunk behind, so the page's last chunk can carry its seq
        for docs in _fetch_chunks(server, db, _leaf_refs(rows, all_leaves), opts):
            if held is not None:
                yield _Chunk(held)
            held = docs
        yield _Chunk(held or [], rows[-1]["seq"])


def _prefetched(chunks: Iterator[_Chunk], depth: int = 1) -> Iterator[_Chunk]:
    """Read ahead in a thread: the server works on the next chunk while this process encodes and compresses
    the current one. At most ``depth`` chunks wait, so memory stays bounded."""
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
        reader.join(timeout=5)


def backup_database(
    server: CouchServer,
    db: str,
    store: Store,
    name: str,
    opts: BackupOptions,
    *,
    plan: str = "",
    previous: Manifest | None = None,
    progress: Progress | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Manifest:
    """Write one backup of ``db`` as ``name`` (+ data and manifest suffixes) and return its manifest.

    With ``previous``, only changes since ``previous.seq`` are stored (an increment on top of it). The data
    file is read back and its checksum compared before the manifest is written."""
    started = now()
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
        started=started.isoformat(),
    )
    with store.open_write(manifest.data_name) as raw:
        hashing = _HashingWriter(raw)
        # mtime=0 keeps the output a pure function of the documents (same input, same bytes).
        with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=6, mtime=0) as gz:  # type: ignore[arg-type]
            batches = BatchWriter(gz, opts.batch_docs, opts.batch_bytes)  # type: ignore[arg-type]
            for chunk in _prefetched(_doc_chunks(server, db, since, opts, with_history=previous is not None)):
                for doc in chunk.docs:
                    batches.add(encode_doc(doc))
                    if doc.get("_deleted"):
                        manifest.deleted += 1
                    manifest.attachment_count += len(doc.get("_attachments") or ())
                manifest.docs += len(chunk.docs)
                if chunk.seq is not None:
                    manifest.seq = chunk.seq
                if progress is not None:
                    progress(len(chunk.docs))
            batches.flush()
    manifest.batches = batches.lines
    manifest.bytes_uncompressed = batches.bytes
    manifest.bytes = hashing.count
    manifest.sha256 = hashing.sha256.hexdigest()
    check_data_file(store, manifest)
    manifest.finished = now().isoformat()
    store.write_bytes(manifest.manifest_name, manifest.to_bytes())
    return manifest


def check_data_file(store: Store, manifest: Manifest) -> None:
    """Read the data file back: checksum, gzip integrity (CRC) and line count must match the manifest."""
    digest = hashlib.sha256()
    lines = 0

    class _Tee:
        def __init__(self, raw: IO[bytes]):
            self.raw = raw

        def read(self, n: int = -1) -> bytes:
            data = self.raw.read(n)
            digest.update(data)
            return data

    try:
        with store.open_read(manifest.data_name) as raw, gzip.GzipFile(fileobj=_Tee(raw), mode="rb") as gz:  # type: ignore[call-overload]
            for _ in iter_lines(gz):  # type: ignore[arg-type]
                lines += 1
    except (OSError, EOFError) as exc:
        raise PermanentError(f"backup {store.url(manifest.data_name)} is unreadable: {exc}") from None
    if digest.hexdigest() != manifest.sha256 or lines != manifest.batches:
        raise PermanentError(
            f"backup {store.url(manifest.data_name)} does not match what was written"
            f" (sha256 {digest.hexdigest()[:12]} vs {manifest.sha256[:12]}, lines {lines} vs {manifest.batches})"
        )


def read_manifest(store: Store, name: str) -> Manifest:
    """The manifest called ``name`` (with or without the ``.manifest.json`` suffix)."""
    if name.endswith(MANIFEST_SUFFIX):
        name = name[: -len(MANIFEST_SUFFIX)]
    elif name.endswith(DATA_SUFFIX):
        name = name[: -len(DATA_SUFFIX)]
    where = store.url(name + MANIFEST_SUFFIX)
    try:
        return Manifest.from_bytes(store.read_bytes(name + MANIFEST_SUFFIX), where)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None


def list_manifests(store: Store, prefix: str) -> list[Manifest]:
    """The manifests under ``prefix`` that this tool wrote, oldest first (names sort by time stamp)."""
    found = []
    for name in store.list(prefix):
        if not name.endswith(MANIFEST_SUFFIX):
            continue
        try:
            found.append(read_manifest(store, name))
        except PermanentError:
            continue  # not ours (or unreadable): never treated as a backup, never pruned
    return sorted(found, key=lambda m: m.name)


def resolve_chain(store: Store, name: str) -> list[Manifest]:
    """The full backup and the increments leading to backup ``name``, in the order to apply them."""
    chain = [read_manifest(store, name)]
    while chain[-1].previous is not None:
        if len(chain) > 10000:
            raise PermanentError(f"backup chain of {name} is longer than 10000: a loop in 'previous'?")
        chain.append(read_manifest(store, chain[-1].previous))
    chain.reverse()
    return chain


def iter_backup_lines(store: Store, manifest: Manifest) -> Iterator[bytes]:
    with store.open_read(manifest.data_name) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        yield from iter_lines(gz)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------- restore


@dataclass
class Checkpoint:
    """Progress of one restore, saved after every applied line so a crashed run can resume."""

    path: Path
    database: str
    backups: list[str]
    position: list[int] = field(default_factory=lambda: [0, 0])  # [backup index, lines applied in it]
    ahead: list[int] = field(default_factory=list)  # lines of that backup applied past the position (concurrency)

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        state = {"database": self.database, "backups": self.backups, "position": self.position, "ahead": self.ahead}
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path, database: str, backups: list[str]) -> Checkpoint | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            position = [int(data["position"][0]), int(data["position"][1])]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise PermanentError(f"checkpoint {path} is unreadable ({exc}); remove it to restart the restore") from None
        if data.get("database") != database or data.get("backups") != backups:
            raise PermanentError(
                f"checkpoint {path} belongs to a restore of {data.get('backups')} into {data.get('database')!r};"
                " remove it or choose another checkpoint file"
            )
        return cls(
            path=path,
            database=database,
            backups=backups,
            position=position,
            ahead=list(data.get("ahead", [])),
        )


def database_is_empty(server: CouchServer, db: str) -> bool | None:
    """True/False, or None when the database does not exist. Tombstones count: they are data to overwrite."""
    try:
        info = server.db_info(db)
    except TargetGone:
        return None
    if info.get("doc_count", 0) or info.get("doc_del_count", 0):
        return False
    page = server.get_json(server.db_path(db, "_changes"), {"limit": 1})
    return not page.get("results")


def restore_chain(
    server: CouchServer,
    db: str,
    store: Store,
    chain: list[Manifest],
    opts: RestoreOptions,
    *,
    checkpoint_path: Path,
    safety_backup: Callable[[], Manifest] | None = None,
    progress: Progress | None = None,
    after_line: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Apply ``chain`` (a full backup then its increments) to ``db``.

    Refuses a non-empty ``db`` unless ``opts.overwrite``; then ``safety_backup()`` is taken (and confirmed) before
    the database is dropped and recreated. A checkpoint at ``checkpoint_path`` for the same chain and database
    resumes an interrupted restore instead."""
    names = [m.name for m in chain]
    result = RestoreResult(database=db, backups=names)
    for manifest in chain:
        # A damaged backup is refused before the target is touched (or dropped, with overwrite).
        check_data_file(store, manifest)
    checkpoint = Checkpoint.load(checkpoint_path, db, names)
    if checkpoint is not None:
        result.resumed = True
        if database_is_empty(server, db) is None:
            server.request("PUT", server.db_path(db), write=True)
    else:
        state = database_is_empty(server, db)
        if state is False:
            if not opts.overwrite:
                raise PermanentError(
                    f"restore target {db!r} on {server.url} is not empty; pass --overwrite to replace it"
                    " (a safety backup of it is taken first)"
                )
            if safety_backup is None:
                raise PermanentError(f"restore target {db!r} is not empty and no safety backup is configured")
            taken = safety_backup()
            result.safety_backup = taken.name
            server.request("DELETE", server.db_path(db), write=True)
            state = None
        if state is None:
            server.request("PUT", server.db_path(db), write=True, ok_statuses=(412,))
        checkpoint = Checkpoint(path=checkpoint_path, database=db, backups=names)
        checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save()
    security = chain[-1].security
    if security:
        server.request("PUT", server.db_path(db, "_security"), body=json.dumps(security).encode(), write=True)
    with ThreadPoolExecutor(max_workers=opts.concurrency, thread_name_prefix="couchdb-restore") as pool:
        for index, manifest in enumerate(chain):
            if index < checkpoint.position[0]:
                result.lines_skipped += manifest.batches
                continue
            _restore_one(server, db, store, manifest, index, opts, checkpoint, result, pool, progress, after_line)
            checkpoint.position, checkpoint.ahead = [index + 1, 0], []
            checkpoint.save()
    checkpoint.path.unlink()
    return result


@dataclass
class _LineOutcome:
    docs: int = 0
    requests: int = 0
    splits: int = 0


def _restore_one(
    server: CouchServer,
    db: str,
    store: Store,
    manifest: Manifest,
    index: int,
    opts: RestoreOptions,
    checkpoint: Checkpoint,
    result: RestoreResult,
    pool: ThreadPoolExecutor,
    progress: Progress | None,
    after_line: Callable[[int], None] | None,
) -> None:
    """Post the lines of one backup with up to ``opts.concurrency`` in flight. The checkpoint records the
    contiguous prefix of applied lines plus any applied beyond it, so a resumed run re-sends nothing that
    was confirmed; only lines in flight at a hard kill can be sent twice (harmless with new_edits=false)."""
    resuming_here = index == checkpoint.position[0]
    contiguous = checkpoint.position[1] if resuming_here else 0
    completed: set[int] = set(checkpoint.ahead) if resuming_here else set()
    limits_ok = manifest.batch_docs <= opts.batch_docs and manifest.batch_bytes <= opts.batch_bytes
    pending: dict[Future[_LineOutcome], int] = {}
    failure: BaseException | None = None

    def settle() -> None:
        nonlocal contiguous, failure
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            line_no = pending.pop(future)
            try:
                outcome = future.result()
            except BaseException as exc:  # kept until in-flight lines are recorded, then raised
                failure = failure or exc
                continue
            result.docs += outcome.docs
            result.batches_sent += outcome.requests
            result.splits += outcome.splits
            result.lines_done += 1
            completed.add(line_no)
        while contiguous in completed:
            completed.remove(contiguous)
            contiguous += 1
        checkpoint.position, checkpoint.ahead = [index, contiguous], sorted(completed)
        checkpoint.save()
        for _ in finished:
            if progress is not None:
                progress(1)
        if after_line is not None and failure is None:
            try:
                after_line(result.lines_done)
            except BaseException as exc:
                failure = exc

    for line_no, line in enumerate(iter_backup_lines(store, manifest)):
        if line_no < contiguous or line_no in completed:
            result.lines_skipped += 1
            continue
        while len(pending) >= opts.concurrency and failure is None:
            settle()
        if failure is not None:
            break
        where = f"{store.url(manifest.data_name)} line {line_no + 1}"
        pending[pool.submit(_post_line, server, db, line, where, opts, limits_ok)] = line_no
    while pending:
        settle()
    if failure is not None:
        raise failure


def _post_line(
    server: CouchServer, db: str, line: bytes, where: str, opts: RestoreOptions, trust_limits: bool
) -> _LineOutcome:
    """POST one backup line; split it when it is over the restore's limits or the server answers 413."""
    outcome = _LineOutcome()
    if trust_limits and len(line) <= opts.batch_bytes:
        # The fast path: the line was written within these limits, send its bytes untouched.
        try:
            outcome.docs = _post_body(server, db, line, where, None)
            outcome.requests = 1
            return outcome
        except HttpRefused as exc:
            if exc.status != 413:
                raise
    docs = decode_line(line, where)
    outcome.splits += 1
    for part in _split(docs, opts):
        outcome.docs += _post_docs(server, db, part, where, outcome)
    return outcome


def _split(docs: list[dict[str, Any]], opts: RestoreOptions) -> Iterator[list[dict[str, Any]]]:
    part: list[dict[str, Any]] = []
    size = 0
    for doc in docs:
        n = len(encode_doc(doc))
        if part and (len(part) >= opts.batch_docs or size + n > opts.batch_bytes):
            yield part
            part, size = [], 0
        part.append(doc)
        size += n
    if part:
        yield part


def _post_docs(server: CouchServer, db: str, docs: list[dict[str, Any]], where: str, outcome: _LineOutcome) -> int:
    try:
        count = _post_body(server, db, encode_line(docs), where, docs)
        outcome.requests += 1
        return count
    except HttpRefused as exc:
        if exc.status != 413:
            raise
        if len(docs) == 1:
            raise PermanentError(
                f"{where}: document {docs[0].get('_id')!r} is too large for the server (HTTP 413)"
            ) from None
        outcome.splits += 1
        half = len(docs) // 2
        return _post_docs(server, db, docs[:half], where, outcome) + _post_docs(server, db, docs[half:], where, outcome)


def _post_body(server: CouchServer, db: str, body: bytes, where: str, docs: list[dict[str, Any]] | None) -> int:
    resp = server.request("POST", server.db_path(db, "_bulk_docs"), body=body, write=True)
    answer = resp.json()
    errors = [r for r in answer if isinstance(r, dict) and r.get("error")] if isinstance(answer, list) else []
    if errors:
        first = errors[0]
        raise PermanentError(
            f"{where}: {len(errors)} documents refused, first {first.get('id')!r}:"
            f" {first.get('error')} {first.get('reason', '')}".rstrip()
        )
    if docs is None:
        return body.count(b'"_id":')  # an estimate for progress; exact counts come from verify
    return len(docs)


# --------------------------------------------------------------------------------------------------- verify

_SCHEMA = """
CREATE TABLE rows (side TEXT, id TEXT, rev TEXT, deleted INT, atts TEXT, occ INT);
"""


def _attachment_digest(att: dict[str, Any]) -> str:
    data = att.get("data")
    if isinstance(data, str):
        return "md5-" + base64.b64encode(hashlib.md5(base64.b64decode(data)).digest()).decode()
    return str(att.get("digest", ""))


def _row(doc: dict[str, Any]) -> tuple[str, str, int, str]:
    atts = doc.get("_attachments") or {}
    digests = ",".join(f"{name}={_attachment_digest(att)}" for name, att in sorted(atts.items()))
    return doc["_id"], doc["_rev"], 1 if doc.get("_deleted") else 0, digests


class _Loader:
    """Inserts (id, rev, ...) rows for one side; ``occ`` numbers each run of consecutive rows of one id so
    that a document seen again later (changed during a backup, or in a later increment) replaces its
    earlier rows instead of adding to them."""

    def __init__(self, conn: sqlite3.Connection, side: str):
        self.conn = conn
        self.side = side
        self.occ = 0
        self.last_id: str | None = None
        self.buffer: list[tuple[Any, ...]] = []

    def add(self, doc: dict[str, Any]) -> None:
        doc_id, rev, deleted, atts = _row(doc)
        if doc_id != self.last_id:
            self.occ += 1
            self.last_id = doc_id
        self.buffer.append((self.side, doc_id, rev, deleted, atts, self.occ))
        if len(self.buffer) >= 5000:
            self.flush()

    def flush(self) -> None:
        self.conn.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?)", self.buffer)
        self.buffer = []


def verify_database(
    server: CouchServer,
    db: str,
    store: Store,
    chain: list[Manifest],
    *,
    page_size: int = 2000,
    progress: Progress | None = None,
    show: int = 10,
) -> VerifyResult:
    """Compare ``db`` with what ``chain`` holds: live and deleted document counts, the set of (id, rev) leaf
    pairs and the attachment digests. ``differing_ids`` lists the first ``show`` ids that differ."""
    mode = chain[-1].mode
    with tempfile.TemporaryDirectory(prefix="couchdb-verify-") as tmp:
        conn = sqlite3.connect(str(Path(tmp) / "verify.sqlite3"))
        try:
            conn.executescript(_SCHEMA)
            expected = _Loader(conn, "e")
            for manifest in chain:
                for line_no, line in enumerate(iter_backup_lines(store, manifest)):
                    for doc in decode_line(line, f"{store.url(manifest.data_name)} line {line_no + 1}"):
                        expected.add(doc)
            expected.flush()
            actual = _Loader(conn, "a")
            opts = BackupOptions(mode=mode, attachments=False, page_size=page_size)
            for chunk in _prefetched(_doc_chunks(server, db, 0, opts, with_history=False)):
                for doc in chunk.docs:
                    actual.add(doc)
                if progress is not None:
                    progress(len(chunk.docs))
            actual.flush()
            return _compare(conn, db, show)
        finally:
            conn.close()


def _compare(conn: sqlite3.Connection, db: str, show: int) -> VerifyResult:
    conn.executescript(
        """
        CREATE INDEX rows_side_id ON rows (side, id, occ);
        CREATE TABLE latest AS
            SELECT r.side, r.id, r.rev, r.deleted, r.atts FROM rows r
            JOIN (SELECT side, id, MAX(occ) AS occ FROM rows GROUP BY side, id) m
              ON r.side = m.side AND r.id = m.id AND r.occ = m.occ;
        CREATE TABLE sigs AS
            SELECT side, id, MIN(deleted) AS all_deleted, COUNT(*) AS revisions,
                   SUM(atts != '') AS with_atts,
                   group_concat(rev || ':' || deleted || ':' || atts, '|') AS sig
            FROM (SELECT * FROM latest ORDER BY side, id, rev) GROUP BY side, id;
        CREATE INDEX sigs_side_id ON sigs (side, id);
        """
    )

    def counts(side: str) -> dict[str, int]:
        docs, deleted, revisions, atts = conn.execute(
            "SELECT COALESCE(SUM(all_deleted = 0), 0), COALESCE(SUM(all_deleted = 1), 0),"
            " COALESCE(SUM(revisions), 0), COALESCE(SUM(with_atts), 0) FROM sigs WHERE side = ?",
            (side,),
        ).fetchone()
        return {"docs": docs, "deleted": deleted, "revisions": revisions, "attachments": atts}

    differing = [
        row[0]
        for row in conn.execute(
            """
            SELECT e.id FROM sigs e LEFT JOIN sigs a ON a.side = 'a' AND a.id = e.id
             WHERE e.side = 'e' AND (a.sig IS NULL OR a.sig != e.sig)
            UNION
            SELECT a.id FROM sigs a LEFT JOIN sigs e ON e.side = 'e' AND e.id = a.id
             WHERE a.side = 'a' AND e.id IS NULL
            ORDER BY 1 LIMIT ?
            """,
            (show,),
        )
    ]
    expected, actual = counts("e"), counts("a")
    return VerifyResult(
        database=db, ok=not differing and expected == actual, expected=expected, actual=actual, differing_ids=differing
    )
