"""Masking a ``mariadb-dump`` file on its way into the scratch database (local profile, ``mask_mode: stream``).

The dump goes to the loader in its own order. Text that holds no rows of a ruled table passes unchanged, in large
blocks, without being parsed; every ``INSERT INTO `t` VALUES (...),(...);`` statement of a ruled table is parsed
row by row, its ruled columns replaced by their masked values and written back in the same form. Unmasked
personal data therefore never reaches scratch, and the table is written once instead of loaded, read back,
rewritten and re-indexed.

A masking thread runs ahead of the loader: set kinds (``email``, ``hash``) need every value of their domain
before the first one can be given out (collision resolution), so it first collects them, then masks the ruled
statements into a spool file while the loader is still busy with the tables that come before them. Indexes on
ruled columns are built after the rows are in (random masked values make index inserts slow).

The same ``Masker`` is used as by the in-place masking of ``kinds.sqlsync.db``, on the same strings, so both give the
same staging data. Anything this parser does not recognise inside a ruled table's data stops the load with the
table, the line and the text; nothing unmasked is passed through.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import multiprocessing
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

from kinds.sqlsync.masking import SET_KINDS, ColumnRule, Masker

# One SQL value as mariadb-dump writes it: a quoted string (maybe with a charset introducer such as _binary, or
# b'' / x''), or a bare token (number, NULL, 0x... with --hex-blob). Quoted strings escape with backslashes.
_QUOTED = r"(?:_[A-Za-z0-9]+ ?|[bBxX])?'[^'\\]*(?:\\.[^'\\]*)*'"
_VALUE = rf"({_QUOTED}|[^,()']+)"
_COLUMN = re.compile(r"^  `((?:[^`]|``)+)` ")
_INDEX = re.compile(r"^  (UNIQUE KEY|KEY) `((?:[^`]|``)+)` (\(.*)$")
_IDENTIFIER = re.compile(r"`((?:[^`]|``)+)`")
# mariadb-dump's section comments ("--\n-- Table structure for table `t`", ...) and the first line of its trailer.
_SECTION = re.compile(
    rb"^--\n-- (Table structure for table `((?:[^`\n]|``)+)`|Temporary (?:table|view) structure"
    rb"|Final view structure|Dumping routines|Dumping events)",
    re.MULTILINE,
)
_TRAILER = re.compile(rb"^/\*!40103 SET TIME_ZONE=@OLD_TIME_ZONE \*/;", re.MULTILINE)
# Triggers, routines and events: mariadb-dump writes their bodies between "DELIMITER ;;" and "DELIMITER ;". An
# INSERT in a trigger body is a statement of the trigger, not rows of its table.
_DELIMITER_ON, _DELIMITER_OFF = b"\nDELIMITER ;;\n", b"\nDELIMITER ;\n"


def _bodies(dump: mmap.mmap) -> list[tuple[int, int]]:
    """Where the trigger and routine bodies are. Found by plain byte search: a regular expression anchored at line
    starts tries every byte of the dump (seconds per pass over a few hundred MB); ``find`` skips to the candidates."""
    bodies: list[tuple[int, int]] = []
    pos = 0
    while True:
        start = dump.find(_DELIMITER_ON, pos)
        if start < 0:
            return bodies
        end = dump.find(_DELIMITER_OFF, start)
        end = len(dump) if end < 0 else end + len(_DELIMITER_OFF)
        bodies.append((start, end))
        pos = end


_INSERT = re.compile(r"^INSERT INTO `((?:[^`]|``)+)`(?: \(([^)]*)\))? VALUES\s*")
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
_UNESCAPED = {"0": "\0", "n": "\n", "r": "\r", "t": "\t", "b": "\b", "Z": "\x1a"}
_NEEDS_ESCAPE = re.compile(r"[\\'\0\n\r\x1a]")
_ESCAPES = str.maketrans({"\\": "\\\\", "'": "\\'", "\0": "\\0", "\n": "\\n", "\r": "\\r", "\x1a": "\\Z"})


PASS_BLOCK = 8 << 20  # text without ruled rows goes to the loader in blocks of this many bytes


class DumpFormatError(ValueError):
    """A ruled table's data in the dump is not in the form this parser knows: the load stops, nothing leaks."""


