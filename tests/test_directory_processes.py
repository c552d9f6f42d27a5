"""Directory copies whose walk is shared by several processes (``copy_tree(processes=2)``, the CLI's default on
a machine with two cores or more): the same copy as one process makes, work really shared, and a worker that
fails or fills the disk stops the copy cleanly."""

from __future__ import annotations

import errno
import os
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kinds.directory import copies as dircopy
from tests.dirtrees import make_socket, snapshot

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


def write(path: Path, data: bytes, mtime: int = 1_700_000_000, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    os.utime(path, (mtime, mtime))
    return path


def make_tree(root: Path) -> list[str]:
    """Files at the top and deep down, a wide directory (shared in slices), nested subtrees (shared whole), odd
    modes, a read-only directory, symlinks, a FIFO, a socket and an empty directory. Returns the files."""
    files = []
    for n in range(5):
        files.append(f"top{n}.txt")
    for n in range(2500):
        files.append(f"wide/f{n:04d}")
    for a in range(12):
        for b in range(4):
            for c in range(6):
                files.append(f"t{a:02d}/s{b}/f{c}.bin")
    for rel in files:
        write(root / rel, rel.encode() * 3)
    (root / "t03" / "s1" / "f2.bin").chmod(0o640)
    os.symlink("top0.txt", root / "link-to-top")
    os.symlink("../f0.bin", root / "t05" / "s2" / "up-link")
    os.mkfifo(root / "t07" / "fifo")
    make_socket(root / "t08" / "sock")
    (root / "t09" / "empty").mkdir()
    (root / "t10" / "s3").chmod(0o555)
    for rel in ("t10/s3", "t10", "wide", "t09/empty"):
        os.utime(root / rel, (1_600_000_000, 1_600_000_000))
    return files


def pids_listing(monkeypatch, log: Path, then=None) -> None:
    """Record which process lists each directory (one line per listing, appended atomically), then call
    ``then`` if given. Once a worker is forked, the first process lists nothing more until a worker has listed a
    directory, so the work is shared however busy the machine is (the wait is bounded)."""
    real = dircopy._read_directory
    first = os.getpid()
    forked: list[int] = []
    real_fork = os.fork

    def fork() -> int:
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    def listing(source, rel_dir, stats):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        if os.getpid() == first and forked:
            give_up = time.monotonic() + 60
            while len(set(log.read_text().split())) < 2 and time.monotonic() < give_up:
                time.sleep(0.01)
        if then is not None:
            then()
        return real(source, rel_dir, stats)

    monkeypatch.setattr(dircopy.os, "fork", fork)
    monkeypatch.setattr(dircopy, "_read_directory", listing)


def tree_of(copy: Path) -> dict[bytes, tuple]:
    """Every entry of a copy as ``snapshot`` sees it, without the copy's own manifest and log."""
    found = snapshot(copy)
    del found[dircopy.MANIFEST_NAME.encode()], found[dircopy.LOG_NAME.encode()]
    return found


def body(copy: Path) -> list[str]:
    return (copy / dircopy.MANIFEST_NAME).read_text(errors="surrogateescape").splitlines()[1:]


def test_two_processes_make_the_same_copy_as_one_and_share_the_work(tmp_path: Path, monkeypatch):
    src = tmp_path / "share"
    files = make_tree(src)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    log = tmp_path / "listings"
    pids_listing(monkeypatch, log)
    seen: list[dircopy.Progress] = []

    alone = dircopy.copy_tree(src, one, T0, sync=False, processes=1)
    log.unlink()
    shared = dircopy.copy_tree(src, two, T0, sync=False, processes=2, on_progress=seen.append, progress_every=0)

    assert len(set(log.read_text().split())) == 2  # both processes listed directories
    assert shared.stats.errors == []
    assert shared.stats.summary() | {"duration_seconds": 0} == alone.stats.summary() | {"duration_seconds": 0}
    assert (shared.stats.files_copied, shared.stats.symlinks, shared.stats.specials) == (len(files), 2, 2)
    assert body(shared.path) == body(alone.path)
    assert tree_of(shared.path) == tree_of(alone.path) == snapshot(src)
    assert stat.S_IMODE(os.stat(shared.path / "t10" / "s3").st_mode) == 0o555
    assert (seen[-1].files_done, seen[-1].files_total) == (len(files), len(files))
    assert dircopy.verify_copy(shared.path).ok


def test_an_incremental_copy_in_two_processes_links_the_unchanged_files_and_copies_the_rest(tmp_path, monkeypatch):
    src, dest = tmp_path / "share", tmp_path / "copies"
    files = make_tree(src)
    dest.mkdir()
    first = dircopy.copy_tree(src, dest, T0, sync=False, processes=2)
    changed = files[::97]
    for rel in changed:
        write(src / rel, b"changed " + rel.encode(), mtime=1_700_000_500)
    os.unlink(src / "wide" / "f0001")
    (first.path / "t04" / "s0" / "f3.bin").chmod(0o600)  # damaged inside the previous copy: copied afresh
    log = tmp_path / "listings"
    pids_listing(monkeypatch, log)

    second = dircopy.copy_tree(src, dest, T0 + timedelta(hours=1), sync=False, processes=2)

    assert len(set(log.read_text().split())) == 2
    stats = second.stats
    assert stats.errors == []
    assert (stats.files_copied, stats.files_deleted, stats.damaged_previous) == (len(changed) + 1, 1, 1)
    assert stats.files_linked == len(files) - 1 - len(changed) - 1
    assert os.stat(second.path / "wide" / "f0002").st_nlink == 2
    assert os.stat(second.path / changed[1]).st_nlink == 1
    assert (second.path / changed[1]).read_bytes() == b"changed " + changed[1].encode()
    assert not (second.path / "wide" / "f0001").exists()
    assert dircopy.verify_copy(second.path).ok


def test_a_failing_worker_process_stops_the_copy_and_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    src, dest = tmp_path / "share", tmp_path / "copies"
    make_tree(src)
    dest.mkdir()
    first = os.getpid()

    def broken_in_workers():
        if os.getpid() != first:
            raise RuntimeError("a bug in a worker")

    pids_listing(monkeypatch, tmp_path / "listings", then=broken_in_workers)

    with pytest.raises(dircopy.CopyError, match="a copying process failed: RuntimeError: a bug in a worker"):
        dircopy.copy_tree(src, dest, T0, sync=False, processes=2)

    assert [p.name for p in dest.iterdir()] == [dircopy.LOCK_NAME]


def test_a_worker_that_fills_the_disk_stops_the_copy_and_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    src, dest = tmp_path / "share", tmp_path / "copies"
    make_tree(src)
    dest.mkdir()
    first = os.getpid()
    real = dircopy.copy_file

    def full_in_workers(source, target, st):
        if os.getpid() != first:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        return real(source, target, st)

    monkeypatch.setattr(dircopy, "copy_file", full_in_workers)
    pids_listing(monkeypatch, tmp_path / "listings")

    with pytest.raises(dircopy.CopyError, match="No space left on device.*the unfinished copy was removed"):
        dircopy.copy_tree(src, dest, T0, sync=False, processes=2)

    assert [p.name for p in dest.iterdir()] == [dircopy.LOCK_NAME]


def test_a_small_tree_is_copied_by_one_process(tmp_path: Path, monkeypatch):
    src, dest = tmp_path / "share", tmp_path / "copies"
    for n in range(3):
        write(src / f"d{n}" / "f.txt", b"small")
    dest.mkdir()
    log = tmp_path / "listings"
    pids_listing(monkeypatch, log)

    copy = dircopy.copy_tree(src, dest, T0, sync=False, processes=2)

    assert set(log.read_text().split()) == {str(os.getpid())}
    assert copy.stats.files_copied == 3
