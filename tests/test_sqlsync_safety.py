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