@dataclass
class StreamReport:
    rows: int = 0
    values: int = 0  # distinct values of set kinds (email, hash) mapped
    tables: list[str] = field(default_factory=list)
    # Where the time went: "first-pass" (set kinds collected and mapped), "written" (the whole stream), "waited"
    # (of which the loader's side waited for masked statements).
    seconds: dict[str, float] = field(default_factory=dict)


def decode_value(token: str) -> str | None:
    """The string a dumped SQL value stands for (``None`` for NULL)."""
    if token[0] == "'":  # the common case: a plain quoted string
        body = token[1:-1]
        return body if "\\" not in body else _unescape(body)
    if token == "NULL":
        return None
    quote = token.find("'")
    if quote > 0 and token.endswith("'"):
        body = _unescape(token[quote + 1 : -1])
        if quote == 1 and token[0] in "xX":
            return bytes.fromhex(body).decode("utf-8", "surrogateescape")
        return body
    if token.startswith(("0x", "0X")):
        return bytes.fromhex(token[2:]).decode("utf-8", "surrogateescape")
    return token  # a number: masked as its text, as the database's CONVERT would give it


def _unescape(body: str) -> str:
    return _UNESCAPE.sub(lambda m: _UNESCAPED.get(m.group(1), m.group(1)), body) if "\\" in body else body


def encode_value(value: str | None) -> str:
    if value is None:
        return "NULL"
    if _NEEDS_ESCAPE.search(value):
        value = value.translate(_ESCAPES)
    return f"'{value}'"


def _unquote_identifier(name: str) -> str:
    return name.replace("``", "`")


def _count_lines(dump: mmap.mmap, start: int, end: int) -> int:
    """Newlines in ``dump[start:end]``, counted a block at a time (no copy of the whole range)."""
    return sum(dump[at : min(end, at + PASS_BLOCK)].count(b"\n") for at in range(start, end, PASS_BLOCK))


def _decode(raw: bytes) -> str:
    """Dump bytes as text; bytes that are not UTF-8 survive the round trip (surrogateescape)."""
    return raw.decode("utf-8", "surrogateescape")


class _TableShape:
    """Column order of one ruled table (from its CREATE TABLE, or the INSERT's own column list) and the row
    pattern for it."""

    def __init__(self, table: str, columns: list[str]):
        self.table = table
        self.columns = columns
        self.row = re.compile(r"\(" + ",".join([_VALUE] * len(columns)) + r"\)")

    def rows(self, statement: str, start: int, where: str) -> Iterator[re.Match[str]]:
        """Every row of one INSERT statement, checking that the rows cover it exactly. Rows are separated by a
        comma, and a newline too where mariadb-dump writes one row per line (10.5 and later)."""
        pos = start
        row = self.row
        end = len(statement.rstrip("\n"))
        while True:
            match = row.match(statement, pos)
            if match is None:
                raise DumpFormatError(
                    f"{where}: cannot read a row of {len(self.columns)} values of table {self.table}"
                    f" ({', '.join(self.columns)}) at {statement[pos : pos + 80]!r}"
                )
            yield match
            pos = match.end()
            if pos < end and statement[pos] == ",":
                pos += 2 if statement[pos + 1 : pos + 2] == "\n" else 1
                continue
            if statement[pos:end] == ";":
                return
            raise DumpFormatError(
                f"{where}: unexpected text after a row of {self.table}: {statement[pos : pos + 80]!r}"
            )


