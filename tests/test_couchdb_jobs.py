"""The couchdb kind as a job through the worker: backups and restore drills larger than one task's budget finish
through continuations (a budget of 0 s, so every part does the least it can, on any machine), a database deleted
since listing is skipped, and a drill proves the newest backup restores (or fails saying what differs)."""

from __future__ import annotations

import pytest
import requests

from kinds.couchdb import drill as couch_drill
from kinds.couchdb.backup import PART_SUFFIX
from kinds.couchdb.http import CouchServer
from kinds.couchdb.kind import KIND
from kinds.couchdb.restore import RestoreOptions, restore_chain
from kinds.couchdb.store import open_store, resolve_chain
from kinds.couchdb.verify import check_sample
from services import jobs
from services.catalog import FAILED, SKIPPED, SUCCEEDED
from services.errors import PermanentError
from services.kinds import RunContext, Target
from services.plans import parse_plan
from tests.couch_data import leaves, make_docs, runtime, seed
from tests.couch_proxy import Fault, FaultProxy
from tests.helpers import Clock
from tests.service_harness import Service


def _plan(destination, databases, drill=None, **options):
    raw = {
        "kind": "couchdb",
        "select": {"databases": databases},
        "destination": {"url": destination},
        "options": {"page_size": 10, **options},
    }
    if drill is not None:
        raw["drill"] = drill
    return parse_plan("couch", raw)


def _service(tmp_path, datastore, url, plan):
    return Service(tmp_path, datastore, {"couch": plan}, Clock(), job_budget_seconds=0.0, environ={"COUCHDB_URL": url})


def test_a_database_larger_than_one_budget_is_backed_up_in_parts_through_the_worker(pouchdb, tmp_path, datastore):
    db = pouchdb.new_db_name("parts")
    seed(pouchdb.url, db, make_docs(120))
    dest = tmp_path / "backups"
    svc = _service(tmp_path, datastore, pouchdb.url, _plan(str(dest), [db]))
    task = svc.task("couch", db)

    answer = svc.run(task)

    assert answer.get_json()["status"] == SUCCEEDED
    record = svc.catalog.get(task.name)
    parts = [line for line in record.log if line.startswith("part ")]
    assert len(parts) >= 12  # 120 documents, 10 changes a page, a page a part: it did not fit in one budget
    store = open_store(str(dest))
    chain = resolve_chain(store, store.name_of(record.output))
    restored = pouchdb.new_db_name("parts-restored")
    restore_chain(CouchServer(pouchdb.url), restored, store, chain, RestoreOptions(), checkpoint_path=tmp_path / "c")
    assert leaves(pouchdb.url, restored) == leaves(pouchdb.url, db)
    assert not [p for p in dest.rglob("*") if PART_SUFFIX in p.name or p.name.endswith(".partial")]
    follow_ups = [t for t in svc.queue.tasks() if t["name"].startswith(task.name + "-poll-")]
    assert {t["queue"] for t in follow_ups} == {"backups"}


def test_parts_beyond_one_compose_request_are_joined_in_a_bucket(pouchdb, tmp_path, monkeypatch):
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from tests.fixtures.pouchdb import free_port

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    try:
        client = storage.Client(project="demo", credentials=AnonymousCredentials())
        client.create_bucket("couch-backups")
        db = pouchdb.new_db_name("gcs-parts")
        seed(pouchdb.url, db, make_docs(80, attachment_every=0))
        plan = _plan("gs://couch-backups/nightly", [db], page_size=2)  # 40+ parts: more than 32, one request's limit
        rt = runtime(env={"COUCHDB_URL": pouchdb.url})
        rt._clients["storage"] = client
        run = RunContext(run_id="r1", plan="couch", target_key=db, period=Clock()())
        pending = []

        done = jobs.drive(KIND, plan, Target(db), run, rt, budget_seconds=0.0, on_pending=pending.append)

        names = sorted(b.name for b in client.list_blobs("couch-backups"))
        store = open_store("gs://couch-backups/nightly", client)
        chain = resolve_chain(store, store.name_of(done.output))
        restored = pouchdb.new_db_name("gcs-restored")
        server_side = CouchServer(pouchdb.url)
        restore_chain(server_side, restored, store, chain, RestoreOptions(), checkpoint_path=tmp_path / "c")
    finally:
        server.stop()

    assert len(pending) > 32
    assert [n.rsplit("/", 1)[-1].split("-", 1)[1] for n in names] == ["full.jsonl.gz", "full.manifest.json"]
    assert leaves(pouchdb.url, restored) == leaves(pouchdb.url, db)


