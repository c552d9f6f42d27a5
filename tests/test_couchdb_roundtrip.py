"""Backup -> restore -> verify against a real pouchdb-server: documents come back exactly as they were."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import requests

from kinds.couchdb.backup import BackupOptions, backup_database
from kinds.couchdb.http import CouchServer
from kinds.couchdb.restore import RestoreOptions, restore_chain
from kinds.couchdb.store import open_store, read_manifest
from kinds.couchdb.verify import verify_database
from services.errors import PermanentError
from tests.couch_data import leaves, make_docs, seed, winners
from tests.couch_proxy import FaultProxy


@pytest.fixture
def source(pouchdb):
    db = pouchdb.new_db_name("src")
    seed(pouchdb.url, db, make_docs(120, attachment_every=10))
    return db


def _backup(url, db, store, name="t/x/1-full", **opts):
    server = CouchServer(url)
    return backup_database(server, db, store, name, BackupOptions(**opts))


def _restore(url, db, store, chain, tmp_path, **opts):
    return restore_chain(
        CouchServer(url), db, store, chain, RestoreOptions(**opts), checkpoint_path=tmp_path / "ckpt.json"
    )


def test_full_mode_round_trip_is_byte_identical(pouchdb, source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    target = pouchdb.new_db_name("dst")
    original = leaves(pouchdb.url, source)
    # The source really has what must survive: conflicts (two leaves of one id), tombstones, attachments.
    ids = [doc_id for doc_id, _ in original]
    assert len(ids) > len(set(ids))
    assert any(b'"_deleted": true' in body for body in original.values())
    assert any(b'"_attachments"' in body for body in original.values())

    manifest = _backup(pouchdb.url, source, store, mode="full", batch_docs=25)
    _restore(pouchdb.url, target, store, [manifest], tmp_path)

    assert leaves(pouchdb.url, target) == original
    assert verify_database(CouchServer(pouchdb.url), target, store, [manifest]).ok


def test_every_line_is_a_ready_bulk_docs_body_and_documents_are_not_nested(pouchdb, source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    manifest = _backup(pouchdb.url, source, store, mode="winning", batch_docs=40)
    target = pouchdb.new_db_name("curl")
    requests.put(f"{pouchdb.url}/{target}", timeout=10).raise_for_status()

    # What a person with curl would do: POST each line as it is.
    with gzip.open(tmp_path / "store" / manifest.data_name) as lines:
        for line in lines:
            body = json.loads(line)
            assert body["new_edits"] is False
            requests.post(
                f"{pouchdb.url}/{target}/_bulk_docs",
                data=line,
                timeout=30,
                headers={"Content-Type": "application/json"},
            ).raise_for_status()

    restored = winners(pouchdb.url, target)
    assert restored == winners(pouchdb.url, source)
    some = restored["doc-000001"]
    assert some["n"] == 1 and some["name"] == "naïve café № 1"
    assert "doc" not in some  # not wrapped the way _all_docs?include_docs=true rows are


def test_winning_mode_keeps_winning_revisions_without_conflicts(pouchdb, source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    target = pouchdb.new_db_name("win")

    manifest = _backup(pouchdb.url, source, store, mode="winning")
    _restore(pouchdb.url, target, store, [manifest], tmp_path)

    assert winners(pouchdb.url, target) == winners(pouchdb.url, source)  # same ids, revisions and bodies
    restored_ids = [doc_id for doc_id, _ in leaves(pouchdb.url, target)]
    assert len(restored_ids) == len(set(restored_ids))  # one leaf per document: conflicts were left out
    assert manifest.deleted > 0  # tombstones are kept, so an incremental restore can delete
    assert verify_database(CouchServer(pouchdb.url), target, store, [manifest]).ok


def test_manifest_describes_the_backup(pouchdb, source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    requests.put(f"{pouchdb.url}/{source}/_security", json={"admins": {"names": ["ops"]}}, timeout=10)

    manifest = _backup(pouchdb.url, source, store, mode="full", batch_docs=30)

    on_disk = read_manifest(store, manifest.name)
    data = (tmp_path / "store" / manifest.data_name).read_bytes()
    import hashlib

    assert on_disk.sha256 == hashlib.sha256(data).hexdigest()
    assert on_disk.database == source and on_disk.mode == "full" and on_disk.created_by == "backup-scheduler"
    assert on_disk.docs == len(leaves(pouchdb.url, source))
    assert on_disk.batches == len(gzip.decompress(data).splitlines())
    assert on_disk.security == {"admins": {"names": ["ops"]}}
    assert on_disk.seq == requests.get(f"{pouchdb.url}/{source}", timeout=10).json()["update_seq"]


def test_batches_are_bounded_by_bytes_as_well_as_count(pouchdb, tmp_path):
    db = pouchdb.new_db_name("big")
    seed(pouchdb.url, db, make_docs(30, attachment_every=1, attachment_bytes=20_000))
    store = open_store(str(tmp_path / "store"))

    manifest = _backup(pouchdb.url, db, store, batch_docs=500, batch_bytes=100_000)

    with gzip.open(tmp_path / "store" / manifest.data_name) as lines:
        sizes = [len(line) for line in lines]
    assert len(sizes) > 1
    assert max(sizes) <= 100_000


def test_restore_refuses_a_non_empty_target_and_leaves_it_alone(pouchdb, source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    manifest = _backup(pouchdb.url, source, store)
    target = pouchdb.new_db_name("busy")
    seed(pouchdb.url, target, [{"_id": "precious", "_rev": "1-abc", "v": 1}])

    with pytest.raises(PermanentError, match="not empty"):
        _restore(pouchdb.url, target, store, [manifest], tmp_path)

    assert set(winners(pouchdb.url, target)) == {"precious"}


def test_overwrite_takes_a_confirmed_safety_backup_before_dropping_the_target(pouchdb, source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    manifest = _backup(pouchdb.url, source, store)
    target = pouchdb.new_db_name("busy")
    seed(pouchdb.url, target, [{"_id": "precious", "_rev": "1-abc", "v": 1}])
    before = leaves(pouchdb.url, target)
    with FaultProxy(pouchdb.url) as proxy:
        server = CouchServer(proxy.url)
        taken = []

        def safety():
            m = backup_database(server, target, store, "safety/t/1-full", BackupOptions())
            taken.append(m)
            return m

        result = restore_chain(
            server,
            target,
            store,
            [manifest],
            RestoreOptions(overwrite=True),
            checkpoint_path=tmp_path / "c.json",
            safety_backup=safety,
        )
        seen = list(proxy.state.seen)

    # Order on the wire: the safety backup's reads all happened before the target was dropped.
    delete_at = next(i for i, s in enumerate(seen) if s.method == "DELETE")
    safety_reads = [i for i, s in enumerate(seen) if "_bulk_get" in s.path]
    assert safety_reads and max(safety_reads) < delete_at
    assert result.safety_backup == "safety/t/1-full"
    # The safety backup holds the old content: restoring it gives it back exactly.
    back = pouchdb.new_db_name("back")
    _restore(pouchdb.url, back, store, [taken[0]], tmp_path)
    assert leaves(pouchdb.url, back) == before
    assert "precious" not in winners(pouchdb.url, target)
    assert verify_database(CouchServer(pouchdb.url), target, store, [manifest]).ok


def test_a_damaged_backup_is_refused_before_the_target_is_touched(pouchdb, source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    manifest = _backup(pouchdb.url, source, store)
    data = tmp_path / "store" / manifest.data_name
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    target = pouchdb.new_db_name("busy")
    seed(pouchdb.url, target, [{"_id": "precious", "_rev": "1-abc", "v": 1}])
    before = leaves(pouchdb.url, target)

    with pytest.raises(PermanentError, match=r"1-full.jsonl.gz (is unreadable|does not match)"):
        restore_chain(
            CouchServer(pouchdb.url),
            target,
            store,
            [manifest],
            RestoreOptions(overwrite=True),
            checkpoint_path=tmp_path / "c.json",
            safety_backup=lambda: pytest.fail("no safety backup should be needed"),
        )

    assert leaves(pouchdb.url, target) == before


def test_verify_names_the_first_differing_ids(pouchdb, source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    manifest = _backup(pouchdb.url, source, store)
    target = pouchdb.new_db_name("dst")
    _restore(pouchdb.url, target, store, [manifest], tmp_path)
    doc = requests.get(f"{pouchdb.url}/{target}/doc-000007", timeout=10).json()
    requests.put(f"{pouchdb.url}/{target}/doc-000007", json={**doc, "n": "changed"}, timeout=10).raise_for_status()
    requests.put(f"{pouchdb.url}/{target}/zz-extra", json={"x": 1}, timeout=10).raise_for_status()

    result = verify_database(CouchServer(pouchdb.url), target, store, [manifest])

    assert not result.ok
    assert result.differing_ids == ["doc-000007", "zz-extra"]
    assert result.actual["docs"] == result.expected["docs"] + 1


def test_verify_detects_a_changed_attachment(pouchdb, source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    manifest = _backup(pouchdb.url, source, store)
    target = pouchdb.new_db_name("dst")
    requests.put(f"{pouchdb.url}/{target}", timeout=10).raise_for_status()
    # Restore by hand with one attachment's bytes changed under the same id and revision id:
    # only the digest comparison can see that.
    with gzip.open(tmp_path / "store" / manifest.data_name) as lines:
        for line in lines:
            body = json.loads(line)
            for doc in body["docs"]:
                if doc["_id"] == "doc-000010":
                    doc["_attachments"]["blob.bin"]["data"] = "dGFtcGVyZWQ="
                    doc["_attachments"]["blob.bin"].pop("digest", None)
            requests.post(f"{pouchdb.url}/{target}/_bulk_docs", json=body, timeout=30).raise_for_status()

    result = verify_database(CouchServer(pouchdb.url), target, store, [manifest])

    assert not result.ok
    assert result.differing_ids == ["doc-000010"]
    assert result.actual["docs"] == result.expected["docs"]


def test_gcs_destination_round_trip(pouchdb, source, gcs_emulator, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="demo", credentials=AnonymousCredentials())
    client.create_bucket("couch-backups")
    store = open_store("gs://couch-backups/nightly", client)
    target = pouchdb.new_db_name("fromgcs")

    manifest = _backup(pouchdb.url, source, store, name="p/db/1-full")
    _restore(pouchdb.url, target, store, [manifest], tmp_path)

    names = sorted(b.name for b in client.list_blobs("couch-backups"))
    assert names == ["nightly/p/db/1-full.jsonl.gz", "nightly/p/db/1-full.manifest.json"]
    assert leaves(pouchdb.url, target) == leaves(pouchdb.url, source)


@pytest.fixture
def gcs_emulator(monkeypatch, tmp_path):
    from gcp_storage_emulator.server import create_server

    from tests.fixtures.pouchdb import free_port

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    try:
        yield server
    finally:
        server.stop()


def test_data_path_helpers_do_not_escape_the_destination(tmp_path):
    store = open_store(str(tmp_path))
    with pytest.raises(Exception, match="escapes"):
        store.url("../elsewhere")
    assert Path(store.url("a/b")).is_relative_to(tmp_path)
