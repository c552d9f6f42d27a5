"""``backup sqlsync PLAN``: --stop-at, --start-at with --period, --dry-run and exit codes, on real MariaDB servers."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cli import backup
from services.plans import parse_plan
from tests.sqlsync_data import make_sync_setup

PERIOD = "20261123T020000Z"


@pytest.fixture
def sync_setup(mariadb_servers, tmp_path, monkeypatch):
    return make_sync_setup(mariadb_servers, tmp_path, monkeypatch)


def _invoke(setup, *args):
    setup["rt"]._plans = {"staging-refresh": setup["plan"]}
    return CliRunner().invoke(backup, ["sqlsync", "staging-refresh", *args], obj={"runtime": setup["rt"]})


def _count(setup, side, sql):
    server, database = setup[side]
    return server.execute(sql, database=database)[0][0]


def test_stop_at_then_start_at_resumes_the_same_run(sync_setup):
    stopped = _invoke(sync_setup, "--stop-at", "export-scratch", "--period", PERIOD)
    staging_between = _count(sync_setup, "staging", "SELECT COUNT(*) FROM accounts")

    resumed = _invoke(sync_setup, "--start-at", "backup-staging", "--period", PERIOD)

    assert stopped.exit_code == 0, stopped.output
    assert "reached step export-scratch" in stopped.output and "step mask: done in" in stopped.output
    assert staging_between == 3
    assert resumed.exit_code == 0, resumed.output
    assert "step mask:" not in resumed.output and "reached step cleanup-scratch" in resumed.output
    assert _count(sync_setup, "staging", "SELECT COUNT(*) FROM accounts") == 122


def test_dry_run_lists_the_steps_checks_and_changes_nothing(sync_setup):
    result = _invoke(sync_setup, "--dry-run")

    assert result.exit_code == 0, result.output
    assert "masking accounts.country=fixed, accounts.email=email" in result.output
    assert "  mask: nothing left: masked during import-scratch" in result.output
    assert "step check: done in" in result.output and "nothing was changed" in result.output
    assert _count(sync_setup, "staging", "SELECT COUNT(*) FROM accounts") == 3
    assert (
        _count(sync_setup, "scratch", "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()")
        == 0
    )


def test_resuming_needs_the_period_and_failures_exit_non_zero(sync_setup):
    no_period = _invoke(sync_setup, "--start-at", "mask")
    sync_setup["raw"]["options"]["rules"]["orders"]["shipping_phone"] = "phone"
    sync_setup["plan"] = parse_plan("staging-refresh", sync_setup["raw"])
    drift = _invoke(sync_setup)

    assert no_period.exit_code == 2 and "give that run's --period" in no_period.output
    assert drift.exit_code == 1
    assert "step check: schema drift: column orders.shipping_phone" in drift.output


def test_a_dump_deleted_before_a_resume_is_a_failure_not_worth_retrying(sync_setup):
    stopped = _invoke(sync_setup, "--stop-at", "export-production", "--period", PERIOD)
    (sync_setup["dumps"] / "staging-refresh" / PERIOD / "production.sql").unlink()

    resumed = _invoke(sync_setup, "--start-at", "import-scratch", "--period", PERIOD)

    assert stopped.exit_code == 0, stopped.output
    assert resumed.exit_code == 1, resumed.output
    assert "step import-scratch: dump " in resumed.output and "production.sql does not exist" in resumed.output


def test_a_plan_error_is_one_line_without_a_traceback(sync_setup, tmp_path):
    from google.auth.credentials import AnonymousCredentials

    from services.runtime import Runtime, Settings

    plans = tmp_path / "plans.yaml"
    plans.write_text("plans:\n  staging-refresh:\n    kind: sqlsync\n    select: {database: shop}\n")
    rt = Runtime(Settings.from_env({"BACKUP_PLANS": str(plans)}), credentials=AnonymousCredentials())

    result = CliRunner().invoke(backup, ["sqlsync", "staging-refresh"], obj={"runtime": rt})

    assert result.exit_code == 1
    assert result.output.startswith("Error: plans.yaml: plan 'staging-refresh', field ")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(("keep", "restart"), [((), "export-production"), (("--keep-files",), "import-scratch")])
def test_a_half_done_step_prints_where_to_start_again(mariadb_servers, tmp_path, monkeypatch, keep, restart):
    setup = make_sync_setup(mariadb_servers, tmp_path, monkeypatch, mask_mode="in-place")
    assert _invoke(setup, "--stop-at", "import-scratch", "--period", PERIOD).exit_code == 0
    scratch, scratch_db = setup["scratch"]
    scratch.execute(
        "CREATE TABLE _sqlsync_progress (step VARCHAR(32) PRIMARY KEY, state VARCHAR(16))", database=scratch_db
    )
    scratch.execute("INSERT INTO _sqlsync_progress VALUES ('mask', 'started')", database=scratch_db)

    result = _invoke(setup, "--start-at", "mask", "--period", PERIOD, *keep)

    assert result.exit_code == 1
    assert f"resume with: backup sqlsync staging-refresh --start-at {restart} --period {PERIOD}" in result.output
    assert (setup["dumps"] / "staging-refresh" / PERIOD / "production.sql").exists() == bool(keep)