def test_a_database_deleted_since_listing_is_skipped(pouchdb, tmp_path, datastore):
    svc = _service(tmp_path, datastore, pouchdb.url, _plan(str(tmp_path / "b"), ["gone-*"]))
    task = svc.task("couch", "gone-" + pouchdb.new_db_name())

    answer = svc.run(task)

    assert answer.status_code == 200 and answer.get_json()["status"] == SKIPPED
    assert "not found" in svc.catalog.get(task.name).error


def test_a_checkpoint_naming_another_backup_is_refused(pouchdb, tmp_path):
    plan = _plan(str(tmp_path), ["a*"])
    forged = {"backup": {"manifest": {"name": "other/b/x-full", "database": "b"}, "parts": [], "feed_done": False}}
    forged["backup"]["manifest"].update(mode="full", attachments=True, incremental=False, since=0, seq=0)
    run = RunContext(run_id="r", plan="couch", target_key="a", period=Clock()())

    with pytest.raises(PermanentError, match="refused: checkpoint names backup"):
        KIND.poll(plan, Target("a"), forged, run, runtime(env={"COUCHDB_URL": pouchdb.url}))


@pytest.fixture
def backed_up(pouchdb, tmp_path, datastore):
    """A database backed up by a plan with a daily drill, the service running on a spent budget."""

    def build(url=None, **drill):
        db = pouchdb.new_db_name("drill")
        seed(pouchdb.url, db, make_docs(60, attachment_every=5))
        plan = _plan(str(tmp_path / "backups"), [db], drill={"every": "1d", **drill}, drill_sample=25)
        svc = _service(tmp_path, datastore, url or pouchdb.url, plan)
        assert svc.run(svc.task("couch", db)).get_json()["status"] == SUCCEEDED
        svc.db, svc.scratch = db, couch_drill.scratch_name(plan, db)
        return svc

    return build


def test_a_drill_restores_the_newest_backup_into_scratch_in_parts_checks_it_and_drops_it(pouchdb, backed_up):
    svc = backed_up()
    requests.put(f"{pouchdb.url}/{svc.scratch}", timeout=10).raise_for_status()  # a crashed drill's leftover
    requests.post(f"{pouchdb.url}/{svc.scratch}", json={"_id": "left-over"}, timeout=10).raise_for_status()

    _scheduled, (answer,) = svc.run_drills()

    assert answer.get_json()["status"] == SUCCEEDED
    (state,) = svc.catalog.target_states("couch")
    record = svc.catalog.get(state.last_drill_run_id)
    assert state.last_drill_seconds is not None and record.stats["passed"]
    assert "25 sampled documents compared leaf by leaf" in record.stats["checked"][-1]
    assert len([line for line in record.log if "going on" in line]) >= 2  # the restore took several parts
    assert requests.get(f"{pouchdb.url}/{svc.scratch}", timeout=10).status_code == 404
    assert svc.db in requests.get(f"{pouchdb.url}/_all_dbs", timeout=10).json()  # the source is untouched


def test_a_drill_whose_restore_lost_writes_fails_and_still_drops_the_scratch(pouchdb, backed_up):
    with FaultProxy(pouchdb.url) as proxy:
        svc = backed_up(url=proxy.url)
        # The server answers one _bulk_docs as if it stored it, and stores nothing.
        proxy.state.faults.append(Fault(status=201, times=1))

        _scheduled, (answer,) = svc.run_drills()

    assert answer.get_json()["status"] == FAILED
    assert "drill failed: restored" in answer.get_json()["error"]
    assert requests.get(f"{pouchdb.url}/{svc.scratch}", timeout=10).status_code == 404


def test_the_sampled_check_names_a_document_whose_revision_differs(pouchdb, tmp_path):
    db = pouchdb.new_db_name("sample")
    seed(pouchdb.url, db, make_docs(8, attachment_every=0))
    plan = _plan(str(tmp_path), [db])
    rt = runtime(env={"COUCHDB_URL": pouchdb.url})
    done = jobs.drive(KIND, plan, Target(db), RunContext(run_id="r", plan="couch", target_key=db, period=Clock()()), rt)
    store = open_store(str(tmp_path))
    chain = resolve_chain(store, store.name_of(done.output))
    doc = requests.get(f"{pouchdb.url}/{db}/doc-000003", timeout=10).json()
    requests.put(f"{pouchdb.url}/{db}/doc-000003", json={**doc, "n": "changed"}, timeout=10).raise_for_status()

    checked = check_sample(CouchServer(pouchdb.url), db, store, chain, sample=100, seed="s")

    assert not checked.ok and checked.differing_ids == ["doc-000003"]
    assert checked.expected["docs"] == checked.actual["docs"]  # the count alone would not have told
