"""Directory copies into a bucket, against gcp-storage-emulator: complete prefixes, server-side reuse of
unchanged files, the manifest as the completion marker, retention, and the kind's Done output."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services import gcscopy
from services.dircopy import LOG_NAME, MANIFEST_NAME
from services.kinds import RunContext
from services.plans import parse_plan

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
URL = "gs://dir-copies/share"


def make_tree(root: Path) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "docs" / "b.txt").write_bytes(b"bravo" * 1000)
    os.symlink("docs/b.txt", root / "link")
    return root


def objects(client, prefix: str) -> dict[str, bytes]:
    return {b.name[len(prefix) :]: b.download_as_bytes() for b in client.list_blobs("dir-copies", prefix=prefix)}


def test_second_copy_reuses_unchanged_objects_and_uploads_changes(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    first = gcscopy.copy_tree_to_bucket(src, client, URL, T0, threads=2)
    (src / "a.txt").write_bytes(b"alpha, edited")
    os.utime(src / "docs" / "b.txt", (1_800_000_000, 1_800_000_000))  # touched, same bytes

    second = gcscopy.copy_tree_to_bucket(src, client, URL, T0 + timedelta(hours=1), threads=2)

    assert first.url == "gs://dir-copies/share/20261123T020000Z"
    assert (second.stats.files_copied, second.stats.files_linked) == (1, 1)
    stored = objects(client, "share/20261123T030000Z/")
    assert stored["a.txt"] == b"alpha, edited"
    assert stored["docs/b.txt"] == b"bravo" * 1000
    assert {LOG_NAME, MANIFEST_NAME} <= set(stored)
    assert "link" not in stored  # symlinks live in the manifest
    manifest = gcscopy._read_manifest(client, gcscopy.BucketPlace.parse(URL), "20261123T030000Z")
    assert manifest.entries["link"].target == "docs/b.txt"
    assert objects(client, "share/20261123T020000Z/")["a.txt"] == b"alpha"


def test_a_prefix_without_manifest_is_not_a_copy_and_is_cleaned_once_stale(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    bucket = client.bucket("dir-copies")
    bucket.blob("share/20261120T000000Z/a.txt").upload_from_string(b"half a copy")  # crashed 3 days ago
    bucket.blob("share/20261123T013000Z/a.txt").upload_from_string(b"maybe still running")

    result = gcscopy.copy_tree_to_bucket(src, client, URL, T0)

    assert result.previous is None
    assert gcscopy.complete_copies(client, gcscopy.BucketPlace.parse(URL)) == ["20261123T020000Z"]
    assert objects(client, "share/20261120T000000Z/") == {}
    assert objects(client, "share/20261123T013000Z/") == {"a.txt": b"maybe still running"}


def test_kind_with_bucket_destination_applies_retention(files_bucket, tmp_path: Path):
    from services import directory
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
    [target] = directory.enumerate_targets(plan, None, rt).targets
    outcomes = []
    for hour in range(3):
        (src / "a.txt").write_bytes(f"hour {hour}".encode())
        when = T0 + timedelta(hours=hour)
        run = RunContext(run_id=f"r{hour}", plan=plan.name, target_key=target.key, period=when)
        outcomes.append(directory.start(plan, target, run, rt))

    assert outcomes[-1].output == "gs://dir-copies/share/20261123T040000Z"
    assert gcscopy.complete_copies(files_bucket, gcscopy.BucketPlace.parse(URL)) == [
        "20261123T030000Z",
        "20261123T040000Z",
    ]
    assert objects(files_bucket, "share/20261123T020000Z/") == {}
    assert objects(files_bucket, "share/20261123T040000Z/")["a.txt"] == b"hour 2"


def test_verify_and_restore_a_bucket_copy(files_bucket, tmp_path: Path):
    client = files_bucket
    src = make_tree(tmp_path / "share")
    (src / "docs" / "b.txt").chmod(0o640)
    copy = gcscopy.copy_tree_to_bucket(src, client, URL, T0)
    assert gcscopy.verify_bucket_copy(client, copy.url).ok

    restored = gcscopy.restore_bucket_copy(client, copy.url, tmp_path / "restored")

    assert restored.errors == []
    assert (tmp_path / "restored" / "docs" / "b.txt").read_bytes() == b"bravo" * 1000
    assert ((tmp_path / "restored" / "docs" / "b.txt").stat().st_mode & 0o777) == 0o640
    assert os.readlink(tmp_path / "restored" / "link") == "docs/b.txt"
    client.bucket("dir-copies").blob("share/20261123T020000Z/a.txt").upload_from_string(b"alphA")
    problems = gcscopy.verify_bucket_copy(client, copy.url).problems
    assert [p.split(":")[0] for p in problems] == ["a.txt"]
