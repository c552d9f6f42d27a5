"""Verify of one CouchDB database against a backup chain: both sides reduced to (id, rev, deleted, attachment
digests) rows in an on-disk SQLite file, then compared with SQL, so even verification does not hold the database
in memory."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kinds.couchdb.backup import BackupOptions, doc_chunks, prefetched
from kinds.couchdb.format import Manifest, decode_line
from kinds.couchdb.http import CouchServer
from kinds.couchdb.store import Store, iter_backup_lines

Progress = Callable[[int], None]  # called with the number of documents just read


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
            for chunk in prefetched(doc_chunks(server, db, 0, opts, with_history=False)):
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
