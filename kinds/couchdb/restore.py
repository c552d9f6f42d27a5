"""Restore of one CouchDB database from a backup chain (a full backup, then its increments in order).

Data file lines go to ``POST _bulk_docs`` with ``new_edits: false`` (the very same revisions come back), several
in flight under the server's writes-per-second limit; a line is split when it is over the restore's own limits or
the server answers 413. A checkpoint after every line lets a crashed restore resume where it stopped: in a file for
the CLI, or in the task's state for a restore that runs in budgeted parts (a drill).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kinds.couchdb.format import Manifest, decode_line, encode_doc, encode_line
from kinds.couchdb.http import CouchServer, HttpRefused
from kinds.couchdb.store import Store, check_data_file, iter_backup_lines
from services.errors import PermanentError, TargetGone, TargetNotEmpty

Progress = Callable[[int], None]  # called with the number of backup lines just applied
LineSeen = Callable[[bytes, str], None]  # a backup line and where it is (file and line number)


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
    finished: bool = True  # False: a budgeted restore stopped at its deadline; go on from ``checkpoint``
    checkpoint: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """Progress of one restore, saved after every applied line so a crashed run can resume: into ``path`` (the
    CLI), or only in memory when ``path`` is None (a budgeted restore hands ``to_json()`` to its next part)."""

    path: Path | None
    database: str
    backups: list[str]
    position: list[int] = field(default_factory=lambda: [0, 0])  # [backup index, lines applied in it]
    ahead: list[int] = field(default_factory=list)  # lines of that backup applied past the position (concurrency)
    marker: str | None = None  # the token this restore left in the target (MARKER_DOC): the same target on resume

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("database", "backups", "position", "ahead", "marker")}

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, self.path)

    @classmethod
    def from_json(cls, data: Any, path: Path | None, database: str, backups: list[str], where: str) -> Checkpoint:
        try:
            position = [int(data["position"][0]), int(data["position"][1])]
            ahead = [int(n) for n in data.get("ahead", [])]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise PermanentError(f"{where} is unreadable ({exc}); remove it to restart the restore") from None
        if data.get("database") != database or data.get("backups") != backups:
            raise PermanentError(
                f"{where} belongs to a restore of {data.get('backups')} into {data.get('database')!r};"
                " remove it or choose another checkpoint file"
            )
        marker = data.get("marker")
        return cls(path, database, backups, position, ahead, marker if isinstance(marker, str) else None)

    @classmethod
    def load(cls, path: Path, database: str, backups: list[str]) -> Checkpoint | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise PermanentError(f"checkpoint {path} is unreadable ({exc}); remove it to restart the restore") from None
        return cls.from_json(data, path, database, backups, f"checkpoint {path}")


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


# A local document (never replicated, never in _changes or the document counts) that a restore leaves in its target
# while it runs: a resumed restore finds it again, or knows the target was dropped or replaced in between.
MARKER_DOC = "_local/backup-scheduler-restore"


def _marker_in(server: CouchServer, db: str) -> dict[str, Any] | None:
    try:
        found = server.get_json(server.db_path(db, MARKER_DOC))
    except TargetGone:
        return None
    return found if isinstance(found, dict) else None


def _leave_marker(server: CouchServer, db: str, checkpoint: Checkpoint) -> None:
    checkpoint.marker = uuid.uuid4().hex
    body: dict[str, Any] = {"token": checkpoint.marker, "backups": checkpoint.backups}
    current = _marker_in(server, db)
    if current is not None:
        body["_rev"] = current.get("_rev")
    server.request("PUT", server.db_path(db, MARKER_DOC), body=json.dumps(body).encode(), write=True)


def _remove_marker(server: CouchServer, db: str) -> None:
    current = _marker_in(server, db)
    if current is not None:
        with contextlib.suppress(TargetGone):
            server.request("DELETE", server.db_path(db, MARKER_DOC), params={"rev": current.get("_rev")}, write=True)


class OutOfTime(Exception):
    """A budgeted restore's deadline passed: the lines in flight were recorded, nothing more is sent."""


