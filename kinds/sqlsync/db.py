"""The SQL half of the sqlsync kind: connections, schema checks, masking a scratch database in place, re-inserting
preserved staging rows with key remapping, and the post-import PII verification.

Everything here talks DB-API (PyMySQL) to MySQL or MariaDB, so the local profile and Cloud SQL share it; only
how a connection is opened differs (``connect``): TCP/socket for local servers and the Cloud SQL Auth Proxy, the
Cloud SQL Python Connector for Cloud SQL instances.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from kinds.sqlsync.errors import HalfDone
from kinds.sqlsync.masking import INJECTIVE_KINDS, SET_KINDS, ColumnRule, Masker, longest_output
from kinds.sqlsync.plan import DatabaseRef

MAP_BATCH = 5000
PARALLEL_MIN = 50_000  # below this, starting worker processes costs more than it saves
UPDATE_CHUNK = 50_000
CONNECT_TIMEOUT_SECONDS = 20
# Longer than any one statement of a sync takes (an index rebuilt on a big table), far shorter than for ever.
NET_TIMEOUT_SECONDS = 1800
# Kinds whose original values are personal data worth checking for after the import.
VERIFIED_KINDS = ("email", "phone", "name", "first_name", "last_name", "hash", "date", "card", "address")


def quote(name: str) -> str:
    """Backtick-quote an identifier (plan names are validated against IDENTIFIER; names read from the server
    may hold anything, so backticks are doubled)."""
    return "`" + name.replace("`", "``") + "`"


def connect(ref: DatabaseRef, database: str | None = None, *, streaming: bool = False) -> Any:
    """A PyMySQL connection to ``ref`` (autocommit on). ``streaming`` returns unbuffered cursors for big reads."""
    import pymysql
    import pymysql.cursors

    kwargs: dict[str, Any] = {
        "user": ref.user,
        "password": ref.password,
        "database": database if database is not None else ref.database,
        "autocommit": True,
        "charset": "utf8mb4",
        "local_infile": True,
        "max_allowed_packet": 64 * 1024 * 1024,
        # A server that stops answering must not hold a worker for ever: the step fails as a transient error.
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "read_timeout": NET_TIMEOUT_SECONDS,
        "write_timeout": NET_TIMEOUT_SECONDS,
    }
    if streaming:
        kwargs["cursorclass"] = pymysql.cursors.SSCursor
    if ref.instance and not ref.host and not ref.socket:
        return _connect_cloud_sql(ref, kwargs)
    if ref.socket:
        return pymysql.connect(unix_socket=ref.socket, **kwargs)
    return pymysql.connect(host=ref.host or "127.0.0.1", port=ref.port, **kwargs)


_CONNECTORS: dict[bool, Any] = {}
_CONNECTORS_LOCK = threading.Lock()


def _connect_cloud_sql(ref: DatabaseRef, kwargs: dict[str, Any]) -> Any:
    """Through the Cloud SQL Python Connector (IAM-authorised TLS, private IP when asked). One Connector per
    process and IP type: it keeps certificates fresh in a background thread, so it is shared, not rebuilt."""
    try:
        from google.cloud.sql.connector import Connector, IPTypes
    except ImportError as exc:  # pragma: no cover - depends on the deployment
        raise LookupError(
            "the Cloud SQL Python Connector is not installed (pip install cloud-sql-python-connector[pymysql]),"
            f" or set host/port for {ref.role} to connect through the Cloud SQL Auth Proxy"
        ) from exc
    with _CONNECTORS_LOCK:
        if ref.private_ip not in _CONNECTORS:
            _CONNECTORS[ref.private_ip] = Connector(ip_type=IPTypes.PRIVATE if ref.private_ip else IPTypes.PUBLIC)
        connector = _CONNECTORS[ref.private_ip]
    passed_on = {k: v for k, v in kwargs.items() if k not in ("user", "password", "database")}
    return connector.connect(
        ref.instance, "pymysql", user=kwargs["user"], password=kwargs["password"], db=kwargs["database"], **passed_on
    )


def query(conn: Any, sql: str, args: Any = None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def database_identity(conn: Any, database: str) -> tuple[str, str]:
    """Which database ``database`` is, as the server itself sees it: the server (host name, port, data directory;
    the same whichever address or socket reached it) and the name as the server compares names (without case where
    ``lower_case_table_names`` is set: ``Shop`` is then ``shop``)."""
    server, folding = query(conn, "SELECT CONCAT_WS('|', @@hostname, @@port, @@datadir), @@lower_case_table_names")[0]
    return str(server), database.lower() if int(folding) else database


# ---- progress markers -----------------------------------------------------------------------------------------

# A small table in the scratch database records which in-place steps (mask, preserve) finished, so that a task
# delivered twice does not mask masked data or insert preserved rows twice. It is left out of the scratch export
# and of the table move, and dropped with the rest of scratch.
PROGRESS_TABLE = "_sqlsync_progress"


def read_progress(conn: Any) -> dict[str, str]:
    exists = query(
        conn,
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
        (PROGRESS_TABLE,),
    )[0][0]
    if not exists:
        return {}
    return dict(query(conn, f"SELECT step, state FROM {quote(PROGRESS_TABLE)}"))  # type: ignore[arg-type]


def mark_progress(conn: Any, step: str, state: str) -> None:
    query(
        conn,
        f"CREATE TABLE IF NOT EXISTS {quote(PROGRESS_TABLE)} (step VARCHAR(32) PRIMARY KEY, state VARCHAR(16) NOT NULL,"
        " at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    )
    query(conn, f"REPLACE INTO {quote(PROGRESS_TABLE)} (step, state) VALUES (%s, %s)", (step, state))


def begin_in_place_step(conn: Any, step: str) -> bool:
    """False when ``step`` already finished on this scratch database (skip it); raises when an earlier attempt
    stopped half-way, because running it again over half-changed data would be wrong."""
    state = read_progress(conn).get(step)
    if state == "done":
        return False
    if state == "started":
        raise HalfDone(
            f"an earlier attempt of step {step} stopped half-way and scratch is partly changed:"
            " the run must go on again from import-scratch",
            restart_at="import-scratch",
        )
    mark_progress(conn, step, "started")
    return True


# ---- schema ----------------------------------------------------------------------------------------------------


@dataclass
class Schema:
    """What the checks and the remapping need to know about one database's tables."""

    columns: dict[str, list[str]] = field(default_factory=dict)
    primary_keys: dict[str, list[str]] = field(default_factory=dict)
    unique_indexes: dict[str, dict[str, list[tuple[str, int | None]]]] = field(default_factory=dict)
    foreign_keys: list[tuple[str, str, str, str]] = field(default_factory=list)  # child, column, parent, column
    integer_columns: set[tuple[str, str]] = field(default_factory=set)
    # (table, column) -> (data type, maximum length in characters or None, collation or None)
    types: dict[tuple[str, str], tuple[str, int | None, str | None]] = field(default_factory=dict)
    views: set[str] = field(default_factory=set)
    not_null: set[tuple[str, str]] = field(default_factory=set)
    json_columns: set[tuple[str, str]] = field(default_factory=set)

    @property
    def tables(self) -> list[str]:
        """The base tables (views show what tables hold, and are not copied as data)."""
        return sorted(t for t in self.columns if t not in self.views)


