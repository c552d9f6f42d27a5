"""Memory stays flat: backing up and restoring a 5x larger database does not raise peak RSS."""

from __future__ import annotations

import json
import os
import sys

from services.runtime import ROOT
from tests.couch_data import make_docs, peak_rss_mb, seed

# Small batches so that even the small database fills every buffer: what is left to grow is what must not.
LIMITS = ["--batch-docs", "100", "--batch-bytes", str(1024 * 1024)]


def _backup_and_restore(url, db, dest, target):
    env = {**os.environ, "COUCHDB_URL": url}
    cli = [sys.executable, "-m", "commands.couchdb"]
    backup_rss, backup_status = peak_rss_mb(
        [*cli, "backup", db, "--to", str(dest), "--quiet", "--page-size", "200", *LIMITS], env, str(ROOT)
    )
    manifest = next(dest.rglob("*.manifest.json"))
    restore_rss, restore_status = peak_rss_mb(
        [*cli, "restore", str(manifest), "--db", target, "--quiet", "--no-verify", *LIMITS], env, str(ROOT)
    )
    assert (backup_status, restore_status) == (0, 0)
    return backup_rss, restore_rss


def test_peak_memory_does_not_grow_with_the_database(pouchdb, tmp_path):
    small, large = pouchdb.new_db_name("mem-s"), pouchdb.new_db_name("mem-l")
    seed(pouchdb.url, small, make_docs(800, attachment_every=20, attachment_bytes=20_000, padding=2000))
    seed(pouchdb.url, large, make_docs(4000, attachment_every=20, attachment_bytes=20_000, padding=2000))

    small_rss = _backup_and_restore(pouchdb.url, small, tmp_path / "s", pouchdb.new_db_name("mem-s-r"))
    large_rss = _backup_and_restore(pouchdb.url, large, tmp_path / "l", pouchdb.new_db_name("mem-l-r"))

    manifest = json.loads(next((tmp_path / "l").rglob("*.manifest.json")).read_text())
    assert manifest["bytes_uncompressed"] > 10 * 1024 * 1024  # big enough that holding it in memory would show
    for small_mb, large_mb in zip(small_rss, large_rss, strict=True):
        assert large_mb < 150
        # 5x the data may move the allocator by a few MB; holding the database would add tens of MB.
        assert large_mb <= small_mb * 1.10 + 3, (small_rss, large_rss)
