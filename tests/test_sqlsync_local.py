"""The whole sqlsync pipeline against three real MariaDB servers (production, scratch, staging), local profile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kinds.sqlsync import kind as sqlsync
from services.errors import ConfigError, PermanentError
from services.kinds import RunContext
from services.plans import parse_plan
from tests.sqlsync_data import make_sync_setup, production_rows

PERIOD = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


@pytest.fixture
def sync_setup(mariadb_servers, tmp_path, monkeypatch):
    """Fresh production/scratch/staging databases with data, and a local-profile plan pointing at them."""
    return make_sync_setup(mariadb_servers, tmp_path, monkeypatch)


@pytest.fixture
def in_place_setup(mariadb_servers, tmp_path, monkeypatch):
    """The same, masking in place in scratch after a plain import (what the cloudsql profile does)."""
    return make_sync_setup(mariadb_servers, tmp_path, monkeypatch, mask_mode="in-place")


def _run(setup, period=PERIOD, **kwargs):
    run = RunContext(run_id="r1", plan="staging-refresh", target_key="staging-shop", period=period)
    outcome = sqlsync.drive(setup["plan"], run, setup["rt"], **kwargs)
    return outcome, run


def _rows(setup, side, sql):
    server, database = setup[side]
    return server.execute(sql, database=database)


def test_full_sync_leaves_no_original_personal_value_in_staging(sync_setup):
    outcome, run = _run(sync_setup)

    originals = production_rows()
    staged = _rows(
        sync_setup, "staging", "SELECT id, email, phone, name, notes, ssn, country FROM accounts WHERE demo = 0"
    )
    contacts = {r[0] for r in _rows(sync_setup, "staging", "SELECT contact_email FROM orders")}
    assert outcome.stats["step_reached"] == "cleanup-scratch"
    assert len(staged) == 120
    for column in (1, 2, 3, 4, 5):
        assert not {str(r[column]).lower() for r in staged} & {str(o[column]).lower() for o in originals}
    assert not contacts & {o[1] for o in originals}
    assert all(r[1].endswith("@example.com") and r[5] is None and r[6] == "XX" for r in staged)
    assert all(r[2].startswith("+44 ") and len(r[2]) == len(originals[0][2]) for r in staged)
    assert all(len(r[4]) == len(o[4]) for r, o in zip(sorted(staged), originals, strict=True))
    assert [line for line in run.log_lines if line.startswith("step ") and " done in " in line][-1].startswith(
        "step cleanup-scratch: done in"
    )
    assert _rows(sync_setup, "scratch", "SHOW TABLES") == []
    assert not (sync_setup["dumps"] / "staging-refresh" / "20261123T020000Z" / "production.sql").exists()
    assert (sync_setup["dumps"] / "staging-refresh" / "20261123T020000Z" / "staging-before.sql").stat().st_size > 0


def test_stream_masking_never_lets_an_original_value_into_scratch(sync_setup):
    outcome, run = _run(sync_setup, stop_at="import-scratch")

    originals = production_rows()
    scratch = _rows(sync_setup, "scratch", "SELECT id, email, phone, name, notes, ssn, country FROM accounts")
    contacts = {r[0] for r in _rows(sync_setup, "scratch", "SELECT contact_email FROM orders")}
    assert outcome.stats["masked_rows"] == 120 + 360
    assert len(scratch) == 120
    for column in (1, 2, 3, 4, 5):
        assert not {str(r[column]).lower() for r in scratch} & {str(o[column]).lower() for o in originals}
    assert not contacts & {o[1] for o in originals}
    assert _rows(sync_setup, "scratch", "SELECT step, state FROM _sqlsync_progress") == [("mask", "done")]
    assert any("masking 480 rows of accounts, orders on the way in" in line for line in run.log_lines)


def test_same_input_masks_alike_across_tables_and_runs(sync_setup):
    _run(sync_setup)
    first = _rows(sync_setup, "staging", "SELECT id, email, phone, name FROM accounts WHERE demo = 0 ORDER BY id")

    _run(sync_setup, period=PERIOD + timedelta(days=1))
    second = _rows(sync_setup, "staging", "SELECT id, email, phone, name FROM accounts WHERE demo = 0 ORDER BY id")

    joined = _rows(
        sync_setup,
        "staging",
        "SELECT COUNT(*), SUM(o.contact_email = a.email) FROM orders o JOIN accounts a ON a.id = o.account_id"
        " WHERE a.demo = 0",
    )
    assert first == second
    assert joined[0][0] == 360 and joined[0][1] == 360  # orders.contact_email masked exactly like accounts.email


def test_preserved_rows_survive_with_new_ids_and_foreign_keys_intact(sync_setup):
    outcome, _ = _run(sync_setup)

    demo = dict(_rows(sync_setup, "staging", "SELECT email, id FROM accounts WHERE demo = 1"))
    demo_orders = _rows(
        sync_setup,
        "staging",
        "SELECT a.email, o.total FROM orders o JOIN accounts a ON a.id = o.account_id"
        " WHERE a.demo = 1 ORDER BY o.total",
    )
    stale = _rows(sync_setup, "staging", "SELECT COUNT(*) FROM accounts WHERE email = 'old.copy@real-mail.com'")
    assert set(demo) == {"demo.sales@demo.test", "demo.support@demo.test"}
    assert demo["demo.sales@demo.test"] > 120  # id 1 collided with production and got a new one
    assert demo["demo.support@demo.test"] == 500  # no collision: id kept
    assert demo_orders == [("demo.support@demo.test", 42), ("demo.sales@demo.test", 99)]
    assert stale == [(0,)]
    assert outcome.stats["remapped_ids"] == {"accounts": 1, "orders": 2}


def test_unique_indexes_are_back_after_masking(sync_setup):
    _run(sync_setup)

    indexes = _rows(sync_setup, "staging", "SHOW INDEX FROM accounts WHERE Non_unique = 0")

    assert {row[2] for row in indexes} == {"PRIMARY", "uq_email", "uq_phone"}


def test_a_rule_on_a_vanished_column_is_refused_listing_the_columns(sync_setup):
    sync_setup["raw"]["options"]["rules"]["accounts"]["phone_number"] = "phone"
    plan = parse_plan("staging-refresh", sync_setup["raw"])
    before = _rows(sync_setup, "staging", "SELECT COUNT(*) FROM accounts")

    with pytest.raises(PermanentError) as error:
        sqlsync.drive(plan, RunContext("r", "staging-refresh", "t", PERIOD), sync_setup["rt"])

    assert "step check" in str(error.value) and "schema drift" in str(error.value)
    assert "accounts.phone_number" in str(error.value) and "id, email, phone, name" in str(error.value)
    assert _rows(sync_setup, "staging", "SELECT COUNT(*) FROM accounts") == before


def test_staging_that_is_production_is_refused_in_the_plan_and_on_the_server(sync_setup):
    production, prod_db = sync_setup["production"]
    raw = sync_setup["raw"]
    raw["destination"]["staging"] = {"host": "localhost", "port": production.port, "database": prod_db}

    with pytest.raises(ConfigError, match="staging resolves to the production database"):
        parse_plan("staging-refresh", raw)

    # The same server reached another way (its socket) is only caught by asking the servers who they are.
    raw["destination"]["staging"] = {"socket": str(production.socket_path), "database": prod_db}
    plan = parse_plan("staging-refresh", raw)
    with pytest.raises(PermanentError, match="step check: staging resolves to the production database"):
        sqlsync.drive(plan, RunContext("r", "staging-refresh", "t", PERIOD), sync_setup["rt"])
    assert production.execute("SELECT COUNT(*) FROM accounts", database=prod_db) == [(120,)]


def test_start_at_resumes_a_run_stopped_after_masking(sync_setup):
    stopped, _ = _run(sync_setup, stop_at="mask")
    staging_while_stopped = _rows(sync_setup, "staging", "SELECT COUNT(*) FROM accounts")

    resumed, run = _run(sync_setup, start_at="preserve")

    assert stopped.stats["step_reached"] == "mask"
    assert staging_while_stopped == [(3,)]  # untouched until the import step
    assert resumed.stats["step_reached"] == "cleanup-scratch"
    assert run.log_lines[0] == "sqlsync staging-refresh: starting at step preserve"
    assert _rows(sync_setup, "staging", "SELECT COUNT(*) FROM accounts") == [(122,)]


@pytest.mark.parametrize(
    ("leak", "found"),
    [
        (
            "UPDATE orders SET contact_email = 'Customer.7@Real-Mail.com' WHERE id = 5",
            "orders.contact_email: an original email from accounts.email is present",
        ),
        (
            "UPDATE accounts SET phone = '+44 7700 900007' WHERE id = 7",
            "accounts.phone: the row with key [7] still holds its original value",
        ),
        (
            "UPDATE accounts SET name = 'Zebulon9 Quixotic9' WHERE id = 9",
            "accounts.name: the row with key [9] still holds its original value",
        ),
    ],
)
def test_verification_fails_the_run_when_an_original_value_reaches_staging(sync_setup, leak, found):
    _run(sync_setup, stop_at="import-staging")
    server, database = sync_setup["staging"]
    server.execute(leak, database=database)
    sync_setup["plan"] = parse_plan(
        "staging-refresh", {**sync_setup["raw"], "options": {**sync_setup["raw"]["options"], "verify_sample": 120}}
    )

    with pytest.raises(PermanentError) as error:
        _run(sync_setup, start_at="verify")

    assert str(error.value).startswith("step verify: personal data found in staging after the import: ")
    assert found in str(error.value)


def test_safety_dump_is_required_before_staging_is_overwritten(sync_setup):
    before = _rows(sync_setup, "staging", "SELECT COUNT(*) FROM accounts")

    with pytest.raises(PermanentError, match="no safety backup of staging"):
        _run(sync_setup, start_at="import-staging")

    assert _rows(sync_setup, "staging", "SELECT COUNT(*) FROM accounts") == before


def test_scratch_on_the_staging_server_moves_tables_with_their_foreign_keys(sync_setup):
    import pymysql

    staging, staging_db = sync_setup["staging"]
    scratch_db = staging.fresh_database(f"{staging_db}_scratch")
    sync_setup["raw"]["destination"]["scratch"] = {"host": "127.0.0.1", "port": staging.port, "database": scratch_db}
    sync_setup["plan"] = parse_plan("staging-refresh", sync_setup["raw"])

    outcome, run = _run(sync_setup)

    assert (
        "step export-scratch: skipped, scratch shares the staging server and its tables will be moved" in run.log_lines
    )
    assert _rows(sync_setup, "staging", "SELECT COUNT(*) FROM accounts") == [(122,)]
    assert staging.execute("SHOW TABLES", database=scratch_db) == []
    with pytest.raises(pymysql.err.IntegrityError):
        staging.execute("INSERT INTO orders (account_id, total) VALUES (99999, 1)", database=staging_db)
    assert (sync_setup["dumps"] / "staging-refresh" / "20261123T020000Z" / "staging-before.sql").exists()


def test_a_mask_task_delivered_twice_does_not_mask_twice(in_place_setup):
    sync_setup = in_place_setup
    _run(sync_setup, stop_at="mask")
    scratch, scratch_db = sync_setup["scratch"]
    after_first = scratch.execute("SELECT email, phone, name FROM accounts ORDER BY id", database=scratch_db)

    again, run = _run(sync_setup, start_at="mask", stop_at="mask")

    assert (
        "step mask: scratch is already masked (on import, or by an earlier attempt of this step); skipped"
        in run.log_lines
    )
    assert scratch.execute("SELECT email, phone, name FROM accounts ORDER BY id", database=scratch_db) == after_first


def test_a_mask_that_stopped_half_way_is_not_run_over_half_masked_data(in_place_setup):
    sync_setup = in_place_setup
    _run(sync_setup, stop_at="import-scratch")
    scratch, scratch_db = sync_setup["scratch"]
    scratch.execute(
        "CREATE TABLE _sqlsync_progress (step VARCHAR(32) PRIMARY KEY, state VARCHAR(16) NOT NULL)", database=scratch_db
    )
    scratch.execute("INSERT INTO _sqlsync_progress VALUES ('mask', 'started')", database=scratch_db)

    with pytest.raises(PermanentError, match="step mask: an earlier attempt of step mask stopped half-way"):
        _run(sync_setup, start_at="mask")


def test_the_progress_marker_never_reaches_staging(sync_setup):
    _run(sync_setup)

    tables = {row[0] for row in _rows(sync_setup, "staging", "SHOW TABLES")}

    assert tables == {"accounts", "orders"}


def test_masking_works_where_the_server_refuses_load_data_local(in_place_setup):
    sync_setup = in_place_setup
    scratch, scratch_db = sync_setup["scratch"]
    scratch.execute("SET GLOBAL local_infile = 0")  # as Cloud SQL's default flags have it
    try:
        _run(sync_setup, stop_at="mask")
    finally:
        scratch.execute("SET GLOBAL local_infile = 1")

    masked = scratch.execute("SELECT email FROM accounts", database=scratch_db)
    assert len(masked) == 120 and all(row[0].endswith("@example.com") for row in masked)
