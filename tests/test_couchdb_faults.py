"""Rate limits, 429/413/5xx handling and crash-resume of restores, through the fault-injecting proxy."""

from __future__ import annotations

import pytest

from services.couchdb_engine import BackupOptions, RestoreOptions, backup_database, restore_chain, verify_database
from services.couchdb_http import CouchServer, RetryPolicy, TokenBucket, retry_after_seconds
from services.couchdb_store import open_store
from services.errors import TransientError
from tests.couch_data import leaves, make_docs, seed
from tests.couch_proxy import Fault, FaultProxy


@pytest.fixture
def backup(pouchdb, tmp_path):
    """A full backup of a 60-document database, 10 documents per line."""
    db = pouchdb.new_db_name("src")
    seed(pouchdb.url, db, make_docs(60, attachment_every=6, attachment_bytes=3000))
    store = open_store(str(tmp_path / "store"))
    manifest = backup_database(CouchServer(pouchdb.url), db, store, "t/src/1-full", BackupOptions(batch_docs=10))
    assert manifest.batches >= 6
    return db, store, manifest


def test_restore_respects_the_writes_per_second_limit(pouchdb, backup, tmp_path):
    source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    rate = 8.0
    with FaultProxy(pouchdb.url) as proxy:
        restore_chain(
            CouchServer(proxy.url, writes_per_second=rate),
            target,
            store,
            [manifest],
            RestoreOptions(),
            checkpoint_path=tmp_path / "c.json",
        )
        writes = [s.at for s in proxy.state.requests_to("POST", "_bulk_docs")]

    assert len(writes) == manifest.batches
    # No window of one second holds more than rate (+1 for the bucket's single-token burst) writes.
    for i, start in enumerate(writes):
        in_window = [t for t in writes[i:] if t - start < 1.0]
        assert len(in_window) <= rate + 1
    assert writes[-1] - writes[0] >= (len(writes) - 2) / rate
    assert leaves(pouchdb.url, target) == leaves(pouchdb.url, source)


def test_429_with_retry_after_is_honoured(pouchdb, backup, tmp_path):
    source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    with FaultProxy(pouchdb.url) as proxy:
        proxy.state.faults.append(Fault(status=429, times=2, retry_after="1"))
        server = CouchServer(proxy.url)
        restore_chain(server, target, store, [manifest], RestoreOptions(), checkpoint_path=tmp_path / "c.json")
        posts = proxy.state.requests_to("POST", "_bulk_docs")

    assert [p.status for p in posts[:3]] == [429, 429, 201]
    assert posts[1].at - posts[0].at >= 1.0
    assert posts[2].at - posts[1].at >= 1.0
    assert server.retries == 2
    assert leaves(pouchdb.url, target) == leaves(pouchdb.url, source)


def test_5xx_is_retried_with_backoff_then_given_up_as_transient(pouchdb, backup, tmp_path):
    source, store, manifest = backup
    with FaultProxy(pouchdb.url) as proxy:
        proxy.state.faults.append(Fault(status=503, times=100))
        server = CouchServer(proxy.url, retry=RetryPolicy(attempts=3, base_delay=0.2))
        with pytest.raises(TransientError, match="HTTP 503 after 3 attempts"):
            restore_chain(
                server,
                pouchdb.new_db_name("dst"),
                store,
                [manifest],
                RestoreOptions(),
                checkpoint_path=tmp_path / "c.json",
            )
        posts = proxy.state.requests_to("POST", "_bulk_docs")

    assert len(posts) == 3
    assert posts[1].at - posts[0].at >= 0.1  # backoff of 0.2 s with jitter down to half
    assert posts[2].at - posts[1].at >= 0.2


def test_413_splits_the_batch_until_the_server_accepts_it(pouchdb, backup, tmp_path):
    source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    with FaultProxy(pouchdb.url) as proxy:
        proxy.state.max_body_bytes = 9000  # smaller than a 10-document line, larger than any one document
        result = restore_chain(
            CouchServer(proxy.url), target, store, [manifest], RestoreOptions(), checkpoint_path=tmp_path / "c.json"
        )
        refused = proxy.state.requests_to("POST", "_bulk_docs", status=413)
        accepted = proxy.state.requests_to("POST", "_bulk_docs", status=201)

    assert refused and result.splits > 0
    assert all(a.body_bytes <= 9000 for a in accepted)
    assert leaves(pouchdb.url, target) == leaves(pouchdb.url, source)
    assert verify_database(CouchServer(pouchdb.url), target, store, [manifest]).ok


class Crash(Exception):
    pass


def test_a_restore_killed_half_way_resumes_without_resending_batches(pouchdb, backup, tmp_path):
    source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    checkpoint = tmp_path / "restore.json"

    def crash_after_three(lines_done):
        if lines_done == 3:
            raise Crash("killed")

    with FaultProxy(pouchdb.url) as proxy:
        with pytest.raises(Crash):
            restore_chain(
                CouchServer(proxy.url),
                target,
                store,
                [manifest],
                RestoreOptions(),
                checkpoint_path=checkpoint,
                after_line=crash_after_three,
            )
        assert checkpoint.exists()
        # The half-restored target is not empty, yet the checkpoint lets the same restore continue.
        result = restore_chain(
            CouchServer(proxy.url), target, store, [manifest], RestoreOptions(), checkpoint_path=checkpoint
        )
        posts = proxy.state.requests_to("POST", "_bulk_docs")

    assert result.resumed and result.lines_skipped == 3
    assert result.lines_done == manifest.batches - 3
    assert len(posts) == manifest.batches  # every line sent exactly once across both runs
    assert not checkpoint.exists()
    assert leaves(pouchdb.url, target) == leaves(pouchdb.url, source)


def test_token_bucket_spaces_acquisitions():
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(4.0, clock=lambda: now[0], sleep=sleep)

    for _ in range(9):
        bucket.acquire()

    assert now[0] == pytest.approx(2.0)  # one free token, then 8 at 4 per second


def test_retry_after_accepts_seconds_and_http_dates():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Mon, 23 Nov 2026 10:00:05 GMT", now=lambda: 1795428000.0) == pytest.approx(5.0)
    assert retry_after_seconds("soon") is None