def read_schema(conn: Any, database: str) -> Schema:
    schema = Schema()
    for table, column, data_type, length, collation, nullable in query(
        conn,
        "SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE, CHARACTER_MAXIMUM_LENGTH, COLLATION_NAME, IS_NULLABLE"
        " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME, ORDINAL_POSITION",
        (database,),
    ):
        schema.columns.setdefault(table, []).append(column)
        if nullable == "NO":
            schema.not_null.add((table, column))
        schema.types[(table, column)] = (data_type.lower(), None if length is None else int(length), collation)
        if data_type.lower() in ("tinyint", "smallint", "mediumint", "int", "bigint"):
            schema.integer_columns.add((table, column))
    # MariaDB keeps JSON as LONGTEXT with a json_valid() check; MySQL has a json type.
    schema.json_columns = {key for key, (data_type, _, _) in schema.types.items() if data_type == "json"}
    for table, clause in _json_checks(conn, database):
        found = re.fullmatch(r"\s*json_valid\(`((?:[^`]|``)+)`\)\s*", str(clause), re.IGNORECASE)
        if found:
            schema.json_columns.add((table, found.group(1).replace("``", "`")))
    schema.views = {
        name
        for (name,) in query(
            conn,
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'VIEW'",
            (database,),
        )
    }
    for table, index, column, sub_part in query(
        conn,
        "SELECT TABLE_NAME, INDEX_NAME, COLUMN_NAME, SUB_PART FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = %s AND NON_UNIQUE = 0 ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX",
        (database,),
    ):
        if index == "PRIMARY":
            schema.primary_keys.setdefault(table, []).append(column)
        else:
            schema.unique_indexes.setdefault(table, {}).setdefault(index, []).append((column, sub_part))
    schema.foreign_keys = [
        tuple(row)  # type: ignore[misc]
        for row in query(
            conn,
            "SELECT TABLE_NAME, COLUMN_NAME, REFERENCED_TABLE_NAME, REFERENCED_COLUMN_NAME"
            " FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = %s"
            " AND REFERENCED_TABLE_NAME IS NOT NULL AND REFERENCED_TABLE_SCHEMA = %s",
            (database, database),
        )
    ]
    return schema