def restore_chain(
    server: CouchServer,
    db: str,
    store: Store,
    chain: list[Manifest],
    opts: RestoreOptions,
    *,
    checkpoint_path: Path | None = None,
    resume: dict[str, Any] | None = None,
    deadline: float | None = None,
    safety_backup: Callable[[], Manifest] | None = None,
    progress: Progress | None = None,
    after_line: Callable[[int], None] | None = None,
    on_line: LineSeen | None = None,
) -> RestoreResult:
    """Apply ``chain`` (a full backup then its increments) to ``db``.

    Refuses a non-empty ``db`` (TargetNotEmpty) unless ``opts.overwrite``; then ``safety_backup()`` is taken (and
    confirmed) before the database is dropped and recreated. A checkpoint for the same chain and database resumes
    an interrupted restore instead: the file ``checkpoint_path``, or ``resume`` (a previous part's
    ``RestoreResult.checkpoint``). With ``deadline`` (time.monotonic()) the restore stops once it has passed,
    after at least one line, and answers ``finished`` False with the checkpoint to go on from. ``on_line`` sees
    every line of the chain in order (applied now or before), in this thread while the server works on the lines in
    flight."""
    names = [m.name for m in chain]
    result = RestoreResult(database=db, backups=names)
    if resume is None:
        for manifest in chain:
            # A damaged backup is refused before the target is touched (or dropped, with overwrite).
            check_data_file(store, manifest, check_lines=True)
    if resume is not None:
        checkpoint: Checkpoint | None = Checkpoint.from_json(resume, None, db, names, "the restore's checkpoint")
    else:
        checkpoint = Checkpoint.load(checkpoint_path, db, names) if checkpoint_path is not None else None
    if checkpoint is not None and checkpoint.marker is not None:
        found = _marker_in(server, db)
        if found is None or found.get("token") != checkpoint.marker:
            # The target is not the database this checkpoint's lines went into (dropped or replaced since):
            # the lines it counts as applied are not there. Start again if it is empty, else touch nothing.
            if database_is_empty(server, db) is False:
                raise PermanentError(
                    f"restore target {db!r} on {server.url} is no longer the database this restore's checkpoint was"
                    " written for (it was dropped or replaced, and now holds other data); nothing was written"
                )
            checkpoint = None
    if checkpoint is not None:
        result.resumed = True
        if database_is_empty(server, db) is None:
            server.request("PUT", server.db_path(db), write=True)
    else:
        state = database_is_empty(server, db)
        if state is False:
            if not opts.overwrite:
                raise TargetNotEmpty(
                    f"restore target {db!r} on {server.url} is not empty; restore into an empty or new database,"
                    " or overwrite it (a safety backup of it is taken first)"
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
        if checkpoint.path is not None:
            checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
        _leave_marker(server, db, checkpoint)
        checkpoint.save()
    security = chain[-1].security
    if security:
        server.request("PUT", server.db_path(db, "_security"), body=json.dumps(security).encode(), write=True)
    stop_after_line = after_line
    if deadline is not None:

        def stop_after_line(lines_done: int) -> None:
            if after_line is not None:
                after_line(lines_done)
            if time.monotonic() >= deadline:
                raise OutOfTime

    try:
        with ThreadPoolExecutor(max_workers=opts.concurrency, thread_name_prefix="couchdb-restore") as pool:
            for index, manifest in enumerate(chain):
                if index < checkpoint.position[0]:
                    result.lines_skipped += manifest.batches
                    if on_line is not None:
                        for line_no, line in enumerate(iter_backup_lines(store, manifest)):
                            on_line(line, f"{store.url(manifest.data_name)} line {line_no + 1}")
                    continue
                _restore_one(
                    server,
                    db,
                    store,
                    manifest,
                    index,
                    opts,
                    checkpoint,
                    result,
                    pool,
                    progress,
                    stop_after_line,
                    on_line,
                )
                checkpoint.position, checkpoint.ahead = [index + 1, 0], []
                checkpoint.save()
    except OutOfTime:
        result.finished = False
        result.checkpoint = checkpoint.to_json()
        return result
    _remove_marker(server, db)
    if checkpoint.path is not None:
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
    on_line: LineSeen | None = None,
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
        if on_line is not None:
            on_line(line, f"{store.url(manifest.data_name)} line {line_no + 1}")
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
