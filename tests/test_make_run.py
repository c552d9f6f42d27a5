"""`make run` as a newcomer starts it (localdev.py, a process of its own): the app and a second worker process for
the worker queues, as App Engine and Cloud Run split them in production. Every kind runs end to end through it with
a budget of 0 seconds, so each job task does its smallest unit of work and hands on: a directory tree and a CouchDB
database complete only through continuations. Compute and Filestore, which have no local stand-in, are the tests'
stateful fakes served over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

from services.runtime import ROOT
from tests.couch_data import make_docs, seed
from tests.fakes_compute import ComputeFake, FakeServer
from tests.fakes_filestore import FilestoreFake
from tests.helpers import free_port
from tests.sqlsync_data import SECRET, SECRET_ENV, make_sync_setup

TERMINAL = {"succeeded", "failed", "skipped"}


def _port_block() -> int:
    """A port whose next three are free too (localdev takes app, Datastore, GCS and worker ports in a row)."""
    for _ in range(50):
        base = free_port()
        if all(_free(base + i) for i in range(1, 4)):
            return base
    pytest.fail("no four consecutive free ports on 127.0.0.1")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_until(predicate, what: str, process: subprocess.Popen, timeout: float, state: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"localdev exited ({process.returncode}) while waiting for {what}; logs in {state}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    logs = {p.name: p.read_text()[-3000:] for p in state.glob("*.log")}
    pytest.fail(f"{what} not within {timeout:.0f} s; logs: {logs}")


@pytest.fixture
def cloud_fakes():
    """Compute with one labelled disk and Filestore with one labelled instance, over HTTP on 127.0.0.1."""
    compute, filestore = ComputeFake(), FilestoreFake("http://filestore.fake/")
    compute.add_disk("proj-alpha", "db-disk", zone="us-central1-a", labels={"backup-generations": "3"})
    filestore.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "2"})
    with FakeServer(compute) as compute_server, FakeServer(filestore, api_path="/") as file_server:
        yield SimpleNamespace(compute=compute_server.endpoint, file=file_server.endpoint)


@pytest.fixture
def make_run(tmp_path, pouchdb, mariadb_servers, monkeypatch, cloud_fakes):
    """localdev.py on free ports with its state and plans in tmp_path, and the plans' targets made."""
    share, copies = tmp_path / "share", tmp_path / "copies"
    for d in range(6):
        for sub in ("a", "b"):
            folder = share / f"d{d}" / sub
            folder.mkdir(parents=True)
            for f in range(4):
                (folder / f"f{f}.txt").write_text(f"{d}/{sub}/{f}\n" * (f + 1))
    copies.mkdir()
    couch_db = pouchdb.new_db_name("makerun")
    seed(pouchdb.url, couch_db, make_docs(120, attachment_every=15))
    sync = make_sync_setup(mariadb_servers, tmp_path, monkeypatch)
    plans = yaml.safe_load((ROOT / "plans.yaml").read_text())
    plans["plans"] |= {
        "share": {
            "kind": "directory",
            "select": {"paths": [str(share)]},
            "destination": {"path": str(copies)},
            "options": {"sync": False},
        },
        "couch": {
            "kind": "couchdb",
            "select": {"databases": [couch_db]},
            "destination": {"url": str(tmp_path / "couch")},
            "options": {"page_size": 25},  # a _changes page is the smallest part: 120 documents take five or more
        },
        "staging-refresh": sync["raw"],
        "disk-nightly": {
            "kind": "disks",
            "select": {"projects": ["proj-alpha"]},
            "options": {"endpoint": cloud_fakes.compute},
        },
        "shares-nightly": {
            "kind": "filestore",
            "select": {"projects": ["proj-one"], "label": "backup-keep"},
            "options": {"endpoint": cloud_fakes.file, "poll_seconds": 1},
        },
    }
    state = tmp_path / "state"
    plans_file = tmp_path / "plans.yaml"
    plans_file.write_text(yaml.safe_dump(plans))
    port = _port_block()
    env = os.environ | {
        "PORT": str(port),
        "BACKUP_LOCAL_STATE": str(state),
        "BACKUP_PLANS": str(plans_file),
        "BACKUP_JOB_BUDGET_SECONDS": "0",
        "COUCHDB_URL": pouchdb.url,
        SECRET_ENV: SECRET,
    }
    env.pop("DATASTORE_EMULATOR_HOST", None)  # localdev starts its own emulators, as on a fresh machine
    env.pop("STORAGE_EMULATOR_HOST", None)
    output = tmp_path / "localdev.out"
    with output.open("wb") as out:
        process = subprocess.Popen([sys.executable, "localdev.py"], cwd=ROOT, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        token_file = state / "token"
        _wait_until(token_file.exists, "the token", process, 60, tmp_path)
        token = token_file.read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}

        def up():
            try:
                return requests.get(f"{url}/runs", headers=auth, timeout=5).ok
            except requests.RequestException:
                return False

        _wait_until(up, "the app", process, 120, state)
        yield SimpleNamespace(url=url, auth=auth, state=state, process=process, copies=copies)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        assert "stopping" in output.read_text()  # Ctrl-C stopped it the way a person's would


def test_every_local_kind_runs_through_the_app_and_the_worker_process_in_budgeted_parts(make_run):
    url, auth, state = make_run.url, make_run.auth, make_run.state
    plans = ("share", "couch", "staging-refresh", "disk-nightly", "shares-nightly")
    for plan in plans:
        answer = requests.post(f"{url}/admin/plans/{plan}/run", headers=auth | {"X-Backup-Client": "test"}, timeout=30)
        assert answer.status_code == 200, answer.text

    def settled():
        runs = requests.get(f"{url}/runs", headers=auth, timeout=10).json()["runs"]
        mine = {r["plan"]: r for r in runs if r["plan"] in plans and r.get("purpose") != "drill"}
        return mine if len(mine) == len(plans) and all(r["status"] in TERMINAL for r in mine.values()) else None

    runs = _wait_until(settled, "every plan's run", make_run.process, 300, state)

    assert {plan: r["status"] for plan, r in runs.items()} == dict.fromkeys(plans, "succeeded"), runs
    parts = [line for line in runs["share"]["log"] if "part done" in line]
    assert len(parts) >= 6  # twelve folders, a spent budget each part: it came through continuations
    couch_parts = [line for line in runs["couch"]["log"] if "going on in a follow-up task" in line]
    assert len(couch_parts) >= 4, runs["couch"]["log"]  # 120 documents in parts, each resuming the last
    worker_log, app_log = (state / "worker.log").read_text(), (state / "app.log").read_text()
    share_key = runs["share"]["target"]
    assert f"{share_key}: " in worker_log  # the directory queue's tasks went to the worker process ...
    assert f"{share_key}: " not in app_log  # ... and none to the app
    assert "staging-refresh" in worker_log or runs["staging-refresh"]["target"] in worker_log
    assert "/projects/proj-alpha/global/snapshots/bk-db-disk-" in runs["disk-nightly"]["output"]
    assert "/backups/" in runs["shares-nightly"]["output"]
    copy = runs["share"]["output"]
    assert Path(copy).parent == make_run.copies and (Path(copy) / "d5" / "b" / "f3.txt").read_text() == "5/b/3\n" * 4
