"""The sqlsync restore drill on real MariaDB: the newest run's staging safety dump restored into a scratch database,
compared with the dump table by table, searched for production values, timed, and the scratch dropped."""

from __future__ import annotations

import pytest

from services.catalog import FAILED, SUCCEEDED
from services.plans import parse_plan
from tests.sqlsync_data import SECRET, SECRET_ENV, make_sync_setup
from tests.test_drills import _drill_all_of

DRILL_DB = "backup_scheduler_drill_staging_refresh"


@pytest.fixture
def synced(mariadb_servers, tmp_path, datastore, monkeypatch):
    """A sync plan with a daily drill, run once through the service."""
    from tests.helpers import Clock
    from tests.service_harness import Service

    setup = make_sync_setup(mariadb_servers, tmp_path, monkeypatch)

    def sync(before=None, **options):
        setup["raw"]["drill"] = {"every": "1d"}
        setup["raw"]["options"].update(options)
        plan = parse_plan("staging-refresh", setup["raw"])
        svc = Service(tmp_path, datastore, {plan.name: plan}, Clock(), environ={SECRET_ENV: SECRET})
        if before:
            before(setup)
        answer = svc.run(svc.task(plan.name, "staging-" + plan.settings.staging.database))
        assert answer.get_json()["status"] == SUCCEEDED, answer.get_json()
        svc.setup = setup
        return svc

    return sync


def _scratch_databases(svc):
    server, _ = svc.setup["scratch"]
    return {row[0] for row in server.execute("SHOW DATABASES")}


def _safety_dump(svc):
    (dump,) = svc.setup["dumps"].glob("staging-refresh/*/staging-before.sql")
    return dump


def test_a_drill_restores_the_safety_dump_into_scratch_and_compares_every_table(synced):
    svc = synced()
    server, _ = svc.setup["scratch"]
    server.execute(f"CREATE DATABASE {DRILL_DB}")  # what a crashed drill would have left
    server.execute("CREATE TABLE leftover (id INT)", database=DRILL_DB)

    _scheduled, answers = _drill_all_of(svc, "staging-refresh")

    assert [a.get_json()["status"] for a in answers] == [SUCCEEDED]
    (state,) = svc.catalog.target_states("staging-refresh")
    drill = svc.catalog.get(state.last_drill_run_id)
    assert drill.stats["passed"] is True and state.last_drill_seconds is not None
    assert "2 tables, 5 rows restored into" in drill.stats["checked"][1]  # staging as it was: 3 accounts, 2 orders
    assert DRILL_DB not in _scratch_databases(svc)


def test_a_dump_that_does_not_restore_as_it_was_written_fails_the_drill(synced):
    svc = synced()
    dump = _safety_dump(svc)
    # Too long for CHAR(2): the dump's own sql_mode is not strict, so the server cuts it down without a word.
    dump.write_text(dump.read_text().replace("'US'", "'USA'", 1))

    _scheduled, answers = _drill_all_of(svc, "staging-refresh")

    error = answers[0].get_json()["error"]
    assert answers[0].get_json()["status"] == FAILED
    assert "sha256 differs from the one recorded" in error
    assert "table accounts: restored rows differ from the dump's (sha256)" in error
    assert DRILL_DB not in _scratch_databases(svc)


def test_a_truncated_dump_fails_the_drill_without_restoring(synced):
    svc = synced()
    dump = _safety_dump(svc)
    dump.write_bytes(dump.read_bytes()[:-300])

    _scheduled, answers = _drill_all_of(svc, "staging-refresh")

    assert answers[0].get_json()["status"] == FAILED
    assert "has no completion marker: it is truncated" in answers[0].get_json()["error"]


def test_a_production_value_in_the_restored_copy_fails_the_drill(synced):
    def leak(setup):
        server, database = setup["staging"]
        server.execute("UPDATE accounts SET email = 'Customer.7@Real-Mail.com' WHERE id = 2", database=database)

    svc = synced(before=leak, drill_sample=120)  # every production row: the one leaked value is among them

    _scheduled, answers = _drill_all_of(svc, "staging-refresh")

    assert answers[0].get_json()["status"] == FAILED
    assert "personal data in the restored copy: accounts.email: an original email" in answers[0].get_json()["error"]