class DumpMasker:
    """One dump file and the rules for it: ``collect`` (first pass: set kinds) and ``mask_ahead`` (the ruled
    statements, into a spool) run on the masking thread, ``write_masked`` (the stream, in order) on the other."""

    def __init__(self, path: str, rules: list[ColumnRule], masker: Masker):
        self.path = path
        self.masker = masker
        self.rules: dict[str, dict[str, ColumnRule]] = {}
        for rule in rules:
            self.rules.setdefault(rule.table, {})[rule.column] = rule
        self.domain_maps: dict[str, dict[str, str]] = {}
        self.report = StreamReport()
        self._prepared: dict[
            tuple[str, tuple[str, ...]], tuple[_TableShape, list[tuple[int, Callable[[str], str]]]]
        ] = {}

    # ---- reading the dump --------------------------------------------------------------------------------------

    def _scan(
        self, deferred: list[str] | None = None, ruled_last: bool = False
    ) -> Iterator[tuple[bytes, _TableShape | None, int, int]]:
        """The dump in pieces: ``(bytes, None, 0, line)`` for text that passes unchanged (large blocks, never
        parsed), ``(statement, shape, rows_start, line)`` for each INSERT statement of a ruled table.

        Ruled tables' statements are found by a byte search for a line starting with CREATE TABLE, INSERT or
        REPLACE naming the table (a newline never occurs inside a dumped string, so such a line is a statement).
        With ``deferred``, a ruled table's CREATE TABLE comes out without its indexes on ruled columns, and the
        ALTER TABLE statements that add them back are appended to ``deferred``: masked values arrive in random
        order, and InnoDB inserts them into an index about twice as slowly as it builds it afterwards by sorting.
        With ``ruled_last``, the ruled tables' sections come after every other table (see ``_spans``).
        """
        names = b"|".join(re.escape(("`" + t.replace("`", "``") + "`").encode()) for t in sorted(self.rules))
        statement_start = re.compile(rb"(?:\A|\n)(CREATE TABLE|INSERT|REPLACE)\b[^\n`]*(" + names + rb")")
        shapes: dict[str, _TableShape] = {}
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as dump:
            spans = self._spans(dump) if ruled_last else [(0, len(dump))]
            bodies = _bodies(dump)
            body_starts = [start for start, _ in bodies]
            for span_start, span_end in spans:
                pos, line = span_start, _count_lines(dump, 0, span_start) + 1
                for found in statement_start.finditer(dump, span_start, span_end):
                    at = found.start(1)
                    if at < pos:
                        continue
                    inside = bisect.bisect_right(body_starts, at) - 1
                    if inside >= 0 and at < bodies[inside][1]:
                        continue  # in a trigger or routine body: passed on as it is, with the text around it
                    for block in range(pos, at, PASS_BLOCK):
                        chunk = dump[block : min(at, block + PASS_BLOCK)]
                        line += chunk.count(b"\n")
                        yield chunk, None, 0, line
                    table = _unquote_identifier(found.group(2)[1:-1].decode("utf-8", "surrogateescape"))
                    where = f"{self.path}:{line}"
                    if found.group(1) == b"CREATE TABLE":
                        closing = dump.find(b"\n)", at, span_end)
                        end = dump.find(b";\n", closing, span_end) + 2 if closing >= 0 else 1
                    else:
                        end = dump.find(b";\n", at, span_end) + 2
                    if end < 2:
                        raise DumpFormatError(f"{where}: the dump ends inside a statement of table {table}")
                    statement = dump[at:end]
                    first_line = line
                    line += statement.count(b"\n")
                    pos = end
                    if found.group(1) == b"CREATE TABLE":
                        yield self._created(table, statement, where, shapes, deferred), None, 0, first_line
                        continue
                    text = _decode(statement[:4096])
                    insert = _INSERT.match(text)
                    if insert is None or _unquote_identifier(insert.group(1)) != table:
                        raise DumpFormatError(f"{where}: unexpected statement for table {table}: {text[:80]!r}")
                    shape = shapes.get(table)
                    if insert.group(2) is not None:
                        listed = [_unquote_identifier(c.strip().strip("`")) for c in insert.group(2).split(",")]
                        shape = self._shape(table, listed, where)
                    if shape is None:
                        raise DumpFormatError(f"{where}: rows of {table} come before its CREATE TABLE")
                    yield statement, shape, insert.end(), first_line
                for block in range(pos, span_end, PASS_BLOCK):
                    chunk = dump[block : min(span_end, block + PASS_BLOCK)]
                    line += chunk.count(b"\n")
                    yield chunk, None, 0, line

    def _spans(self, dump: mmap.mmap) -> list[tuple[int, int]]:
        """The dump as byte ranges in the order to load them: every other table first, then the ruled tables'
        sections (structure, rows, triggers), then views, routines and the trailer. The masking thread then has
        the whole time the other tables take to load, whatever the tables are called (mariadb-dump writes them
        alphabetically). The order is safe to change: the dump turns foreign key checks off until its trailer,
        and views and routines come after. A dump without mariadb-dump's section comments or trailer is loaded
        in its own order."""
        trailer = _TRAILER.search(dump)
        marks = list(_SECTION.finditer(dump, 0, trailer.start() if trailer else 0))
        if trailer is None or not marks:
            return [(0, len(dump))]
        bounds = [mark.start() for mark in marks] + [trailer.start()]
        tables = [i for i, mark in enumerate(marks) if mark.group(1).startswith(b"Table structure")]
        insert_at = bounds[tables[-1] + 1] if tables else trailer.start()
        ruled = [
            (bounds[i], bounds[i + 1])
            for i in tables
            if _unquote_identifier(marks[i].group(2).decode("utf-8", "surrogateescape")) in self.rules
        ]
        spans, pos = [], 0
        for start, end in ruled:
            spans.append((pos, start))
            pos = end
        spans.append((pos, insert_at))
        spans += ruled
        spans.append((insert_at, len(dump)))
        return [(start, end) for start, end in spans if end > start]

    def _created(
        self, table: str, statement: bytes, where: str, shapes: dict[str, _TableShape], deferred: list[str] | None
    ) -> bytes:
        """Learn a ruled table's columns from its CREATE TABLE; return the statement (indexes deferred or not)."""
        created_lines = _decode(statement).splitlines(keepends=True)
        closing = next((i for i, line in enumerate(created_lines) if line.startswith(")")), len(created_lines))
        columns = [_unquote_identifier(m.group(1)) for m in map(_COLUMN.match, created_lines[1:closing]) if m]
        shapes[table] = self._shape(table, columns, where)
        if deferred is None:
            return statement
        return "".join(self._defer_indexes(table, created_lines, deferred)).encode("utf-8", "surrogateescape")

    def _defer_indexes(self, table: str, created_lines: list[str], deferred: list[str]) -> list[str]:
        """``created_lines`` (a CREATE TABLE: its header line, one line per column or index, then the lines from
        the closing parenthesis on, table options and partitions included) without the plain and unique indexes
        that cover a ruled column (unless a foreign key of the table uses that column); their ALTER TABLE goes to
        ``deferred``."""
        end = next((i for i, line in enumerate(created_lines) if line.startswith(")")), len(created_lines))
        header, body, closing = created_lines[0], created_lines[1:end], "".join(created_lines[end:])
        ruled = set(self.rules[table])
        foreign = {
            _unquote_identifier(name)
            for line in body
            if line.startswith("  CONSTRAINT ") and " FOREIGN KEY " in line
            for name in _IDENTIFIER.findall(line.split(" FOREIGN KEY ", 1)[1].split(" REFERENCES ", 1)[0])
        }
        kept, moved = [], []
        for line in body:
            index = _INDEX.match(line)
            if index:
                covered = {_unquote_identifier(name) for name in _IDENTIFIER.findall(index.group(3))}
                if covered & ruled and not covered & foreign:
                    moved.append(line.strip().rstrip(","))
                    continue
            kept.append(line.rstrip("\n").rstrip(","))
        if moved:
            quoted = "`" + table.replace("`", "``") + "`"
            deferred.append(f"ALTER TABLE {quoted} " + ", ".join(f"ADD {definition}" for definition in moved) + ";\n")
        return [header, ",\n".join(kept) + "\n", closing]

    def _shape(self, table: str, columns: list[str], where: str) -> _TableShape:
        missing = sorted(set(self.rules[table]) - set(columns))
        if missing:
            raise DumpFormatError(
                f"{where}: schema drift: table {table} has no column {', '.join(missing)} in the dump"
                f" (columns: {', '.join(columns)})"
            )
        return _TableShape(table, columns)

    # ---- pass 1: the values of set kinds -----------------------------------------------------------------------

    def needs_collect(self) -> bool:
        return any(rule.kind in SET_KINDS for table in self.rules.values() for rule in table.values())

    def collect(self) -> None:
        """Read every value of the set-kind columns and compute one mapping per domain (over all its columns)."""
        began = time.perf_counter()
        values: dict[str, set[str]] = {}
        first_rule: dict[str, ColumnRule] = {}
        for raw, shape, start, number in self._scan():
            if shape is None:
                continue
            picks = []
            for index, column in enumerate(shape.columns):
                rule = self.rules[shape.table].get(column)
                if rule is not None and rule.kind in SET_KINDS:
                    key = f"{rule.kind}:{rule.domain}"
                    first_rule.setdefault(key, rule)
                    picks.append((index + 1, values.setdefault(key, set())))
            if not picks:
                continue
            for match in shape.rows(_decode(raw), start, f"{self.path}:{number}"):
                for group, target in picks:
                    token = match.group(group)
                    if token != "NULL":
                        target.add(decode_value(token))  # type: ignore[arg-type]
        for key, found in values.items():
            self.domain_maps[key] = self.masker.mapping(first_rule[key], found)
            self.report.values += len(found)
        self.report.seconds["first-pass"] = round(time.perf_counter() - began, 3)

    # ---- pass 2: the masked stream -----------------------------------------------------------------------------

    def _column_function(self, rule: ColumnRule) -> Callable[[str], str]:
        """Dumped token in, masked token out. NULL stays NULL (the ``null`` kind makes everything NULL)."""
        if rule.kind == "null":
            return lambda token: "NULL"
        if rule.kind in SET_KINDS:
            mapping = self.domain_maps[f"{rule.kind}:{rule.domain}"]
            return lambda token: token if token == "NULL" else encode_value(mapping[decode_value(token)])  # type: ignore[index]
        function = self.masker.value_function(rule)
        return lambda token: token if token == "NULL" else encode_value(function(decode_value(token)))  # type: ignore[arg-type]

    def mask_statement(
        self, table: str, columns: tuple[str, ...], statement: bytes, start: int, where: str
    ) -> tuple[bytes, int]:
        """One INSERT statement of a ruled table, its ruled columns masked, in the same form; and its row count."""
        key = (table, columns)
        prepared = self._prepared.get(key)
        if prepared is None:
            shape = _TableShape(table, list(columns))
            functions = [
                (index, self._column_function(self.rules[table][column]))
                for index, column in enumerate(columns)
                if column in self.rules[table]
            ]
            prepared = self._prepared[key] = (shape, functions)
        shape, functions = prepared
        text = _decode(statement)
        rows = []
        for match in shape.rows(text, start, where):
            values = list(match.groups())
            for index, function in functions:
                values[index] = function(values[index])
            rows.append("(" + ",".join(values) + ")")
        return (text[:start] + ",\n".join(rows) + ";\n").encode("utf-8", "surrogateescape"), len(rows)

    def mask_ahead(self, spool: _Spool, workers: int = 1) -> None:
        """Mask every ruled statement, in dump order, into ``spool`` (on ``workers`` forked processes, a few
        statements ahead, when more than one)."""
        pool = _worker_pool(self, workers) if workers > 1 else None
        pending: deque[Future[tuple[bytes, int]]] = deque()
        try:
            for raw, shape, start, number in self._scan():
                if shape is None:
                    continue
                if spool.aborted:
                    return
                where = f"{self.path}:{number}"
                if pool is None:
                    spool.add(*self.mask_statement(shape.table, tuple(shape.columns), raw, start, where))
                    continue
                pending.append(pool.submit(_mask_in_worker, shape.table, tuple(shape.columns), raw, start, where))
                while len(pending) > 2 * workers:
                    spool.add(*pending.popleft().result())
            while pending:
                spool.add(*pending.popleft().result())
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                _forget_worker_dump()

    def write_masked(self, write: Callable[[bytes], object], spool: _Spool) -> None:
        """Write the dump to ``write``, the ruled tables' sections after every other table (``_spans``): text
        without ruled rows as it is, each ruled statement as masked into ``spool`` (waiting for it when the
        masking is behind), then the deferred indexes."""
        deferred: list[str] = []
        began = time.perf_counter()
        count = 0
        for raw, shape, _, _ in self._scan(deferred, ruled_last=True):
            if shape is None:
                write(raw)
                continue
            if shape.table not in self.report.tables:
                self.report.tables.append(shape.table)
            masked, rows = spool.get(count)
            count += 1
            self.report.rows += rows
            write(masked)
        spool.get_end(count)
        self.report.seconds["written"] = round(time.perf_counter() - began, 3)
        self.report.seconds["waited"] = round(spool.waited, 3)
        for alter in deferred:  # after the whole dump, whose trailer restores the session's settings
            write(alter.encode("utf-8", "surrogateescape"))