def width_problems(schema: Schema, rules: Iterable[ColumnRule], email_bits: int) -> list[str]:
    """Rules whose masked values may not fit their column: the dump's loader would cut them short without a word
    (its sql_mode is not strict), an UPDATE would fail half-way."""
    problems = []
    for rule in rules:
        data_type, width, _ = schema.types.get((rule.table, rule.column), ("", None, None))
        longest = longest_output(rule, email_bits)
        if longest is not None and width is not None and longest > width:
            problems.append(
                f"column {rule.table}.{rule.column} holds at most {width} characters ({data_type}), but rule"
                f" {rule.kind!r} can write {longest}"
                + (
                    " (a lower email_bits, or a shorter email_domain, makes emails shorter)"
                    if rule.kind == "email"
                    else ""
                )
            )
        if (rule.table, rule.column) in schema.json_columns and not _valid_json(rule):
            problems.append(
                f"column {rule.table}.{rule.column} holds JSON: rule {rule.kind!r} would not write valid JSON"
                " (use null, or fixed with a JSON value)"
            )
        if rule.kind == "null" and (rule.table, rule.column) in schema.not_null:
            problems.append(f"column {rule.table}.{rule.column} is NOT NULL: rule 'null' cannot be written to it")
    return problems


def twin_problems(conn: Any, schema: Schema, rules: Iterable[ColumnRule]) -> list[str]:
    """Email columns with a unique index of their own that hold values the column tells apart but email masking
    does not (case, or spaces around them, in a case-sensitive collation such as utf8mb4_bin): both would get the
    same masked address and the load would fail on the index (1062) after all the copying."""
    problems = []
    for rule in rules:
        if rule.kind != "email":
            continue
        alone = [
            index
            for index, cols in schema.unique_indexes.get(rule.table, {}).items()
            if [c for c, _ in cols] == [rule.column]
        ]
        if not alone:
            continue
        column = quote(rule.column)
        collation = schema.types.get((rule.table, rule.column), ("", None, None))[2] or ""
        if collation.endswith("_ci") and not query(
            conn, f"SELECT 1 FROM {quote(rule.table)} WHERE {column} <> TRIM({column}) LIMIT 1"
        ):
            continue  # case-insensitive and no value with spaces around it: the index itself rules out twins
        twins = query(
            conn,
            f"SELECT MIN({column}), MAX({column}) FROM {quote(rule.table)} WHERE {column} IS NOT NULL"
            f" GROUP BY LOWER(TRIM({column})) HAVING COUNT(DISTINCT {column}) > 1 LIMIT 1",
        )
        if twins:
            first, second = twins[0]
            problems.append(
                f"column {rule.table}.{rule.column} ({collation}, unique index {alone[0]}) holds {first!r} and"
                f" {second!r}, which differ only in case or spaces: masked alike, they would break the index"
            )
    return problems


def _json_checks(conn: Any, database: str) -> list[tuple[Any, ...]]:
    """MariaDB's check constraints with their tables (MySQL's CHECK_CONSTRAINTS has no TABLE_NAME, and needs none:
    its JSON columns have their own type)."""
    import pymysql

    try:
        return query(
            conn,
            "SELECT TABLE_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = %s",
            (database,),
        )
    except pymysql.err.MySQLError:
        return []


def _valid_json(rule: ColumnRule) -> bool:
    import json

    if rule.kind in ("null", "json"):
        return True
    if rule.kind != "fixed":
        return False
    try:
        json.loads(rule.value or "")
    except ValueError:
        return False
    return True


def schema_problems(schema: Schema, rules: Iterable[ColumnRule], preserve: dict[str, str]) -> list[str]:
    """Everything in the plan that the production schema contradicts, each naming table, column and what exists."""
    problems: list[str] = []
    for rule in rules:
        if rule.table not in schema.columns:
            problems.append(f"table {rule.table} has a masking rule but does not exist")
            continue
        if rule.column not in schema.columns[rule.table]:
            problems.append(
                f"column {rule.table}.{rule.column} has a masking rule but does not exist"
                f" (columns of {rule.table}: {', '.join(schema.columns[rule.table])})"
            )
            continue
        if rule.column in schema.primary_keys.get(rule.table, []):
            problems.append(f"column {rule.table}.{rule.column} is part of the primary key and cannot be masked")
        if rule.kind not in INJECTIVE_KINDS and rule.kind != "null":
            for index, cols in schema.unique_indexes.get(rule.table, {}).items():
                if rule.column in [c for c, _ in cols]:
                    problems.append(
                        f"column {rule.table}.{rule.column} is in unique index {index} but rule {rule.kind!r}"
                        f" cannot keep values unique (use one of {', '.join(INJECTIVE_KINDS)})"
                    )
    for table in preserve:
        if table not in schema.columns:
            problems.append(f"table {table} has a preserve rule but does not exist")
    return problems


def structural(schema: Schema, table: str, column: str) -> bool:
    """An integer key (the primary key, or a foreign key): an id, copied as it is without being listed."""
    if (table, column) not in schema.integer_columns:
        return False
    return column in schema.primary_keys.get(table, []) or any(
        child == table and col == column for child, col, _, _ in schema.foreign_keys
    )


def allowed(allow: Iterable[str], table: str, column: str) -> bool:
    entries = set(allow)
    return f"{table}.{column}" in entries or f"{table}.*" in entries


