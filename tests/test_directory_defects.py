"""One test per defect of issue 13 (directory copies), local engine and CLI; the GCS ones are in
tests/test_directory_gcs.py. Each failed on the code before the fix."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from commands.files import directory_group
from kinds.directory import copies as dircopy
from services.runtime import Runtime, Settings
from tests.dirtrees import make_deep, read_at, snapshot

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, data: bytes, mtime: float | None = 1_700_000_000, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, dest = tmp_path / "share", tmp_path / "backups"
    write(src / "a.txt", b"alpha\n")
    write(src / "docs" / "b.txt", b"bravo\n" * 50)
    dest.mkdir()
    return src, dest


def cli(*args: str, clock=None):
    rt = Runtime(Settings.from_env({}), clock=clock or (lambda: datetime.now(UTC)))
    return CliRunner().invoke(directory_group, list(args), obj={"runtime": rt})


# 1 ------------------------------------------------------------------------------------------------------------
def test_1_a_path_over_4096_bytes_is_copied_verified_and_restored(dirs, tmp_path: Path):
    src, dest = dirs
    deep = make_deep(src, levels=17, name_len=240)  # 4,097 bytes before the file name: fits nowhere with a prefix
    assert len(deep) > 4096

    result = dircopy.copy_tree(src, dest, T0, sync=False)

    assert result.stats.errors == []
    assert read_at(result.path, deep) == b"at the bottom of a very long path\n"
    assert os.fsdecode(deep) in dircopy.read_manifest(result.path).entries
    assert dircopy.verify_copy(result.path).ok
    restored = dircopy.restore_copy(result.path, tmp_path / "restored")
    assert restored.errors == []
    assert read_at(tmp_path / "restored", deep) == b"at the bottom of a very long path\n"
    second = dircopy.copy_tree(src, dest, T0 + timedelta(hours=1), sync=False)
    assert second.stats.files_linked == 3 and second.stats.files_copied == 0
    dircopy.prune(dest, keep=1, min_keep=1)  # deleting a copy with such a path works too
    assert dircopy.complete_copies(dest) == [second.path]


# 4 ------------------------------------------------------------------------------------------------------------
def test_4_restore_overwrite_replaces_a_symlink_and_never_writes_through_it(dirs, tmp_path: Path):
    src, dest = dirs
    write(src / "links" / "inside.txt", b"from the backup")
    copy = dircopy.copy_tree(src, dest, T0, sync=False).path
    elsewhere = tmp_path / "srv-elsewhere"
    write(elsewhere / "precious.txt", b"not part of the target")
    elsewhere.chmod(0o711)
    os.utime(elsewhere, (1_600_000_000, 1_600_000_000))
    before = snapshot(elsewhere)
    target = tmp_path / "live"
    write(target / "a.txt", b"live")
    os.symlink(elsewhere, target / "links")

    result = dircopy.restore_copy(copy, target, overwrite=True, when=T0 + timedelta(hours=1))

    assert result.errors == []
    assert snapshot(elsewhere) == before
    assert not (target / "links").is_symlink()
    assert (target / "links" / "inside.txt").read_bytes() == b"from the backup"
    assert any(r.startswith("links: a symlink in the target") for r in result.replaced)


# 5 ------------------------------------------------------------------------------------------------------------
def test_5_a_255_byte_name_is_restored(dirs, tmp_path: Path):
    src, dest = dirs
    long_name = "n" * 255
    write(src / "docs" / long_name, b"long name")
    (src / "docs").chmod(0o750)
    os.symlink("a.txt", src / "link")
    copy = dircopy.copy_tree(src, dest, T0, sync=False).path

    result = dircopy.restore_copy(copy, tmp_path / "restored")

    assert result.errors == []
    assert (tmp_path / "restored" / "docs" / long_name).read_bytes() == b"long name"
    assert stat.S_IMODE((tmp_path / "restored" / "docs").stat().st_mode) == 0o750
    assert os.readlink(tmp_path / "restored" / "link") == "a.txt"


# 6 ------------------------------------------------------------------------------------------------------------
def test_6_damage_inside_the_newest_copy_is_not_linked_into_the_next(dirs):
    src, dest = dirs
    first = dircopy.copy_tree(src, dest, T0, sync=False).path
    with open(first / "a.txt", "ab") as fh:
        fh.write(b"appended inside the backup\n")
    (first / "docs" / "b.txt").chmod(0o666)

    second = dircopy.copy_tree(src, dest, T0 + timedelta(hours=1), sync=False)

    assert (second.path / "a.txt").read_bytes() == b"alpha\n"
    assert (second.path / "a.txt").stat().st_ino != (first / "a.txt").stat().st_ino
    assert stat.S_IMODE((second.path / "docs" / "b.txt").stat().st_mode) == 0o644
    assert (second.stats.files_linked, second.stats.files_copied, second.stats.damaged_previous) == (0, 2, 2)
    assert "changed inside the previous copy" in (second.path / dircopy.LOG_NAME).read_text()
    assert dircopy.verify_copy(second.path).ok


# 7 ------------------------------------------------------------------------------------------------------------
def test_7_safety_copies_stay_apart_from_the_plans_copies(dirs, tmp_path: Path):
    src, dest = dirs
    copy = dircopy.copy_tree(src, dest, T0, sync=False).path
    target = tmp_path / "live"
    write(target / "a.txt", b"bad deploy")
    write(target / "big.bin", os.urandom(100_000))

    result = dircopy.restore_copy(copy, target, overwrite=True, when=T0 + timedelta(minutes=5))
    nxt = dircopy.copy_tree(src, dest, T0 + timedelta(hours=1), sync=False)

    assert dircopy.complete_copies(dest) == [copy, nxt.path]
    assert nxt.previous == copy
    assert (nxt.stats.files_linked, nxt.stats.files_copied) == (2, 0)
    assert result.safety_copy is not None
    assert result.safety_copy.parent == dest / ".safety-copies"
    assert stat.S_IMODE(result.safety_copy.parent.stat().st_mode) == 0o700
    assert (result.safety_copy / "a.txt").read_bytes() == b"bad deploy"
    dircopy.prune(dest, keep=1, min_keep=1)
    assert (result.safety_copy / "big.bin").exists()  # retention never counts or deletes safety copies


# 8 ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"this test mounts a 2 MB tmpfs to fill it: run the tests as root ({done.stderr.decode()})")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_8_a_full_disk_stops_with_one_line_and_leaves_nothing_behind(dirs, small_fs: Path):
    src, _ = dirs
    for n in range(6):
        write(src / "big" / f"{n}.bin", os.urandom(1 << 20))

    run = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", "directory", "run", str(src), str(small_fs), "--no-sync"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )

    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "No space left on device" in errors[0] and "the unfinished copy was removed" in errors[0]
    assert [p.name for p in small_fs.iterdir()] == [dircopy.LOCK_NAME]


# 9 ------------------------------------------------------------------------------------------------------------
def test_9_file_and_directory_clashes_in_the_target_are_replaced_after_the_safety_copy(dirs, tmp_path: Path):
    src, dest = dirs
    copy = dircopy.copy_tree(src, dest, T0, sync=False).path
    target = tmp_path / "live"
    write(target / "docs", b"a file where the backup has a directory")
    write(target / "a.txt" / "nested.txt", b"a directory where the backup has a file")

    result = dircopy.restore_copy(copy, target, overwrite=True, when=T0 + timedelta(hours=1))

    assert result.errors == []
    assert (target / "docs" / "b.txt").read_bytes() == b"bravo\n" * 50
    assert (target / "a.txt").read_bytes() == b"alpha\n"
    assert sorted(r.split(":")[0] for r in result.replaced) == ["a.txt", "docs"]
    assert (result.safety_copy / "a.txt" / "nested.txt").read_bytes() == b"a directory where the backup has a file"
    assert (result.safety_copy / "docs").read_bytes() == b"a file where the backup has a directory"


# 10 -----------------------------------------------------------------------------------------------------------
def test_10_a_file_replaced_by_a_fifo_after_the_scan_does_not_block_the_copy(dirs, monkeypatch):
    src, dest = dirs
    real = dircopy._read_directory

    def listed_then_swapped(source, rel_dir, stats):
        found = real(source, rel_dir, stats)
        if rel_dir == "docs":
            os.unlink(src / "docs" / "b.txt")
            os.mkfifo(src / "docs" / "b.txt")
        return found

    monkeypatch.setattr(dircopy, "_read_directory", listed_then_swapped)
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(dircopy.copy_tree(src, dest, T0, sync=False)))
    worker.start()
    worker.join(20)
    if worker.is_alive():
        os.close(os.open(src / "docs" / "b.txt", os.O_WRONLY | os.O_NONBLOCK))  # let the stuck reader go
        worker.join(20)
        pytest.fail("the copy blocked on a FIFO that replaced a file")

    [result] = outcome
    assert result.stats.errors == []
    assert result.stats.vanished == 1
    assert "docs/b.txt: was a file when listed, now a FIFO" in (result.path / dircopy.LOG_NAME).read_text()
    assert not (result.path / "docs" / "b.txt").exists()
    assert dircopy.verify_copy(result.path).ok


# 11 -----------------------------------------------------------------------------------------------------------
def test_11_verify_reports_what_the_copy_left_out(dirs):
    src, dest = dirs
    write(src / dircopy.MANIFEST_NAME, b"a source file with a reserved name")
    result = dircopy.copy_tree(src, dest, T0, sync=False)
    assert len(result.stats.errors) == 1

    report = dircopy.verify_copy(result.path)
    verified = cli("verify", str(result.path))

    assert not report.ok
    assert report.problems == []
    assert report.recorded_errors == [result.stats.errors[0]]
    assert verified.exit_code == 1
    assert "left out when the copy was made: .backup-manifest.tsv: name is reserved" in verified.output


# 12 -----------------------------------------------------------------------------------------------------------
def test_12_a_crash_in_the_middle_of_retention_leaves_no_complete_looking_half_copy(dirs):
    src, dest = dirs
    for n in range(40):
        write(src / f"file-{n:02d}.txt", f"{n}".encode())
    old = dircopy.copy_tree(src, dest, T0, sync=False).path
    new = dircopy.copy_tree(src, dest, T0 + timedelta(hours=1), sync=False).path
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from kinds.directory import copies as dircopy
        real_unlink, calls = os.unlink, []
        def unlink_then_die(*args, **kwargs):
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append(args)
            return real_unlink(*args, **kwargs)
        os.unlink = unlink_then_die
        dircopy.prune({str(dest)!r}, keep=1, min_keep=1)
        """
    )

    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True)

    assert crashed.returncode == -9, crashed.stderr
    assert dircopy.complete_copies(dest) == [new]
    assert not old.exists()
    dircopy.prune(dest, keep=1, min_keep=1)
    assert sorted(p.name for p in dest.iterdir()) == sorted([dircopy.LOCK_NAME, new.name])


