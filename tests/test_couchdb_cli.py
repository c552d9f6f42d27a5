"""``backup couchdb backup|restore|verify`` end to end against pouchdb-server, with their exit codes."""

from __future__ import annotations

import requests
from click.testing import CliRunner

from commands.couchdb import couchdb
from kinds.couchdb.http import RetryPolicy
from tests.couch_data import leaves, make_docs, seed, winners


def _cli(*args):
    return CliRunner().invoke(couchdb, [*args, "--quiet"], catch_exceptions=False)


def test_backup_restore_verify_and_exit_codes(couch_env, tmp_path):
    url = couch_env.url
    source = couch_env.new_db_name("cli")
    seed(url, source, make_docs(30))
    target = couch_env.new_db_name("cli-restored")

    backed_up = _cli("backup", source, "--to", str(tmp_path), "--mode", "full")
    manifest = backed_up.stdout.strip()
    restored = _cli("restore", manifest, "--db", target)
    refused = _cli("restore", manifest, "--db", target)
    doc = requests.get(f"{url}/{target}/doc-000004", timeout=10).json()
    requests.put(f"{url}/{target}/doc-000004", json={**doc, "n": 0}, timeout=10).raise_for_status()
    mismatch = _cli("verify", manifest, "--db", target)
    overwritten = _cli("restore", manifest, "--db", target, "--overwrite")

    assert backed_up.exit_code == 0 and manifest.endswith("-full.manifest.json")
    assert restored.exit_code == 0 and f"verified {len(winners(url, source))} docs" in restored.stderr
    assert refused.exit_code == 4 and "not empty" in refused.stderr
    assert mismatch.exit_code == 3 and "doc-000004" in mismatch.stderr
    assert overwritten.exit_code == 0 and "safety backup" in overwritten.stderr
    assert leaves(url, target) == leaves(url, source)
    assert list((tmp_path / "safety").rglob("*.manifest.json"))


def test_backup_needs_a_selection_and_reports_an_unknown_database(couch_env, tmp_path):
    nothing = CliRunner().invoke(couchdb, ["backup", "--to", str(tmp_path)])
    unknown = _cli("backup", "no-such-db-*", "--to", str(tmp_path))

    assert nothing.exit_code == 2 and "name at least one database" in nothing.output
    assert unknown.exit_code == 1 and "no database" in unknown.stderr


def test_a_server_that_is_down_exits_5(monkeypatch, tmp_path):
    from tests.fixtures.pouchdb import free_port

    monkeypatch.setenv("COUCHDB_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr("kinds.couchdb.http.DEFAULT_RETRY", RetryPolicy(attempts=3, base_delay=0.01))

    down = _cli("backup", "x", "--to", str(tmp_path))

    assert down.exit_code == 5 and "ConnectionError" in down.stderr