def coverage_problems(schema: Schema, rules: Iterable[ColumnRule], allow: Iterable[str]) -> list[str]:
    """Production columns the plan says nothing about: every column of every table must have a masking rule, be
    listed in ``options.allow`` (copied as it is), or be an integer key. A new column or table stops the sync until
    someone decides."""
    ruled = {(rule.table, rule.column) for rule in rules}
    problems = []
    for table in schema.tables:
        missing = [
            column
            for column in schema.columns[table]
            if (table, column) not in ruled
            and not allowed(allow, table, column)
            and not structural(schema, table, column)
        ]
        if missing:
            problems.append(
                f"table {table}: no masking rule and not in options.allow: {', '.join(missing)}"
                f" (add a rule, or list {', '.join(f'{table}.{c}' for c in missing)} in options.allow)"
            )
    for entry in allow:
        table, _, column = entry.partition(".")
        if table not in schema.columns or (column != "*" and column not in schema.columns[table]):
            problems.append(f"options.allow names {entry}, which production does not have")
    return problems


_PERSONAL_NAME = re.compile(
    r"(e_?mail|phone|mobile|fax|(^|_)tel(_|$)|name|birth|(^|_)dob(_|$)|ssn|passport|iban|card|address|street|"
    r"(^|_)city(_|$)|zip|post_?code|(^|_)ip(_|$)|ip_?addr)",
    re.IGNORECASE,
)
_PERSONAL_VALUE = (
    ("an email", re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")),
    ("a phone number", re.compile(r"^\+?[0-9][0-9 ().-]{6,}[0-9]$")),
    ("an IP address", re.compile(r"^(\d{1,3}\.){3}\d{1,3}$")),
    ("a card number", re.compile(r"^\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{1,7}$")),
)


def personal_looking(conn: Any, schema: Schema, columns: Iterable[tuple[str, str]], sample: int = 20) -> list[str]:
    """Of ``columns`` (copied as they are), those whose name or sampled values look like personal data."""
    flagged = []
    for table, column in columns:
        if table in schema.views:
            continue
        if _PERSONAL_NAME.search(column):
            flagged.append(f"{table}.{column} (its name)")
            continue
        data_type = schema.types.get((table, column), ("", None, None))[0]
        if data_type not in TEXT_TYPES:
            continue
        values = query(
            conn,
            f"SELECT {quote(column)} FROM {quote(table)} WHERE {quote(column)} IS NOT NULL LIMIT %s",
            (sample,),
        )
        for what, pattern in _PERSONAL_VALUE:
            hits = sum(1 for (value,) in values if pattern.match(str(value).strip()))
            if values and hits * 2 >= len(values):
                flagged.append(f"{table}.{column} (values look like {what})")
                break
    return flagged


# ---- masking ---------------------------------------------------------------------------------------------------


@dataclass
class MaskReport:
    rows_updated: int = 0
    values_masked: int = 0
    tables: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # read, compute, load, update, indexes

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - since, 3)
        return now


def _column_values(conn_streaming: Any, table: str, columns: list[str]) -> dict[str, set[str]]:
    """Distinct non-null values of several columns in one streaming scan of the table, compared byte for byte
    (a *_ci collation would fold 'A' and 'a' together and leave one of them without a mapping)."""
    values: dict[str, set[str]] = {column: set() for column in columns}
    sets = [values[column] for column in columns]
    select = ", ".join(f"CAST(CONVERT({quote(c)} USING utf8mb4) AS BINARY)" for c in columns)
    with conn_streaming.cursor() as cur:
        cur.execute(f"SELECT {select} FROM {quote(table)}")
        while True:
            rows = cur.fetchmany(10000)
            if not rows:
                break
            for target, column_values in zip(sets, zip(*rows, strict=True), strict=True):
                target.update(column_values)
    for target in sets:
        target.discard(None)  # type: ignore[arg-type]
    return {
        column: {raw.decode("utf-8", "surrogateescape") for raw in raw_values}  # type: ignore[attr-defined]
        for column, raw_values in values.items()
    }


