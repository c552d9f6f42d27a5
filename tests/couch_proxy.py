"""A fault-injecting HTTP proxy in front of pouchdb-server, for what pouchdb never does on its own.

pouchdb-server never answers 429 and accepts any body size, unlike Cloudant (429 beyond the plan's rate,
413 over 64 MB). The proxy forwards every request to the real server and can, per rule, answer 429 with a
``Retry-After`` header, 5xx, or 413 for bodies over a size; it records each request's arrival time so tests can
measure the writes-per-second a client really achieved.
"""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "host"}


@dataclass
class Fault:
    """Answer ``status`` instead of forwarding, ``times`` times, to requests matching method and path."""

    status: int
    times: int
    method: str = "POST"
    path_contains: str = "_bulk_docs"
    retry_after: str | None = None


@dataclass
class Seen:
    at: float  # time.monotonic() on arrival
    method: str
    path: str
    status: int
    body_bytes: int


@dataclass
class ProxyState:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    max_body_bytes: int | None = None
    strip_auth: bool = False  # pouchdb-server in admin party refuses unknown users: take the header off
    auth_seen: list[str] = field(default_factory=list)
    # CouchDB 3 reports doc_del_count in database info; pouchdb-server does not, and couchrestore refuses a
    # target whose doc_del_count is not 0 (the benchmark needs this to run couchrestore at all).
    add_doc_del_count: bool = False
    # What couchbackup's full mode needs of a server and pouchdb-server does not do: gzip'd request bodies
    # understood, an empty _bulk_get answered, and "pending" in every _changes answer (it waits for it).
    couchbackup_compat: bool = False
    write_delay: float = 0.0  # seconds to hold each _bulk_docs before forwarding (to kill a client mid-restore)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests_to(self, method: str, path_contains: str, status: int | None = None) -> list[Seen]:
        with self.lock:
            return [
                s
                for s in self.seen
                if s.method == method and path_contains in s.path and (status is None or s.status == status)
            ]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ProxyState  # set on the subclass made per proxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _handle(self) -> None:
        arrived = time.monotonic()
        body = self._read_body()
        if self.state.couchbackup_compat and self._compat_answered(arrived, body):
            return
        unzipped = self.state.couchbackup_compat and self.headers.get("Content-Encoding", "").lower() == "gzip"
        if unzipped:
            body = gzip.decompress(body)
        fault = self._matching_fault(len(body))
        if fault is not None:
            status, extra = fault
            payload = b'{"error":"injected","reason":"fault-injecting proxy"}'
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self._record(arrived, len(body), status)
            return
        if self.state.write_delay and self.command == "POST" and "_bulk_docs" in self.path:
            time.sleep(self.state.write_delay)
        upstream = urlsplit(self.state.upstream)
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=120)
        try:
            # The length is the one of the body sent on (http.client sets it), which may have been unzipped here.
            dropped = HOP_HEADERS | {"content-length"} | ({"content-encoding"} if unzipped else set())
            headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
            if self.state.strip_auth and "Authorization" in headers:
                with self.state.lock:
                    self.state.auth_seen.append(headers.pop("Authorization"))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if self.state.add_doc_del_count and self.command == "GET" and resp.status == 200:
                data = _with_doc_del_count(self.path, data)
            if self.state.couchbackup_compat and "/_changes" in self.path and resp.status == 200:
                data = _with_pending(data)
            self.send_response(resp.status)
            for name, value in resp.getheaders():
                if name.lower() not in HOP_HEADERS and name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self._record(arrived, len(body), resp.status)
        finally:
            conn.close()

    def _compat_answered(self, arrived: float, body: bytes) -> bool:
        """Answer couchbackup's probe of ``_bulk_get`` with no documents, which pouchdb-server refuses."""
        if not (self.command == "POST" and "/_bulk_get" in self.path and body):
            return False
        raw = gzip.decompress(body) if self.headers.get("Content-Encoding", "").lower() == "gzip" else body
        try:
            empty = json.loads(raw).get("docs") == []
        except (ValueError, AttributeError):
            return False
        if not empty:
            return False
        payload = b'{"results":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self._record(arrived, len(body), 200)
        return True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # Node clients (couchrestore) stream request bodies in chunks without a Content-Length.
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the empty line
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _matching_fault(self, body_bytes: int) -> tuple[int, dict[str, str]] | None:
        with self.state.lock:
            limit = self.state.max_body_bytes
            if limit is not None and self.command == "POST" and body_bytes > limit:
                return 413, {}
            for fault in self.state.faults:
                if fault.times > 0 and fault.method == self.command and fault.path_contains in self.path:
                    fault.times -= 1
                    return fault.status, ({"Retry-After": fault.retry_after} if fault.retry_after else {})
        return None

    def _record(self, arrived: float, body_bytes: int, status: int) -> None:
        with self.state.lock:
            self.state.seen.append(Seen(arrived, self.command, self.path, status, body_bytes))

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


def _with_pending(data: bytes) -> bytes:
    try:
        page = json.loads(data)
    except ValueError:
        return data  # a continuous feed, not one page
    if isinstance(page, dict) and "results" in page and "pending" not in page:
        page["pending"] = 0
        return json.dumps(page).encode()
    return data


def _with_doc_del_count(path: str, data: bytes) -> bytes:
    if path.count("/") != 1 or "?" in path or path == "/" or path.startswith("/_"):
        return data
    info = json.loads(data)
    if isinstance(info, dict) and "doc_count" in info and "doc_del_count" not in info:
        info["doc_del_count"] = 0
        return json.dumps(info).encode()
    return data


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-answer (couchrestore aborting on an error) is not the proxy's problem.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultProxy:
    """``with FaultProxy(upstream) as proxy:`` serves on ``proxy.url`` until the block ends."""

    def __init__(self, upstream: str):
        self.state = ProxyState(upstream=upstream)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
