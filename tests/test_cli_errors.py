"""Expected CLI errors are one ``Error:`` line and a documented exit code, never a traceback (``--debug`` shows it):
a broken plans.yaml, no credentials, an emulator that is not running, an unknown plan. Run as users run it
(``./backup`` in a child process with an environment of its own) where the environment is the point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import cli
from commands import errors, local_environment
from services.runtime import ROOT
from tests.helpers import free_port, make_runtime
from tests.test_datastore import seed


def run_backup(tmp_path, *args, env=None):
    """``./backup ARGS`` with only the environment given (no credentials, no emulator, no make run)."""
    base = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),  # no gcloud credentials from the machine
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "no-such-key.json"),
    }
    return subprocess.run(
        [str(ROOT / "backup"), *args], env=base | (env or {}), capture_output=True, text=True, timeout=120
    )


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_a_broken_plans_file_is_one_line_naming_plan_and_field(tmp_path):
    plans = tmp_path / "plans.yaml"
    plans.write_text(
        "plans:\n  nightly:\n    kind: datastore\n    rpo_hours: soon\n"
        "    destination: {bucket: demo-backups}\n    options: {location: us-central1}\n"
    )

    result = run_backup(tmp_path, "plans", env={"BACKUP_PLANS": str(plans), "BACKUP_PROJECT": "demo-backups"})

    line = one_error_line(result)
    assert result.returncode == errors.EXIT_CONFIG
    assert "plan 'nightly'" in line and "rpo_hours" in line


def test_no_credentials_is_one_line_saying_how_to_get_them(tmp_path):
    result = run_backup(tmp_path, "runs", env={"BACKUP_PROJECT": "demo-backups"})

    line = one_error_line(result)
    assert result.returncode == errors.EXIT_NOPERM
    assert "gcloud auth application-default login" in line and "make run" in line


def test_restore_disk_without_credentials_is_one_line(tmp_path):
    args = ("restore-disk", "--snapshot", "snap-1", "--zone", "us-central1-a", "--name", "restored-1")
    result = run_backup(tmp_path, *args, env={"BACKUP_PROJECT": "demo-backups"})

    one_error_line(result)
    assert result.returncode == errors.EXIT_NOPERM


def test_an_emulator_that_is_not_running_is_named_at_once(tmp_path):
    host = f"127.0.0.1:{free_port()}"

    result = run_backup(tmp_path, "runs", env={"BACKUP_PROJECT": "demo-backups", "DATASTORE_EMULATOR_HOST": host})

    line = one_error_line(result)
    assert result.returncode == errors.EXIT_UNAVAILABLE
    assert host in line and "make run" in line


def invoke(tmp_path, *args, **overrides):
    rt = make_runtime(tmp_path, **overrides)
    return CliRunner().invoke(cli.backup, list(args), obj={"runtime": rt})


def test_an_unknown_plan_is_an_error_for_every_command(tmp_path, datastore):
    for args in (("run", "nope"), ("runs", "--plan", "nope"), ("trends", "nope")):
        result = invoke(tmp_path, *args)

        assert result.exit_code == errors.EXIT_USAGE, result.output
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("Error: no plan named 'nope'; plans: datastore-nightly")


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path, datastore, monkeypatch):
    from services.catalog import Catalog

    def broken(*_args, **_kwargs):
        raise KeyError("plan_created")

    monkeypatch.setattr(Catalog, "recent_runs", broken)

    plain = invoke(tmp_path, "runs")
    debug = invoke(tmp_path, "--debug", "runs")

    assert plain.exit_code == errors.EXIT_SOFTWARE
    assert "unexpected KeyError" in plain.stderr and "--debug" in plain.stderr
    assert isinstance(debug.exception, KeyError)


def test_run_speaks_prose_and_json_on_request(tmp_path, datastore, datastore_emulator):
    seed(datastore, "Customer")
    endpoint = {"datastore_admin_endpoint": datastore_emulator["url"]}

    prose = invoke(tmp_path, "run", "datastore-nightly", **endpoint)
    as_json = invoke(tmp_path, "run", "datastore-nightly", "--json", **endpoint)

    assert prose.exit_code == 0, prose.output
    assert prose.stdout.splitlines()[0] == "datastore-nightly: 1 target(s), 1 task(s) queued"
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)["already_queued"] == 1  # the same period: the task exists


def test_runs_has_a_header(tmp_path, datastore):
    from services.catalog import Catalog
    from tests.alerting import finished_run

    Catalog(datastore).save(finished_run("datastore-nightly", "Customer", "succeeded", make_runtime(tmp_path).now()))

    result = invoke(tmp_path, "runs")

    header, row = result.stdout.splitlines()
    assert header.split() == ["CREATED", "(UTC)", "STATUS", "PLAN", "TARGET", "DETAIL"]
    assert row.split()[2:5] == ["succeeded", "datastore-nightly", "Customer"]


@pytest.mark.parametrize("alive", [True, False])
def test_make_runs_environment_is_used_only_while_it_runs(tmp_path, alive):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        if not alive:
            child.kill()
            child.wait()
        path = tmp_path / "env.json"
        env = {"DATASTORE_EMULATOR_HOST": "127.0.0.1:8081", "BACKUP_LOCAL_TOKEN": "secret"}
        path.write_text(json.dumps({"pid": child.pid, "env": env}))

        found = local_environment(path)
    finally:
        child.kill()
        child.wait()

    assert found == ({"DATASTORE_EMULATOR_HOST": "127.0.0.1:8081"} if alive else {})
