"""A small stateful fake of the Cloud SQL Admin API (sqladmin v1beta4): export, import, backupRuns and operations.

No Cloud SQL emulator exists, so the sqlsync tests answer the real googleapiclient from this fake through
``responses``. It keeps state across calls and moves real data: an export dumps the instance's database from
the MariaDB server standing in for that instance into the GCS emulator (gzipped), an import loads such an object,
so the whole cloudsql chain runs end to end. What it models of Cloud SQL's behaviour:

- operations go PENDING -> RUNNING -> DONE, one step per ``operations.get``; the work happens on the last step;
- one operation per instance: starting a second while one is active answers 409 (as Cloud SQL does);
- ``operations.list?instance=`` newest first, ``backupRuns`` insert/list/delete;
- injected failures: an operation that ends with an error, or an HTTP error on the next matching call.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kinds.sqlsync import dumps as sqlsync
from kinds.sqlsync.plan import DatabaseRef

PATH = re.compile(r"^/?sql/v1beta4/projects/(?P<project>[^/]+)/(?P<rest>.*)$")


@dataclass
class Backend:
    """The MariaDB server that plays one Cloud SQL instance."""

    host: str
    port: int


@dataclass
class SqlAdminFake:
    project: str
    backends: dict[str, Backend]
    storage: Any  # a google.cloud.storage client on the GCS emulator
    steps_to_done: int = 2
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    backup_runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    started: list[tuple[str, str]] = field(default_factory=list)  # (instance, operationType) in start order
    conflicts: int = 0
    failing: dict[tuple[str, str], str] = field(default_factory=dict)  # (instance, type) -> error message
    http_faults: list[tuple[str, str, int, str]] = field(default_factory=list)  # method, path part, status, msg
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    # ---- what tests call -------------------------------------------------------------------------------------

    def start_foreign_operation(self, instance: str, op_type: str = "EXPORT") -> str:
        """An operation somebody else started (a manual export): it occupies the instance until polled done."""
        return self._new_operation(instance, op_type, {})["name"]

    def fail_next(self, instance: str, op_type: str, message: str) -> None:
        self.failing[(instance, op_type)] = message

    def http_fault(self, method: str, path_part: str, status: int, message: str) -> None:
        self.http_faults.append((method, path_part, status, message))

    def advance(self, name: str) -> None:
        """Move one operation one state on (PENDING -> RUNNING -> DONE), as reading it does."""
        self._step(self.operations[name])

    # ---- the HTTP face ---------------------------------------------------------------------------------------

    def callback(self, request: Any) -> tuple[int, dict[str, str], str]:
        url = urlsplit(request.url)
        for fault in self.http_faults:
            method, part, status, message = fault
            if method == request.method and part in url.path:
                self.http_faults.remove(fault)
                return self._error(status, message)
        match = PATH.match(url.path)
        if not match or match["project"] != self.project:
            return self._error(404, f"The project or path does not exist: {url.path}")
        rest = match["rest"].split("/")
        body = json.loads(request.body) if request.body else {}
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if rest[0] == "operations":
            if len(rest) == 2 and request.method == "GET":
                op = self.operations.get(rest[1])
                if op is None:
                    return self._error(404, f"The Cloud SQL operation {rest[1]} does not exist.")
                self._step(op)
                return self._ok(op)
            if len(rest) == 1 and request.method == "GET":
                items = [op for op in self.operations.values() if op["targetId"] == query.get("instance")]
                return self._ok({"kind": "sql#operationsList", "items": list(reversed(items))})
        if rest[0] == "instances" and len(rest) >= 3:
            instance = rest[1]
            if instance not in self.backends:
                return self._error(404, f"The Cloud SQL instance {instance} does not exist.")
            action = rest[2]
            if action in ("export", "import") and request.method == "POST":
                op_type = action.upper()
                context = body[f"{action}Context"]
                return self._start(instance, op_type, {f"{action}Context": context})
            if action == "backupRuns":
                runs = self.backup_runs.setdefault(instance, [])
                if request.method == "POST":
                    reply = self._start(instance, "BACKUP_VOLUME", {})
                    if reply[0] == 200:
                        op = json.loads(reply[2])
                        runs.append(
                            {
                                "id": str(next(self._ids)),
                                "description": body.get("description", ""),
                                "status": "RUNNING",
                                "type": "ON_DEMAND",
                                "instance": instance,
                                "_operation": op["name"],
                            }
                        )
                    return reply
                if request.method == "GET" and len(rest) == 3:
                    visible = [{k: v for k, v in r.items() if not k.startswith("_")} for r in reversed(runs)]
                    return self._ok({"kind": "sql#backupRunsList", "items": visible})
                if request.method == "DELETE" and len(rest) == 4:
                    kept = [r for r in runs if r["id"] != rest[3]]
                    if len(kept) == len(runs):
                        return self._error(404, f"backup run {rest[3]} does not exist")
                    self.backup_runs[instance] = kept
                    return self._ok(self._new_operation(instance, "DELETE_BACKUP", {}, done=True))
        return self._error(400, f"the fake does not model {request.method} {url.path}")

    # ---- state -----------------------------------------------------------------------------------------------

    def _start(self, instance: str, op_type: str, context: dict[str, Any]) -> tuple[int, dict[str, str], str]:
        if any(op["targetId"] == instance and op["status"] != "DONE" for op in self.operations.values()):
            self.conflicts += 1
            return self._error(409, "Operation failed because another operation was already in progress.")
        op = self._new_operation(instance, op_type, context)
        self.started.append((instance, op_type))
        return self._ok(op)

    def _new_operation(self, instance: str, op_type: str, context: dict[str, Any], done: bool = False) -> dict:
        name = f"op-{next(self._ids):04d}"
        op = {
            "kind": "sql#operation",
            "name": name,
            "operationType": op_type,
            "status": "DONE" if done else "PENDING",
            "targetId": instance,
            "targetProject": self.project,
            **context,
        }
        self.operations[name] = op
        return op

    def _step(self, op: dict[str, Any]) -> None:
        if op["status"] == "PENDING":
            op["status"] = "RUNNING"
        elif op["status"] == "RUNNING":
            message = self.failing.pop((op["targetId"], op["operationType"]), None)
            if message:
                op["error"] = {"kind": "sql#operationErrors", "errors": [{"code": "ERROR", "message": message}]}
                for backup in self.backup_runs.get(op["targetId"], []):
                    if backup["_operation"] == op["name"]:
                        backup["status"] = "FAILED"
            else:
                self._do_work(op)
            op["status"] = "DONE"

    def _do_work(self, op: dict[str, Any]) -> None:
        backend = self.backends[op["targetId"]]
        if op["operationType"] == "EXPORT" and "exportContext" in op:  # a foreign operation has no context
            ctx = op["exportContext"]
            ref = DatabaseRef("fake", ctx["databases"][0], host=backend.host, port=backend.port)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "dump.sql"
                tables = tuple(ctx.get("sqlExportOptions", {}).get("tables", []))
                sqlsync.dump_database(ref, path, tables=tables)
                self._blob(ctx["uri"]).upload_from_string(gzip.compress(path.read_bytes()))
        elif op["operationType"] == "IMPORT" and "importContext" in op:
            ctx = op["importContext"]
            ref = DatabaseRef("fake", ctx["database"], host=backend.host, port=backend.port)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "dump.sql"
                path.write_bytes(gzip.decompress(self._blob(ctx["uri"]).download_as_bytes()))
                sqlsync.load_dump(ref, path)
        elif op["operationType"] == "BACKUP_VOLUME":
            for backup in self.backup_runs.get(op["targetId"], []):
                if backup["_operation"] == op["name"]:
                    backup["status"] = "SUCCESSFUL"

    def _blob(self, uri: str) -> Any:
        bucket, _, name = uri[len("gs://") :].partition("/")
        return self.storage.bucket(bucket).blob(name)

    @staticmethod
    def _ok(body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
        return 200, {"Content-Type": "application/json"}, json.dumps(body)

    @staticmethod
    def _error(status: int, message: str) -> tuple[int, dict[str, str], str]:
        reason = {401: "unauthorized", 403: "forbidden", 404: "notFound", 409: "conflict", 429: "rateLimitExceeded"}
        body = {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"message": message, "domain": "global", "reason": reason.get(status, "invalid")}],
            }
        }
        return status, {"Content-Type": "application/json"}, json.dumps(body)
