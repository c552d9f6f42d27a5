"""The cloudsql profile: the real googleapiclient (sqladmin v1beta4) answered by a stateful fake through
``responses``; the fake moves real data between MariaDB servers and the GCS emulator, and SQL on the databases
goes over TCP (as through the Cloud SQL Auth Proxy)."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime, timedelta

import pytest
import responses
from google.auth.credentials import AnonymousCredentials

from kinds.sqlsync import kind as sqlsync
from services.errors import PermanentError, TransientError
from services.kinds import Pending, RunContext, Target
from services.plans import parse_plan
from services.runtime import Runtime, Settings
from tests.fakes_sqladmin import Backend, SqlAdminFake
from tests.sqlsync_data import SECRET, SECRET_ENV, load_shop, production_rows

ENDPOINT = "https://sqladmin.fake.test/"
PROJECT = "shop-prod"
BUCKET = "sqlsync-dumps"
PERIOD = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
_names = itertools.count()


@pytest.fixture
def cloud(mariadb_servers, gcs, monkeypatch):
    gcs.create_bucket(BUCKET)
    n = next(_names)
    production, scratch, staging = (mariadb_servers[k] for k in ("production", "scratch", "staging"))
    prod_db = production.fresh_database(f"cloud_{n}")
    scratch_db = scratch.fresh_database(f"cloud_scratch_{n}")
    staging_db = staging.fresh_database(f"cloud_{n}")
    load_shop(production, prod_db, staging, staging_db)
    fake = SqlAdminFake(
        project=PROJECT,
        backends={name: Backend("127.0.0.1", server.port) for name, server in mariadb_servers.items()},
        storage=gcs,
    )

    def ref(name, server, database):
        # SQL goes over TCP to the server playing the instance, as it would through the Cloud SQL Auth Proxy.
        return {
            "instance": f"{PROJECT}:europe-west1:{name}",
            "host": "127.0.0.1",
            "port": server.port,
            "database": database,
        }

    raw = {
        "kind": "sqlsync",
        "retention": {"keep": 2},
        "select": ref("production", production, prod_db),
        "destination": {
            "staging": ref("staging", staging, staging_db),
            "scratch": ref("scratch", scratch, scratch_db),
            "bucket": f"gs://{BUCKET}/exports",
        },
        "options": {
            "profile": "cloudsql",
            "endpoint": ENDPOINT,
            "secret_env": "SQLSYNC_TEST_SECRET",
            "poll_seconds": 0,
            "rules": {
                "accounts": {"email": "email", "phone": "phone", "name": "name"},
                "orders": {"contact_email": "email"},
            },
            "preserve": {"accounts": "demo = 1", "orders": "account_id IN (SELECT id FROM accounts WHERE demo = 1)"},
            "allow": ["accounts.notes", "accounts.ssn", "accounts.country", "accounts.demo", "orders.total"],
        },
    }
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for method in ("GET", "POST", "DELETE"):
            mock.add_callback(method, re.compile(re.escape(ENDPOINT) + ".*"), callback=fake.callback)
        mock.add_passthru(re.compile(r"http://127\.0\.0\.1:\d+/.*"))  # the GCS emulator
        yield {
            "fake": fake,
            "raw": raw,
            "plan": parse_plan("staging-refresh", raw),
            "rt": Runtime(Settings.from_env({SECRET_ENV: SECRET}), plans={}, credentials=AnonymousCredentials()),
            "staging": (staging, staging_db),
            "gcs": gcs,
        }


def _run(cloud, period=PERIOD, **kwargs):
    run = RunContext(run_id="r1", plan="staging-refresh", target_key="staging", period=period)
    return sqlsync.drive(cloud["plan"], run, cloud["rt"], sleep=lambda _: None, **kwargs), run


def test_the_cloud_chain_exports_imports_backs_up_and_cleans_up(cloud):
    outcome, run = _run(cloud)

    staging, staging_db = cloud["staging"]
    emails = {r[0] for r in staging.execute("SELECT email FROM accounts WHERE demo = 0", database=staging_db)}
    fake = cloud["fake"]
    exports = [op for op in fake.operations.values() if op["operationType"] == "EXPORT"]
    assert fake.started == [
        ("production", "EXPORT"),
        ("scratch", "IMPORT"),
        ("scratch", "EXPORT"),
        ("staging", "BACKUP_VOLUME"),
        ("staging", "IMPORT"),
    ]
    assert all(op["exportContext"]["offload"] is True for op in exports)
    assert exports[1]["exportContext"]["sqlExportOptions"]["tables"] == ["accounts", "orders"]
    assert (
        exports[0]["exportContext"]["uri"]
        == f"gs://{BUCKET}/exports/sqlsync/staging-refresh/20261123T020000Z/production.sql.gz"
    )
    assert len(emails) == 120 and not emails & {row[1] for row in production_rows()}
    assert [r["description"] for r in fake.backup_runs["staging"]] == ["sqlsync:staging-refresh:20261123T020000Z"]
    assert list(cloud["gcs"].list_blobs(BUCKET)) == []  # the unmasked production export is gone
    assert {row[0] for row in staging.execute("SHOW TABLES", database=staging_db)} == {"accounts", "orders"}
    assert outcome.stats["step_reached"] == "cleanup-scratch"
    assert any(line.startswith("step import-staging: done in") for line in run.log_lines)


def test_a_busy_instance_makes_the_step_wait_instead_of_starting_a_second_operation(cloud):
    fake = cloud["fake"]
    foreign = fake.start_foreign_operation("staging", "EXPORT")
    plan, rt = cloud["plan"], cloud["rt"]
    run = RunContext("r1", "staging-refresh", "staging", PERIOD)
    state = {"step": "backup-staging", "timings": {}}

    waiting = sqlsync.poll(plan, Target("staging"), state, run, rt)
    fake.advance(foreign)
    fake.advance(foreign)  # the other operation finishes
    started = sqlsync.poll(plan, Target("staging"), waiting.state, run, rt)

    assert isinstance(waiting, Pending) and "operation" not in waiting.state
    assert f"busy with EXPORT operation {foreign}" in run.log_lines[0]
    assert isinstance(started, Pending) and started.state["operation"]["instance"] == "staging"
    assert fake.conflicts == 0 and fake.started == [("staging", "BACKUP_VOLUME")]


def test_a_duplicated_task_adopts_the_operation_it_already_started(cloud):
    fake = cloud["fake"]
    plan, rt = cloud["plan"], cloud["rt"]
    run = RunContext("r1", "staging-refresh", "staging", PERIOD)
    state = {"step": "export-production", "timings": {}}

    first = sqlsync.poll(plan, Target("staging"), dict(state, timings={}), run, rt)
    again = sqlsync.poll(plan, Target("staging"), dict(state, timings={}), run, rt)

    assert first.state["operation"]["name"] == again.state["operation"]["name"]
    assert fake.started == [("production", "EXPORT")]


def test_a_failed_operation_stops_the_run_naming_the_step_and_leaves_staging_alone(cloud):
    cloud["fake"].fail_next("scratch", "IMPORT", "ERROR 1064 (42000) at line 12: syntax error")
    staging, staging_db = cloud["staging"]

    with pytest.raises(PermanentError, match=r"step import-scratch: operation failed: op-\d+ on scratch: .*line 12"):
        _run(cloud)

    assert staging.execute("SELECT COUNT(*) FROM accounts", database=staging_db) == [(3,)]


@pytest.mark.parametrize(
    ("status", "error", "words"),
    [
        (403, PermanentError, "step export-production: auth: "),
        (404, PermanentError, "step export-production: not found: "),
        (429, TransientError, "step export-production: quota: "),
        (503, TransientError, "step export-production: server error 503: "),
    ],
)
def test_api_errors_are_classified_with_the_step_named(cloud, status, error, words):
    cloud["fake"].http_fault("POST", "/instances/production/export", status, "the fake says no")

    with pytest.raises(error) as raised:
        _run(cloud)

    assert str(raised.value) == words + "the fake says no"
    assert getattr(raised.value, "rate_limited", False) == (status == 429)


def test_safety_backups_are_pruned_to_retention_and_others_are_kept(cloud):
    fake = cloud["fake"]
    fake.backup_runs["staging"] = [
        {
            "id": "900",
            "description": "nightly automated",
            "status": "SUCCESSFUL",
            "type": "AUTOMATED",
            "instance": "staging",
            "_operation": "none",
        }
    ]

    for day in range(3):
        _run(cloud, period=PERIOD + timedelta(days=day))

    kept = [r["description"] for r in fake.backup_runs["staging"]]
    assert kept == [
        "nightly automated",
        "sqlsync:staging-refresh:20261124T020000Z",
        "sqlsync:staging-refresh:20261125T020000Z",
    ]


def test_the_endpoint_can_come_from_the_environment(cloud):
    raw = dict(cloud["raw"], options={k: v for k, v in cloud["raw"]["options"].items() if k != "endpoint"})
    cloud["plan"] = parse_plan("staging-refresh", raw)
    cloud["rt"] = Runtime(
        Settings.from_env({"BACKUP_SQLADMIN_ENDPOINT": ENDPOINT.rstrip("/"), SECRET_ENV: SECRET}),
        plans={},
        credentials=AnonymousCredentials(),
    )

    outcome, _ = _run(cloud, stop_at="import-scratch")

    assert outcome.stats["step_reached"] == "import-scratch"
    assert cloud["fake"].started == [("production", "EXPORT"), ("scratch", "IMPORT")]


@pytest.mark.parametrize(
    ("status", "error", "words"),
    [
        (409, TransientError, "step export-production: another operation is running: "),
        (400, PermanentError, "step export-production: request refused (400): "),
    ],
)
def test_conflicts_and_refusals_are_judged_as_for_every_kind(cloud, status, error, words):
    from googleapiclient.errors import HttpError

    from services import gcp_errors

    cloud["fake"].http_fault("POST", "/instances/production/export", status, "the fake says no")

    with pytest.raises(error) as raised:
        _run(cloud)

    assert str(raised.value) == words + "the fake says no"
    cause = raised.value.__cause__
    assert isinstance(cause, HttpError)
    assert type(gcp_errors.classify(cause, "anything")) is type(raised.value)


def _scratch_rows(backend, database, sql):
    import pymysql

    with (
        pymysql.connect(host=backend.host, port=backend.port, user="root", database=database) as conn,
        conn.cursor() as cur,
    ):
        cur.execute(sql)
        return cur.fetchall()


def test_the_export_is_masked_on_its_way_so_scratch_never_holds_an_original(cloud):
    import gzip

    outcome, run = _run(cloud, stop_at="import-scratch")

    prefix = "exports/sqlsync/staging-refresh/20261123T020000Z/"
    names = sorted(blob.name for blob in cloud["gcs"].list_blobs(BUCKET))
    masked = gzip.decompress(cloud["gcs"].bucket(BUCKET).blob(prefix + "production-masked.sql.gz").download_as_bytes())
    imports = [op for op in cloud["fake"].operations.values() if op["operationType"] == "IMPORT"]
    scratch_server, scratch_db = cloud["fake"].backends["scratch"], cloud["plan"].settings.scratch.database
    assert names == [prefix + "production-masked.sql.gz"]  # the unmasked export is gone once masked
    assert imports[0]["importContext"]["uri"].endswith("/production-masked.sql.gz")
    assert b"INSERT INTO `accounts`" in masked and b"Real-Mail.com" not in masked
    assert outcome.stats["masked_rows"] == 120 + 360
    assert any(
        "step import-scratch: masked 480 rows of accounts, orders of the export" in line for line in run.log_lines
    )
    emails = {row[0] for row in _scratch_rows(scratch_server, scratch_db, "SELECT email FROM accounts")}
    assert len(emails) == 120 and not emails & {row[1] for row in production_rows()}


def test_in_place_masking_still_runs_in_the_cloud_profile(cloud):
    cloud["plan"] = parse_plan(
        "staging-refresh", dict(cloud["raw"], options={**cloud["raw"]["options"], "mask_mode": "in-place"})
    )

    outcome, run = _run(cloud)

    staging, staging_db = cloud["staging"]
    emails = {r[0] for r in staging.execute("SELECT email FROM accounts WHERE demo = 0", database=staging_db)}
    assert outcome.stats["step_reached"] == "cleanup-scratch"
    assert any(line.startswith("step mask: 480 rows in accounts, orders") for line in run.log_lines)
    assert len(emails) == 120 and not emails & {row[1] for row in production_rows()}


def test_a_cloud_drill_checks_the_runs_backup_and_staging(cloud):
    from services.kinds import BackupRef

    plan = parse_plan(
        "staging-refresh",
        dict(cloud["raw"], drill={"every": "1d"}, options={**cloud["raw"]["options"], "drill_sample": 120}),
    )
    outcome, _ = _run(cloud)
    backup = BackupRef("r1", outcome.output, outcome.stats, PERIOD)
    run = RunContext("drill-1", plan.name, "staging", PERIOD)

    passed = sqlsync.KIND.drill(plan, Target("staging"), backup, None, run, cloud["rt"])
    staging, staging_db = cloud["staging"]
    staging.execute("UPDATE accounts SET email = 'Customer.9@Real-Mail.com' WHERE id = 9", database=staging_db)
    with pytest.raises(PermanentError) as failed:
        sqlsync.KIND.drill(plan, Target("staging"), backup, None, run, cloud["rt"])
    missing = BackupRef("r0", outcome.output, {}, PERIOD - timedelta(days=1))
    with pytest.raises(PermanentError, match="no successful backup run sqlsync:staging-refresh:20261122T020000Z"):
        sqlsync.KIND.drill(plan, Target("staging"), missing, None, run, cloud["rt"])

    assert passed.stats["passed"] is True
    assert passed.stats["checked"][0] == "backup run sqlsync:staging-refresh:20261123T020000Z of staging: SUCCESSFUL"
    assert "personal data in staging: accounts.email: an original email" in str(failed.value)