class _Spool:
    """Masked statements, made by one thread and taken in order by another, kept in a temporary file (the
    masking runs ahead of the loader, up to a whole table)."""

    def __init__(self, directory: str | None):
        self._file = tempfile.TemporaryFile(dir=directory, prefix="sqlsync-masked-")  # noqa: SIM115 - closed in close()
        self._index: list[tuple[int, int, int]] = []  # offset, length, rows
        self._size = 0
        self._done = False
        self._failure: BaseException | None = None
        self._changed = threading.Condition()
        self.aborted = False
        self.waited = 0.0

    def add(self, masked: bytes, rows: int) -> None:
        self._file.write(masked)  # appended; readers use pread, which leaves the file position alone
        self._file.flush()
        with self._changed:
            self._index.append((self._size, len(masked), rows))
            self._size += len(masked)
            self._changed.notify_all()

    def finish(self, failure: BaseException | None = None) -> None:
        with self._changed:
            self._done = True
            self._failure = failure
            self._changed.notify_all()

    def _wait_for(self, count: int) -> None:
        began = time.perf_counter()
        with self._changed:
            while len(self._index) < count and not self._done:
                self._changed.wait()
            if self._failure is not None:
                raise self._failure
        self.waited += time.perf_counter() - began

    def get(self, number: int) -> tuple[bytes, int]:
        self._wait_for(number + 1)
        if number >= len(self._index):
            raise DumpFormatError("the masking pass found fewer ruled statements than the writing pass")
        offset, length, rows = self._index[number]
        return os.pread(self._file.fileno(), length, offset), rows

    def get_end(self, count: int) -> None:
        """The writer saw ``count`` ruled statements: the masking must have made exactly as many."""
        with self._changed:
            while not self._done:
                self._changed.wait()
            if self._failure is not None:
                raise self._failure
        if len(self._index) != count:
            raise DumpFormatError("the masking pass found more ruled statements than the writing pass")

    def close(self) -> None:
        self.aborted = True
        self._file.close()