def mask_database(
    conn: Any, conn_streaming: Any, schema: Schema, rules: list[ColumnRule], masker: Masker, workers: int = 1
) -> MaskReport:
    """Mask every ruled column of the scratch database in place: one UPDATE per table, joining per-column
    mapping tables (original bytes -> masked value) computed in Python.

    Columns of the same domain share one mapping computed over the union of their values, so they stay
    joinable and the uniqueness resolution sees every value. Unique indexes on masked columns are dropped
    for the UPDATE (a row's new value may equal another row's old one until both are rewritten) and added back
    afterwards, which makes the database itself re-check uniqueness.
    """
    report = MaskReport()
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else nullcontext() as pool:

        def parallel(func: Any, items: list[Any]) -> Any:
            # Per-value masking is pure CPU in Python: big columns are spread over the machine's cores.
            if pool is None or len(items) < PARALLEL_MIN:
                return map(func, items)
            return pool.map(func, items, chunksize=max(1000, len(items) // (4 * workers)))

        _mask_tables(conn, conn_streaming, schema, rules, masker, report, parallel)
    return report


def _mask_tables(
    conn: Any,
    conn_streaming: Any,
    schema: Schema,
    rules: list[ColumnRule],
    masker: Masker,
    report: MaskReport,
    parallel: Any,
) -> None:
    query(conn, "SET SESSION foreign_key_checks = 0")
    by_domain: dict[str, list[ColumnRule]] = {}
    for rule in rules:
        if rule.kind in SET_KINDS:
            by_domain.setdefault(f"{rule.kind}:{rule.domain}", []).append(rule)
    clock = time.perf_counter()
    # Each column's distinct values are read once; set kinds then get one mapping per domain over the union.
    read_columns: dict[str, list[str]] = {}
    for rule in rules:
        if rule.kind not in ("null", "fixed"):
            read_columns.setdefault(rule.table, []).append(rule.column)
    column_values: dict[tuple[str, str], set[str]] = {}
    for table, columns in read_columns.items():
        for column, found in _column_values(conn_streaming, table, columns).items():
            column_values[(table, column)] = found
    clock = report.add("read", clock)
    domain_maps: dict[str, dict[str, str]] = {}
    for key, domain_rules in by_domain.items():
        union: set[str] = set()
        for rule in domain_rules:
            union.update(column_values[(rule.table, rule.column)])
        domain_maps[key] = masker.mapping(domain_rules[0], union, map_fn=parallel)
    clock = report.add("compute", clock)

    by_table: dict[str, list[ColumnRule]] = {}
    for rule in rules:
        by_table.setdefault(rule.table, []).append(rule)
    for table, table_rules in sorted(by_table.items()):
        joins, assignments, args = [], [], []
        for n, rule in enumerate(table_rules):
            col = f"t.{quote(rule.column)}"
            if rule.kind == "null":
                assignments.append(f"{col} = NULL")
                continue
            if rule.kind == "fixed":
                assignments.append(f"{col} = IF({col} IS NULL, NULL, %s)")
                args.append(rule.value)
                continue
            values = column_values.pop((table, rule.column))
            if rule.kind in SET_KINDS:
                mapping = domain_maps[f"{rule.kind}:{rule.domain}"]
                pairs = [(v, mapping[v]) for v in values]
            else:
                mapping = masker.mapping(rule, values, map_fn=parallel)
                pairs = list(mapping.items())
            clock = report.add("compute", clock)
            map_table = f"_sqlsync_map_{n}"
            query(conn, f"DROP TEMPORARY TABLE IF EXISTS {map_table}")
            query(
                conn,
                f"CREATE TEMPORARY TABLE {map_table} (orig VARBINARY(3072) NOT NULL PRIMARY KEY,"
                " masked VARCHAR(3072) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL) ENGINE=InnoDB",
            )
            report.values_masked += _load_map(conn, map_table, pairs)
            clock = report.add("load", clock)
            joins.append(f"LEFT JOIN {map_table} ON {map_table}.orig = CAST(CONVERT({col} USING utf8mb4) AS BINARY)")
            assignments.append(f"{col} = IF({col} IS NULL, NULL, {map_table}.masked)")
        masked_columns = {rule.column for rule in table_rules}
        dropped = {
            index: cols
            for index, cols in schema.unique_indexes.get(table, {}).items()
            if masked_columns & {c for c, _ in cols}
        }
        for index in dropped:
            query(conn, f"ALTER TABLE {quote(table)} DROP INDEX {quote(index)}")
        clock = report.add("indexes", clock)
        report.rows_updated += _update_in_chunks(
            conn, schema, table, f"UPDATE {quote(table)} AS t {' '.join(joins)} SET {', '.join(assignments)}", args
        )
        clock = report.add("update", clock)
        for index, cols in dropped.items():
            parts = ", ".join(quote(c) + (f"({sub})" if sub else "") for c, sub in cols)
            query(conn, f"ALTER TABLE {quote(table)} ADD UNIQUE INDEX {quote(index)} ({parts})")
        clock = report.add("indexes", clock)
        for n in range(len(table_rules)):
            query(conn, f"DROP TEMPORARY TABLE IF EXISTS _sqlsync_map_{n}")
        report.tables.append(table)
    query(conn, "SET SESSION foreign_key_checks = 1")


def _update_in_chunks(conn: Any, schema: Schema, table: str, update: str, args: list[Any]) -> int:
    """Run the masking UPDATE in primary-key ranges when the key is one integer column: many small transactions
    keep InnoDB's undo log short (one transaction over millions of rows is markedly slower)."""
    pk = schema.primary_keys.get(table, [])
    if len(pk) != 1 or (table, pk[0]) not in schema.integer_columns:
        with conn.cursor() as cur:
            cur.execute(update, args or None)
            return cur.rowcount
    low, high = query(conn, f"SELECT MIN({quote(pk[0])}), MAX({quote(pk[0])}) FROM {quote(table)}")[0]
    if low is None:
        return 0
    rows = 0
    with conn.cursor() as cur:
        for start in range(int(low), int(high) + 1, UPDATE_CHUNK):
            cur.execute(f"{update} WHERE t.{quote(pk[0])} BETWEEN %s AND %s", [*args, start, start + UPDATE_CHUNK - 1])
            rows += cur.rowcount
    return rows


def _load_map(conn: Any, map_table: str, pairs: list[tuple[str, str]]) -> int:
    """Fill a mapping table. LOAD DATA LOCAL INFILE of a hex-encoded file is several times faster than
    INSERTs; servers that refuse local infile (Cloud SQL's default flags) get batched INSERTs instead."""
    try:
        return _load_map_infile(conn, map_table, pairs)
    except Exception as exc:
        import pymysql

        if not isinstance(exc, pymysql.err.MySQLError) or exc.args[0] not in (1148, 3948, 4166, 2068):
            raise
    return _load_map_inserts(conn, map_table, pairs)


def _load_map_infile(conn: Any, map_table: str, pairs: list[tuple[str, str]]) -> int:
    # Sorted by key, the rows append to the primary key's B-tree instead of landing at random pages.
    rows = sorted((original.encode("utf-8", "surrogateescape"), masked) for original, masked in pairs)
    with tempfile.NamedTemporaryFile("w", suffix=".tsv", encoding="ascii") as fh:
        fh.writelines(f"{original.hex()}\t{masked.encode().hex()}\n" for original, masked in rows)
        fh.flush()
        with conn.cursor() as cur:
            cur.execute(
                f"LOAD DATA LOCAL INFILE %s INTO TABLE {map_table} FIELDS TERMINATED BY '\\t'"
                " LINES TERMINATED BY '\\n' (@orig, @masked)"
                " SET orig = UNHEX(@orig), masked = CONVERT(UNHEX(@masked) USING utf8mb4)",
                (fh.name,),
            )
            return cur.rowcount


def _load_map_inserts(conn: Any, map_table: str, pairs: list[tuple[str, str]]) -> int:
    with conn.cursor() as cur:
        for start in range(0, len(pairs), MAP_BATCH):
            batch = [(o.encode("utf-8", "surrogateescape"), m) for o, m in pairs[start : start + MAP_BATCH]]
            cur.executemany(f"INSERT INTO {map_table} (orig, masked) VALUES (%s, %s)", batch)
    return len(pairs)


# ---- preserved staging rows ------------------------------------------------------------------------------------


@dataclass
class PreserveReport:
    rows: dict[str, int] = field(default_factory=dict)
    remapped: dict[str, dict[Any, Any]] = field(default_factory=dict)


def preserve_order(tables: Iterable[str], schema: Schema) -> list[str]:
    """Preserved tables with parents before children (by foreign keys among them), so inserts satisfy FKs."""
    pending = sorted(set(tables))
    parents = {t: {p for c, _, p, _ in schema.foreign_keys if c == t and p != t and p in pending} for t in pending}
    ordered: list[str] = []
    while pending:
        ready = [t for t in pending if parents[t] <= set(ordered)]
        if not ready:
            raise ValueError(f"preserve: foreign keys form a cycle among {', '.join(pending)}")
        ordered.extend(ready)
        pending = [t for t in pending if t not in ready]
    return ordered


def copy_preserved_rows(staging: Any, scratch: Any, schema: Schema, preserve: dict[str, str]) -> PreserveReport:
    """Read staging's preserved rows (each table's WHERE) and insert them into the masked scratch database.

    A row whose single-column integer primary key is already used by a production row gets the next free id
    (above both sets); foreign keys of preserved rows that point at a remapped parent are rewritten. Inserts
    run with foreign-key checks on, so a preserved row that points at a parent that exists nowhere fails the
    step instead of landing broken.
    """
    report = PreserveReport()
    staged: dict[str, tuple[list[str], list[list[Any]]]] = {}
    for table in preserve_order(preserve, schema):
        staging_cols = {row[0] for row in query(staging, f"SHOW COLUMNS FROM {quote(table)}")}
        columns = [c for c in schema.columns[table] if c in staging_cols]
        rows = [
            list(row)
            for row in query(
                staging, f"SELECT {', '.join(quote(c) for c in columns)} FROM {quote(table)} WHERE {preserve[table]}"
            )
        ]
        staged[table] = (columns, rows)

    for table, (columns, rows) in staged.items():
        for child, column, parent, parent_column in schema.foreign_keys:
            if child != table or parent not in report.remapped or column not in columns:
                continue
            if schema.primary_keys.get(parent) != [parent_column]:
                continue
            idx = columns.index(column)
            for row in rows:
                if row[idx] in report.remapped[parent]:
                    row[idx] = report.remapped[parent][row[idx]]
        pk = schema.primary_keys.get(table, [])
        remap: dict[Any, Any] = {}
        if rows and len(pk) == 1 and pk[0] in columns:
            idx = columns.index(pk[0])
            ids = [row[idx] for row in rows]
            taken: set[Any] = set()
            for chunk_start in range(0, len(ids), 1000):
                chunk = ids[chunk_start : chunk_start + 1000]
                marks = ", ".join(["%s"] * len(chunk))
                taken.update(
                    r[0]
                    for r in query(
                        scratch, f"SELECT {quote(pk[0])} FROM {quote(table)} WHERE {quote(pk[0])} IN ({marks})", chunk
                    )
                )
            if taken:
                if (table, pk[0]) not in schema.integer_columns:
                    raise ValueError(
                        f"preserve: {len(taken)} row(s) of {table} collide with production on primary key {pk[0]},"
                        " which is not an integer and cannot be given new ids"
                    )
                (max_id,) = query(scratch, f"SELECT COALESCE(MAX({quote(pk[0])}), 0) FROM {quote(table)}")[0]
                next_id = max(int(max_id), max(int(i) for i in ids)) + 1
                for row in sorted(rows, key=lambda r: r[idx]):
                    if row[idx] in taken:
                        remap[row[idx]] = next_id
                        row[idx] = next_id
                        next_id += 1
                # A self-referencing foreign key (parent_id in the same table) follows its parent's new id.
                for child, column, parent, parent_column in schema.foreign_keys:
                    if child == table == parent and parent_column == pk[0] and column in columns:
                        cidx = columns.index(column)
                        for row in rows:
                            if row[cidx] in remap:
                                row[cidx] = remap[row[cidx]]
        report.remapped[table] = remap
        rows = _parents_first(schema, table, columns, rows)
        if rows:
            marks = ", ".join(["%s"] * len(columns))
            with scratch.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in columns)}) VALUES ({marks})", rows
                )
        report.rows[table] = len(rows)
    return report


