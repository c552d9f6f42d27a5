"""Stream masking of a mariadb-dump file on its way into scratch (kinds/sqlsync/stream.py): real dumps from a
real MariaDB, compared with the in-place masking the cloudsql profile uses."""

from __future__ import annotations

import io
from collections import Counter

import pytest

from kinds.sqlsync import db as sqlsync_db
from kinds.sqlsync import dumps as sqlsync
from kinds.sqlsync.masking import ColumnRule, Masker, _Feistel
from kinds.sqlsync.stream import DumpFormatError, decode_value, encode_value, mask_dump

SECRET = b"test-secret-0123456789abcdef"
RULES = [
    ColumnRule("people", "email", "email", "email"),
    ColumnRule("people", "phone", "phone", "phone"),
    ColumnRule("people", "name", "name", "name"),
    ColumnRule("people", "notes", "text", "text"),
    ColumnRule("people", "login", "email", "email"),  # a VARBINARY column: dumped as 0x... with --hex-blob
    ColumnRule("people", "secret", "null", "null"),
    ColumnRule("people", "code", "fixed", "fixed", value="it's \\ fixed"),
]
AWKWARD = [
    (1, "Ann.O'Neil@Mail.com", "+44 20 7946 0958", "Ann O'Neil", "line one\nline two\ttab", b"ann@x.io", "s", "c"),
    (2, "back\\slash@mail.com", "+1 (555) 010-0199", "Zoë Ångström", "),(,'),('", b"b\xc3\xa9@x.io", None, None),
    (3, "emoji\U0001f600@mail.com", None, "", "", None, "s", "c"),
    (4, "semi;colon@mail.com", "0044 20 7946 0000", "Ünïcödé Nâme", "ends with a quote'", b"", "", ""),
    (5, "nul\0byte@mail.com", "07700 900123", "Carriage\rReturn", "\x1a", b"x\x00y@z.io", "s", "c"),
]


@pytest.fixture
def people(mariadb_servers, tmp_path):
    """A production table of awkward values, dumped by the real mariadb-dump the local profile uses."""
    production = mariadb_servers["production"]
    database = production.fresh_database("stream_people")
    production.execute(
        "CREATE TABLE people (id INT PRIMARY KEY, email VARCHAR(255) NOT NULL, phone VARCHAR(32) NULL,"
        " name VARCHAR(100) NOT NULL, notes TEXT NOT NULL, login VARBINARY(64) NULL, secret VARCHAR(8) NULL,"
        " code VARCHAR(32) NULL, UNIQUE KEY uq_email (email)) DEFAULT CHARSET=utf8mb4",
        database=database,
    )
    production.execute(
        "CREATE TABLE untouched (id INT PRIMARY KEY, note TEXT) DEFAULT CHARSET=utf8mb4", database=database
    )
    with production.connect(database) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO people VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", AWKWARD)
        cur.executemany("INSERT INTO untouched VALUES (%s, %s)", [(i, f"keep 'me' {i}\n") for i in range(3)])
    ref = sqlsync_db.DatabaseRef(role="production", database=database, host="127.0.0.1", port=production.port)
    path = tmp_path / "production.sql"
    sqlsync.dump_database(ref, path)
    return path


def _scratch(server, name: str) -> sqlsync_db.DatabaseRef:
    return sqlsync_db.DatabaseRef(
        role="scratch", database=server.fresh_database(name), host="127.0.0.1", port=server.port
    )


# Python 3.12+ warns when forking a process that runs threads (the masking workers are forked from the masking
# thread); the workers touch nothing the other threads hold.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("workers", [1, 2])
def test_stream_masking_gives_the_same_tables_as_masking_in_place(people, mariadb_servers, workers):
    server = mariadb_servers["scratch"]
    streamed, in_place = _scratch(server, f"stream_a{workers}"), _scratch(server, f"stream_b{workers}")
    masker = Masker(SECRET)

    report = sqlsync.load_dump(
        streamed, people, lambda write: mask_dump(str(people), RULES, masker, write, workers=workers)
    )
    sqlsync.load_dump(in_place, people)
    with sqlsync_db.connect(in_place) as conn, sqlsync_db.connect(in_place, streaming=True) as stream:
        sqlsync_db.mask_database(conn, stream, sqlsync_db.read_schema(conn, in_place.database), RULES, Masker(SECRET))

    # The unique index on a masked column was left out of the CREATE TABLE and added after the rows.
    assert server.execute("SHOW INDEX FROM people WHERE Key_name = 'uq_email'", database=streamed.database)
    select = "SELECT id, email, phone, name, notes, login, secret, code FROM people ORDER BY id"
    got = server.execute(select, database=streamed.database)
    assert got == server.execute(select, database=in_place.database)
    assert report.rows == 5 and report.tables == ["people"]
    assert report.values == 9  # distinct emails over both email columns (empty login included)
    originals = {value for row in AWKWARD for value in row[1:4] if value}
    assert not originals & {value for row in got for value in row[1:4]}
    assert [row[6] for row in got] == [None] * 5 and {row[7] for row in got} == {"it's \\ fixed", None}
    assert got[0][4] == "xxxx xxx\nxxxx xxxtxxx".replace("t", "\t")  # text keeps whitespace and length
    assert server.execute("SELECT id, note FROM untouched ORDER BY id", database=streamed.database) == [
        (i, f"keep 'me' {i}\n") for i in range(3)
    ]


