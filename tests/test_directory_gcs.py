"""Directory copies into a bucket, against gcp-storage-emulator: content stored once by checksum, requests in
proportion to what changed, each copy verifiable and restorable alone, mark-and-sweep retention that survives
a crash, the lease, the recorded cost, names no object name could hold (issue 13, defects 2, 3, 5), and copies
in the earlier layout (format 1)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kinds.directory import bucket as gcscopy
from kinds.directory import copies as dircopy
from kinds.directory.copies import FORMAT_V1, LOG_NAME, MANIFEST_NAME, Entry
from services.errors import TransientError
from services.kinds import RunContext
from services.plans import parse_plan
from tests.dirtrees import LINE_BREAKERS, NOT_UTF8, fsname

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
URL = "gs://dir-copies/share"
PLACE = gcscopy.BucketPlace.parse(URL)


def make_tree(root: Path, files: int = 0) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "docs" / "b.txt").write_bytes(b"bravo" * 1000)
    os.symlink("docs/b.txt", root / "link")
    for n in range(files):
        (root / "docs" / f"f{n:03d}.txt").write_bytes(f"file {n}\n".encode())
    return root


def names(client, prefix: str) -> set[str]:
    return {b.name[len(prefix) :] for b in client.list_blobs("dir-copies", prefix=prefix)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_incremental_copy_makes_requests_for_what_changed_only(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share", files=60)
    first = gcscopy.copy_tree_to_bucket(src, client, URL, T0, threads=2)
    (src / "a.txt").write_bytes(b"alpha, edited")
    (src / "docs" / "f007.txt").write_bytes(b"file 7, edited")
    os.utime(src / "docs" / "b.txt", (1_800_000_000, 1_800_000_000))  # touched: same bytes
    os.rename(src / "docs" / "f008.txt", src / "docs" / "renamed.txt")  # same bytes, new name

    second = gcscopy.copy_tree_to_bucket(src, client, URL, T0 + timedelta(hours=1), threads=2)

    assert first.cost.objects_written == 62 and first.cost.requests >= 62
    assert second.cost.objects_written == 2
    assert second.cost.bytes_uploaded < first.cost.bytes_uploaded
    assert second.cost.requests <= 7 + 2  # lease (3), listing, previous manifest, log, manifest; two uploads
    assert (second.stats.files_copied, second.stats.files_linked) == (2, 60)
    assert names(client, "share/20261123T030000Z/") == {LOG_NAME, MANIFEST_NAME}
    assert sha(b"alpha, edited") in names(client, "share/objects/")
    manifest = gcscopy._read_manifest(client, PLACE, "20261123T030000Z")
    assert manifest.entries["link"].target == "docs/b.txt"
    assert manifest.entries["docs/renamed.txt"].sha256 == sha(b"file 8\n")
    assert manifest.header["cost_before_manifest"]["objects_written"] == 2
    log = client.bucket("dir-copies").blob(f"share/20261123T030000Z/{LOG_NAME}").download_as_text()
    assert "2 objects written" in log


def test_each_copy_verifies_and_restores_on_its_own(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    (src / "docs" / "b.txt").chmod(0o640)
    src.chmod(0o750)
    first = gcscopy.copy_tree_to_bucket(src, client, URL, T0)
    (src / "a.txt").write_bytes(b"second version")
    second = gcscopy.copy_tree_to_bucket(src, client, URL, T0 + timedelta(hours=1))
    client.bucket("dir-copies").blob(f"share/20261123T030000Z/{MANIFEST_NAME}").delete()  # the newer one is gone

    report = gcscopy.verify_bucket_copy(client, first.url)
    restored = gcscopy.restore_bucket_copy(client, first.url, tmp_path / "restored")

    assert second.stats.files_copied == 1
    assert report.ok and report.files_checked == 2
    assert restored.errors == []
    out = tmp_path / "restored"
    assert (out / "a.txt").read_bytes() == b"alpha"
    assert (out / "docs" / "b.txt").read_bytes() == b"bravo" * 1000
    assert stat.S_IMODE((out / "docs" / "b.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert os.readlink(out / "link") == "docs/b.txt"
    client.bucket("dir-copies").blob(PLACE.object_name(sha(b"alpha"))).upload_from_string(b"alphA")
    problems = gcscopy.verify_bucket_copy(client, first.url).problems
    assert [p.split(":")[0] for p in problems] == ["a.txt"]


def test_retention_sweeps_only_objects_no_remaining_copy_references(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    for hour in range(3):
        (src / "a.txt").write_bytes(f"hour {hour}".encode())
        gcscopy.copy_tree_to_bucket(src, client, URL, T0 + timedelta(hours=hour))

    pruned = gcscopy.prune_bucket_copies(client, URL, keep=2, min_keep=1, now=T0 + timedelta(hours=3))

    assert pruned.deleted == ["gs://dir-copies/share/20261123T020000Z"]
    assert gcscopy.complete_copies(client, PLACE) == ["20261123T030000Z", "20261123T040000Z"]
    assert names(client, "share/objects/") == {sha(b"hour 1"), sha(b"hour 2"), sha(b"bravo" * 1000)}
    assert names(client, "share/20261123T020000Z/") == set()
    assert pruned.cost.objects_deleted == 3 and pruned.cost.requests > 0
    for name in ("20261123T030000Z", "20261123T040000Z"):
        assert gcscopy.verify_bucket_copy(client, PLACE.url(name)).ok


def test_a_crash_during_retention_never_leaves_a_complete_copy_with_a_missing_object(
    files_bucket, tmp_path: Path, monkeypatch
):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    for hour in range(3):
        (src / "a.txt").write_bytes(f"hour {hour}".encode())
        gcscopy.copy_tree_to_bucket(src, client, URL, T0 + timedelta(hours=hour))
    real_sweep = gcscopy._sweep

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the doomed manifests went, before the sweep

    monkeypatch.setattr(gcscopy, "_sweep", die)
    with pytest.raises(KeyboardInterrupt):
        gcscopy.prune_bucket_copies(client, URL, keep=1, min_keep=1, now=T0 + timedelta(hours=3))
    complete = gcscopy.complete_copies(client, PLACE)
    assert complete == ["20261123T040000Z"]
    assert gcscopy.verify_bucket_copy(client, PLACE.url(complete[0])).ok
    assert sha(b"hour 0") in names(client, "share/objects/")  # not swept yet

    monkeypatch.setattr(gcscopy, "_sweep", real_sweep)
    again = gcscopy.prune_bucket_copies(client, URL, keep=1, min_keep=1, now=T0 + timedelta(hours=3))

    assert again.deleted == []
    assert names(client, "share/objects/") == {sha(b"hour 2"), sha(b"bravo" * 1000)}
    assert gcscopy.verify_bucket_copy(client, PLACE.url(complete[0])).ok
    assert gcscopy.SWEEP_PENDING not in names(client, "share/")


def test_abandoned_prefixes_are_removed_by_retention_once_stale(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    bucket = client.bucket("dir-copies")
    bucket.blob("share/20261120T000000Z/.backup-log.txt").upload_from_string(b"crashed 3 days ago")
    bucket.blob(PLACE.object_name("0" * 64)).upload_from_string(b"uploaded by that run")
    bucket.blob("share/20261123T013000Z/.backup-log.txt").upload_from_string(b"half an hour ago")

    result = gcscopy.copy_tree_to_bucket(src, client, URL, T0)
    gcscopy.prune_bucket_copies(client, URL, keep=5, min_keep=1, now=T0)

    assert result.previous is None
    assert gcscopy.complete_copies(client, PLACE) == ["20261123T020000Z"]
    assert names(client, "share/20261120T000000Z/") == set()
    assert "0" * 64 not in names(client, "share/objects/")
    assert names(client, "share/20261123T013000Z/") == {LOG_NAME}


def test_a_held_lease_makes_a_copy_wait_and_an_expired_one_is_taken_over(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    lease = client.bucket("dir-copies").blob(f"share/{gcscopy.LEASE_NAME}")

    with gcscopy.BucketLease(client, PLACE):
        with pytest.raises(dircopy.CopyBusy, match="holds .backup-lock"):
            gcscopy.copy_tree_to_bucket(src, client, URL, T0)
        with pytest.raises(dircopy.CopyBusy):
            gcscopy.prune_bucket_copies(client, URL, keep=1, min_keep=1)
    assert not lease.exists()
    lease.upload_from_string(json.dumps({"holder": "dead-worker", "expires": 1_000_000_000}))

    result = gcscopy.copy_tree_to_bucket(src, client, URL, T0)

    assert result.stats.files_copied == 2
    assert not lease.exists()


def test_kind_with_bucket_destination_records_cost_and_applies_retention(files_bucket, tmp_path: Path):
    from kinds.directory import kind as directory
    from services.runtime import Runtime, Settings

    src = make_tree(tmp_path / "share")
    plan = parse_plan(
        "to-bucket",
        {
            "kind": "directory",
            "select": {"paths": [str(src)]},
            "destination": {"bucket": URL},
            "retention": {"keep": 2},
        },
    )
    rt = Runtime(Settings.from_env({}), clock=lambda: T0)
    rt.client("storage", lambda: files_bucket)
    [target] = directory.KIND.enumerate(plan, None, rt).targets
    outcomes = []
    for hour in range(3):
        (src / "a.txt").write_bytes(f"hour {hour}".encode())
        run = RunContext(run_id=f"r{hour}", plan=plan.name, target_key=target.key, period=T0 + timedelta(hours=hour))
        outcomes.append(directory.KIND.start(plan, target, run, rt))
    with gcscopy.BucketLease(files_bucket, PLACE):
        run = RunContext(run_id="busy", plan=plan.name, target_key=target.key, period=T0 + timedelta(hours=9))
        with pytest.raises(TransientError, match="holds"):
            directory.KIND.start(plan, target, run, rt)

    assert outcomes[-1].output == "gs://dir-copies/share/20261123T040000Z"
    assert outcomes[-1].stats["pruned"] == ["gs://dir-copies/share/20261123T020000Z"]
    assert outcomes[-1].stats["cost"]["objects_written"] == 1
    assert outcomes[-1].stats["cost"]["requests"] <= 8
    assert outcomes[-1].stats["retention_cost"]["objects_deleted"] >= 2
    assert gcscopy.complete_copies(files_bucket, PLACE) == ["20261123T030000Z", "20261123T040000Z"]


# --- defects 2, 3 and 5 of issue 13 --------------------------------------------------------------------------


def test_2_names_with_line_breaking_characters_survive_the_next_run_verify_and_restore(files_bucket, tmp_path: Path):
    client = files_bucket
    src = tmp_path / "share"
    src.mkdir()
    for text in LINE_BREAKERS:
        (src / text).write_bytes(text.encode())
    first = gcscopy.copy_tree_to_bucket(src, client, URL, T0)

    second = gcscopy.copy_tree_to_bucket(src, client, URL, T0 + timedelta(hours=1))
    report = gcscopy.verify_bucket_copy(client, second.url)
    restored = gcscopy.restore_bucket_copy(client, second.url, tmp_path / "restored")

    assert first.stats.errors == [] and second.stats.errors == []
    assert second.stats.files_linked == len(LINE_BREAKERS)
    assert report.ok and report.files_checked == len(LINE_BREAKERS)
    assert restored.errors == []
    assert sorted(os.listdir(tmp_path / "restored")) == sorted(LINE_BREAKERS)


def test_3_names_no_object_name_could_hold_are_copied_verified_and_restored(files_bucket, tmp_path: Path):
    client = files_bucket
    src = tmp_path / "share"
    src.mkdir()
    odd = [fsname(raw) for raw in NOT_UTF8] + ["carriage\rreturn", "line\nfeed"]
    for name in odd:
        (src / name).write_bytes(os.fsencode(name))
    deep = src / ("x" * 200) / ("y" * 200) / ("z" * 200) / ("w" * 200) / ("v" * 200)
    deep.mkdir(parents=True)
    (deep / ("u" * 200)).write_bytes(b"a path over 1,024 bytes")

    copy = gcscopy.copy_tree_to_bucket(src, client, URL, T0)
    report = gcscopy.verify_bucket_copy(client, copy.url)
    restored = gcscopy.restore_bucket_copy(client, copy.url, tmp_path / "restored")

    assert copy.stats.errors == []
    assert report.ok, report.problems
    assert restored.errors == []
    out = tmp_path / "restored"
    for name in odd:
        assert (out / name).read_bytes() == os.fsencode(name)
    assert (out / deep.relative_to(src) / ("u" * 200)).read_bytes() == b"a path over 1,024 bytes"


def test_5_a_bucket_restore_restores_255_byte_names_and_finishes_the_tree(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    (src / "docs" / ("n" * 255)).write_bytes(b"long name")
    (src / "docs").chmod(0o750)
    copy = gcscopy.copy_tree_to_bucket(src, client, URL, T0)

    restored = gcscopy.restore_bucket_copy(client, copy.url, tmp_path / "restored")

    out = tmp_path / "restored"
    assert restored.errors == []
    assert (out / "docs" / ("n" * 255)).read_bytes() == b"long name"
    assert os.readlink(out / "link") == "docs/b.txt"
    assert stat.S_IMODE((out / "docs").stat().st_mode) == 0o750


def test_a_bucket_restore_goes_on_past_a_missing_object(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    (src / "docs").chmod(0o750)
    copy = gcscopy.copy_tree_to_bucket(src, client, URL, T0)
    client.bucket("dir-copies").blob(PLACE.object_name(sha(b"alpha"))).delete()  # one object lost

    restored = gcscopy.restore_bucket_copy(client, copy.url, tmp_path / "restored")
    report = gcscopy.verify_bucket_copy(client, copy.url)

    out = tmp_path / "restored"
    assert [e.split(":")[0] for e in restored.errors] == ["a.txt"]
    assert not (out / "a.txt").exists()
    assert (out / "docs" / "b.txt").read_bytes() == b"bravo" * 1000
    assert os.readlink(out / "link") == "docs/b.txt"
    assert stat.S_IMODE((out / "docs").stat().st_mode) == 0o750
    assert [p.split(":")[0] for p in report.problems] == ["a.txt"]


# --- copies made before content-addressed objects ------------------------------------------------------------


def write_format_1_copy(client, src: Path, name: str) -> None:
    """A copy as the earlier code wrote it: one object per file under the stamp, a format-1 manifest."""
    bucket = client.bucket("dir-copies")
    entries = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        st = path.lstat()
        if path.is_symlink():
            entries.append(
                Entry(rel, "l", st.st_size, st.st_mtime_ns, 0o777, st.st_uid, st.st_gid, None, os.readlink(path))
            )
        elif path.is_dir():
            entries.append(Entry(rel, "d", st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
        else:
            data = path.read_bytes()
            bucket.blob(f"share/{name}/{rel}").upload_from_string(data)
            entries.append(
                Entry(rel, "f", len(data), st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, sha(data))
            )
    header = {"format": FORMAT_V1, "stamp": name, "stats": {"errors": 0}, "previous": None}
    body = "\n".join([json.dumps(header)] + [e.to_line() for e in entries]) + "\n"
    bucket.blob(f"share/{name}/{LOG_NAME}").upload_from_string(b"log")
    bucket.blob(f"share/{name}/{MANIFEST_NAME}").upload_from_string(body.encode())


def test_format_1_copies_are_verified_restored_reused_and_pruned(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    write_format_1_copy(client, src, "20261122T020000Z")
    old_url = PLACE.url("20261122T020000Z")

    report = gcscopy.verify_bucket_copy(client, old_url)
    restored = gcscopy.restore_bucket_copy(client, old_url, tmp_path / "restored")
    new = gcscopy.copy_tree_to_bucket(src, client, URL, T0)
    pruned = gcscopy.prune_bucket_copies(client, URL, keep=1, min_keep=1, now=T0)

    assert report.ok, report.problems
    assert restored.errors == [] and (tmp_path / "restored" / "docs" / "b.txt").read_bytes() == b"bravo" * 1000
    assert new.previous == old_url
    assert new.cost.objects_written == 2 and new.cost.bytes_uploaded < 2000  # copied inside the bucket
    assert pruned.deleted == [old_url]
    assert names(client, "share/20261122T020000Z/") == set()
    assert gcscopy.verify_bucket_copy(client, new.url).ok