def _parents_first(schema: Schema, table: str, columns: list[str], rows: list[list[Any]]) -> list[list[Any]]:
    """``rows`` ordered so that a row another preserved row refers to through a self-referencing foreign key
    (``referred_by`` -> ``id``) is inserted before it: inserts run with foreign key checks on, and a child that came
    first in key order (a parent that got a new, higher id in an earlier sync) would be refused."""
    pk = schema.primary_keys.get(table, [])
    links = [
        columns.index(column)
        for child, column, parent, parent_column in schema.foreign_keys
        if child == table == parent and pk == [parent_column] and column in columns
    ]
    if not links or len(pk) != 1 or pk[0] not in columns:
        return rows
    key = columns.index(pk[0])
    waiting = {row[key]: row for row in rows}
    ordered: list[list[Any]] = []
    placed: set[Any] = set()
    while waiting:
        ready = [
            row
            for row in waiting.values()
            if all(row[i] is None or row[i] in placed or row[i] not in waiting or row[i] == row[key] for i in links)
        ]
        if not ready:
            raise ValueError(f"preserve: the preserved rows of {table} refer to each other in a cycle")
        for row in ready:
            ordered.append(row)
            placed.add(row[key])
            del waiting[row[key]]
    return ordered


# ---- verification ----------------------------------------------------------------------------------------------


