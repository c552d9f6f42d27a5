"""`make run` refuses at once, in one line, what would otherwise hang or fail later: a port already taken (another
`make run`), and plans that do not load. Run as `make run` runs it (localdev.py in its own process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from services.runtime import ROOT


def start_localdev(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "localdev.py")],
        env=os.environ | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def four_free_ports() -> int:
    """A port whose next three are free too (make run uses four in a row)."""
    for base in range(20000, 60000, 97):
        with socket.socket() as a, socket.socket() as b, socket.socket() as c, socket.socket() as d:
            try:
                for offset, sock in enumerate((a, b, c, d)):
                    sock.bind(("127.0.0.1", base + offset))
            except OSError:
                continue
            return base
    raise RuntimeError("no four free ports in a row")


def test_a_port_in_use_is_named_and_make_run_stops_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app_port = taken.getsockname()[1]
        process = start_localdev({"PORT": str(app_port)})
        _out, err = process.communicate(timeout=10)  # raises if make run hangs

    assert process.returncode != 0
    assert f"port {app_port} (the app) is in use" in err and "another `make run`" in err
    assert "Traceback" not in err


def test_invalid_plans_are_shown_on_the_console(tmp_path):
    plans = tmp_path / "plans.yaml"
    plans.write_text("plans:\n  nightly:\n    kind: datastore\n    rpo_hours: soon\n")
    process = start_localdev({"PORT": str(four_free_ports()), "BACKUP_PLANS": str(plans)})
    _out, err = process.communicate(timeout=30)

    assert process.returncode == 78
    assert "plan 'nightly'" in err and "Traceback" not in err


def test_run_history_survives_a_restart_of_make_runs_datastore_emulator(tmp_path):
    import requests
    from google.cloud import datastore

    from services.local_emulators import datastore_emulator_command
    from tests.helpers import free_port, wait_until

    port = free_port()

    def start() -> subprocess.Popen:
        command = datastore_emulator_command(port, tmp_path / "datastore", on_disk=True)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_until(up, timeout=60, what="the Datastore emulator")
        return process

    previous = os.environ.get("DATASTORE_EMULATOR_HOST")
    os.environ["DATASTORE_EMULATOR_HOST"] = f"127.0.0.1:{port}"
    try:
        first = start()
        client = datastore.Client(project="demo-backups")
        run = datastore.Entity(client.key("BackupRun", "run-1", namespace="backup-scheduler"))
        run["status"] = "succeeded"
        client.put(run)
        first.terminate()
        first.wait(timeout=30)
        second = start()
        found = datastore.Client(project="demo-backups").get(run.key)
        second.terminate()
        second.wait(timeout=30)
    finally:
        if previous is None:
            os.environ.pop("DATASTORE_EMULATOR_HOST", None)
        else:
            os.environ["DATASTORE_EMULATOR_HOST"] = previous

    assert found is not None and found["status"] == "succeeded"
