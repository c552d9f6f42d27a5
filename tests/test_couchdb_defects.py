"""Defects found by using the couchdb kind as a user would (issue 12), each held by a test against pouchdb-server:
same-second and concurrent backups, a resumed restore whose target was dropped, damaged or malformed backups,
files left by killed backups, and another tool's backup file given to restore."""

from __future__ import annotations

import gzip
import hashlib
import json
from datetime import UTC, datetime

import pytest
import requests
from click.testing import CliRunner

from commands.couchdb import couchdb
from kinds.couchdb.backup import BackupOptions, backup_database, backup_part, begin_backup
from kinds.couchdb.http import CouchServer
from kinds.couchdb.kind import KIND, LEASE_NAME
from kinds.couchdb.restore import MARKER_DOC, RestoreOptions, restore_chain
from kinds.couchdb.store import list_manifests, open_store, resolve_chain
from services.errors import PermanentError, TransientError
from services.kinds import RunContext, Target
from tests.couch_data import couch_plan, leaves, make_docs, runtime, seed

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


def _cli(*args, rt=None):
    obj = {"runtime": rt} if rt is not None else None
    return CliRunner().invoke(couchdb, [*args, "--quiet"], obj=obj, catch_exceptions=False)


def test_incremental_backups_started_in_the_same_second_never_build_on_themselves(couch_env, tmp_path):
    db = couch_env.new_db_name("same-second")
    seed(couch_env.url, db, make_docs(20))
    frozen = runtime(clock=lambda: datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC))

    runs = [_cli("backup", db, "--to", str(tmp_path), "--incremental", rt=frozen) for _ in range(3)]

    assert [r.exit_code for r in runs] == [0, 0, 0]
    store = open_store(str(tmp_path))
    (manifest,) = list_manifests(store, f"cli/{db}/")
    assert manifest.previous is None
    assert [m.name for m in resolve_chain(store, manifest.name)] == [manifest.name]


def test_a_second_backup_of_the_same_database_waits_for_the_first(couch_env, tmp_path):
    db = couch_env.new_db_name("lease")
    seed(couch_env.url, db, make_docs(30))
    plan = couch_plan("nightly", str(tmp_path), [db], page_size=10)
    rt = runtime()
    first = RunContext(run_id="run-1", plan="nightly", target_key=db, period=T0, deadline=0.0)
    second = RunContext(run_id="run-2", plan="nightly", target_key=db, period=T0.replace(hour=3))

    pending = KIND.start(plan, Target(db), first, rt)
    with pytest.raises(TransientError, match="another backup of this database is in progress"):
        KIND.start(plan, Target(db), second, rt)
    first.deadline = None
    done = KIND.poll(plan, Target(db), pending.state, first, rt)
    after = KIND.start(plan, Target(db), second, rt)

    assert done.output.endswith("20261123T020000Z-full.manifest.json")
    assert after.output.endswith("20261123T030000Z-full.manifest.json")
    assert not (tmp_path / "nightly" / db / LEASE_NAME).exists()


def test_parts_and_partial_files_left_by_a_killed_backup_are_removed_by_the_next(couch_env, tmp_path):
    db = couch_env.new_db_name("leftover")
    seed(couch_env.url, db, make_docs(30))
    plan = couch_plan("nightly", str(tmp_path), [db], page_size=10)
    folder = tmp_path / "nightly" / db
    server, store = CouchServer(couch_env.url), open_store(str(tmp_path))
    killed = begin_backup(server, db, f"nightly/{db}/20261122T020000Z-full", BackupOptions(page_size=10))
    backup_part(server, store, killed, BackupOptions(page_size=10), deadline=0.0)  # then the process died
    (folder / "20261122T020000Z-full.jsonl.gz.partial").write_bytes(b"half a gzip")
    (folder / "notes.txt").write_text("someone else's")
    assert len(list(folder.iterdir())) == 3

    run = RunContext(run_id="r", plan="nightly", target_key=db, period=T0)

    KIND.start(plan, Target(db), run, runtime())

    assert sorted(p.name for p in folder.iterdir()) == [
        "20261123T020000Z-full.jsonl.gz",
        "20261123T020000Z-full.manifest.json",
        "notes.txt",
    ]
    assert len([line for line in run.log_lines if "left by a backup that did not finish" in line]) == 2