def find_leaks(
    production: Any, staging: Any, schema: Schema, rules: list[ColumnRule], masker: Masker, sample: int
) -> list[str]:
    """Sample production rows and look for their original personal values in staging.

    Emails are searched for anywhere in every email column of staging (masked emails live on a reserved domain,
    so a hit is a real leak). Other kinds are compared row by row through the primary key: a staging row that
    still holds its production value (where masking would have changed it) is a leak. Value-wide search would
    raise false alarms for them (a masked name or phone can equal another person's original).
    """
    leaks: list[str] = []
    by_table: dict[str, list[ColumnRule]] = {}
    for rule in rules:
        if rule.kind in VERIFIED_KINDS:
            by_table.setdefault(rule.table, []).append(rule)
    email_columns = [(r.table, r.column) for r in rules if r.kind == "email"]
    for table, table_rules in sorted(by_table.items()):
        pk = schema.primary_keys.get(table, [])
        key_cols = pk if pk else []
        select = key_cols + [r.column for r in table_rules]
        rows = query(
            production,
            f"SELECT {', '.join(quote(c) for c in select)} FROM {quote(table)} ORDER BY RAND() LIMIT %s",
            (sample,),
        )
        for row in rows:
            key = row[: len(key_cols)]
            values = dict(zip([r.column for r in table_rules], row[len(key_cols) :], strict=True))
            for rule in table_rules:
                original = values[rule.column]
                if original is None or not str(original).strip():
                    continue
                if rule.kind == "email":
                    for t, c in email_columns:
                        hits = query(staging, f"SELECT COUNT(*) FROM {quote(t)} WHERE {quote(c)} = %s", (original,))
                        if hits and hits[0][0]:
                            leaks.append(f"{t}.{c}: an original email from {table}.{rule.column} is present")
                    continue
                if not key_cols or masker.mask_value(rule, str(original)) == original:
                    continue
                where = " AND ".join(f"{quote(c)} = %s" for c in key_cols)
                found = query(staging, f"SELECT {quote(rule.column)} FROM {quote(table)} WHERE {where}", tuple(key))
                if found and found[0][0] == original:
                    leaks.append(f"{table}.{rule.column}: the row with key {list(key)} still holds its original value")
    return leaks


