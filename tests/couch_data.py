"""Builds CouchDB databases with everything a faithful backup must keep, and reads them back for comparison.

Documents are written with ``new_edits: false`` and explicit revision histories, so a test database has
multi-revision histories, conflicts (two leaves), tombstones (a deleted winning leaf), unicode, and inline
attachments, with deterministic content.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

import requests


def _h(*parts: object) -> str:
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def make_docs(
    n: int, *, attachment_every: int = 10, attachment_bytes: int = 2000, start: int = 0, padding: int = 0
) -> list[dict]:
    docs: list[dict[str, Any]] = []
    for i in range(start, start + n):
        doc_id = f"doc-{i:06d}"
        history = [_h(doc_id, gen) for gen in (3, 2, 1)]
        doc: dict[str, Any] = {
            "_id": doc_id,
            "_rev": f"3-{history[0]}",
            "_revisions": {"start": 3, "ids": history},
            "n": i,
            "name": f"naïve café № {i}",
            "tags": ["a", "b", str(i % 7)],
            "nested": {"doc": {"looks": "like a wrapper but is data"}},
        }
        if padding:
            doc["text"] = (_h(doc_id, "text") * (padding // 32 + 1))[:padding]
        if attachment_every and i % attachment_every == 0:
            blob = hashlib.sha256(doc_id.encode()).digest() * (attachment_bytes // 32 + 1)
            doc["_attachments"] = {
                "blob.bin": {
                    "content_type": "application/octet-stream",
                    "data": base64.b64encode(blob[:attachment_bytes]).decode(),
                }
            }
        docs.append(doc)
        if i % 9 == 4:  # a conflict: a second branch off generation 1
            branch = [_h(doc_id, "branch"), history[-1]]
            docs.append({"_id": doc_id, "_rev": f"2-{branch[0]}", "_revisions": {"start": 2, "ids": branch}, "n": -i})
        if i % 11 == 5:  # a tombstone: the document was deleted after generation 3
            tomb = [_h(doc_id, "deleted"), *history]
            docs.append(
                {"_id": doc_id, "_rev": f"4-{tomb[0]}", "_revisions": {"start": 4, "ids": tomb}, "_deleted": True}
            )
    return docs


def seed(url: str, db: str, docs: list[dict], batch: int = 500, create: bool = True) -> None:
    if create:
        requests.put(f"{url}/{db}", timeout=30).raise_for_status()
    for i in range(0, len(docs), batch):
        resp = requests.post(
            f"{url}/{db}/_bulk_docs", json={"docs": docs[i : i + batch], "new_edits": False}, timeout=120
        )
        resp.raise_for_status()


def leaves(url: str, db: str) -> dict[tuple[str, str], bytes]:
    """Every leaf revision of ``db`` with history and attachments, as canonical JSON bytes keyed by (id, rev)."""
    out: dict[tuple[str, str], bytes] = {}
    changes = requests.get(f"{url}/{db}/_changes", params={"style": "all_docs"}, timeout=120).json()
    refs = [{"id": r["id"], "rev": c["rev"]} for r in changes["results"] for c in r["changes"]]
    for i in range(0, len(refs), 500):
        answer = requests.post(
            f"{url}/{db}/_bulk_get",
            params={"revs": "true", "attachments": "true"},
            json={"docs": refs[i : i + 500]},
            timeout=120,
        ).json()
        for result in answer["results"]:
            for entry in result["docs"]:
                doc = entry["ok"]
                out[(doc["_id"], doc["_rev"])] = json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()
    return out


def winners(url: str, db: str) -> dict[str, dict]:
    """The winning revision of every live document, as the server reports it (no tombstones)."""
    rows = requests.get(f"{url}/{db}/_all_docs", params={"include_docs": "true"}, timeout=120).json()["rows"]
    return {row["id"]: row["doc"] for row in rows}


def couch_plan(name: str, destination: str, databases: list[str], **options: Any) -> Any:
    """A parsed ``couchdb`` plan, as plans.yaml would give it."""
    from services.plans import parse_plan

    retention = options.pop("retention", None)
    raw: dict[str, Any] = {
        "kind": "couchdb",
        "select": {"databases": databases},
        "destination": {"url": destination},
        "options": options,
    }
    if retention:
        raw["retention"] = retention
    return parse_plan(name, raw)


def runtime(clock: Any = None, env: dict[str, str] | None = None) -> Any:
    from google.auth.credentials import AnonymousCredentials

    from services.runtime import Runtime, Settings, utcnow

    if env is None:  # the deployment's CouchDB variables (tests set them as a deployment would), nothing else
        env = {name: value for name, value in os.environ.items() if name.startswith("COUCHDB_")}
    return Runtime(Settings.from_env(env), plans={}, clock=clock or utcnow, credentials=AnonymousCredentials())


def peak_rss_mb(
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stderr_path: str | None = None,
    timeout: float | None = None,
) -> tuple[float, int]:
    """Run ``argv`` to completion; return (peak resident memory of that process in MB, exit status).

    Reads the kernel's high-water mark (VmHWM in /proc/PID/status) every 20 ms while it runs. Not ru_maxrss:
    on Linux a child's ru_maxrss starts from its parent's peak (the memory map it was spawned from is counted
    at exec), so a child of a 70 MB pytest would never report less than 70 MB."""
    import subprocess
    import time

    errors = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors)
    if stderr_path:
        errors.close()
    peak_kb = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while process.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            process.kill()  # the caller sees the kill's status as a failure
            break
        try:
            with open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak_kb = max(peak_kb, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    process.wait()
    return peak_kb / 1024, process.returncode
