"""The CLI imports only what the command it runs needs: ``backup --help`` and the ``directory`` commands load no
Google client, no CouchDB and no SQL code; and the lazily listed commands are the ones the modules define."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import commands
from commands import LAZY_COMMANDS

ROOT = Path(__file__).resolve().parent.parent
HEAVY = (
    "google",
    "googleapiclient",
    "grpc",
    "couchdb",
    "pymysql",
    "kinds.couchdb",
    "kinds.sqlsync.kind",
    "kinds.sqlsync.steps",
    "flask",
)

PROBE = """
import json, os, sys
sys.argv = ["backup", *json.loads(sys.argv[1])]
exit_now = os._exit

def report(code=0):
    print(json.dumps(sorted(sys.modules)), file=sys.stderr)
    sys.stderr.flush()
    exit_now(code)

os._exit = report  # a directory copy ends without the interpreter's teardown
import cli
try:
    cli.main()
except SystemExit:
    pass
report()
"""


def loaded_by(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    modules = json.loads(done.stderr.strip().splitlines()[-1])
    return [m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY)]


def test_help_and_directory_commands_load_no_client_libraries(tmp_path: Path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "a.txt").write_text("a")

    assert loaded_by("--help") == []
    assert loaded_by("directory", "--help") == []
    assert loaded_by("directory", "run", "--no-sync", str(src), str(dest)) == []
    [copy] = [p for p in dest.iterdir() if not p.name.startswith(".")]
    assert loaded_by("directory", "verify", str(copy)) == []
    assert loaded_by("directory", "restore", str(copy), str(tmp_path / "restored")) == []
    assert (tmp_path / "restored" / "a.txt").read_text() == "a"


def test_the_lazy_table_matches_the_command_modules():
    defined = {}
    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"commands.{info.name}")
        for command in getattr(module, "commands", []):
            defined[command.name] = (module.__name__, command.get_short_help_str(limit=10_000))

    assert defined == LAZY_COMMANDS


def test_a_lazy_command_runs_through_the_group():
    from cli import backup

    result = CliRunner().invoke(backup, ["directory", "run"])

    assert result.exit_code == 2
    assert "SOURCE and DEST are required" in result.output


def test_a_command_module_missing_from_the_table_still_works(monkeypatch):
    from click.testing import CliRunner

    import cli

    monkeypatch.delitem(LAZY_COMMANDS, "trends")
    group = cli._LazyGroup("backup")

    listed = CliRunner().invoke(group, ["--help"])

    assert listed.exit_code == 0
    assert "trends" in listed.output
    assert group.get_command(None, "trends") is not None