# ---- scratch ---------------------------------------------------------------------------------------------------


def table_names(conn: Any, database: str) -> list[str]:
    """The base tables of ``database`` (no views), without the progress marker."""
    rows = query(
        conn,
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE'",
        (database,),
    )
    return sorted(name for (name,) in rows if name != PROGRESS_TABLE)


def empty_database(ref: DatabaseRef) -> int:
    """Drop every table (and view) of ``ref``'s database; used only on the scratch database."""
    with connect(ref) as conn:
        query(conn, "SET SESSION foreign_key_checks = 0")
        rows = query(
            conn,
            "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
            (ref.database,),
        )
        for name, table_type in rows:
            what = "VIEW" if table_type == "VIEW" else "TABLE"
            query(conn, f"DROP {what} IF EXISTS {quote(name)}")
        return len(rows)


# ---- triggers --------------------------------------------------------------------------------------------------

_DEFINER = re.compile(r"\bDEFINER\s*=\s*(?:`[^`]*`|'[^']*'|\S+)@(?:`[^`]*`|'[^']*'|\S+)\s+", re.IGNORECASE)


def suspend_triggers(conn: Any, database: str) -> list[tuple[str, str, str]]:
    """Drop every trigger of ``database`` and return what recreates them: (name, sql_mode, CREATE statement). An
    UPDATE that masks a table must not fire them: an audit trigger would copy every original value it overwrites
    into another table."""
    saved = []
    for (name,) in query(
        conn, "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s", (database,)
    ):
        created = query(conn, f"SHOW CREATE TRIGGER {quote(name)}")[0]
        saved.append((str(name), str(created[1]), str(created[2])))
    for name, _, _ in saved:
        query(conn, f"DROP TRIGGER {quote(name)}")
    return saved


def restore_triggers(conn: Any, saved: list[tuple[str, str, str]]) -> None:
    """Create the triggers ``suspend_triggers`` dropped, each in its own sql_mode, with this connection's user as
    their definer (the original definer may not exist on this server, or not be ours to name)."""
    (mode,) = query(conn, "SELECT @@SESSION.sql_mode")[0]
    try:
        for _name, sql_mode, statement in saved:
            query(conn, "SET SESSION sql_mode = %s", (sql_mode,))
            query(conn, _DEFINER.sub("", statement, count=1))
    finally:
        query(conn, "SET SESSION sql_mode = %s", (mode,))


# ---- looking for production values in a copy -------------------------------------------------------------------

TEXT_TYPES = ("char", "varchar", "tinytext", "text", "mediumtext", "longtext", "json", "enum", "set")
# Masks that can never give back a real value: an original of these kinds found anywhere in a copy is a leak.
# (A masked name or phone may equal another person's original, so those are compared by row in find_leaks.)
_NEVER_PRODUCED = ("email", "text", "null", "fixed")
SCAN_MIN_LENGTH = 6  # shorter originals ("FR", "n/a") are too likely to occur on their own


def scan_for_values(
    production: Any, copy: Any, copy_database: str, rules: list[ColumnRule], masker: Masker, sample: int
) -> list[str]:
    """Sample the originals of ruled columns whose masks never produce a real value (emails, free text, columns set
    to NULL or a fixed value) and look for them in every text column of every table of ``copy``: a column nobody
    ruled, an audit table a trigger filled, anything. Returns where each was found."""
    originals: dict[str, str] = {}
    for rule in rules:
        if rule.kind not in _NEVER_PRODUCED:
            continue
        column = quote(rule.column)
        for (value,) in query(
            production,
            f"SELECT {column} FROM {quote(rule.table)} WHERE CHAR_LENGTH({column}) >= %s ORDER BY RAND() LIMIT %s",
            (SCAN_MIN_LENGTH, sample),
        ):
            text = str(value)
            if masker.mask_value(rule, text) != text:
                originals.setdefault(text, f"{rule.table}.{rule.column}")
    if not originals:
        return []
    found = []
    values = sorted(originals)
    columns = query(
        copy,
        "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND DATA_TYPE IN"
        f" ({', '.join(['%s'] * len(TEXT_TYPES))}) AND TABLE_NAME IN (SELECT TABLE_NAME FROM information_schema.TABLES"
        " WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE') ORDER BY TABLE_NAME, ORDINAL_POSITION",
        (copy_database, *TEXT_TYPES, copy_database),
    )
    for table, column in columns:
        for start in range(0, len(values), 500):
            batch = values[start : start + 500]
            hits = query(
                copy,
                f"SELECT DISTINCT {quote(column)} FROM {quote(table)} WHERE {quote(column)} IN"
                f" ({', '.join(['%s'] * len(batch))}) LIMIT 5",
                batch,
            )
            for (hit,) in hits:
                source = originals.get(str(hit)) or next(
                    (where for value, where in originals.items() if value.lower() == str(hit).lower()), "production"
                )
                found.append(f"{table}.{column}: an original value of {source} is present")
    return found
