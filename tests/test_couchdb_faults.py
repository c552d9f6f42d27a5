"""Rate limits, 429/413/5xx handling and crash-resume of restores, through the fault-injecting proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from kinds.couchdb.backup import BackupOptions, backup_database
from kinds.couchdb.http import CouchServer, RetryPolicy, TokenBucket, retry_after_seconds
from kinds.couchdb.restore import RestoreOptions, restore_chain
from kinds.couchdb.store import open_store
from kinds.couchdb.verify import verify_database
from services.errors import TransientError
from services.runtime import ROOT
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
        one_at_a_time = RestoreOptions(concurrency=1)
        restore_chain(server, target, store, [manifest], one_at_a_time, checkpoint_path=tmp_path / "c.json")
        posts = proxy.state.requests_to("POST", "_bulk_docs")

    assert [p.status for p in posts[:3]] == [429, 429, 201]
    assert posts[1].at - posts[0].at >= 1.0
    assert posts[2].at - posts[1].at >= 1.0
    assert server.retries == 2
    assert leaves(pouchdb.url, target) == leaves(pouchdb.url, source)


def test_429_pauses_every_concurrent_writer(pouchdb, backup, tmp_path):
    source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    with FaultProxy(pouchdb.url) as proxy:
        proxy.state.faults.append(Fault(status=429, times=1, retry_after="1"))
        restore_chain(
            CouchServer(proxy.url),
            target,
            store,
            [manifest],
            RestoreOptions(concurrency=4),
            checkpoint_path=tmp_path / "c.json",
        )
        posts = proxy.state.requests_to("POST", "_bulk_docs")

    refused_at = next(p.at for p in posts if p.status == 429)
    # Requests already on the wire when the 429 came back may land just after it; nothing new for 1 s.
    assert not [p for p in posts if refused_at + 0.2 <= p.at < refused_at + 1.0]
    assert len([p for p in posts if p.status == 201]) == manifest.batches
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
                RestoreOptions(concurrency=1),
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

    # Lines already in flight when it crashed were waited for and recorded, so they count as applied.
    assert result.resumed and result.lines_skipped >= 3
    assert result.lines_skipped + result.lines_done == manifest.batches
    assert len(posts) == manifest.batches  # every line sent exactly once across both runs
    assert not checkpoint.exists()
    assert leaves(pouchdb.url, target) == leaves(pouchdb.url, source)


def test_a_restore_process_killed_with_sigkill_resumes_from_its_checkpoint(pouchdb, backup, tmp_path):
    source, store, manifest = backup
    target = pouchdb.new_db_name("dst")
    checkpoint = tmp_path / "restore.json"
    with FaultProxy(pouchdb.url) as proxy:
        proxy.state.write_delay = 0.2
        env = {**os.environ, "COUCHDB_URL": proxy.url}
        argv = [sys.executable, "-m", "commands.couchdb", "restore", store.url(manifest.manifest_name)]
        argv += ["--db", target, "--checkpoint", str(checkpoint), "--concurrency", "1", "--quiet"]
        victim = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while len(proxy.state.requests_to("POST", "_bulk_docs", status=201)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        sent_before = len(proxy.state.requests_to("POST", "_bulk_docs"))
        proxy.state.write_delay = 0.0
        resumed = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        posts = proxy.state.requests_to("POST", "_bulk_docs")

    assert 3 <= sent_before < manifest.batches
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr and "verified" in resumed.stderr
    assert len(posts) - manifest.batches <= 1  # at most the one line in flight at the kill is sent again
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
