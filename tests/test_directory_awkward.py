"""The awkward tree of issue 13 (names with every control character and bytes that are not UTF-8, 255-byte names,
a path over 4,096 bytes, symlink loops, a FIFO, a socket, a sparse file, a file vanishing mid-copy) copied,
verified and restored, locally and through the GCS emulator; and side by side with ``rsync -a`` on the same tree,
so the differences docs/files.md lists are the only ones."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kinds.directory import bucket as gcscopy
from kinds.directory import copies as dircopy
from tests.dirtrees import make_awkward_tree, set_times, snapshot

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


@pytest.fixture
def awkward(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """The tree, and a file in it that is deleted right after the walk lists its directory."""
    src = tmp_path / "src"
    facts = make_awkward_tree(src, sparse_mb=16)
    (src / "names" / "vanishing.tmp").write_bytes(b"here when listed, gone when copied")
    real = dircopy._read_directory

    def listed_then_deleted(source, rel_dir, stats):
        found = real(source, rel_dir, stats)
        if rel_dir == "names" and (src / "names" / "vanishing.tmp").exists():
            os.unlink(src / "names" / "vanishing.tmp")
        return found

    monkeypatch.setattr(dircopy, "_read_directory", listed_then_deleted)
    return src, facts


def test_the_awkward_tree_copies_verifies_and_restores_locally(awkward, tmp_path: Path):
    src, facts = awkward
    dest = tmp_path / "backups"
    dest.mkdir()

    copy = dircopy.copy_tree(src, dest, T0, sync=False)
    again = dircopy.copy_tree(src, dest, T0 + timedelta(hours=1), sync=False)
    report = dircopy.verify_copy(again.path)
    restored = dircopy.restore_copy(again.path, tmp_path / "restored")

    assert copy.stats.errors == [] and copy.stats.vanished == 1
    assert copy.stats.specials == 2  # the FIFO and the socket
    assert again.stats.files_copied == 0 and again.stats.errors == []
    assert report.ok, report.problems
    assert restored.errors == []
    assert snapshot(tmp_path / "restored") == snapshot(src)
    sparse = os.stat(tmp_path / "restored" / facts["sparse"])
    assert sparse.st_blocks * 512 < sparse.st_size // 8  # holes stayed holes
    manifest = (again.path / dircopy.MANIFEST_NAME).read_bytes()
    manifest.decode("utf-8")  # escaped: valid UTF-8 whatever the names
    assert len(manifest.decode().splitlines()) == len(dircopy.read_manifest(again.path).entries) + 1


def test_the_awkward_tree_copies_verifies_and_restores_through_the_bucket(awkward, files_bucket, tmp_path: Path):
    src, _ = awkward
    url = "gs://dir-copies/awkward"

    copy = gcscopy.copy_tree_to_bucket(src, files_bucket, url, T0)
    again = gcscopy.copy_tree_to_bucket(src, files_bucket, url, T0 + timedelta(hours=1))
    report = gcscopy.verify_bucket_copy(files_bucket, again.url)
    restored = gcscopy.restore_bucket_copy(files_bucket, again.url, tmp_path / "restored")

    assert copy.stats.errors == [] and copy.stats.vanished == 1
    assert again.cost.objects_written == 0 and again.stats.files_copied == 0
    assert report.ok, report.problems
    assert restored.errors == []
    assert snapshot(tmp_path / "restored") == snapshot(src)


def test_beside_rsync_the_only_difference_is_the_path_over_4096_bytes(tmp_path: Path):
    if shutil.which("rsync") is None:
        pytest.fail("rsync is not installed: run scripts/ensure-rsync.sh")
    src = tmp_path / "src"
    facts = make_awkward_tree(src, sparse_mb=16)
    set_times(src, 1_600_000_000)  # whole seconds in the past: rsync compares mtimes to the second
    dest = tmp_path / "backups"
    dest.mkdir()
    ours = dircopy.copy_tree(src, dest, T0, sync=False).path
    theirs = tmp_path / "rsync"

    done = subprocess.run(["rsync", "-a", f"{src}/", f"{theirs}/"], capture_output=True)

    ours_snap = {k: v for k, v in snapshot(ours).items() if k not in (b".backup-manifest.tsv", b".backup-log.txt")}
    theirs_snap = snapshot(theirs)
    deep_top = facts["deep"].split(b"/")[0]
    only_ours = {k for k in ours_snap if k not in theirs_snap}
    assert done.returncode == 23  # rsync's "partial transfer": it could not handle the long path
    assert b"filename overflows max-path len" in done.stderr
    assert only_ours and all(k.startswith(deep_top + b"/") for k in only_ours)
    assert [k for k in theirs_snap if k not in ours_snap] == []
    assert {k for k in theirs_snap if theirs_snap[k] != ours_snap[k]} == set()
    assert ours_snap == snapshot(src)