def test_tables_without_rules_pass_through_byte_for_byte(people):
    out = io.BytesIO()

    mask_dump(str(people), [ColumnRule("nothing", "here", "null", "null")], Masker(SECRET), out.write)

    assert out.getvalue() == people.read_bytes()


def test_a_rule_on_a_column_the_dump_does_not_have_is_schema_drift(people):
    rules = [ColumnRule("people", "mobile", "phone", "phone")]

    with pytest.raises(
        DumpFormatError, match=r"schema drift: table people has no column mobile in the dump \(columns: id, email"
    ):
        mask_dump(str(people), rules, Masker(SECRET), io.BytesIO().write)


def test_a_row_the_parser_cannot_read_stops_before_writing_it(tmp_path):
    dump = tmp_path / "odd.sql"
    dump.write_text(
        "CREATE TABLE `people` (\n  `id` int(11) NOT NULL,\n  `email` varchar(255) NOT NULL,\n"
        "  PRIMARY KEY (`id`)\n);\n"
        "INSERT INTO `people` VALUES\n(1,'a@b.c'),\n(2,'c@d.e',3);\n"
    )
    out = io.BytesIO()

    with pytest.raises(
        DumpFormatError, match=r"odd.sql:6: cannot read a row of 2 values of table people \(id, email\)"
    ):
        mask_dump(str(dump), [ColumnRule("people", "email", "email", "email")], Masker(SECRET), out.write)

    assert b"a@b.c" not in out.getvalue() and b"INSERT" not in out.getvalue()


def test_sql_literals_round_trip():
    for value in ["", "plain", "it's", "back\\slash", "nul\0", "new\nline", "cr\r", "ctrl-z\x1a", "tab\t", "é😀"]:
        assert decode_value(encode_value(value)) == value
    assert decode_value("NULL") is None and encode_value(None) == "NULL"
    assert decode_value("0x6140622E63") == "a@b.c" and decode_value("_binary 'x\\'y'") == "x'y"
    assert decode_value("42") == "42"


def test_remembered_phone_rounds_give_exactly_the_computed_permutation(monkeypatch):
    # 4 national digits: the round values are remembered after 100 numbers, and all 10,000 numbers are permuted.
    phones = [f"+1 {i:04d}" for i in range(10_000)] + ["+44 7700 900123", "0044 20 7946 0000"]
    masker = Masker(SECRET)
    remembered = [masker.phone(p) for p in phones]
    assert masker._networks[(4, "1")].memo is not None

    monkeypatch.setattr(_Feistel, "MEMO_HALF_DIGITS", 0)
    computed = Masker(SECRET)
    assert [computed.phone(p) for p in phones] == remembered
    assert computed._networks[(4, "1")].memo is None
    assert len(set(remembered[:10_000])) == 10_000  # still a permutation of the 10^4 numbers


def test_indexes_on_masked_columns_are_built_after_the_rows_unless_a_foreign_key_needs_them(tmp_path):
    dump = tmp_path / "keys.sql"
    dump.write_text(
        "CREATE TABLE `orders` (\n  `id` int(11) NOT NULL,\n  `email` varchar(255) NOT NULL,\n"
        "  `owner_email` varchar(255) NOT NULL,\n  `note` text,\n  PRIMARY KEY (`id`),\n"
        "  UNIQUE KEY `uq_email` (`email`),\n  KEY `by_note` (`note`(20),`email`),\n"
        "  KEY `fk_owner` (`owner_email`),\n  CONSTRAINT `fk_owner` FOREIGN KEY (`owner_email`) REFERENCES `u` (`e`),\n"
        "  CONSTRAINT `c_note` CHECK (`note` <> '')\n) ENGINE=InnoDB;\n"
        "INSERT INTO `orders` VALUES (1,'a@b.c','o@b.c','n');\n-- Dump completed\n"
    )
    rules = [ColumnRule("orders", c, "email", "email") for c in ("email", "owner_email")]
    out = io.BytesIO()

    mask_dump(str(dump), rules, Masker(SECRET), out.write)

    text = out.getvalue().decode()
    create = text[text.index("CREATE TABLE") : text.index(") ENGINE")]
    assert "uq_email" not in create and "by_note" not in create
    assert "  PRIMARY KEY (`id`),\n  KEY `fk_owner` (`owner_email`),\n  CONSTRAINT `fk_owner`" in create
    assert create.endswith("  CONSTRAINT `c_note` CHECK (`note` <> '')\n")
    assert text.endswith(
        "-- Dump completed\n"
        "ALTER TABLE `orders` ADD UNIQUE KEY `uq_email` (`email`), ADD KEY `by_note` (`note`(20),`email`);\n"
    )


