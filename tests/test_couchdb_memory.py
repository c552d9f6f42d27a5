"""Memory stays flat: backing up and restoring a 5x larger database does not raise peak RSS."""

from __future__ import annotations

import json
import os
import sys

import pytest

from services.runtime import ROOT
from tests.couch_data import make_docs, peak_rss_mb, seed

# Small batches so that even the small database fills every buffer: what is left to grow is what must not.
LIMITS = ["--batch-docs", "100", "--batch-bytes", str(1024 * 1024)]
READS = ["--read-bytes", str(512 * 1024)]


def _backup_and_restore(url, db, dest, target, mode):
    env = {**os.environ, "COUCHDB_URL": url}
    cli = [sys.executable, "-m", "commands.couchdb"]
    backup_rss, backup_status = peak_rss_mb(
        [*cli, "backup", db, "--to", str(dest), "--quiet", "--mode", mode, "--page-size", "200", *READS, *LIMITS],
        env,
        str(ROOT),
    )
    manifest = next(dest.rglob("*.manifest.json"))
    restore_rss, restore_status = peak_rss_mb(
        [*cli, "restore", str(manifest), "--db", target, "--quiet", "--no-verify", *LIMITS], env, str(ROOT)
    )
    assert (backup_status, restore_status) == (0, 0)
    return backup_rss, restore_rss


@pytest.mark.parametrize("mode", ["full", "winning"])
def test_peak_memory_does_not_grow_with_the_database(pouchdb, tmp_path, mode):
    small, large = pouchdb.new_db_name("mem-s"), pouchdb.new_db_name("mem-l")
    seed(pouchdb.url, small, make_docs(800, attachment_every=20, attachment_bytes=20_000, padding=2000))
    seed(pouchdb.url, large, make_docs(4000, attachment_every=20, attachment_bytes=20_000, padding=2000))

    small_rss = _backup_and_restore(pouchdb.url, small, tmp_path / "s", pouchdb.new_db_name("mem-s-r"), mode)
    large_rss = _backup_and_restore(pouchdb.url, large, tmp_path / "l", pouchdb.new_db_name("mem-l-r"), mode)

    small_data = json.loads(next((tmp_path / "s").rglob("*.manifest.json")).read_text())["bytes_uncompressed"]
    large_data = json.loads(next((tmp_path / "l").rglob("*.manifest.json")).read_text())["bytes_uncompressed"]
    # Holding the extra documents (as Python objects, twice their JSON size at least) would add over 16 MB;
    # the few MB allowed are the allocator's high-water mark moving with more pages read.
    assert large_data - small_data > 8 * 1024 * 1024
    for small_mb, large_mb in zip(small_rss, large_rss, strict=True):
        assert large_mb < 150
        assert large_mb <= small_mb + 8, (mode, small_rss, large_rss)
