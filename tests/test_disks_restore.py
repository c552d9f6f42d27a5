"""``backup restore-disk`` against the stateful fake Compute: a new disk from a snapshot, never an overwrite."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from google.auth.credentials import AnonymousCredentials

from commands.disks import restore_disk_command
from kinds.disks import restore as disks
from services.errors import PermanentError
from services.runtime import Runtime, Settings
from tests.fixtures.compute import FAKE_COMPUTE_ENDPOINT


@pytest.fixture
def rt(compute_clock, monkeypatch):
    monkeypatch.setattr(disks, "RESTORE_POLL_SECONDS", 0.0)
    settings = Settings.from_env({"BACKUP_COMPUTE_ENDPOINT": FAKE_COMPUTE_ENDPOINT, "BACKUP_PROJECT": "proj-alpha"})
    return Runtime(settings, clock=compute_clock, credentials=AnonymousCredentials())


@pytest.fixture
def snapshot(compute_fake):
    source = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={"backup-generations": "3"})
    return compute_fake.add_snapshot("proj-alpha", "bk-web-20261123-0900-abc", source_disk=source)


def test_restore_disk_creates_a_new_disk_from_the_snapshot(compute_fake, rt, snapshot):
    result = CliRunner().invoke(
        restore_disk_command,
        ["--snapshot", snapshot["name"], "--zone", "us-east1-c", "--name", "web-restored"],
        obj={"runtime": rt},
    )

    assert result.exit_code == 0, result.output
    restored = compute_fake.disks[("proj-alpha", "zones/us-east1-c", "web-restored")]
    assert restored["sourceSnapshotId"] == snapshot["id"]
    assert restored["labels"] == {"restored-from": snapshot["name"]}  # not enrolled in backups by accident
    assert "web-restored" in result.output and "READY" in result.output


def test_restore_disk_never_overwrites_an_existing_disk(compute_fake, rt, snapshot):
    existing = compute_fake.add_disk("proj-alpha", "web-restored", zone="us-east1-c", labels={"keep": "me"})

    result = CliRunner().invoke(
        restore_disk_command,
        ["--snapshot", snapshot["name"], "--zone", "us-east1-c", "--name", "web-restored"],
        obj={"runtime": rt},
    )

    assert result.exit_code == 1
    assert "already exists" in result.output
    assert compute_fake.disks[("proj-alpha", "zones/us-east1-c", "web-restored")] is existing
    assert not [c for c in compute_fake.calls if c[0] == "POST"]


def test_restore_from_a_missing_or_unready_snapshot_is_refused(compute_fake, rt, snapshot):
    compute_fake.add_snapshot("proj-alpha", "half-done", source_disk=None, status="CREATING")

    with pytest.raises(PermanentError, match="not found in project proj-alpha"):
        disks.restore_disk(rt, project="proj-alpha", zone="us-east1-c", snapshot="nope", name="new-disk")
    with pytest.raises(PermanentError, match="CREATING"):
        disks.restore_disk(rt, project="proj-alpha", zone="us-east1-c", snapshot="half-done", name="new-disk")
    assert ("proj-alpha", "zones/us-east1-c", "new-disk") not in compute_fake.disks


def test_restore_refuses_an_invalid_disk_name_before_calling_the_api(compute_fake, rt, snapshot):
    with pytest.raises(PermanentError, match="--name 'Web_Restored'"):
        disks.restore_disk(rt, project="proj-alpha", zone="us-east1-c", snapshot=snapshot["name"], name="Web_Restored")

    assert compute_fake.calls == []


def test_a_bad_name_on_the_command_line_exits_2_like_every_usage_error(compute_fake, rt, snapshot):
    result = CliRunner().invoke(
        restore_disk_command,
        ["--snapshot", snapshot["name"], "--zone", "us-east1-c", "--name", "Web_Restored"],
        obj={"runtime": rt},
    )

    assert result.exit_code == 2
    assert "'Web_Restored' is not a disk name" in result.output
    assert compute_fake.calls == []


def test_restore_rides_out_rate_limits_and_server_errors(compute_fake, rt, snapshot):
    from google.api_core.retry import Retry

    from services.errors import TransientError
    from tests.fakes_compute import Fault

    compute_fake.faults = [Fault(share=0.4, status=503, reason="backendError"), Fault(share=0.2, status=429, reason="")]
    quick = Retry(predicate=lambda exc: isinstance(exc, TransientError), initial=0.001, maximum=0.01, timeout=30)

    restored = disks.restore_disk(
        rt, project="proj-alpha", zone="us-east1-c", snapshot=snapshot["name"], name="web-restored", retry=quick
    )

    assert restored.status == "READY"
    assert compute_fake.injected > 0  # the faults did fire, and were retried
    assert ("proj-alpha", "zones/us-east1-c", "web-restored") in compute_fake.disks
