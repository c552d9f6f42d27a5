"""``backup directory run|verify|restore`` and ``backup restore-filestore`` through click, on real temp trees and
the Filestore fake: exit codes and what an operator reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

from click.testing import CliRunner

from commands.files import directory_group, restore_filestore_command
from kinds.directory import copies as dircopy
from tests.fakes_filestore import FilestoreFake
from tests.fixtures.filestore import FAKE_FILE_ENDPOINT

ROOT = Path(__file__).resolve().parent.parent


def test_run_verify_and_restore_from_the_command_line(tmp_path: Path):
    src, dest = tmp_path / "share", tmp_path / "backups"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha")
    dest.mkdir()
    runner = CliRunner()

    ran = runner.invoke(directory_group, ["run", str(src), str(dest), "--no-sync"])
    [copy] = dircopy.complete_copies(dest)
    verified = runner.invoke(directory_group, ["verify", str(copy)])
    (copy / "docs" / "a.txt").write_text("alphA")
    damaged = runner.invoke(directory_group, ["verify", str(copy)])
    refused = runner.invoke(directory_group, ["restore", str(copy), str(src)])

    assert ran.exit_code == 0, ran.output
    assert "copied 1 files" in ran.output
    assert verified.exit_code == 0 and "OK, 1 files" in verified.output
    assert damaged.exit_code == 1
    assert "docs/a.txt: content differs" in damaged.output
    assert refused.exit_code == 1 and "not empty" in refused.output
    assert (src / "docs" / "a.txt").read_text() == "alpha"


def test_a_copy_run_as_a_process_prints_everything_before_it_ends(tmp_path: Path):
    """``./backup directory run`` ends without the interpreter's teardown (cli.QUICK_EXIT): its output is still
    all there, through a pipe too, and the exit code is the command's."""
    src, dest = tmp_path / "share", tmp_path / "backups"
    for n in range(30):
        (src / f"d{n}").mkdir(parents=True)
        (src / f"d{n}" / "a.txt").write_text(f"file {n}")
    dest.mkdir()

    def backup(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ROOT / "backup"), *args], capture_output=True, text=True, timeout=120)

    ran = backup("directory", "run", "--no-sync", str(src), str(dest))
    again = backup("directory", "run", "--no-sync", str(src), str(tmp_path / "missing"))

    [copy] = dircopy.complete_copies(dest)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[-2:] == [
        f"copy: {copy}",
        f"copied 30 files (200 bytes), linked 0 unchanged, 0 deleted since the previous copy, 0 symlinks,"
        f" 30 directories, {dircopy.read_manifest(copy).header['stats']['duration_seconds']:.1f} s",
    ]
    assert again.returncode == 1
    assert again.stderr.strip().endswith("is not a directory (create it first)")


def test_run_needs_a_source_and_destination():
    result = CliRunner().invoke(directory_group, ["run"])

    assert result.exit_code == 2
    assert "SOURCE and DEST are required" in result.output


def test_restore_filestore_reports_the_safety_backup(filestore_fake: FilestoreFake, monkeypatch):
    monkeypatch.setenv("BACKUP_FILE_ENDPOINT", FAKE_FILE_ENDPOINT)
    home = filestore_fake.add_instance("proj-one", "us-central1", "home", {})
    backup = "projects/proj-one/locations/us-central1/backups/b1"
    filestore_fake.add_backup(backup, home, {})
    from google.auth.credentials import AnonymousCredentials

    from services.runtime import Runtime, Settings

    rt = Runtime(Settings.from_env(), credentials=AnonymousCredentials())
    monkeypatch.setattr("kinds.filestore.restore.time.sleep", lambda seconds: None)

    result = CliRunner().invoke(
        restore_filestore_command,
        ["--backup", backup, "--instance", home, "--share", "vol1"],
        obj={"runtime": rt},
    )

    assert result.exit_code == 0, result.output
    assert "safety backup projects/proj-one/locations/us-central1/backups/pre-restore-home-" in result.output
    assert filestore_fake.restores[0]["sourceBackup"] == backup


def test_run_verify_and_restore_a_bucket_copy_from_the_command_line(files_bucket, tmp_path: Path):
    from services.runtime import Runtime, Settings

    src = tmp_path / "share"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha")
    rt = Runtime(Settings.from_env({}))
    rt.client("storage", lambda: files_bucket)
    runner = CliRunner()

    ran = runner.invoke(directory_group, ["run", str(src), "gs://dir-copies/share"], obj={"runtime": rt})
    url = ran.output.split("copy: ")[1].split()[0]
    verified = runner.invoke(directory_group, ["verify", url], obj={"runtime": rt})
    refused = runner.invoke(directory_group, ["restore", url, str(src), "--overwrite"], obj={"runtime": rt})
    restored = runner.invoke(directory_group, ["restore", url, str(tmp_path / "out")], obj={"runtime": rt})

    assert ran.exit_code == 0, ran.output
    assert "cost: 7 requests, 1 objects written" in ran.output
    assert verified.exit_code == 0 and "OK, 1 files" in verified.output
    assert refused.exit_code == 1 and "--safety-dest" in refused.output
    assert restored.exit_code == 0, restored.output
    assert (tmp_path / "out" / "docs" / "a.txt").read_text() == "alpha"


def test_a_malformed_bucket_url_is_one_clear_line(tmp_path: Path):
    from services.runtime import Runtime, Settings

    rt = Runtime(Settings.from_env({}))
    rt.client("storage", lambda: None)  # never reached: the URL is refused first

    verified = CliRunner().invoke(directory_group, ["verify", "gs://"], obj={"runtime": rt})
    restored = CliRunner().invoke(directory_group, ["restore", "gs://b/p/nostamp", str(tmp_path)], obj={"runtime": rt})

    assert verified.exit_code == 1 and "expected gs://BUCKET[/PREFIX]" in verified.output
    assert restored.exit_code == 1 and "expected gs://BUCKET/PREFIX/<stamp>" in restored.output
