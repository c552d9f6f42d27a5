"""A small stateful fake of the Filestore ``file v1`` REST API, answering the real googleapiclient through
``responses``. It keeps instances, backups and operations across calls, so retention over several runs is real.

Modelled (and nothing more; anything else is a 400 or 404 so the code cannot lean on what is not modelled):

- ``instances.list`` on ``projects/P/locations/-`` or one location, filter ``labels.K:*`` only, pages;
- ``instances.get``; ``instances.restore`` -> an operation (done on its next read);
- ``backups.create`` -> an operation; the backup goes CREATING -> FINALIZING -> READY, one step per read of the
  backup or its operation (or -> INVALID with the operation failed, for an instance marked to fail);
  an existing id is 409 ALREADY_EXISTS;
- ``backups.list`` with ``labels.K="V"`` terms joined by AND, pages; ``backups.get``;
- ``backups.delete`` -> an operation done on its next read; a second delete in the same backup chain while one
  is pending is 429 RESOURCE_EXHAUSTED, as Filestore does;
- ``operations.get``;
- 403 naming the missing permission for a project the test denies, and one-off injected statuses.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

PRESENCE = re.compile(r"^labels\.([a-z][a-z0-9_-]*):\*$")
EQUALS = re.compile(r'^labels\.([a-z][a-z0-9_-]*)="([^"]*)"$')
STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS"}
STATUS_NAMES.update({429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"})


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "status": STATUS_NAMES.get(self.status, "")}}


class FilestoreFake:
    def __init__(self, endpoint: str, clock: Callable[[], datetime] | None = None, page_size: int = 2):
        self.endpoint = endpoint.rstrip("/") + "/v1/"
        self.clock = clock or (lambda: datetime(2026, 11, 23, 2, 0, tzinfo=UTC))
        self.page_size = page_size
        self.instances: dict[str, dict[str, Any]] = {}
        self.backups: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.failing_instances: set[str] = set()
        self.denied: dict[str, str] = {}  # project -> permission it lacks
        self.injected: list[tuple[str, str, int]] = []  # (method, path substring, status), used once each
        self.calls: list[tuple[str, str]] = []
        self.restores: list[dict[str, Any]] = []
        self.stored_bytes = 5 * 2**30  # what each new backup reports holding
        self._ids = itertools.count(1)
        self._tick = itertools.count(1)

    # --- arranging state --------------------------------------------------------------------------------------

    def add_instance(self, project: str, location: str, instance_id: str, labels: dict[str, str], share: str = "vol1"):
        name = f"projects/{project}/locations/{location}/instances/{instance_id}"
        self.instances[name] = {
            "name": name,
            "labels": dict(labels),
            "fileShares": [{"name": share, "capacityGb": "1024"}],
            "state": "READY",
        }
        return name

    def add_backup(self, name: str, source: str, labels: dict[str, str], state: str = "READY", age_days: int = 30):
        self.backups[name] = {
            "name": name,
            "sourceInstance": source,
            "labels": dict(labels),
            "state": state,
            "createTime": (self.clock() - timedelta(days=age_days)).isoformat().replace("+00:00", "Z"),
            "capacityGb": "1024",
            "storageBytes": "5368709120",
        }

    def backups_of(self, instance_name: str) -> list[str]:
        return sorted(n for n, b in self.backups.items() if b["sourceInstance"] == instance_name)

    # --- serving ----------------------------------------------------------------------------------------------

    def callback(self, request: Any) -> tuple[int, dict[str, str], str]:
        """For ``responses``: one intercepted request answered."""
        status, payload = self.handle(request.method, request.url, request.body)
        return status, {"Content-Type": "application/json"}, json.dumps(payload)

    def handle(self, method: str, url: str, raw_body: bytes | str | None) -> tuple[int, dict[str, Any]]:
        """One request (also served over real HTTP by tests.fakes_compute.FakeServer): status and JSON answer."""
        split = urlsplit(url)
        path = split.path.split("/v1/", 1)[1]
        params = {k: v[0] for k, v in parse_qs(split.query).items()}
        body = json.loads(raw_body) if raw_body else {}
        self.calls.append((method, path))
        try:
            for i, (injected_method, fragment, status) in enumerate(self.injected):
                if injected_method == method and fragment in path:
                    del self.injected[i]
                    raise ApiError(status, f"injected {status}")
            return 200, self._route(method, path, params, body)
        except ApiError as exc:
            return exc.status, exc.body()

    def _require(self, path: str, permission: str) -> None:
        project = path.split("/")[1]
        if self.denied.get(project) == permission:
            raise ApiError(403, f"Permission '{permission}' denied on resource '{path}' (or it may not exist).")

    def _route(self, method: str, path: str, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        seg = path.split("/")
        if len(seg) < 4 or seg[0] != "projects" or seg[2] != "locations":
            raise ApiError(404, f"unknown path {path}")
        if len(seg) == 5 and seg[4] == "instances" and method == "GET":
            self._require(path, "file.instances.list")
            return self._list_instances(seg[1], seg[3], params)
        if len(seg) == 6 and seg[4] == "instances" and method == "GET":
            self._require(path, "file.instances.get")
            return self._get(self.instances, path, "instance")
        if len(seg) == 6 and seg[4] == "instances" and method == "POST" and seg[5].endswith(":restore"):
            self._require(path, "file.instances.restore")
            return self._restore(path[: -len(":restore")], body)
        if len(seg) == 5 and seg[4] == "backups" and method == "POST":
            self._require(path, "file.backups.create")
            return self._create_backup(path, params, body)
        if len(seg) == 5 and seg[4] == "backups" and method == "GET":
            self._require(path, "file.backups.list")
            return self._list_backups(path, params)
        if len(seg) == 6 and seg[4] == "backups" and method == "GET":
            self._require(path, "file.backups.get")
            backup = self._get(self.backups, path, "backup")
            self._advance(backup)
            return backup
        if len(seg) == 6 and seg[4] == "backups" and method == "DELETE":
            self._require(path, "file.backups.delete")
            return self._delete_backup(path)
        if len(seg) == 6 and seg[4] == "operations" and method == "GET":
            return self._read_operation(path)
        raise ApiError(400, f"the fake does not model {method} {path}")

    def _get(self, table: dict[str, dict[str, Any]], name: str, what: str) -> dict[str, Any]:
        if name not in table:
            raise ApiError(404, f"{what} {name!r} not found")
        return table[name]

    def _page(self, items: list[dict[str, Any]], params: dict[str, str], key: str) -> dict[str, Any]:
        start = int(params.get("pageToken") or 0)
        size = min(int(params.get("pageSize") or self.page_size), self.page_size)
        out: dict[str, Any] = {key: items[start : start + size]}
        if start + size < len(items):
            out["nextPageToken"] = str(start + size)
        return out

    def _list_instances(self, project: str, location: str, params: dict[str, str]) -> dict[str, Any]:
        flt = params.get("filter", "")
        presence = PRESENCE.match(flt) if flt else None
        if flt and not presence:
            raise ApiError(400, f"the fake understands only labels.KEY:* filters, got {flt!r}")
        items = [
            inst
            for name, inst in sorted(self.instances.items())
            if name.startswith(f"projects/{project}/")
            and (location == "-" or f"/locations/{location}/" in name)
            and (presence is None or presence.group(1) in inst["labels"])
        ]
        return self._page(items, params, "instances")

    def _operation(self, parent: str, target: str, kind: str, **extra: Any) -> dict[str, Any]:
        name = f"{parent}/operations/operation-{next(self._ids)}"
        self.operations[name] = {"name": name, "done": False, "metadata": {"target": target, "verb": kind}, **extra}
        return dict(self.operations[name])

    def _create_backup(self, parent: str, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        backup_id = params.get("backupId", "")
        if not re.match(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$", backup_id):
            raise ApiError(400, f"invalid backup_id {backup_id!r}")
        name = f"{parent.rsplit('/backups', 1)[0]}/backups/{backup_id}"
        if name in self.backups:
            raise ApiError(409, f"Resource '{name}' already exists")
        source = body.get("sourceInstance", "")
        instance = self._get(self.instances, source, "source instance")
        if body.get("sourceFileShare") not in [s["name"] for s in instance["fileShares"]]:
            raise ApiError(400, f"file share {body.get('sourceFileShare')!r} not on {source}")
        region = parent.split("/")[3]
        if not instance["name"].split("/")[3].startswith(region):
            raise ApiError(400, "this fake only models backups in the instance's own region")
        self.backups[name] = {
            "name": name,
            "sourceInstance": source,
            "sourceFileShare": body["sourceFileShare"],
            "labels": dict(body.get("labels", {})),
            "description": body.get("description", ""),
            "state": "CREATING",
            # a tick keeps the order of backups made at the same fake time
            "createTime": (self.clock() + timedelta(microseconds=next(self._tick))).isoformat().replace("+00:00", "Z"),
            "_fail": source in self.failing_instances,
        }
        return self._operation(parent.rsplit("/backups", 1)[0], name, "create", _backup=name)

    def _advance(self, backup: dict[str, Any]) -> None:
        if backup["state"] == "CREATING":
            backup["state"] = "INVALID" if backup.get("_fail") else "FINALIZING"
        elif backup["state"] == "FINALIZING":
            backup["state"] = "READY"
            share = next(s for s in self.instances[backup["sourceInstance"]]["fileShares"])
            backup.update(capacityGb=share.get("capacityGb", "1024"), storageBytes=str(self.stored_bytes))

    def _list_backups(self, parent: str, params: dict[str, str]) -> dict[str, Any]:
        terms = [t.strip() for t in params.get("filter", "").split(" AND ")] if params.get("filter") else []
        wanted = []
        for term in terms:
            found = EQUALS.match(term)
            if not found:
                raise ApiError(400, f'the fake understands only labels.K="V" terms joined by AND, got {term!r}')
            wanted.append(found.groups())
        location = parent.split("/")[3]
        items = [
            {k: v for k, v in b.items() if not k.startswith("_")}
            for name, b in sorted(self.backups.items())
            if f"/locations/{location}/" in name and all(b["labels"].get(k) == v for k, v in wanted)
        ]
        return self._page(items, params, "backups")

    def _delete_backup(self, name: str) -> dict[str, Any]:
        backup = self._get(self.backups, name, "backup")
        for op in self.operations.values():
            pending = not op["done"] and op["metadata"]["verb"] == "delete"
            if pending and self.backups.get(op["_backup"], {}).get("sourceInstance") == backup["sourceInstance"]:
                raise ApiError(429, "Too many concurrent delete operations in the backup chain")
        return self._operation(name.rsplit("/backups", 1)[0], name, "delete", _backup=name)

    def _restore(self, instance_name: str, body: dict[str, Any]) -> dict[str, Any]:
        self._get(self.instances, instance_name, "instance")
        backup = self._get(self.backups, body.get("sourceBackup", ""), "backup")
        if backup["state"] != "READY":
            raise ApiError(400, f"backup {backup['name']} is not READY")
        return self._operation(instance_name.rsplit("/instances", 1)[0], instance_name, "restore", _restore=body)

    def _read_operation(self, name: str) -> dict[str, Any]:
        op = self._get(self.operations, name, "operation")
        verb = op["metadata"]["verb"]
        if not op["done"]:
            if verb == "create":
                backup = self.backups[op["_backup"]]
                self._advance(backup)
                if backup["state"] == "INVALID":
                    op.update(done=True, error={"code": 9, "message": "backup creation failed: source busy"})
                elif backup["state"] == "READY":
                    op.update(done=True, response={"name": backup["name"]})
            elif verb == "delete":
                self.backups.pop(op["_backup"], None)
                op.update(done=True, response={})
            elif verb == "restore":
                self.restores.append(op["_restore"] | {"instance": op["metadata"]["target"]})
                op.update(done=True, response={"name": op["metadata"]["target"]})
        return {k: v for k, v in op.items() if not k.startswith("_")}