def _forget_worker_dump() -> None:
    global _WORKER_DUMP
    _WORKER_DUMP = None


# The forked masking workers find their DumpMasker here (set in the parent just before the fork, inherited).
_WORKER_DUMP: DumpMasker | None = None


def _worker_pool(dump: DumpMasker, workers: int) -> ProcessPoolExecutor:
    """Forked workers share the parent's masker and mappings (copy-on-write) instead of receiving a pickled copy
    of a million-entry mapping each. The global stays set until the pool is shut down."""
    global _WORKER_DUMP
    _WORKER_DUMP = dump
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))


def _mask_in_worker(
    table: str, columns: tuple[str, ...], statement: bytes, start: int, where: str
) -> tuple[bytes, int]:
    assert _WORKER_DUMP is not None, "masking worker started without its DumpMasker"
    return _WORKER_DUMP.mask_statement(table, columns, statement, start, where)


def mask_dump(
    path: str,
    rules: list[ColumnRule],
    masker: Masker,
    write: Callable[[bytes], object],
    workers: int = 1,
    spool_dir: str | None = None,
) -> StreamReport:
    """Stream the dump at ``path`` to ``write`` with the ruled columns masked.

    Two threads: the masking thread makes the first pass (set kinds) and then masks the ruled statements into a
    spool file, while this thread writes the dump in order, taking masked statements from the spool as it
    reaches them. The ruled tables are written last, so the masking overlaps the loading of every other table.
    ``workers`` > 1 masks on that many forked processes."""
    dump = DumpMasker(path, rules, masker)
    spool = _Spool(spool_dir)

    def produce() -> None:
        failure: BaseException | None = None
        try:
            if dump.needs_collect():
                dump.collect()
            dump.mask_ahead(spool, workers)
        except BaseException as exc:  # handed over to the writing thread, which raises it
            failure = exc
        finally:
            spool.finish(failure)

    producer = threading.Thread(target=produce, name="sqlsync-mask", daemon=True)
    producer.start()
    try:
        dump.write_masked(write, spool)
    finally:
        spool.aborted = True
        producer.join()
        spool.close()
    return dump.report


_CREATED = re.compile(rb"^CREATE TABLE `((?:[^`\n]|``)+)` \(", re.MULTILINE)


def table_digests(path: str) -> dict[str, tuple[int, str]]:
    """Per table the dump creates: how many rows it holds and a sha256 over them (each row as dumped). Two dumps of
    the same data by the same mariadb-dump options agree, however the rows were split into statements."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as dump:
        tables = [_unquote_identifier(_decode(m.group(1))) for m in _CREATED.finditer(dump)]
    reader = DumpMasker(path, [], Masker(b"\0" * 16))  # reads only: nothing is masked
    reader.rules = {table: {} for table in tables}
    counts = dict.fromkeys(tables, 0)
    hashes = {table: hashlib.sha256() for table in tables}
    for raw, shape, start, number in reader._scan():
        if shape is None:
            continue
        digest = hashes[shape.table]
        for match in shape.rows(_decode(raw), start, f"{path}:{number}"):
            digest.update(match.group(0).encode("utf-8", "surrogateescape") + b"\n")
            counts[shape.table] += 1
    return {table: (counts[table], hashes[table].hexdigest()) for table in tables}
