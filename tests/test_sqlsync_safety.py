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
