"""The couchdb kind through its plan interface: settings, targets, start (incremental, idempotent), retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from kinds.couchdb.http import CouchServer
from kinds.couchdb.kind import access_secret, enumerate_targets, select_databases, start
from kinds.couchdb.restore import RestoreOptions, restore_chain
from kinds.couchdb.store import list_manifests, open_store, resolve_chain
from kinds.couchdb.verify import verify_database
from services.errors import ConfigError, PermanentError
from services.kinds import Done, RunContext, Target
from services.plans import parse_plan
from tests.couch_data import couch_plan, leaves, make_docs, runtime, seed
from tests.couch_proxy import FaultProxy

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


def _run(plan, db, period):
    return RunContext(run_id=f"r-{period:%H%M}", plan=plan.name, target_key=db, period=period)


def test_plan_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"plan 'p', field 'options.mode': expected one of full, winning"):
        couch_plan("p", "/tmp/x", ["a"], mode="everything")
    with pytest.raises(ConfigError, match=r"field 'destination.url': expected gs://BUCKET/PREFIX"):
        couch_plan("p", "relative/dir", ["a"])
    with pytest.raises(ConfigError, match=r"field 'options.batch_size': unknown field"):
        couch_plan("p", "/tmp/x", ["a"], batch_size=3)
    with pytest.raises(ConfigError, match=r"field 'select.databases': is required"):
        parse_plan("p", {"kind": "couchdb", "select": {}, "destination": {"url": "/tmp/x"}})


def test_selection_by_name_glob_and_all_keeps_system_databases_out_unless_named():
    available = ["_replicator", "_users", "orders", "orders-eu", "users"]

    assert select_databases(["*"], available) == ["orders", "orders-eu", "users"]
    assert select_databases(["orders*"], available) == ["orders", "orders-eu"]
    assert select_databases(["users", "_users"], available) == ["_users", "users"]


def test_enumerate_targets_pages_through_the_matching_databases(couch_env, tmp_path):
    names = sorted(couch_env.new_db_name("enum") for _ in range(3))
    for name in names:
        requests.put(f"{couch_env.url}/{name}", timeout=10).raise_for_status()
    plan = couch_plan("p", str(tmp_path), ["enum-*"])
    plan = type(plan)(**{**plan.__dict__, "fanout_page_size": 2})

    first = enumerate_targets(plan, None, runtime())
    second = enumerate_targets(plan, first.next_page_token, runtime())

    assert [t.key for t in first.targets + second.targets] == names
    assert second.next_page_token is None


def test_start_backs_up_and_is_idempotent_for_the_same_period(couch_env, tmp_path):
    db = couch_env.new_db_name("kind")
    seed(couch_env.url, db, make_docs(40))
    plan = couch_plan("nightly", str(tmp_path), [db])

    first = start(plan, Target(key=db, params={"database": db}), _run(plan, db, T0), runtime())
    again = start(plan, Target(key=db, params={"database": db}), _run(plan, db, T0), runtime())

    assert isinstance(first, Done) and first.output == again.output
    assert first.output == str(tmp_path / "nightly" / db / "20261123T020000Z-full.manifest.json")
    assert first.stats["docs"] == len(leaves(couch_env.url, db))
    assert len(list((tmp_path / "nightly" / db).iterdir())) == 2


def test_retention_prunes_only_our_backups_beyond_keep_after_the_new_one(couch_env, tmp_path):
    db = couch_env.new_db_name("ret")
    seed(couch_env.url, db, make_docs(10))
    plan = couch_plan("nightly", str(tmp_path), [db], retention={"keep": 2, "min_keep": 1})
    folder = tmp_path / "nightly" / db
    folder.mkdir(parents=True)
    (folder / "00000000T000000Z-hand-made.manifest.json").write_text('{"note": "not ours"}')

    outputs = []
    for day in range(4):
        period = T0 + timedelta(days=day)
        outputs.append(start(plan, Target(key=db), _run(plan, db, period), runtime()).output)

    remaining = sorted(p.name for p in folder.iterdir())
    assert remaining == [
        "00000000T000000Z-hand-made.manifest.json",
        "20261125T020000Z-full.jsonl.gz",
        "20261125T020000Z-full.manifest.json",
        "20261126T020000Z-full.jsonl.gz",
        "20261126T020000Z-full.manifest.json",
    ]


def test_incremental_backups_restore_to_the_same_state_as_a_full_one(couch_env, tmp_path):
    url = couch_env.url
    db = couch_env.new_db_name("inc")
    seed(url, db, make_docs(50))
    plan = couch_plan("hourly", str(tmp_path), [db], incremental=True, full_every=5, retention={"keep": 1})
    store = open_store(str(tmp_path))
    start(plan, Target(key=db), _run(plan, db, T0), runtime())
    # Changes after the full backup: edits, a deletion, new documents, a new conflict.
    doc = requests.get(f"{url}/{db}/doc-000001", timeout=10).json()
    requests.put(f"{url}/{db}/doc-000001", json={**doc, "n": "edited"}, timeout=10).raise_for_status()
    doc = requests.get(f"{url}/{db}/doc-000002", timeout=10).json()
    requests.delete(f"{url}/{db}/doc-000002", params={"rev": doc["_rev"]}, timeout=10).raise_for_status()
    seed(url, db, make_docs(10, start=50), create=False)
    step1 = start(plan, Target(key=db), _run(plan, db, T0 + timedelta(hours=1)), runtime())
    doc = requests.get(f"{url}/{db}/doc-000003", timeout=10).json()
    requests.put(f"{url}/{db}/doc-000003", json={**doc, "n": "again"}, timeout=10).raise_for_status()
    step2 = start(plan, Target(key=db), _run(plan, db, T0 + timedelta(hours=2)), runtime())

    chain = resolve_chain(store, str(Path(step2.output).relative_to(tmp_path)))
    target = couch_env.new_db_name("inc-restored")
    restore_chain(CouchServer(url), target, store, chain, RestoreOptions(), checkpoint_path=tmp_path / "c.json")

    assert [m.incremental for m in chain] == [False, True, True]
    assert step1.stats["incremental"] and step1.stats["docs"] < 20  # only the changes were stored
    assert leaves(url, target) == leaves(url, db)
    assert verify_database(CouchServer(url), target, store, chain).ok
    # retention keep=1 kept the newest increment and everything it depends on
    assert len(list_manifests(store, f"hourly/{db}/")) == 3


def test_winning_mode_increments_extend_revisions_instead_of_creating_conflicts(couch_env, tmp_path):
    url = couch_env.url
    db = couch_env.new_db_name("winc")
    seed(url, db, make_docs(20, attachment_every=0))
    plan = couch_plan("hourly", str(tmp_path), [db], mode="winning", incremental=True)
    store = open_store(str(tmp_path))
    start(plan, Target(key=db), _run(plan, db, T0), runtime())
    doc = requests.get(f"{url}/{db}/doc-000001", timeout=10).json()
    requests.put(f"{url}/{db}/doc-000001", json={**doc, "n": "edited"}, timeout=10).raise_for_status()
    doc = requests.get(f"{url}/{db}/doc-000006", timeout=10).json()
    requests.delete(f"{url}/{db}/doc-000006", params={"rev": doc["_rev"]}, timeout=10).raise_for_status()
    done = start(plan, Target(key=db), _run(plan, db, T0 + timedelta(hours=1)), runtime())
    chain = resolve_chain(store, str(Path(done.output).relative_to(tmp_path)))
    target = couch_env.new_db_name("winc-restored")

    restore_chain(CouchServer(url), target, store, chain, RestoreOptions(), checkpoint_path=tmp_path / "c.json")

    edited = requests.get(f"{url}/{target}/doc-000001", params={"conflicts": "true"}, timeout=10).json()
    assert edited["n"] == "edited" and "_conflicts" not in edited
    assert requests.get(f"{url}/{target}/doc-000006", timeout=10).status_code == 404
    assert verify_database(CouchServer(url), target, store, chain).ok


def test_credentials_never_reach_logs_outputs_or_manifests(couch_env, tmp_path, monkeypatch):
    db = couch_env.new_db_name("cred")
    seed(couch_env.url, db, make_docs(5))
    with FaultProxy(couch_env.url) as proxy:
        proxy.state.strip_auth = True
        host = proxy.url.removeprefix("http://")
        monkeypatch.setenv("COUCHDB_URL", f"http://admin:s3cret-pw@{host}")
        plan = couch_plan("nightly", str(tmp_path), [db])
        run = _run(plan, db, T0)

        done = start(plan, Target(key=db), run, runtime())

    assert proxy.state.auth_seen and set(proxy.state.auth_seen) == {"Basic YWRtaW46czNjcmV0LXB3"}
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*.json"))
    assert b"s3cret-pw" not in written and "s3cret-pw" not in repr(done) and "s3cret-pw" not in "".join(run.log_lines)
    assert f"http://{host}".encode() in written  # the server is recorded, without its password


def test_missing_server_variable_is_a_clear_permanent_error(tmp_path, monkeypatch):
    monkeypatch.delenv("COUCHDB_URL", raising=False)
    plan = couch_plan("nightly", str(tmp_path), ["a"])

    with pytest.raises(PermanentError, match="environment variable COUCHDB_URL"):
        start(plan, Target(key="a"), _run(plan, "a", T0), runtime())


def test_password_from_secret_manager():
    import responses

    name = "projects/p/secrets/couch/versions/latest"
    with responses.RequestsMock() as mock:
        mock.get(
            f"https://secretmanager.googleapis.com/v1/{name}:access",
            json={"name": name, "payload": {"data": "aHVudGVyMg=="}},
        )
        assert access_secret(name, runtime()) == "hunter2"