def test_ruled_tables_load_after_the_others_and_before_the_trailer(people):
    out = io.BytesIO()

    mask_dump(str(people), RULES, Masker(SECRET), out.write)

    text = out.getvalue().decode("utf-8", "surrogateescape")
    original = people.read_text(encoding="utf-8", errors="surrogateescape")
    assert original.index("CREATE TABLE `people`") < original.index("CREATE TABLE `untouched`")
    assert text.index("CREATE TABLE `untouched`") < text.index("CREATE TABLE `people`")
    trailer = "/*!40103 SET TIME_ZONE=@OLD_TIME_ZONE */;"
    assert text.index("INSERT INTO `people`") < text.index(trailer) < text.index("-- Dump completed")
    assert text.index("-- Dump completed") < text.index("ALTER TABLE `people` ADD UNIQUE KEY `uq_email`")

    # Nothing lost or doubled: every statement and comment line outside the people table's rows (and outside
    # CREATE TABLE bodies, where the index moved) is there as often as in the dump.
    def lines(dump: str) -> Counter[str]:
        return Counter(line for line in dump.splitlines() if not line.startswith(("(", "INSERT INTO `people`", "  ")))

    assert lines(text) == lines(original) + Counter(["ALTER TABLE `people` ADD UNIQUE KEY `uq_email` (`email`);"])


def test_a_partitioned_table_keeps_its_table_options_when_an_index_is_deferred(tmp_path):
    dump = tmp_path / "parts.sql"
    dump.write_text(
        "CREATE TABLE `people` (\n  `id` int(11) NOT NULL,\n  `email` varchar(255) NOT NULL,\n"
        "  PRIMARY KEY (`id`),\n  KEY `by_email` (`email`)\n) ENGINE=InnoDB\n PARTITION BY HASH (`id`)\n"
        "PARTITIONS 4;\nINSERT INTO `people` VALUES (1,'a@b.c');\n-- Dump completed\n"
    )
    out = io.BytesIO()

    mask_dump(str(dump), [ColumnRule("people", "email", "email", "email")], Masker(SECRET), out.write)

    text = out.getvalue().decode()
    assert text.startswith(
        "CREATE TABLE `people` (\n  `id` int(11) NOT NULL,\n  `email` varchar(255) NOT NULL,\n"
        "  PRIMARY KEY (`id`)\n) ENGINE=InnoDB\n PARTITION BY HASH (`id`)\nPARTITIONS 4;\n"
    )
    assert text.endswith("ALTER TABLE `people` ADD KEY `by_email` (`email`);\n")


def test_one_pass_masking_gives_what_the_first_pass_gives(people):
    one, two = io.BytesIO(), io.BytesIO()

    first = mask_dump(str(people), RULES, Masker(SECRET), one.write, one_pass=True)
    second = mask_dump(str(people), RULES, Masker(SECRET), two.write, one_pass=False)

    assert one.getvalue() == two.getvalue()
    assert "first-pass" not in first.seconds and "first-pass" in second.seconds
    assert first.values == second.values == 9


def test_a_collision_in_one_pass_masking_is_reported_not_written(people, monkeypatch):
    from kinds.sqlsync.stream import Collision

    original = Masker.email_candidate

    def few(self, normalised, counter=0, email_domain="example.com"):
        # Every first candidate the same: set-wise resolution must find others.
        return original(self, "same" if counter == 0 else normalised, counter, email_domain)

    monkeypatch.setattr(Masker, "email_candidate", few)

    with pytest.raises(Collision):
        mask_dump(str(people), RULES, Masker(SECRET), io.BytesIO().write, one_pass=True)
    resolved = mask_dump(str(people), RULES, Masker(SECRET), io.BytesIO().write, one_pass=False)
    assert resolved.rows == 5
