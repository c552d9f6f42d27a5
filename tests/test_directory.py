"""Directory copies on real temporary trees: links, copies, deletions, metadata, crash recovery, retention,
verify and restore, through the engine (kinds/directory/copies.py) and the ``directory`` kind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kinds.directory import copies as dircopy
from kinds.directory import kind as directory
from services.errors import ConfigError, PermanentError, TransientError
from services.kinds import Done, RunContext, Target
from services.plans import parse_plan
from services.runtime import Runtime, Settings

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, data: bytes, mtime: float | None = None, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small source tree with nested folders, mixed sizes, odd modes, symlinks and an empty directory."""
    src = tmp_path / "share"
    write(src / "a.txt", b"alpha\n", mtime=1_700_000_000)
    write(src / "docs" / "b.txt", b"bravo\n" * 100, mtime=1_700_000_100)
    write(src / "docs" / "deep" / "c.bin", os.urandom(3 * 1024 * 1024 + 17), mtime=1_700_000_200)  # > SMALL_FILE
    write(src / "private.key", b"secret", mode=0o600)
    write(src / "tool.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    write(src / "name with\ttab", b"tabbed")
    (src / "empty").mkdir()
    os.symlink("docs/b.txt", src / "link-to-b")
    os.symlink("/nowhere/at/all", src / "dangling")
    (src / "docs").chmod(0o750)
    os.utime(src / "docs", (1_700_000_500, 1_700_000_500))
    return src


def rel_files(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in dircopy.RESERVED_NAMES:
                out.add(rel)
    return out


def test_second_copy_links_unchanged_files_copies_changed_and_drops_deleted(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    first = dircopy.copy_tree(tree, dest, T0, threads=2)
    write(tree / "a.txt", b"alpha, edited\n", mtime=1_700_009_999)
    write(tree / "docs" / "new.txt", b"brand new")
    (tree / "tool.sh").unlink()

    second = dircopy.copy_tree(tree, dest, T0 + timedelta(hours=1), threads=2)

    assert second.previous == first.path
    unchanged = second.path / "docs" / "deep" / "c.bin"
    assert unchanged.stat().st_ino == (first.path / "docs" / "deep" / "c.bin").stat().st_ino
    assert (second.path / "a.txt").stat().st_ino != (first.path / "a.txt").stat().st_ino
    assert (second.path / "a.txt").read_bytes() == b"alpha, edited\n"
    assert (first.path / "a.txt").read_bytes() == b"alpha\n"
    assert (second.path / "docs" / "new.txt").read_bytes() == b"brand new"
    assert not (second.path / "tool.sh").exists()
    assert (first.path / "tool.sh").exists()
    assert (second.stats.files_copied, second.stats.files_deleted) == (2, 1)
    assert second.stats.files_linked == 4  # b.txt, c.bin, private.key, the tabbed name
    assert rel_files(second.path) == rel_files(tree)


def test_copy_keeps_permissions_times_and_symlinks(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()

    copy = dircopy.copy_tree(tree, dest, T0).path

    for rel in ("a.txt", "docs/b.txt", "docs/deep/c.bin", "private.key", "tool.sh", "docs", "empty"):
        src_st, dst_st = os.lstat(tree / rel), os.lstat(copy / rel)
        assert stat.S_IMODE(dst_st.st_mode) == stat.S_IMODE(src_st.st_mode), rel
        assert dst_st.st_mtime_ns == src_st.st_mtime_ns, rel
    assert (copy / "docs" / "deep" / "c.bin").read_bytes() == (tree / "docs" / "deep" / "c.bin").read_bytes()
    assert os.readlink(copy / "link-to-b") == "docs/b.txt"
    assert os.readlink(copy / "dangling") == "/nowhere/at/all"
    assert (copy / "empty").is_dir()
    assert (copy / "name with\ttab").read_bytes() == b"tabbed"


def test_manifest_and_log_describe_the_copy(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()

    result = dircopy.copy_tree(tree, dest, T0)

    manifest = dircopy.read_manifest(result.path)
    import hashlib

    assert manifest.entries["docs/b.txt"].sha256 == hashlib.sha256(b"bravo\n" * 100).hexdigest()
    assert manifest.entries["name with\ttab"].size == 6
    assert manifest.entries["link-to-b"].target == "docs/b.txt"
    assert manifest.header["stats"]["files_copied"] == 6
    log = (result.path / dircopy.LOG_NAME).read_text()
    assert "copied:    6 files" in log
    assert "errors:    0" in log


def test_interrupted_copy_never_looks_complete_and_the_next_run_recovers(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    # A real crash: the copying process kills itself with SIGKILL part-way through.
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from datetime import datetime, timezone
        sys.path.insert(0, {str(ROOT)!r})
        from kinds.directory import copies as dircopy
        def die(progress):
            if progress.files_done >= 2:
                os.kill(os.getpid(), signal.SIGKILL)
        dircopy.copy_tree({str(tree)!r}, {str(dest)!r}, datetime(2026, 11, 23, 2, 0, tzinfo=timezone.utc),
                          threads=1, on_progress=die, progress_every=0)
        """
    )
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert crashed.returncode == -9
    assert dircopy.complete_copies(dest) == []
    assert not (dest / dircopy.stamp(T0)).exists()
    assert [p.name for p in dest.iterdir() if p.name.startswith(dircopy.INPROGRESS_PREFIX)]

    result = dircopy.copy_tree(tree, dest, T0)

    assert dircopy.complete_copies(dest) == [result.path]
    assert not [p for p in dest.iterdir() if p.name.startswith(dircopy.INPROGRESS_PREFIX)]
    assert rel_files(result.path) == rel_files(tree)


def test_a_running_copy_holds_the_destination(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    with dircopy.DestinationLock(dest):
        with pytest.raises(dircopy.CopyBusy):
            dircopy.copy_tree(tree, dest, T0)
        with pytest.raises(dircopy.CopyBusy):
            dircopy.prune(dest, keep=1, min_keep=1)


def test_retention_keeps_n_and_ignores_folders_that_are_not_ours(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    foreign_stamp = dest / "20200101T000000Z"  # looks like a stamp, has no manifest of ours
    foreign_stamp.mkdir()
    (dest / "notes").mkdir()
    copies = []
    for hour in range(5):
        write(tree / "a.txt", f"version {hour}".encode())
        copies.append(dircopy.copy_tree(tree, dest, T0 + timedelta(hours=hour)).path)

    deleted = dircopy.prune(dest, keep=2, min_keep=1)

    assert deleted == copies[:3]
    assert dircopy.complete_copies(dest) == copies[3:]
    assert foreign_stamp.is_dir() and (dest / "notes").is_dir()
    assert (copies[4] / "a.txt").read_bytes() == b"version 4"


def test_retention_floor_wins_over_keep(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    for hour in range(3):
        dircopy.copy_tree(tree, dest, T0 + timedelta(hours=hour))

    dircopy.prune(dest, keep=1, min_keep=2)

    assert len(dircopy.complete_copies(dest)) == 2


def test_verify_catches_a_flipped_byte(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    copy = dircopy.copy_tree(tree, dest, T0).path
    assert dircopy.verify_copy(copy).ok
    victim = copy / "docs" / "deep" / "c.bin"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    report = dircopy.verify_copy(copy)

    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith("docs/deep/c.bin: content differs")


def test_verify_reports_missing_and_extra_files(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    copy = dircopy.copy_tree(tree, dest, T0).path
    (copy / "a.txt").unlink()
    write(copy / "stowaway.txt", b"?")

    problems = dircopy.verify_copy(copy).problems

    assert sorted(problems) == ["a.txt: missing", "stowaway.txt: in the copy but not in its manifest"]


def test_restore_into_an_empty_directory_recreates_the_tree(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    copy = dircopy.copy_tree(tree, dest, T0).path
    target = tmp_path / "restored"

    result = dircopy.restore_copy(copy, target)

    assert result.errors == []
    assert rel_files(target) == rel_files(tree)
    assert (target / "docs" / "deep" / "c.bin").read_bytes() == (tree / "docs" / "deep" / "c.bin").read_bytes()
    assert stat.S_IMODE((target / "private.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((target / "docs").stat().st_mode) == 0o750
    assert os.readlink(target / "link-to-b") == "docs/b.txt"


def test_restore_refuses_a_non_empty_target_and_overwrite_takes_a_safety_copy_first(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    copy = dircopy.copy_tree(tree, dest, T0).path
    write(tree / "a.txt", b"a bad deploy wrote this")
    write(tree / "only-in-live.txt", b"keep me")

    with pytest.raises(dircopy.CopyError, match="not empty"):
        dircopy.restore_copy(copy, tree)
    assert (tree / "a.txt").read_bytes() == b"a bad deploy wrote this"

    result = dircopy.restore_copy(copy, tree, overwrite=True, when=T0 + timedelta(hours=5))

    assert (tree / "a.txt").read_bytes() == b"alpha\n"
    assert (tree / "only-in-live.txt").read_bytes() == b"keep me"
    assert result.safety_copy is not None
    assert (result.safety_copy / "a.txt").read_bytes() == b"a bad deploy wrote this"


def test_restore_refuses_a_damaged_file(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    copy = dircopy.copy_tree(tree, dest, T0).path
    (copy / "a.txt").write_bytes(b"alphA\n")

    result = dircopy.restore_copy(copy, tmp_path / "restored")

    assert [e.split(":")[0] for e in result.errors] == ["a.txt"]
    assert not (tmp_path / "restored" / "a.txt").exists()


def test_an_empty_source_after_a_full_copy_is_refused(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    dircopy.copy_tree(tree, dest, T0)
    empty = tmp_path / "unmounted"
    empty.mkdir()

    with pytest.raises(dircopy.CopyError, match="is the share mounted"):
        dircopy.copy_tree(empty, dest, T0 + timedelta(hours=1))
    assert len(dircopy.complete_copies(dest)) == 1
    assert not [p for p in dest.iterdir() if p.name.startswith(dircopy.INPROGRESS_PREFIX)]


def test_a_destination_inside_the_source_is_refused(tree: Path):
    with pytest.raises(dircopy.CopyError, match="inside the source"):
        dircopy.copy_tree(tree, tree / "docs", T0)


# --- the kind -----------------------------------------------------------------------------------------------------


def make_plan(source: Path, dest: Path, keep: int = 2, **options):
    raw = {
        "kind": "directory",
        "select": {"paths": [str(source)]},
        "destination": {"path": str(dest)},
        "retention": {"keep": keep, "min_keep": 1},
    }
    if options:
        raw["options"] = options
    return parse_plan("share-copies", raw)


def run_for(plan, target: Target, when: datetime) -> RunContext:
    return RunContext(run_id=f"run-{when:%H}", plan=plan.name, target_key=target.key, period=when)


def test_kind_copies_each_source_and_applies_retention(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    plan = make_plan(tree, dest, keep=2, threads=2, progress_seconds=1)
    rt = Runtime(Settings.from_env({}), plans={plan.name: plan}, clock=lambda: T0)
    [target] = directory.KIND.enumerate(plan, None, rt).targets
    outcomes = []
    for hour in range(3):
        write(tree / "a.txt", f"hour {hour}".encode())
        when = T0 + timedelta(hours=hour)
        outcomes.append(directory.KIND.start(plan, target, run_for(plan, target, when), rt))

    assert target.key == str(tree)
    assert all(isinstance(o, Done) for o in outcomes)
    assert [p.name for p in dircopy.complete_copies(dest)] == ["20261123T030000Z", "20261123T040000Z"]
    assert outcomes[2].output == str(dest / "20261123T040000Z")
    assert outcomes[2].stats["pruned"] == ["20261123T020000Z"]
    assert outcomes[2].stats["files_copied"] == 1


def test_kind_start_is_idempotent_for_the_same_period(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    plan = make_plan(tree, dest)
    rt = Runtime(Settings.from_env({}), clock=lambda: T0)
    [target] = directory.KIND.enumerate(plan, None, rt).targets
    run = run_for(plan, target, T0)
    first = directory.KIND.start(plan, target, run, rt)
    write(tree / "a.txt", b"changed after the run")

    again = directory.KIND.start(plan, target, run, rt)

    assert again.output == first.output
    assert "already complete" in again.message
    assert (Path(again.output) / "a.txt").read_bytes() == b"alpha\n"
    assert len(dircopy.complete_copies(dest)) == 1


def test_kind_maps_failures_to_errors_the_worker_understands(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    plan = make_plan(tree, dest)
    rt = Runtime(Settings.from_env({}), clock=lambda: T0)
    missing = Target(key="/mnt/not-mounted", params={"source": "/mnt/not-mounted", "dest": str(dest)})
    [target] = directory.KIND.enumerate(plan, None, rt).targets

    with pytest.raises(PermanentError, match="/mnt/not-mounted"):
        directory.KIND.start(plan, missing, run_for(plan, missing, T0), rt)
    with dircopy.DestinationLock(dest), pytest.raises(TransientError, match="another copy"):
        directory.KIND.start(plan, target, run_for(plan, target, T0), rt)


def test_kind_reports_unreadable_files_and_prunes_nothing(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    plan = make_plan(tree, dest, keep=1)
    rt = Runtime(Settings.from_env({}), clock=lambda: T0)
    [target] = directory.KIND.enumerate(plan, None, rt).targets
    directory.KIND.start(plan, target, run_for(plan, target, T0), rt)
    write(tree / "reserved", b"")
    os.replace(tree / "reserved", tree / dircopy.MANIFEST_NAME)  # a source entry the engine must not copy

    later = T0 + timedelta(hours=1)
    with pytest.raises(PermanentError, match="1 errors"):
        directory.KIND.start(plan, target, run_for(plan, target, later), rt)
    assert len(dircopy.complete_copies(dest)) == 2  # keep=1, but a copy with errors prunes nothing


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"select": {"paths": ["relative/path"]}, "destination": {"path": "/b"}}, "select.paths"),
        ({"select": {"paths": ["/a"]}, "destination": {"path": "/b", "bucket": "gs://x"}}, "exactly one"),
        ({"select": {"paths": ["/a"]}, "destination": {"bucket": "s3://x"}}, "destination.bucket"),
        ({"select": {"paths": ["/x/a", "/y/a"]}, "destination": {"path": "/b"}}, "must differ"),
        ({"select": {"paths": ["/a"]}, "destination": {"path": "/b"}, "options": {"sync": "false"}}, "options.sync"),
    ],
)
def test_bad_plans_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_plan("bad", {"kind": "directory", **raw})


def test_several_sources_get_their_own_folder():
    plan = parse_plan(
        "two", {"kind": "directory", "select": {"paths": ["/mnt/a", "/mnt/b"]}, "destination": {"path": "/bk"}}
    )

    targets = directory.KIND.enumerate(plan, None, None).targets

    assert [(t.key, t.params["dest"]) for t in targets] == [("/mnt/a", "/bk/a"), ("/mnt/b", "/bk/b")]


@pytest.mark.parametrize("damage", ["cut", "joined", "empty line"])
def test_a_manifest_with_one_damaged_line_is_not_read_for_linking(tree: Path, tmp_path: Path, damage: str):
    dest = tmp_path / "backups"
    dest.mkdir()
    first = dircopy.copy_tree(tree, dest, T0).path
    manifest = first / dircopy.MANIFEST_NAME
    header, *lines = manifest.read_text().splitlines()
    if damage == "cut":
        lines[1] = lines[1][: lines[1].index("\t", lines[1].index("\t") + 1)]  # two fields left
    elif damage == "joined":
        lines[1:3] = [lines[1] + "\t" + lines[2]]
    else:
        lines.insert(2, "")
    manifest.write_text("\n".join([header, *lines]) + "\n")

    with pytest.raises(ValueError, match="a line is not a manifest entry"):
        dircopy.read_manifest_lines(first)


def test_a_damaged_previous_manifest_means_a_full_copy_not_a_stuck_backup(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    first = dircopy.copy_tree(tree, dest, T0).path
    manifest = first / dircopy.MANIFEST_NAME
    header = manifest.read_text().splitlines()[0]
    manifest.write_text(header + "\ngarbage without tabs\n")

    second = dircopy.copy_tree(tree, dest, T0 + timedelta(hours=1))

    assert second.stats.files_linked == 0
    assert second.stats.files_copied == 6
    assert "unreadable manifest" in (second.path / dircopy.LOG_NAME).read_text()
    assert dircopy.verify_copy(second.path).ok


def test_unchanged_is_decided_by_the_previous_manifest_not_the_previous_files(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    first = dircopy.copy_tree(tree, dest, T0).path
    manifest = first / dircopy.MANIFEST_NAME
    # The manifest now records another mtime for b.txt, although the file in the copy still matches the source.
    lines = manifest.read_text().splitlines()
    lines = [line.replace("\t1700000100000000000\t", "\t1700000101000000000\t") for line in lines]
    manifest.write_text("\n".join(lines) + "\n")
    (tree / "tool.sh").chmod(0o700)  # mode only: same size and mtime

    second = dircopy.copy_tree(tree, dest, T0 + timedelta(hours=1))

    assert (second.path / "docs" / "b.txt").stat().st_ino != (first / "docs" / "b.txt").stat().st_ino
    assert (second.path / "tool.sh").stat().st_ino != (first / "tool.sh").stat().st_ino
    assert stat.S_IMODE((second.path / "tool.sh").stat().st_mode) == 0o700
    assert (second.path / "a.txt").stat().st_ino == (first / "a.txt").stat().st_ino
    assert (second.stats.files_copied, second.stats.files_linked) == (2, 4)
    assert dircopy.verify_copy(second.path).ok


def test_files_missing_from_a_damaged_previous_copy_are_copied_afresh(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    first = dircopy.copy_tree(tree, dest, T0).path
    (first / "a.txt").unlink()
    dircopy.remove_tree(first / "docs" / "deep")  # a whole directory of the previous copy is gone

    second = dircopy.copy_tree(tree, dest, T0 + timedelta(hours=1))

    assert second.stats.errors == []
    assert (second.stats.files_copied, second.stats.files_linked) == (2, 4)
    assert (second.path / "docs" / "deep" / "c.bin").read_bytes() == (tree / "docs" / "deep" / "c.bin").read_bytes()
    assert (second.path / "docs" / "b.txt").stat().st_ino == (first / "docs" / "b.txt").stat().st_ino
    assert dircopy.verify_copy(second.path).ok


def test_a_source_reached_through_a_symlink_is_copied(tree: Path, tmp_path: Path):
    dest = tmp_path / "backups"
    dest.mkdir()
    os.symlink(tree, tmp_path / "share-link")

    copy = dircopy.copy_tree(tmp_path / "share-link", dest, T0)

    assert copy.stats.errors == []
    assert rel_files(copy.path) == rel_files(tree)


def test_a_wide_tree_walked_by_two_threads_links_counts_and_lists_every_file(tmp_path):
    source, dest = tmp_path / "wide", tmp_path / "copies"
    names = [f"d{a}/e{b}/f{c}.txt" for a in range(6) for b in range(12) for c in range(15)]  # 1,080 files
    for name in names:
        write(source / name, name.encode(), mtime=1_700_000_000)
    dest.mkdir()
    when = datetime(2026, 11, 23, tzinfo=UTC)
    dircopy.copy_tree(source, dest, when, sync=False)
    changed = names[::100]
    for name in changed:
        write(source / name, b"changed " + name.encode(), mtime=1_700_000_500)
    seen = []

    second = dircopy.copy_tree(
        source, dest, when + timedelta(hours=1), sync=False, on_progress=seen.append, progress_every=0, walkers=2
    )

    copy = dest / dircopy.stamp(when + timedelta(hours=1))
    assert (second.stats.files_linked, second.stats.files_copied) == (len(names) - len(changed), len(changed))
    assert second.stats.directories == 6 + 6 * 12
    assert (seen[-1].files_done, seen[-1].files_total) == (len(names), len(names))
    assert sorted(dircopy.read_manifest_lines(copy)) == sorted(
        names + [f"d{a}" for a in range(6)] + [f"d{a}/e{b}" for a in range(6) for b in range(12)]
    )
    assert all(os.stat(copy / name).st_nlink == (1 if name in changed else 2) for name in names)
    assert dircopy.verify_copy(copy).ok


def test_a_format_1_copy_is_verified_restored_linked_against_and_pruned(tmp_path):
    """Copies made before format 2 (only backslash, tab, CR and LF escaped; no root in the header) keep working."""
    src, dest = tmp_path / "share", tmp_path / "backups"
    write(src / "a.txt", b"alpha", mtime=1_700_000_000)
    write(src / "form\x0cfeed", b"a name format 1 wrote as it is", mtime=1_700_000_000)
    dest.mkdir()
    old = dircopy.copy_tree(src, dest, T0, sync=False).path
    manifest = old / dircopy.MANIFEST_NAME
    header, *lines = manifest.read_text().splitlines()
    v1_header = {k: v for k, v in json.loads(header).items() if k not in ("root", "errors")}
    v1_header["format"] = dircopy.FORMAT_V1
    v1_lines = [line.replace("\\x0c", "\x0c") for line in lines]  # format 1 left a form feed unescaped
    manifest.write_text("\n".join([json.dumps(v1_header), *v1_lines]) + "\n")

    report = dircopy.verify_copy(old)
    restored = dircopy.restore_copy(old, tmp_path / "restored")
    new = dircopy.copy_tree(src, dest, T0 + timedelta(hours=1), sync=False)

    assert report.ok, report.problems
    assert restored.errors == []
    assert (tmp_path / "restored" / "form\x0cfeed").read_bytes() == b"a name format 1 wrote as it is"
    assert (new.stats.files_linked, new.stats.files_copied) == (2, 0)
    assert dircopy.read_manifest(new.path).header["format"] == dircopy.FORMAT
    assert "form\\x0cfeed" in (new.path / dircopy.MANIFEST_NAME).read_text()
    assert dircopy.prune(dest, keep=1, min_keep=1) == [old]


def test_a_tree_larger_than_one_task_budget_is_copied_in_parts_through_the_worker(tmp_path, datastore):
    from services.catalog import SUCCEEDED
    from tests.helpers import Clock
    from tests.service_harness import Service

    source, dest = tmp_path / "share", tmp_path / "backups"
    for d in range(12):
        folder = source / f"d{d:03d}" / "inner"
        folder.mkdir(parents=True)
        for f in range(25):
            (folder / f"f{f}.txt").write_bytes(os.urandom(200) + f"{d}-{f}".encode())
    dest.mkdir()
    plan = parse_plan(
        "share-daily",
        {
            "kind": "directory",
            "select": {"paths": [str(source)]},
            "destination": {"path": str(dest)},
            "options": {"sync": False},
        },
    )
    # A budget already spent when the part starts: each part still copies one directory, so the run needs many
    # parts however fast this machine is.
    svc = Service(tmp_path, datastore, {"share-daily": plan}, Clock(), job_budget_seconds=0.0)
    task = svc.task("share-daily", str(source))

    answer = svc.run(task)

    assert answer.get_json()["status"] == SUCCEEDED
    parts = [line for line in svc.catalog.get(task.name).log if "part done" in line]
    assert len(parts) >= 12  # it did not fit in one budget
    (copy,) = dircopy.complete_copies(dest)
    assert dircopy.verify_copy(copy).ok
    manifest = dircopy.read_manifest(copy)
    assert sum(1 for e in manifest.entries.values() if e.kind == "f") == 12 * 25
    assert not [p for p in dest.iterdir() if p.name.startswith((dircopy.INPROGRESS_PREFIX, dircopy.CHECKPOINT_PREFIX))]
    follow_ups = [t for t in svc.queue.tasks() if t["name"].startswith(task.name + "-poll-")]
    assert {t["queue"] for t in follow_ups} == {"directory"}  # the worker's queue, where the share is mounted


def test_a_checkpointed_copy_resumes_where_it_stopped_and_a_stale_one_is_removed(tmp_path):
    import time as _time

    tree, dest = tmp_path / "tree", tmp_path / "dest"
    for d in range(30):
        (tree / f"d{d}").mkdir(parents=True)
        (tree / f"d{d}" / "x").write_text(str(d))
    dest.mkdir()

    first = dircopy.copy_tree(tree, dest, T0, sync=False, deadline=_time.monotonic() - 1)
    assert first.partial and first.path.name.startswith(dircopy.INPROGRESS_PREFIX)
    (tree / "d29" / "late").write_text("added between the parts")
    second = dircopy.copy_tree(tree, dest, T0, sync=False)

    assert not second.partial and dircopy.verify_copy(second.path).ok
    assert (second.path / "d29" / "late").read_text() == "added between the parts"
    stale = dircopy.copy_tree(tree, dest, T0 + timedelta(hours=1), sync=False, deadline=_time.monotonic() - 1)
    checkpoint = dest / f"{dircopy.CHECKPOINT_PREFIX}{stale.stamp}.json"
    old = _time.time() - dircopy.LIVE_CHECKPOINT_SECONDS - 60
    os.utime(checkpoint, (old, old))
    dircopy.copy_tree(tree, dest, T0 + timedelta(hours=2), sync=False)
    assert not stale.path.exists() and not checkpoint.exists()