def test_files_are_readable_by_their_owner_only(couch_env, tmp_path):
    db = couch_env.new_db_name("modes")
    seed(couch_env.url, db, make_docs(5))
    plan = couch_plan("nightly", str(tmp_path / "dest"), [db])

    KIND.start(plan, Target(db), RunContext(run_id="r", plan="nightly", target_key=db, period=T0), runtime())

    for path in (tmp_path / "dest").rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path


@pytest.fixture
def backup(pouchdb, tmp_path):
    db = pouchdb.new_db_name("src")
    seed(pouchdb.url, db, make_docs(60, attachment_every=6))
    store = open_store(str(tmp_path / "store"))
    manifest = backup_database(CouchServer(pouchdb.url), db, store, "t/src/1-full", BackupOptions(batch_docs=10))
    return db, store, manifest


class Crash(Exception):
    pass


def test_a_resumed_restore_whose_target_was_dropped_starts_again(pouchdb, backup, tmp_path):
    source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    checkpoint = tmp_path / "restore.json"

    def crash(lines_done):
        if lines_done == 3:
            raise Crash("killed")

    with pytest.raises(Crash):
        restore_chain(
            CouchServer(pouchdb.url),
            target,
            store,
            [manifest],
            RestoreOptions(concurrency=1),
            checkpoint_path=checkpoint,
            after_line=crash,
        )
    requests.delete(f"{pouchdb.url}/{target}", timeout=10).raise_for_status()

    result = restore_chain(
        CouchServer(pouchdb.url), target, store, [manifest], RestoreOptions(), checkpoint_path=checkpoint
    )

    assert not result.resumed and result.lines_done == manifest.batches
    assert leaves(pouchdb.url, target) == leaves(pouchdb.url, source)
    assert requests.get(f"{pouchdb.url}/{target}/{MARKER_DOC}", timeout=10).status_code == 404


def test_a_resumed_restore_whose_target_now_holds_other_data_touches_nothing(pouchdb, backup, tmp_path):
    _source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    checkpoint = tmp_path / "restore.json"

    def crash(lines_done):
        raise Crash("killed")

    with pytest.raises(Crash):
        restore_chain(
            CouchServer(pouchdb.url),
            target,
            store,
            [manifest],
            RestoreOptions(concurrency=1),
            checkpoint_path=checkpoint,
            after_line=crash,
        )
    requests.delete(f"{pouchdb.url}/{target}", timeout=10).raise_for_status()
    seed(pouchdb.url, target, [{"_id": "someone-else", "_rev": "1-abc"}])

    with pytest.raises(PermanentError, match="no longer the database this restore's checkpoint was written for"):
        restore_chain(CouchServer(pouchdb.url), target, store, [manifest], RestoreOptions(), checkpoint_path=checkpoint)

    assert list(leaves(pouchdb.url, target)) == [("someone-else", "1-abc")]


def _rewrite(store, manifest, change):
    """Replace the backup's data file with ``change(lines)``, and its manifest's checksum with the new one's."""
    path = store._path(manifest.data_name)
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    data = gzip.compress(b"".join(change(lines)), mtime=0)
    path.write_bytes(data)
    manifest.sha256 = hashlib.sha256(data).hexdigest()
    store.write_bytes(manifest.manifest_name, manifest.to_bytes())


def test_a_line_that_is_not_json_is_named_before_anything_is_written(pouchdb, backup):
    _source, store, manifest = backup
    _rewrite(store, manifest, lambda lines: [lines[0], lines[1][:-40] + b"\n", *lines[2:]])
    target = pouchdb.new_db_name("dst")

    with pytest.raises(PermanentError, match=r"1-full\.jsonl\.gz line 2: not a _bulk_docs line"):
        restore_chain(CouchServer(pouchdb.url), target, store, [manifest], RestoreOptions(), checkpoint_path=None)

    assert requests.get(f"{pouchdb.url}/{target}", timeout=10).status_code == 404


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_verify_of_a_damaged_backup_names_the_file_and_exits_1(couch_env, backup, damage):
    source, store, manifest = backup
    path = store._path(manifest.data_name)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    checked = _cli("verify", store.url(manifest.manifest_name), "--db", source)

    assert checked.exit_code == 1
    assert f"{manifest.data_name.rsplit('/', 1)[-1]}" in checked.stderr
    assert "Aborted" not in checked.stderr and "Traceback" not in checked.stderr
    assert "is unreadable" in checked.stderr or "does not match" in checked.stderr


