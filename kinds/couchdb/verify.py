"""Verify of one CouchDB database against a backup chain: both sides reduced to (id, rev, deleted, attachment
digests) rows in an on-disk SQLite file, then compared with SQL, so even verification does not hold the database
in memory.

Three depths: ``verify_database`` reads every document back (the ``verify`` command); with ``bodies=False`` it
compares only what the changes feed lists, each document's leaf revisions and whether it is deleted (after a
restore, where the bodies were just written from the backup itself); ``check_sample`` compares the document counts
and a sample of documents leaf by leaf (restore drills).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kinds.couchdb.backup import BackupOptions, doc_chunks, prefetched
from kinds.couchdb.format import Manifest, decode_line
from kinds.couchdb.http import CouchServer
from kinds.couchdb.store import Store, check_data_file, iter_backup_lines
from services.errors import TargetGone

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
            counted = ", ".join(f"{count} {what}" for what, count in self.actual.items() if what != "docs")
            return f"{self.database}: verified {self.actual['docs']} docs, {counted}"
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


def _row(doc: dict[str, Any], digests: bool = True) -> tuple[str, str, int, str]:
    """(id, rev, deleted, attachment digests); without ``digests`` the last is empty (nothing decoded or hashed)."""
    atts = (doc.get("_attachments") or {}) if digests else {}
    listed = ",".join(f"{name}={_attachment_digest(att)}" for name, att in sorted(atts.items()))
    return doc["_id"], doc["_rev"], 1 if doc.get("_deleted") else 0, listed


class _Loader:
    """Inserts (id, rev, ...) rows for one side; ``occ`` numbers each run of consecutive rows of one id so
    that a document seen again later (changed during a backup, or in a later increment) replaces its
    earlier rows instead of adding to them."""

    def __init__(self, conn: sqlite3.Connection, side: str, digests: bool = True):
        self.conn = conn
        self.side = side
        self.digests = digests
        self.occ = 0
        self.last_id: str | None = None
        self.buffer: list[tuple[Any, ...]] = []

    def add(self, doc: dict[str, Any]) -> None:
        self.add_row(*_row(doc, self.digests))

    def add_row(self, doc_id: str, rev: str, deleted: int, atts: str) -> None:
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
    check_files: bool = True,
    bodies: bool = True,
    loaded: BackupRows | None = None,
) -> VerifyResult:
    """Compare ``db`` with what ``chain`` holds: live and deleted document counts, the set of (id, rev) leaf
    pairs and the attachment digests. ``differing_ids`` lists the first ``show`` ids that differ.

    Without ``bodies``, only what the changes feed lists is compared (each document's leaf revisions, and whether
    it is deleted): a few requests for the whole database instead of reading every document back, but an
    attachment or body changed without a new revision would not be seen.

    ``loaded``: the backup's rows already loaded while something else read it (a restore), instead of reading it
    again here."""
    mode = chain[-1].mode
    for manifest in chain if check_files else ():
        check_data_file(store, manifest)  # a damaged backup is named as such, not half read
    with contextlib.ExitStack() as stack:
        if loaded is None:
            loaded = stack.enter_context(BackupRows(digests=bodies))
            for manifest in chain:
                for line_no, line in enumerate(iter_backup_lines(store, manifest)):
                    loaded.add_line(line, f"{store.url(manifest.data_name)} line {line_no + 1}")
        loaded.expected.flush()
        conn = loaded.conn
        actual = _Loader(conn, "a")
        if bodies:
            opts = BackupOptions(mode=mode, attachments=False, page_size=page_size)
            for chunk in prefetched(doc_chunks(server, db, 0, opts, with_history=False)):
                for doc in chunk.docs:
                    actual.add(doc)
                if progress is not None:
                    progress(len(chunk.docs))
        else:
            all_leaves = mode == "full"
            for rows in prefetched(server.changes(db, 0, all_leaves=all_leaves, page_size=page_size)):
                for row in rows:
                    # The feed says whether the winner is deleted, which it is only when every leaf is.
                    deleted = 1 if row.get("deleted") else 0
                    for change in row["changes"] if all_leaves else row["changes"][:1]:
                        actual.add_row(row["id"], change["rev"], deleted, "")
                if progress is not None:
                    progress(len(rows))
        actual.flush()
        return _compare(conn, db, show, bodies)


class BackupRows:
    """The backup's side of a verify (rows in a temporary SQLite file), loaded line by line as the lines go by:
    ``with BackupRows(digests) as rows``, ``rows.add_line(...)`` for every line of the chain in order."""

    def __init__(self, digests: bool = True):
        self._folder = tempfile.TemporaryDirectory(prefix="couchdb-verify-")
        self.conn = sqlite3.connect(str(Path(self._folder.name) / "verify.sqlite3"), check_same_thread=False)
        self.conn.executescript(_SCHEMA)
        self.expected = _Loader(self.conn, "e", digests)

    def add_line(self, line: bytes, where: str) -> None:
        for doc in decode_line(line, where):
            self.expected.add(doc)

    def __enter__(self) -> BackupRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
        self._folder.cleanup()


def _load_backup(conn: sqlite3.Connection, store: Store, chain: list[Manifest], digests: bool = True) -> None:
    """The rows of what ``chain`` holds, as side 'e' (expected); attachment digests only when they are compared."""
    conn.executescript(_SCHEMA)
    expected = _Loader(conn, "e", digests)
    for manifest in chain:
        for line_no, line in enumerate(iter_backup_lines(store, manifest)):
            for doc in decode_line(line, f"{store.url(manifest.data_name)} line {line_no + 1}"):
                expected.add(doc)
    expected.flush()


def _summarise(conn: sqlite3.Connection, bodies: bool = True) -> None:
    """Per side and id: the leaves of its latest occurrence (``latest``) and their signature (``sigs``): each
    leaf's revision, deleted flag and attachment digests, or (without ``bodies``) the revisions alone."""
    leaf = "rev || ':' || deleted || ':' || atts" if bodies else "rev"
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
                   group_concat(LEAF, '|') AS sig
            FROM (SELECT * FROM latest ORDER BY side, id, rev) GROUP BY side, id;
        CREATE INDEX sigs_side_id ON sigs (side, id);
        """.replace("LEAF", leaf)
    )


def _counts(conn: sqlite3.Connection, side: str) -> dict[str, int]:
    docs, deleted, revisions, atts = conn.execute(
        "SELECT COALESCE(SUM(all_deleted = 0), 0), COALESCE(SUM(all_deleted = 1), 0),"
        " COALESCE(SUM(revisions), 0), COALESCE(SUM(with_atts), 0) FROM sigs WHERE side = ?",
        (side,),
    ).fetchone()
    return {"docs": docs, "deleted": deleted, "revisions": revisions, "attachments": atts}


def _compare(conn: sqlite3.Connection, db: str, show: int, bodies: bool = True) -> VerifyResult:
    _summarise(conn, bodies)
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
    expected, actual = _counts(conn, "e"), _counts(conn, "a")
    if not bodies:  # what the feed does not say is not compared
        del expected["attachments"], actual["attachments"]
    return VerifyResult(
        database=db, ok=not differing and expected == actual, expected=expected, actual=actual, differing_ids=differing
    )


def check_sample(
    server: CouchServer, db: str, store: Store, chain: list[Manifest], *, sample: int, seed: str
) -> VerifyResult:
    """A cheaper check than ``verify_database``, for restore drills: the number of live documents (and of deleted
    ones, where the server reports it) against what ``chain`` holds, and ``sample`` documents, picked by a hash of
    ``seed`` and their id, read back with all their leaves and compared revision by revision (deleted flags and
    attachment digests too). ``differing_ids`` lists the sampled ids that differ."""
    with tempfile.TemporaryDirectory(prefix="couchdb-drill-") as tmp:
        conn = sqlite3.connect(str(Path(tmp) / "expected.sqlite3"))
        try:
            _load_backup(conn, store, chain)
            _summarise(conn)
            counts = _counts(conn, "e")
            expected = {"docs": counts["docs"], "deleted": counts["deleted"], "sampled": 0}
            conn.create_function("pick", 1, lambda doc_id: hashlib.sha256(f"{seed}\n{doc_id}".encode()).hexdigest())
            picked = [
                row[0]
                for row in conn.execute("SELECT id FROM sigs WHERE side = 'e' ORDER BY pick(id) LIMIT ?", (sample,))
            ]
            wanted = {
                doc_id: _signature(
                    conn.execute("SELECT rev, deleted, atts FROM latest WHERE side = 'e' AND id = ?", (doc_id,))
                )
                for doc_id in picked
            }
        finally:
            conn.close()
    info = server.db_info(db)
    actual = {"docs": int(info.get("doc_count", -1)), "sampled": len(wanted)}
    expected["sampled"] = len(wanted)
    if "doc_del_count" in info:
        actual["deleted"] = int(info["doc_del_count"])
    else:
        expected.pop("deleted")  # pouchdb-server does not report it
    differing = [doc_id for doc_id, signature in wanted.items() if _leaves_of(server, db, doc_id) != signature]
    return VerifyResult(
        database=db, ok=not differing and expected == actual, expected=expected, actual=actual, differing_ids=differing
    )


def _signature(rows: Any) -> list[tuple[str, int, str]]:
    return sorted((str(rev), int(deleted), str(atts)) for rev, deleted, atts in rows)


def _leaves_of(server: CouchServer, db: str, doc_id: str) -> list[tuple[str, int, str]]:
    """Every leaf of ``doc_id`` in ``db`` as (rev, deleted, attachment digests), sorted like ``_signature``."""
    try:
        answer = server.get_json(server.db_path(db, quote(doc_id, safe="")), {"open_revs": "all"})
    except TargetGone:
        return []  # not in the database at all
    docs = [entry["ok"] for entry in answer if isinstance(entry, dict) and "ok" in entry]
    return _signature(_row(doc)[1:] for doc in docs)
