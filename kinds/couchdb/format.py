"""The on-disk format of a CouchDB backup: a gzip'd JSON-lines data file plus a JSON manifest.

Every line of the data file is a complete ``_bulk_docs`` request body, ``{"docs": [...], "new_edits": false}``,
so restoring is "POST each line" (even ``zcat x.jsonl.gz | head -1 | curl -d @- .../_bulk_docs`` works). Each
document keeps its ``_id``, ``_rev``, ``_revisions`` history, ``_deleted`` flag and inline (base64) attachments,
which is what makes ``new_edits: false`` recreate the very same revisions.

The manifest (``<name>.manifest.json``) is written last and is what makes a backup a backup: the database, the
mode, counts, the sequence to continue from (incremental backups), ``_security``, the data file's SHA-256, and
``created_by`` so retention only ever prunes what this tool wrote.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

FORMAT = "backup-scheduler/couchdb/1"
CREATED_BY = "backup-scheduler"
TOOL_VERSION = "0.1.0"
MANIFEST_SUFFIX = ".manifest.json"
DATA_SUFFIX = ".jsonl.gz"

_LINE_HEAD = b'{"docs":['
_LINE_TAIL = b'],"new_edits":false}\n'


@dataclass(frozen=True)
class BackupOptions:
    mode: str = "full"  # "winning": winning revisions; "full": every leaf with history, conflicts, tombstones
    attachments: bool = True
    batch_docs: int = 500
    batch_bytes: int = 8 * 1024 * 1024
    page_size: int = 2000  # _changes rows per request, at most
    read_bytes: int = 4 * 1024 * 1024  # aim of one read (a _changes page with documents, a _bulk_get chunk)
    fetchers: int = 4  # _bulk_get requests in flight at once (full mode, increments, verify)


@dataclass
class Manifest:
    """What one backup holds. ``seq`` is where an incremental backup that follows this one starts."""

    name: str  # store-relative name without suffix, e.g. "nightly/orders/20261123T020000Z-full"
    database: str
    mode: str  # "winning" | "full"
    attachments: bool
    incremental: bool
    since: Any  # the sequence this backup started from (0 for a full backup)
    seq: Any  # the last sequence this backup covers
    previous: str | None = None  # name of the backup this increment applies on top of
    chain_length: int = 1  # 1 for a full backup, n for the n-1'th increment after it
    plan: str = ""
    server: str = ""  # redacted: never credentials
    docs: int = 0  # document revisions written (leaves, in full mode)
    deleted: int = 0  # of which tombstones
    attachment_count: int = 0
    batches: int = 0  # lines in the data file
    batch_docs: int = 0  # the per-line document limit used when writing
    batch_bytes: int = 0  # the per-line byte limit used when writing
    bytes_uncompressed: int = 0
    bytes: int = 0
    sha256: str = ""
    security: dict[str, Any] | None = None
    source_doc_count: int | None = None
    started: str = ""
    finished: str = ""
    format: str = FORMAT
    created_by: str = CREATED_BY
    tool_version: str = TOOL_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def data_name(self) -> str:
        return self.name + DATA_SUFFIX

    @property
    def manifest_name(self) -> str:
        return self.name + MANIFEST_SUFFIX

    def to_bytes(self) -> builtins.bytes:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: builtins.bytes, where: str) -> Manifest:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{where}: not a JSON manifest ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a backup-scheduler CouchDB manifest (format {data.get('format')!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class BatchWriter:
    """Groups serialised documents into ``_bulk_docs`` lines bounded by count and by bytes.

    A single document larger than ``max_bytes`` gets a line of its own rather than being refused: the
    server decides whether it accepts it, and the restore reports it by id if not."""

    def __init__(self, out: IO[bytes], max_docs: int, max_bytes: int):
        self.out = out
        self.max_docs = max_docs
        self.max_bytes = max_bytes
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.lines = 0
        self.bytes = 0

    def add(self, doc_json: bytes) -> None:
        overhead = len(_LINE_HEAD) + len(_LINE_TAIL) + len(self._pending)
        if self._pending and (
            len(self._pending) >= self.max_docs or overhead + self._pending_bytes + len(doc_json) + 1 > self.max_bytes
        ):
            self.flush()
        self._pending.append(doc_json)
        self._pending_bytes += len(doc_json)

    def flush(self) -> None:
        if not self._pending:
            return
        line = _LINE_HEAD + b",".join(self._pending) + _LINE_TAIL
        self.out.write(line)
        self.lines += 1
        self.bytes += len(line)
        self._pending = []
        self._pending_bytes = 0


def encode_line(docs: list[dict[str, Any]]) -> bytes:
    """One ``_bulk_docs`` body for ``docs`` (used when a restore has to split a line)."""
    return _LINE_HEAD + b",".join(encode_doc(d) for d in docs) + _LINE_TAIL


def encode_doc(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def decode_line(line: bytes, where: str) -> list[dict[str, Any]]:
    try:
        body = json.loads(line)
        docs = body["docs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not a _bulk_docs line ({exc})") from None
    if not isinstance(docs, list):
        raise ValueError(f"{where}: 'docs' is not a list")
    return docs


def iter_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The lines of a (decompressed) data stream, one at a time."""
    for line in stream:
        if line.strip():
            yield line


@dataclass
class ForeignFile:
    """What a backup file of another tool (IBM's couchbackup) holds, read as it goes: its header, if it has one, and
    how many attachments it only names (a backup taken without ``--attachments`` keeps stubs, not the data)."""

    tool: str = "couchbackup"
    version: str = ""
    mode: str = "shallow"
    stubs_dropped: int = 0

    def pages(self, lines: Iterator[bytes], where: str) -> Iterator[list[dict[str, Any]]]:
        """The arrays of documents in ``lines``; the header and resume markers are read, not returned. An
        attachment stub cannot be restored without its data (``missing_stub``): it is left out and counted."""
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise ValueError(f"{where} line {number}: not JSON") from None
            if isinstance(item, dict):
                if number == 1 and "name" in item and "mode" in item:
                    self.version, self.mode = str(item.get("version", "")), str(item["mode"])
                continue  # the header, or a resume marker
            if not isinstance(item, list):
                raise ValueError(f"{where} line {number}: neither a header nor an array of documents")
            yield [self._without_stubs(doc) for doc in item if isinstance(doc, dict) and "_id" in doc]

    def _without_stubs(self, doc: dict[str, Any]) -> dict[str, Any]:
        attachments = doc.get("_attachments")
        if not isinstance(attachments, dict):
            return doc
        kept = {name: att for name, att in attachments.items() if not (isinstance(att, dict) and att.get("stub"))}
        self.stubs_dropped += len(attachments) - len(kept)
        if len(kept) == len(attachments):
            return doc
        trimmed = {k: v for k, v in doc.items() if k != "_attachments"}
        return {**trimmed, "_attachments": kept} if kept else trimmed