# 13 -----------------------------------------------------------------------------------------------------------
def test_13_two_ad_hoc_runs_in_the_same_second_make_two_copies(dirs):
    src, dest = dirs
    ticks = iter(T0 + timedelta(milliseconds=100 * n) for n in range(1000))

    def clock():
        return next(ticks)

    first = cli("run", str(src), str(dest), "--no-sync", clock=clock)
    write(src / "a.txt", b"changed within the same second\n", mtime=1_700_000_050)
    second = cli("run", str(src), str(dest), "--no-sync", clock=clock)

    assert first.exit_code == 0 and second.exit_code == 0, second.output
    copies = dircopy.complete_copies(dest)
    assert [c.name for c in copies] == ["20261123T020000Z", "20261123T020001Z"]
    assert (copies[1] / "a.txt").read_bytes() == b"changed within the same second\n"
    assert "copied 1 files" in second.output and "linked 1 unchanged" in second.output


# 14 -----------------------------------------------------------------------------------------------------------
def test_14_a_file_that_vanishes_mid_copy_is_logged(dirs, monkeypatch):
    src, dest = dirs
    write(src / "docs" / "tmp-upload.part", b"about to go")
    real = dircopy._read_directory

    def listed_then_deleted(source, rel_dir, stats):
        found = real(source, rel_dir, stats)
        if rel_dir == "docs":
            os.unlink(src / "docs" / "tmp-upload.part")
        return found

    monkeypatch.setattr(dircopy, "_read_directory", listed_then_deleted)

    ran = cli("run", str(src), str(dest), "--no-sync")

    [copy] = dircopy.complete_copies(dest)
    assert ran.exit_code == 0, ran.output
    assert "note: docs/tmp-upload.part: vanished before it could be copied" in ran.output
    log = (copy / dircopy.LOG_NAME).read_text()
    assert "vanished:  1 entries" in log and "docs/tmp-upload.part: vanished" in log
    assert dircopy.read_manifest(copy).header["stats"]["vanished"] == 1


# 15 -----------------------------------------------------------------------------------------------------------
def test_15_restore_takes_modes_owners_and_the_roots_attributes_from_the_manifest(dirs, tmp_path: Path):
    src, dest = dirs
    os.symlink("a.txt", src / "owned-link")
    os.lchown(src / "owned-link", 1234, 5678)
    os.chown(src / "a.txt", 4321, 8765)
    src.chmod(0o750)
    os.utime(src, (1_650_000_000, 1_650_000_000))
    copy = dircopy.copy_tree(src, dest, T0, sync=False).path
    (copy / "docs" / "b.txt").chmod(0o600)  # someone chmod'ed the file inside the backup
    target = tmp_path / "restored"

    result = dircopy.restore_copy(copy, target)

    assert result.errors == []
    assert os.lstat(target / "owned-link")[4:6] == (1234, 5678)
    assert os.stat(target / "a.txt")[4:6] == (4321, 8765)
    assert stat.S_IMODE((target / "docs" / "b.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert target.stat().st_mtime_ns == 1_650_000_000 * 10**9