def test_a_couchbackup_file_given_to_restore_is_named_as_such(couch_env, tmp_path):
    made_by_couchbackup = tmp_path / "orders.txt"
    header = {"name": "@cloudant/couchbackup", "version": "2.11.12", "mode": "full", "attachments": False}
    made_by_couchbackup.write_text(json.dumps(header) + "\n" + json.dumps([{"_id": "a", "_rev": "1-x"}]) + "\n")

    refused = _cli("restore", str(made_by_couchbackup), "--db", couch_env.new_db_name("dst"))

    assert refused.exit_code == 1
    assert "is a couchbackup 2.11.12 file (full mode)" in refused.stderr and "couchdb import" in refused.stderr


def test_verify_from_the_changes_feed_agrees_on_a_faithful_restore_and_names_what_changed(pouchdb, backup, tmp_path):
    from kinds.couchdb.verify import verify_database

    source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    restore_chain(CouchServer(pouchdb.url), target, store, [manifest], RestoreOptions(), checkpoint_path=None)
    server = CouchServer(pouchdb.url)

    faithful = verify_database(server, target, store, [manifest], bodies=False)
    doc = requests.get(f"{pouchdb.url}/{target}/doc-000007", timeout=10).json()
    requests.put(f"{pouchdb.url}/{target}/doc-000007", json={**doc, "n": "edited"}, timeout=10).raise_for_status()
    doc = requests.get(f"{pouchdb.url}/{target}/doc-000012", timeout=10).json()
    requests.delete(f"{pouchdb.url}/{target}/doc-000012", params={"rev": doc["_rev"]}, timeout=10).raise_for_status()
    changed = verify_database(server, target, store, [manifest], bodies=False)

    # The source has conflicts and tombstones: the feed's leaf revisions still match the backup's exactly.
    assert faithful.ok and faithful.actual == faithful.expected
    assert faithful.actual["revisions"] > faithful.actual["docs"] + faithful.actual["deleted"]  # conflicts counted
    assert not changed.ok and changed.differing_ids == ["doc-000007", "doc-000012"]
    assert changed.actual["deleted"] == changed.expected["deleted"] + 1


def test_the_cli_starts_a_new_full_backup_after_full_every_backups_in_a_chain(couch_env, tmp_path):
    db = couch_env.new_db_name("full-every")
    seed(couch_env.url, db, make_docs(10))
    made = []
    for minute in range(5):
        rt = runtime(clock=lambda minute=minute: datetime(2026, 12, 2, 10, minute, tzinfo=UTC))
        seed(couch_env.url, db, make_docs(2, start=100 + 2 * minute), create=False)
        done = _cli("backup", db, "--to", str(tmp_path), "--incremental", "--full-every", "2", rt=rt)
        assert done.exit_code == 0, done.stderr
        made.append(done.stdout.strip().rsplit("-", 1)[-1])

    assert made == ["full.manifest.json", "incr.manifest.json"] * 2 + ["full.manifest.json"]


def test_a_resumed_restore_still_shows_every_line_to_the_verify_it_loads(pouchdb, backup, tmp_path):
    from kinds.couchdb.store import iter_backup_lines
    from kinds.couchdb.verify import BackupRows, verify_database

    source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    checkpoint = tmp_path / "restore.json"

    def crash(lines_done):
        if lines_done == 3:
            raise Crash("killed")

    with pytest.raises(Crash):
        restore_chain(
            CouchServer(pouchdb.url),
            target,
            store,
            [manifest],
            RestoreOptions(concurrency=1),
            checkpoint_path=checkpoint,
            after_line=crash,
        )
    seen = []
    with BackupRows(digests=False) as rows:

        def on_line(line, where):
            seen.append(line)
            rows.add_line(line, where)

        resumed = restore_chain(
            CouchServer(pouchdb.url),
            target,
            store,
            [manifest],
            RestoreOptions(),
            checkpoint_path=checkpoint,
            on_line=on_line,
        )
        checked = verify_database(CouchServer(pouchdb.url), target, store, [manifest], bodies=False, loaded=rows)

    assert resumed.resumed and resumed.lines_skipped >= 3
    assert seen == list(iter_backup_lines(store, manifest))
    assert (
        checked.ok
        and checked.actual["docs"]
        == len({doc_id for doc_id, _ in leaves(pouchdb.url, source)}) - checked.actual["deleted"]
    )
