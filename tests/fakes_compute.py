"""A small stateful fake of the Compute Engine v1 REST API: disks, snapshots and operations.

No Compute emulator exists, so tests (through ``responses``) and the benchmark (through a local HTTP server)
answer the real googleapiclient from this fake. It keeps state across calls, so retention over several runs is
real, and it implements exactly the API surface the disks kind uses:

- ``disks.aggregatedList`` / ``disks.list`` / ``zones.list`` with ``labels.KEY:*`` filters and pages;
- ``disks.createSnapshot`` (zonal and regional) -> an operation that goes PENDING -> RUNNING -> DONE while the
  snapshot goes CREATING -> UPLOADING -> READY (or FAILED), one step per read of either; ``requestId`` dedup and
  409 alreadyExists on a reused name;
- ``snapshots.list`` with ``(labels.K = "V")`` filters and pages, ``snapshots.get`` / ``delete``;
- ``disks.insert`` from a snapshot and ``disks.get`` (restore);
- errors shaped like Google's: 403 naming the missing permission, injected 429 / 403 rateLimitExceeded / 5xx
  on a seeded-random share of calls, optionally after the call took effect (a lost response).

A filter this fake does not understand is a 400, so the code under test cannot rely on more than is modelled.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PACIFIC = timezone(timedelta(hours=-8))
SELF_LINK_BASE = "https://www.googleapis.com/compute/v1/"
PRESENCE = re.compile(r"^\s*labels\.([a-z][a-z0-9_-]*):\*\s*$")
EQUALS_TERM = re.compile(r'\(\s*([A-Za-z][A-Za-z0-9_.-]*)\s*=\s*"([^"]*)"\s*\)')


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.status,
                "message": self.message,
                "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
            }
        }


@dataclass
class Fault:
    """A share of calls answers ``status`` instead. The calls are picked by a seeded random generator, so a
    run is repeatable, but, unlike "every n-th call", a task that needs several calls in a row is not doomed
    to hit a fault forever. With ``after_effect`` the call is carried out first and only its response is lost,
    as when a connection drops after the server acted."""

    share: float
    status: int
    reason: str
    after_effect: bool = False
    methods: tuple[str, ...] = ("GET", "POST", "DELETE")
    seed: int = 3
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def fires(self, method: str) -> bool:
        return method in self.methods and self._random.random() < self.share


def _matches(resource: dict[str, Any], flt: str | None) -> bool:
    """Apply a Compute list filter; only the forms the disks kind sends are understood."""
    if not flt:
        return True
    labels = resource.get("labels") or {}
    presence = PRESENCE.match(flt)
    if presence:
        return presence.group(1) in labels
    terms = EQUALS_TERM.findall(flt)
    if not terms or EQUALS_TERM.sub("", flt).strip():
        raise ApiError(400, "invalid", f"Invalid value for field 'filter': '{flt}'. Invalid list filter expression.")
    for path, value in terms:
        actual = labels.get(path.removeprefix("labels.")) if path.startswith("labels.") else resource.get(path)
        if actual is None or str(actual) != value:
            return False
    return True


def _page(items: list[Any], params: dict[str, str]) -> tuple[list[Any], str | None]:
    max_results = int(params.get("maxResults", "500"))
    if not 0 <= max_results <= 500:
        raise ApiError(400, "invalid", f"Invalid value for field 'maxResults': {max_results}. Must be 0..500.")
    max_results = max_results or 500
    token = params.get("pageToken")
    start = int(base64.urlsafe_b64decode(token.encode()).decode()) if token else 0
    chunk = items[start : start + max_results]
    end = start + len(chunk)
    return chunk, (base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else None)


class ComputeFake:
    """In-memory Compute: call ``handle(method, url, body)``; seed with ``add_disk`` / ``add_snapshot``."""

    def __init__(self, clock: Callable[[], datetime] | None = None, operation_steps: int = 2, upload_steps: int = 1):
        self.clock = clock or (lambda: datetime.now(UTC))
        self.operation_steps = operation_steps  # reads until the create operation is DONE
        self.upload_steps = upload_steps  # further reads until the snapshot is READY
        self.lock = threading.RLock()
        self.projects: set[str] = set()
        self.zones: dict[str, list[str]] = {}
        self.disks: dict[tuple[str, str, str], dict[str, Any]] = {}  # (project, scope, name)
        self.snapshots: dict[tuple[str, str], dict[str, Any]] = {}  # (project, name)
        self.operations: dict[tuple[str, str, str], dict[str, Any]] = {}  # (project, scope, name)
        self.request_ids: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.denied: set[tuple[str, str]] = set()  # (project, permission)
        self.failing_disks: set[str] = set()  # disk names whose snapshots end FAILED
        self.damaged_snapshots: set[str] = set()  # snapshot names whose restored disks come back the wrong size
        self.deleted_disks: list[str] = []
        self.deleted_elsewhere: set[str] = set()  # snapshot names that vanish just before our delete arrives
        self.faults: list[Fault] = []
        self.latency_seconds = 0.0
        self.calls: list[tuple[str, str]] = []
        self.injected = 0
        self._ids = itertools.count(7_000_000_000_000_000_001)

    # --- seeding ---------------------------------------------------------------------------------------------

    def add_project(self, project: str, zones: list[str] | None = None) -> None:
        self.projects.add(project)
        self.zones.setdefault(project, [])
        for zone in zones or []:
            if zone not in self.zones[project]:
                self.zones[project].append(zone)

    def add_disk(
        self,
        project: str,
        name: str,
        *,
        zone: str | None = None,
        region: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        self.add_project(project, [zone] if zone else [])
        scope = f"zones/{zone}" if zone else f"regions/{region}"
        disk = {
            "kind": "compute#disk",
            "id": str(next(self._ids)),
            "name": name,
            "sizeGb": "10",
            "status": "READY",
            "labels": dict(labels or {}),
            "creationTimestamp": self._timestamp(),
            "selfLink": f"{SELF_LINK_BASE}projects/{project}/{scope}/disks/{name}",
            ("zone" if zone else "region"): f"{SELF_LINK_BASE}projects/{project}/{scope}",
        }
        self.disks[(project, scope, name)] = disk
        return disk

    def add_snapshot(
        self,
        project: str,
        name: str,
        *,
        source_disk: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        status: str = "READY",
    ) -> dict[str, Any]:
        snapshot = self._new_snapshot(project, name, source_disk, labels or {}, [])
        snapshot["status"] = status
        snapshot["_frozen"] = True  # a seeded snapshot keeps the status the test gave it
        return snapshot

    def deny(self, project: str, permission: str) -> None:
        self.denied.add((project, permission))

    def snapshots_of(self, disk: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted(
            (s for s in self.snapshots.values() if s.get("sourceDiskId") == disk["id"]), key=lambda s: s["name"]
        )

    # --- HTTP entry points -----------------------------------------------------------------------------------

    def handle(self, method: str, url: str, body: bytes | str | None) -> tuple[int, dict[str, Any]]:
        if self.latency_seconds:
            time.sleep(self.latency_seconds)
        parts = urlsplit(url)
        path = parts.path.split("/compute/v1/", 1)[-1]
        params = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        payload = json.loads(body) if body else {}
        with self.lock:
            self.calls.append((method, path))
            fault = self._fault_for(method)
            try:
                if fault is not None and not fault.after_effect:
                    raise ApiError(fault.status, fault.reason, f"Injected {fault.status} {fault.reason}")
                result = self._route(method, path.split("/"), params, payload)
                if fault is not None:
                    raise ApiError(fault.status, fault.reason, f"Injected {fault.status} after the call took effect")
                return 200, result
            except ApiError as exc:
                return exc.status, exc.body()

    def responses_callback(self, request: Any) -> tuple[int, dict[str, str], str]:
        status, payload = self.handle(request.method, request.url, request.body)
        return status, {"Content-Type": "application/json; charset=UTF-8"}, json.dumps(payload)

    def _fault_for(self, method: str) -> Fault | None:
        for fault in self.faults:
            if fault.fires(method):
                self.injected += 1
                return fault
        return None

    # --- routing ---------------------------------------------------------------------------------------------

    def _route(self, method: str, seg: list[str], params: dict[str, str], payload: dict[str, Any]) -> dict[str, Any]:
        if len(seg) < 2 or seg[0] != "projects":
            raise ApiError(404, "notFound", "Unknown path")
        project = seg[1]
        if project not in self.projects:
            raise ApiError(404, "notFound", f"The resource 'projects/{project}' was not found")
        rest = seg[2:]
        if method == "GET" and rest == ["aggregated", "disks"]:
            self._require(project, "compute.disks.list", f"projects/{project}")
            return self._aggregated_disks(project, params)
        if method == "GET" and rest == ["zones"]:
            self._require(project, "compute.zones.list", f"projects/{project}")
            items = [{"kind": "compute#zone", "name": z} for z in self.zones[project]]
            chunk, token = _page(items, params)
            return {"kind": "compute#zoneList", "items": chunk, **({"nextPageToken": token} if token else {})}
        if len(rest) >= 3 and rest[0] in ("zones", "regions"):
            scope = f"{rest[0]}/{rest[1]}"
            tail = rest[2:]
            if tail == ["disks"] and method == "GET":
                self._require(project, "compute.disks.list", f"projects/{project}/{scope}")
                return self._list_disks(project, scope, params)
            if tail == ["disks"] and method == "POST":
                return self._insert_disk(project, scope, payload, params)
            if len(tail) == 2 and tail[0] == "disks" and method == "GET":
                self._require(project, "compute.disks.get", f"projects/{project}/{scope}/disks/{tail[1]}")
                return self._disk(project, scope, tail[1])
            if len(tail) == 2 and tail[0] == "disks" and method == "DELETE":
                return self._delete_disk(project, scope, tail[1], params)
            if len(tail) == 3 and tail[0] == "disks" and tail[2] == "createSnapshot" and method == "POST":
                return self._create_snapshot(project, scope, tail[1], payload, params)
            if len(tail) == 2 and tail[0] == "operations" and method == "GET":
                return self._read_operation(project, scope, tail[1])
        if rest[:2] == ["global", "snapshots"]:
            if len(rest) == 2 and method == "GET":
                self._require(project, "compute.snapshots.list", f"projects/{project}")
                return self._list_snapshots(project, params)
            if len(rest) == 3 and method == "GET":
                self._require(project, "compute.snapshots.get", f"projects/{project}/global/snapshots/{rest[2]}")
                return self._public(self._advance(self._snapshot(project, rest[2])))
            if len(rest) == 3 and method == "DELETE":
                return self._delete_snapshot(project, rest[2])
        raise ApiError(404, "notFound", f"No fake route for {method} {'/'.join(seg)}")

    def _require(self, project: str, permission: str, resource: str) -> None:
        if (project, permission) in self.denied:
            raise ApiError(403, "forbidden", f"Required '{permission}' permission for '{resource}'")

    # --- disks -----------------------------------------------------------------------------------------------

    def _aggregated_disks(self, project: str, params: dict[str, str]) -> dict[str, Any]:
        flt = params.get("filter")
        in_project = sorted(((k, d) for k, d in self.disks.items() if k[0] == project), key=lambda kd: kd[0])
        matching = [(key[1], disk) for key, disk in in_project if _matches(disk, flt)]
        chunk, token = _page(matching, params)
        items: dict[str, Any] = {}
        for scope, disk in chunk:
            items.setdefault(scope, {"disks": []})["disks"].append(self._public(disk))
        # Google lists scopes with nothing in them as a warning; the client must step over these.
        items["zones/empty-zone-a"] = {"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "There are no results"}}
        response: dict[str, Any] = {"kind": "compute#diskAggregatedList", "items": items}
        if token:
            response["nextPageToken"] = token
        return response

    def _list_disks(self, project: str, scope: str, params: dict[str, str]) -> dict[str, Any]:
        in_scope = sorted(((k, d) for k, d in self.disks.items() if k[:2] == (project, scope)), key=lambda kd: kd[0])
        matching = [disk for _key, disk in in_scope if _matches(disk, params.get("filter"))]
        chunk, token = _page(matching, params)
        return {
            "kind": "compute#diskList",
            "items": [self._public(d) for d in chunk],
            **({"nextPageToken": token} if token else {}),
        }

    def _disk(self, project: str, scope: str, name: str) -> dict[str, Any]:
        disk = self.disks.get((project, scope, name))
        if disk is None:
            raise ApiError(404, "notFound", f"The resource 'projects/{project}/{scope}/disks/{name}' was not found")
        if disk.get("_reads_until_ready"):  # a disk made from a snapshot is CREATING for a few reads
            disk["_reads_until_ready"] -= 1
            disk["status"] = "CREATING" if disk["_reads_until_ready"] else "READY"
        return self._public(disk)

    def _insert_disk(self, project: str, scope: str, payload: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        name = payload.get("name", "")
        self._require(project, "compute.disks.create", f"projects/{project}/{scope}/disks/{name}")
        known = self._by_request_id(project, params)
        if known is not None:
            return known
        if (project, scope, name) in self.disks:
            raise ApiError(
                409, "alreadyExists", f"The resource 'projects/{project}/{scope}/disks/{name}' already exists"
            )
        source_name = str(payload.get("sourceSnapshot", "")).rstrip("/").rsplit("/", 1)[-1]
        source = self._snapshot(project, source_name)
        zone = scope.split("/", 1)[1]
        disk = self.add_disk(project, name, zone=zone, labels=payload.get("labels"))
        size = source.get("diskSizeGb", "10")
        if source_name in self.damaged_snapshots:  # restores come back short, as from a damaged snapshot
            size = str(int(size) // 2)
        disk.update(sizeGb=size, sourceSnapshot=source["selfLink"], sourceSnapshotId=source["id"], status="CREATING")
        disk["_reads_until_ready"] = self.operation_steps
        return self._new_operation(project, scope, "insert", disk["selfLink"], params)

    def _delete_disk(self, project: str, scope: str, name: str, params: dict[str, str]) -> dict[str, Any]:
        self._require(project, "compute.disks.delete", f"projects/{project}/{scope}/disks/{name}")
        disk = self.disks.pop((project, scope, name), None)
        if disk is None:
            raise ApiError(404, "notFound", f"The resource 'projects/{project}/{scope}/disks/{name}' was not found")
        self.deleted_disks.append(name)
        return self._new_operation(project, scope, "delete", disk["selfLink"], params)

    # --- snapshots and operations ----------------------------------------------------------------------------

    def _create_snapshot(
        self, project: str, scope: str, disk_name: str, payload: dict[str, Any], params: dict[str, str]
    ) -> dict[str, Any]:
        resource = f"projects/{project}/{scope}/disks/{disk_name}"
        self._require(project, "compute.disks.createSnapshot", resource)
        self._require(project, "compute.snapshots.create", f"projects/{project}")
        known = self._by_request_id(project, params)
        if known is not None:
            return known
        disk = self.disks.get((project, scope, disk_name))
        if disk is None:
            raise ApiError(404, "notFound", f"The resource '{resource}' was not found")
        name = payload.get("name", "")
        if not re.match(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$", name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'.")
        if (project, name) in self.snapshots:
            raise ApiError(
                409, "alreadyExists", f"The resource 'projects/{project}/global/snapshots/{name}' already exists"
            )
        snapshot = self._new_snapshot(project, name, disk, payload.get("labels") or {}, payload.get("storageLocations"))
        snapshot["guestFlush"] = params.get("guestFlush") == "true" or bool(payload.get("guestFlush"))
        snapshot["_failing"] = disk_name in self.failing_disks
        operation = self._new_operation(project, scope, "createSnapshot", disk["selfLink"], params)
        self.operations[(project, scope, operation["name"])]["_snapshot"] = (project, name)
        return operation

    def _new_snapshot(
        self, project: str, name: str, disk: dict[str, Any] | None, labels: dict[str, str], locations: Any
    ) -> dict[str, Any]:
        snapshot: dict[str, Any] = {
            "kind": "compute#snapshot",
            "id": str(next(self._ids)),
            "name": name,
            "status": "CREATING",
            "labels": dict(labels),
            "creationTimestamp": self._timestamp(),
            "selfLink": f"{SELF_LINK_BASE}projects/{project}/global/snapshots/{name}",
            "storageLocations": list(locations or ["us"]),
            "diskSizeGb": "10",
            "_progress": 0,
        }
        if disk is not None:
            snapshot["sourceDisk"] = disk["selfLink"]
            snapshot["sourceDiskId"] = disk["id"]
        self.snapshots[(project, name)] = snapshot
        return snapshot

    def _new_operation(
        self, project: str, scope: str, kind: str, target_link: str, params: dict[str, str]
    ) -> dict[str, Any]:
        name = f"operation-{next(self._ids)}"
        operation = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": name,
            "operationType": kind,
            "targetLink": target_link,
            "status": "PENDING",
            "progress": 0,
            "selfLink": f"{SELF_LINK_BASE}projects/{project}/{scope}/operations/{name}",
            scope.split("/")[0][:-1]: f"{SELF_LINK_BASE}projects/{project}/{scope}",
            "_reads": 0,
        }
        self.operations[(project, scope, name)] = operation
        if params.get("requestId"):
            self.request_ids[(project, params["requestId"])] = (project, scope, name)
        return self._public(operation)

    def _by_request_id(self, project: str, params: dict[str, str]) -> dict[str, Any] | None:
        key = self.request_ids.get((project, params.get("requestId", "")))
        return self._public(self.operations[key]) if key else None

    def forget_request_ids(self) -> None:
        """Compute remembers a requestId only for a while; after that a retry meets 409 alreadyExists."""
        self.request_ids.clear()

    def _read_operation(self, project: str, scope: str, name: str) -> dict[str, Any]:
        self._require(
            project,
            f"compute.{'zoneOperations' if scope.startswith('zones') else 'regionOperations'}.get",
            f"projects/{project}/{scope}/operations/{name}",
        )
        operation = self.operations.get((project, scope, name))
        if operation is None:
            raise ApiError(
                404, "notFound", f"The resource 'projects/{project}/{scope}/operations/{name}' was not found"
            )
        operation["_reads"] += 1
        target = operation.get("_snapshot")
        if target is not None:
            snapshot = self._advance(self.snapshots[target])
            done = snapshot["_progress"] >= self.operation_steps
            failed = snapshot["status"] == "FAILED"
        else:
            done, failed = operation["_reads"] >= self.operation_steps, False
        operation["status"] = "DONE" if done else "RUNNING"
        operation["progress"] = 100 if done else 50
        if failed:
            operation["error"] = {"errors": [{"code": "SNAPSHOT_FAILED", "message": "Snapshot creation failed"}]}
        return self._public(operation)

    def _advance(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """One step of a snapshot's life per read of it or of its operation."""
        if snapshot["status"] in ("CREATING", "UPLOADING") and not snapshot.get("_frozen"):
            snapshot["_progress"] += 1
            if snapshot["_progress"] >= self.operation_steps and snapshot.get("_failing"):
                snapshot["status"] = "FAILED"
            elif snapshot["_progress"] >= self.operation_steps + self.upload_steps:
                snapshot["status"] = "READY"
            elif snapshot["_progress"] >= self.operation_steps:
                snapshot["status"] = "UPLOADING"
        return snapshot

    def _snapshot(self, project: str, name: str) -> dict[str, Any]:
        snapshot = self.snapshots.get((project, name))
        if snapshot is None:
            raise ApiError(404, "notFound", f"The resource 'projects/{project}/global/snapshots/{name}' was not found")
        return snapshot

    def _list_snapshots(self, project: str, params: dict[str, str]) -> dict[str, Any]:
        flt = params.get("filter")
        matching = [
            self._public(s) for (p, _n), s in sorted(self.snapshots.items()) if p == project and _matches(s, flt)
        ]
        chunk, token = _page(matching, params)
        return {"kind": "compute#snapshotList", "items": chunk, **({"nextPageToken": token} if token else {})}

    def _delete_snapshot(self, project: str, name: str) -> dict[str, Any]:
        self._require(project, "compute.snapshots.delete", f"projects/{project}/global/snapshots/{name}")
        if name in self.deleted_elsewhere:
            self.snapshots.pop((project, name), None)  # someone else deleted it between our list and delete
        snapshot = self._snapshot(project, name)
        del self.snapshots[(project, name)]
        operation = self._new_operation(project, "global", "delete", snapshot["selfLink"], {})
        return {**operation, "status": "DONE"}

    # --- helpers ---------------------------------------------------------------------------------------------

    def _timestamp(self) -> str:
        # Compute's own format: RFC 3339 with milliseconds in US Pacific time (a numeric offset, not Z).
        return self.clock().astimezone(PACIFIC).isoformat(timespec="milliseconds")

    @staticmethod
    def _public(resource: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if not k.startswith("_")}


# --- a real local HTTP server (benchmark, CLI tests) ---------------------------------------------------------


class FakeServer:
    """Serves a fake (``handle(method, url, body)`` -> status, JSON answer: ComputeFake, FilestoreFake) on
    127.0.0.1 over real HTTP/1.1 (keep-alive), in a background thread; ``api_path`` is where the API's paths begin."""

    def __init__(self, fake: Any, api_path: str = "/compute/v1/"):
        self.fake = fake
        self.api_path = api_path

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # One write per response and no Nagle delay: otherwise small answers wait ~40 ms for a delayed ACK,
            # a cost of this server, not of the API, that would skew the benchmark against small list calls.
            disable_nagle_algorithm = True
            wbufsize = 1 << 16

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status, payload = fake.handle(self.command, f"http://fake{self.path}", body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.api_path}"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
