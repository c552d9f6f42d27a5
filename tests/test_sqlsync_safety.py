"""sqlsync never touches production or lets a value through (issue 16), each defect on real MariaDB servers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kinds.sqlsync import kind as sqlsync
from services.errors import PermanentError
from services.kinds import RunContext
from services.plans import parse_plan
from tests.sqlsync_data import create_schema, make_sync_setup, production_rows

PERIOD = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


@pytest.fixture
def sync_setup(mariadb_servers, tmp_path, monkeypatch):
    return make_sync_setup(mariadb_servers, tmp_path, monkeypatch)


def _run(setup, plan=None, **kwargs):
    run = RunContext(run_id="r1", plan="staging-refresh", target_key="staging-shop", period=PERIOD)
    return sqlsync.drive(plan or setup["plan"], run, setup["rt"], **kwargs), run


def _rows(setup, side, sql):
    server, database = setup[side]
    return server.execute(sql, database=database)


# --- 1. identity as the server sees it -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["staging", "scratch"])
def test_a_database_named_in_other_case_on_a_case_insensitive_server_is_production(
    sync_setup, mariadb_case_insensitive, role
):
    nocase = mariadb_case_insensitive
    prod_db = nocase.fresh_database(f"shop_ci_{role}")
    create_schema(nocase, prod_db)
    with nocase.connect(prod_db) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO accounts (id, email, phone, name, notes, ssn, country) VALUES (%s,%s,%s,%s,%s,%s,%s)",
            production_rows(),
        )
    raw = sync_setup["raw"]
    raw["select"] = {"host": "127.0.0.1", "port": nocase.port, "database": prod_db}
    # The same server reached through its socket, the same database in other letters: the plan cannot tell.
    raw["destination"][role] = {"socket": str(nocase.socket_path), "database": prod_db.upper()}
    plan = parse_plan("staging-refresh", raw)

    with pytest.raises(PermanentError, match=f"step check: {role} resolves to the production database"):
        _run(sync_setup, plan)

    emails = nocase.execute("SELECT email FROM accounts ORDER BY id", database=prod_db)
    assert [e for (e,) in emails] == [row[1] for row in production_rows()]


# --- 2. triggers do not run during masking; scratch is searched before anything leaves it ------------------------

AUDIT = [
    "CREATE TABLE account_audit (id INT PRIMARY KEY AUTO_INCREMENT, account_id INT NOT NULL,"
    " old_email VARCHAR(255) NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TRIGGER accounts_audit AFTER UPDATE ON accounts FOR EACH ROW"
    " INSERT INTO account_audit (account_id, old_email) VALUES (OLD.id, OLD.email)",
]


@pytest.fixture
def audited(mariadb_servers, tmp_path, monkeypatch):
    """Production with an audit trigger on accounts (and three audit rows it wrote), masked in place."""
    setup = make_sync_setup(mariadb_servers, tmp_path, monkeypatch, mask_mode="in-place")
    server, database = setup["production"]
    for statement in AUDIT:
        server.execute(statement, database=database)
    server.execute("UPDATE accounts SET country = 'DE' WHERE id <= 3", database=database)
    setup["raw"]["options"]["rules"]["account_audit"] = {"old_email": "email"}
    setup["raw"]["options"]["allow"].append("account_audit.account_id")
    setup["raw"]["options"]["verify_sample"] = 120
    setup["plan"] = parse_plan("staging-refresh", setup["raw"])
    return setup


def test_masking_in_place_does_not_fire_the_tables_triggers(audited):
    outcome, run = _run(audited)

    audit = _rows(audited, "staging", "SELECT account_id, old_email FROM account_audit ORDER BY id")
    originals = {row[1] for row in production_rows()}
    assert outcome.stats["step_reached"] == "cleanup-scratch"
    assert [row[0] for row in audit] == [1, 2, 3]  # production's three rows, none written by the masking
    assert not {row[1] for row in audit} & originals
    assert [row[0] for row in _rows(audited, "staging", "SHOW TRIGGERS")] == ["accounts_audit"]
    assert "step scan-scratch: no sampled production value in any text column" in " ".join(run.log_lines)


def test_a_production_value_in_scratch_stops_the_run_before_staging(audited):
    _run(audited, stop_at="preserve")
    scratch, scratch_db = audited["scratch"]
    # However it got there (a column nobody ruled, a trigger, a bug): an original email in a scratch table.
    scratch.execute("UPDATE orders SET contact_email = 'Customer.7@Real-Mail.com' WHERE id = 4", database=scratch_db)
    staging_before = _rows(audited, "staging", "SELECT id, email FROM accounts ORDER BY id")

    with pytest.raises(PermanentError) as error:
        _run(audited, start_at="scan-scratch")

    assert str(error.value).startswith("step scan-scratch: personal data found in scratch, nothing was copied on")
    assert "orders.contact_email: an original value of accounts.email is present" in str(error.value)
    assert _rows(audited, "staging", "SELECT id, email FROM accounts ORDER BY id") == staging_before


# --- 3. a column or table the plan does not mention stops the sync ------------------------------------------------


def test_new_columns_and_tables_stop_the_sync_until_ruled_or_allowed(sync_setup):
    server, database = sync_setup["production"]
    server.execute("ALTER TABLE accounts ADD COLUMN secondary_email VARCHAR(255) NULL", database=database)
    server.execute("ALTER TABLE accounts ADD COLUMN mobile VARCHAR(32) NULL", database=database)
    server.execute("UPDATE accounts SET secondary_email = CONCAT('second.', email), mobile = phone", database=database)
    server.execute("CREATE TABLE newsletter_signups (id INT PRIMARY KEY, address VARCHAR(255))", database=database)
    staging_before = _rows(sync_setup, "staging", "SELECT id, email FROM accounts ORDER BY id")

    with pytest.raises(PermanentError) as error:
        _run(sync_setup)

    message = str(error.value)
    assert message.startswith("step check: schema drift: ")
    assert "table accounts: no masking rule and not in options.allow: secondary_email, mobile" in message
    assert "table newsletter_signups: no masking rule and not in options.allow: address" in message
    assert _rows(sync_setup, "staging", "SELECT id, email FROM accounts ORDER BY id") == staging_before


def test_allowed_columns_that_look_personal_are_flagged_and_staging_only_tables_reported(sync_setup):
    server, database = sync_setup["production"]
    server.execute("ALTER TABLE orders ADD COLUMN reference VARCHAR(255) NULL", database=database)
    server.execute("UPDATE orders SET reference = contact_email", database=database)  # someone's email, unnoticed
    staging, staging_db = sync_setup["staging"]
    staging.execute("CREATE TABLE old_export (email VARCHAR(255))", database=staging_db)
    sync_setup["raw"]["options"]["allow"] += ["orders.reference"]
    plan = parse_plan("staging-refresh", sync_setup["raw"])

    outcome, run = _run(sync_setup, plan, stop_at="check")

    assert outcome.stats["flagged_columns"] == ["orders.reference (values look like an email)"]
    assert outcome.stats["staging_only_tables"] == ["old_export"]
    assert any("look like personal data: orders.reference" in line for line in run.log_lines)


def test_an_allow_entry_that_names_nothing_is_refused(sync_setup):
    sync_setup["raw"]["options"]["allow"] += ["accounts.gone"]
    plan = parse_plan("staging-refresh", sync_setup["raw"])

    with pytest.raises(PermanentError, match="options.allow names accounts.gone, which production does not have"):
        _run(sync_setup, plan, stop_at="check")


# --- 4. unmasked dumps do not outlive a failed run ------------------------------------------------------------------


def _fail_at_import_scratch(setup):
    scratch, scratch_db = setup["scratch"]
    scratch.execute(f"DROP DATABASE {scratch_db}")  # import-scratch then fails: Unknown database


def test_a_failed_run_deletes_its_unmasked_dump(sync_setup):
    _fail_at_import_scratch(sync_setup)

    with pytest.raises(PermanentError, match="step import-scratch: not found"):
        _run(sync_setup)

    run_dir = sync_setup["dumps"] / "staging-refresh" / "20261123T020000Z"
    assert run_dir.is_dir() and not (run_dir / "production.sql").exists()


def test_keep_files_keeps_the_dump_of_a_failed_run_private(sync_setup):
    _fail_at_import_scratch(sync_setup)

    with pytest.raises(PermanentError):
        _run(sync_setup, keep_files=True)

    run_dir = sync_setup["dumps"] / "staging-refresh" / "20261123T020000Z"
    assert (run_dir / "production.sql").stat().st_mode & 0o777 == 0o600
    assert run_dir.stat().st_mode & 0o777 == 0o700 and run_dir.parent.stat().st_mode & 0o777 == 0o700


def test_unmasked_dumps_older_than_a_day_are_deleted_whatever_retention_keeps(sync_setup):
    import os
    import time

    plan_dir = sync_setup["dumps"] / "staging-refresh"
    old, recent = plan_dir / "20261120T020000Z", plan_dir / "20261122T020000Z"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "production.sql").write_text("-- unmasked")
    (old / "staging-before.sql").write_text("-- a safety dump: kept")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old / "production.sql", (two_days_ago, two_days_ago))

    _outcome, run = _run(sync_setup, stop_at="check")

    assert not (old / "production.sql").exists() and (old / "staging-before.sql").exists()
    assert (recent / "production.sql").exists()  # a run from the last day may still be resumed
    assert any("20261120T020000Z/production.sql" in line for line in run.log_lines)


# --- 5. preserved rows that refer to each other ---------------------------------------------------------------------

PEOPLE = (
    "CREATE TABLE people (id INT PRIMARY KEY, email VARCHAR(255) NOT NULL, referred_by INT NULL,"
    " demo TINYINT NOT NULL DEFAULT 0, CONSTRAINT fk_referrer FOREIGN KEY (referred_by) REFERENCES people (id))"
    " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
)


def test_preserved_rows_referring_to_each_other_survive_every_sync(sync_setup):
    from datetime import timedelta

    production, prod_db = sync_setup["production"]
    staging, staging_db = sync_setup["staging"]
    for server, database in ((production, prod_db), (staging, staging_db)):
        server.execute(PEOPLE, database=database)
    production.execute(
        "INSERT INTO people (id, email) SELECT seq, CONCAT('person', seq, '@real-mail.com') FROM seq_1_to_20",
        database=prod_db,
    )
    # Test person 5 collides with production and gets a new id (21+); the one they referred keeps id 30, and so
    # comes first in key order on the next sync while its referrer has the higher id.
    staging.execute("INSERT INTO people VALUES (5, 'tester@demo.test', NULL, 1)", database=staging_db)
    staging.execute("INSERT INTO people VALUES (30, 'referred@demo.test', 5, 1)", database=staging_db)
    raw = sync_setup["raw"]
    raw["options"]["rules"]["people"] = {"email": "email"}
    raw["options"]["preserve"]["people"] = "demo = 1"
    raw["options"]["allow"].append("people.demo")
    plan = parse_plan("staging-refresh", raw)

    for day in range(3):
        run = RunContext(f"r{day}", plan.name, "staging-shop", PERIOD + timedelta(days=day))
        sqlsync.drive(plan, run, sync_setup["rt"])

    demo = staging.execute(
        "SELECT p.email, r.email FROM people p LEFT JOIN people r ON r.id = p.referred_by WHERE p.demo = 1"
        " ORDER BY p.email",
        database=staging_db,
    )
    assert demo == [("referred@demo.test", "tester@demo.test"), ("tester@demo.test", None)]


# --- 6, 10. masked values that cannot fit their column are refused at check -----------------------------------------


def test_rules_whose_values_do_not_fit_their_column_are_refused_at_check(sync_setup):
    server, database = sync_setup["production"]
    server.execute("ALTER TABLE orders MODIFY contact_email VARCHAR(50) NULL", database=database)
    server.execute(
        "ALTER TABLE accounts ADD COLUMN prefs JSON NULL, ADD COLUMN nick VARCHAR(8) NOT NULL DEFAULT ''",
        database=database,
    )
    raw = sync_setup["raw"]
    raw["options"]["rules"]["accounts"] |= {"prefs": "text", "nick": "null"}
    plan = parse_plan("staging-refresh", raw)
    staging_before = _rows(sync_setup, "staging", "SELECT id, email FROM orders JOIN accounts USING (id)")

    with pytest.raises(PermanentError) as error:
        _run(sync_setup, plan, stop_at="import-scratch")

    message = str(error.value)
    assert "column orders.contact_email holds at most 50 characters (varchar), but rule 'email' can write" in message
    assert "column accounts.prefs holds JSON: rule 'text' would not write valid JSON" in message
    assert "column accounts.nick is NOT NULL: rule 'null' cannot be written to it" in message
    assert _rows(sync_setup, "staging", "SELECT id, email FROM orders JOIN accounts USING (id)") == staging_before


# --- 8. trigger bodies in the dump are statements, not rows ----------------------------------------------------------


def test_stream_masking_passes_trigger_bodies_through(sync_setup):
    server, database = sync_setup["production"]
    server.execute(AUDIT[0], database=database)
    server.execute(
        "CREATE TRIGGER accounts_audit AFTER UPDATE ON accounts FOR EACH ROW\\n"
        "INSERT INTO `account_audit` (account_id, old_email) VALUES (OLD.id, OLD.email)".replace("\\n", "\n"),
        database=database,
    )
    server.execute("UPDATE accounts SET country = 'DE' WHERE id <= 3", database=database)
    raw = sync_setup["raw"]
    raw["options"]["rules"]["account_audit"] = {"old_email": "email"}
    raw["options"]["allow"].append("account_audit.account_id")
    plan = parse_plan("staging-refresh", raw)

    outcome, _ = _run(sync_setup, plan)

    audit = _rows(sync_setup, "staging", "SELECT old_email FROM account_audit ORDER BY id")
    assert outcome.stats["step_reached"] == "cleanup-scratch"
    assert len(audit) == 3 and not {row[0] for row in audit} & {row[1] for row in production_rows()}
    assert [row[0] for row in _rows(sync_setup, "staging", "SHOW TRIGGERS")] == ["accounts_audit"]


# --- 11. decided at check; the safety dump is never overwritten -------------------------------------------------------


def test_views_with_scratch_on_the_staging_server_are_dumped_and_loaded_as_decided_at_check(sync_setup):
    production, prod_db = sync_setup["production"]
    production.execute("CREATE VIEW big_orders AS SELECT id, total FROM orders WHERE total > 100", database=prod_db)
    staging, staging_db = sync_setup["staging"]
    scratch_db = staging.fresh_database(f"{staging_db}_scratch")
    sync_setup["raw"]["destination"]["scratch"] = {"host": "127.0.0.1", "port": staging.port, "database": scratch_db}
    plan = parse_plan("staging-refresh", sync_setup["raw"])

    outcome, run = _run(sync_setup, plan)

    assert outcome.stats["step_reached"] == "cleanup-scratch"
    assert any("the masked tables will be dumped and loaded into staging, not moved" in line for line in run.log_lines)
    assert any(line.startswith("step export-scratch: ") and "bytes" in line for line in run.log_lines)
    assert _rows(sync_setup, "staging", "SELECT COUNT(*) FROM big_orders") == [
        (len(range(91, 360)),)
    ]  # production totals over 100


def test_running_backup_staging_again_keeps_the_runs_safety_dump(sync_setup):
    _run(sync_setup)
    dump = sync_setup["dumps"] / "staging-refresh" / "20261123T020000Z" / "staging-before.sql"
    before = dump.read_bytes()

    _outcome, run = _run(sync_setup, start_at="backup-staging", stop_at="backup-staging")

    assert dump.read_bytes() == before  # staging as it was before the run (3 accounts), not the synced one
    assert b"old.copy@real-mail.com" in before
    assert any("safety dump" in line and "is already there; kept" in line for line in run.log_lines)


# --- 9. a server that stops answering is a transient error, not a hang ----------------------------------------------


class StallingProxy:
    """A TCP proxy to a real server that passes ``allow`` bytes of the server's answers, then nothing more (the
    connection stays open, as a stalled network path does)."""

    def __init__(self, port: int, allow: int):
        import socket
        import threading

        self.upstream, self.allow = port, allow
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [client, server]
            budget = [self.allow]
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, budget), daemon=True).start()

    def _pump(self, source, sink, budget):
        while not self.stop.is_set():
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if budget is not None:
                data = data[: max(0, budget[0])]
                budget[0] -= len(data)
            if data:
                try:
                    sink.sendall(data)
                except OSError:
                    return

    def close(self):
        self.stop.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def stalled_production(sync_setup, monkeypatch):
    from kinds.sqlsync import db, dumps

    monkeypatch.setattr(dumps, "STALL_SECONDS", 1.0)
    monkeypatch.setattr(db, "NET_TIMEOUT_SECONDS", 1)
    server, _ = sync_setup["production"]
    proxies = []

    def through_proxy(allow):
        proxies.append(StallingProxy(server.port, allow))
        sync_setup["raw"]["select"]["port"] = proxies[-1].port
        return parse_plan("staging-refresh", sync_setup["raw"])

    yield through_proxy
    for proxy in proxies:
        proxy.close()


def test_a_dump_whose_server_stops_sending_is_stopped_and_retried(sync_setup, stalled_production):
    from services.errors import TransientError

    plan = stalled_production(allow=20_000)  # the handshake and the dump's first queries, then silence

    with pytest.raises(
        TransientError, match="step export-production: SQL connection error: .*stalled: no data for 1 s"
    ):
        _run(sync_setup, plan, start_at="export-production")


def test_a_query_whose_server_stops_answering_times_out_as_transient(sync_setup, stalled_production):
    from services.errors import TransientError

    plan = stalled_production(allow=2_000)

    with pytest.raises(TransientError, match="step check: SQL connection error 2013"):
        _run(sync_setup, plan)


# --- 7. what the column tells apart, masking must not merge ------------------------------------------------------


def test_case_twins_in_a_case_sensitive_unique_email_column_are_refused_at_check(sync_setup):
    server, database = sync_setup["production"]
    server.execute("ALTER TABLE accounts MODIFY email VARCHAR(255) COLLATE utf8mb4_bin NOT NULL", database=database)
    server.execute("UPDATE accounts SET email = 'customer.7@real-mail.com ' WHERE id = 8", database=database)
    staging_before = _rows(sync_setup, "staging", "SELECT id, email FROM accounts ORDER BY id")

    with pytest.raises(PermanentError) as error:
        _run(sync_setup)

    message = str(error.value)
    assert message.startswith("step check: column accounts.email (utf8mb4_bin, unique index uq_email) holds ")
    assert "'Customer.7@Real-Mail.com'" in message and "'customer.7@real-mail.com '" in message
    assert _rows(sync_setup, "staging", "SELECT id, email FROM accounts ORDER BY id") == staging_before


def test_letters_a_collation_holds_equal_mask_alike():
    from kinds.sqlsync.masking import ColumnRule, Masker

    rule = ColumnRule("accounts", "email", "email", "email")
    masked = Masker(b"test-secret-0123456789abcdef").mapping(rule, ["οδυσσεασ@mail.gr", "Οδυσσεας@mail.gr"])

    assert len(set(masked.values())) == 1  # final sigma and sigma: one letter to a *_ci collation, and so here
