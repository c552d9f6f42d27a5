"""Moving over from IBM's couchbackup: its files (full and shallow mode, made by the real tool against
pouchdb-server) become backups of this tool that restore and verify like any other."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from commands.couchdb import couchdb
from services.runtime import ROOT
from tests.couch_data import leaves, make_docs, seed, winners
from tests.couch_proxy import FaultProxy

COUCHBACKUP = ROOT / ".local" / "node_modules" / ".bin" / "couchbackup"


def _couchbackup(url: str, db: str, out: Path, *args: str) -> None:
    if not COUCHBACKUP.exists():
        pytest.fail(f"couchbackup is not installed at {COUCHBACKUP}: run scripts/ensure-pouchdb.sh (needs npm)")
    with open(out, "wb") as stdout:
        subprocess.run(
            [str(COUCHBACKUP), "--db", db, "--quiet", *args],
            env={**os.environ, "COUCH_URL": url},
            stdout=stdout,
            check=True,
            timeout=120,
        )


def _winning(url: str, db: str, history: bool) -> dict[str, dict]:
    """Each live document's winning revision read back whole (attachment data too), with its history if asked."""
    live = {doc_id: doc["_rev"] for doc_id, doc in winners(url, db).items()}
    found = {}
    for (doc_id, rev), body in leaves(url, db).items():
        if live.get(doc_id) == rev:
            doc = json.loads(body)
            if not history:
                doc.pop("_revisions")
            # couchbackup's file, as it reads pouchdb-server, keeps no attachment content types: not compared.
            for attachment in (doc.get("_attachments") or {}).values():
                attachment.pop("content_type", None)
            found[doc_id] = doc
    return found


def _cli(*args):
    return CliRunner().invoke(couchdb, [*args], catch_exceptions=False)


@pytest.mark.parametrize("mode", ["full", "shallow"])
def test_a_couchbackup_file_is_imported_then_restored_and_verified(couch_env, tmp_path, mode):
    url = couch_env.url
    source = couch_env.new_db_name(f"cb-{mode}")
    seed(url, source, make_docs(40, attachment_every=8))
    made = tmp_path / "couchbackup.txt"
    with FaultProxy(url) as proxy:  # couchbackup's full mode needs what pouchdb-server lacks (see the proxy)
        proxy.state.couchbackup_compat = True
        _couchbackup(proxy.url, source, made, "--mode", mode, "--attachments")
    target = couch_env.new_db_name("cb-restored")

    imported = _cli("import", str(made), "--db", source, "--to", str(tmp_path / "backups"))
    restored = _cli("restore", imported.stdout.strip(), "--db", target, "--quiet")

    assert imported.exit_code == 0, imported.stderr
    assert f"couchbackup 2.11.12 file ({mode} mode)" in imported.stderr
    assert restored.exit_code == 0 and "verified" in restored.stderr, restored.stderr
    # Every live document with its attachments; a full-mode file keeps the revision history too.
    assert _winning(url, target, history=mode == "full") == _winning(url, source, history=mode == "full")


def test_attachments_a_couchbackup_file_only_names_are_left_out_and_said_so(couch_env, tmp_path):
    url = couch_env.url
    source = couch_env.new_db_name("cb-stubs")
    seed(url, source, make_docs(20, attachment_every=5))
    made = tmp_path / "couchbackup.txt"
    _couchbackup(url, source, made, "--mode", "shallow")
    target = couch_env.new_db_name("cb-stubs-restored")

    imported = _cli("import", str(made), "--db", source, "--to", str(tmp_path / "backups"))
    restored = _cli("restore", imported.stdout.strip(), "--db", target, "--quiet", "--no-verify")

    assert imported.exit_code == 0 and "3 attachments were not in the file and are left out" in imported.stderr
    assert restored.exit_code == 0, restored.stderr
    assert set(winners(url, target)) == set(winners(url, source))
