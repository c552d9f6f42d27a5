"""Benchmark: enumerating 10,000 labelled disks (100 zones, 3 projects) for one cron run.

The fake Compute (tests/fakes_compute.py) runs as a real HTTP server on 127.0.0.1 in a child process and waits
~20 ms before answering each call; the real googleapiclient talks to it over HTTP. Compared in the same run:

- backup-scheduler: ``kinds.disks.snapshots.KIND.enumerate``, one ``disks.aggregatedList`` page (label filter) per
  fan-out request, each page turned into task bodies, the page token handed on;
- naive: what a script would do by hand: per project ``zones.list``, then ``disks.list`` zone by zone, keeping
  the labelled disks, all inside one request.

Each approach runs in its own forked process so its peak RSS is its own. "backup-scheduler" rows run the service's
real fan-out (``services.fanout.fan_out``): each request lists one page and enqueues its tasks concurrently through
the real Cloud Tasks client into a local stand-in that also answers after ~20 ms (bench/fanout.py's). The naive row
only lists (enqueueing 10,000 tasks one at a time would add ~10 minutes on its own: see bench/fanout.py).

Run: ``.venv/bin/python bench/disks.py`` (about a minute).
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROJECTS = ("bench-proj-one", "bench-proj-two", "bench-proj-three")
ZONES = [f"{region}-{letter}" for region in (f"region{n:02d}" for n in range(34)) for letter in "abc"][:100]
LABELLED_DISKS = 10_000
UNLABELLED_DISKS = 2_000  # present so the label filter has something to filter out
LATENCY_SECONDS = 0.020
LABEL = "backup-generations"
CRON_DEADLINE_SECONDS = 600.0  # App Engine standard: a cron-triggered request may run for 10 minutes


def build_fake() -> Any:
    from tests.fakes_compute import ComputeFake

    fake = ComputeFake()
    for project in PROJECTS:
        fake.add_project(project, ZONES)
    for i in range(LABELLED_DISKS + UNLABELLED_DISKS):
        project = PROJECTS[i % len(PROJECTS)]
        zone = ZONES[(i // len(PROJECTS)) % len(ZONES)]
        labels = {LABEL: str(1 + i % 14)} if i < LABELLED_DISKS else {"team": "scratch"}
        fake.add_disk(project, f"disk-{i:05d}", zone=zone, labels=labels)
    fake.latency_seconds = LATENCY_SECONDS
    return fake


def serve(port_pipe: Any, stop: Any) -> None:
    from tests.fakes_compute import FakeServer

    with FakeServer(build_fake()) as server:
        port_pipe.send(server.endpoint)
        stop.wait()


def runtime(endpoint: str) -> Any:
    from google.auth.credentials import AnonymousCredentials

    from services.runtime import Runtime, Settings

    return Runtime(Settings.from_env({"BACKUP_COMPUTE_ENDPOINT": endpoint}), credentials=AnonymousCredentials())


def ours(endpoint: str, tasks_endpoint: str, page_size: int) -> dict[str, Any]:
    """The fan-out as the service does it: each loop turn is one fan-out request (list a page, enqueue its tasks)."""
    from datetime import datetime

    from kinds.disks import snapshots as disks
    from services.fanout import fan_out
    from services.plans import parse_plan
    from services.queue import CloudTasksQueue
    from services.runtime import Settings

    plan = parse_plan(
        f"bench-{page_size}", {"kind": "disks", "select": {"projects": list(PROJECTS)}, "fanout_page_size": page_size}
    )
    rt = runtime(endpoint)
    queue = CloudTasksQueue(
        Settings(
            project="bench",
            on_app_engine=False,
            queue_backend="cloudtasks",
            tasks_endpoint=tasks_endpoint,
            tasks_transport="rest",
        )
    )
    disks.KIND.enumerate(plan, None, rt)  # warm-up: builds the client, opens the connection
    period = datetime(2026, 11, 23, 2, tzinfo=UTC)
    request_seconds: list[float] = []
    targets, enqueued, token, page, began = 0, 0, None, 0, time.perf_counter()
    while True:
        start = time.perf_counter()
        result = fan_out(rt, _NoContinuation(queue), plan, period, token, page)
        request_seconds.append(time.perf_counter() - start)
        targets += result.targets
        enqueued += result.enqueued
        token = _NoContinuation.last_token
        page += 1
        if not result.continuation:
            break
    total = time.perf_counter() - began
    return {
        "targets": targets,
        "enqueued": enqueued,
        "calls": len(request_seconds),
        "seconds": total,
        "requests": request_seconds,
    }


class _NoContinuation:
    """Passes backup tasks to the real queue and keeps the continuation's page token, so this loop plays the
    continuation tasks itself (in production the queue delivers them as separate requests)."""

    last_token: str | None = None

    def __init__(self, queue: Any):
        self.queue = queue

    def enqueue_many(self, tasks: Any) -> list[bool]:
        if len(tasks) == 1 and tasks[0].path.endswith("/fanout"):
            _NoContinuation.last_token = tasks[0].payload["page_token"]
            return [True]
        return self.queue.enqueue_many(tasks)


def naive(endpoint: str) -> dict[str, Any]:
    """Zone by zone with disks.list, the loop a user writes first; all of it in one request."""
    from kinds.disks import snapshots as disks

    compute = disks.compute_client(runtime(endpoint), endpoint)
    compute.zones().list(project=PROJECTS[0]).execute()  # warm-up, as above
    found, calls, began = 0, 0, time.perf_counter()
    for project in PROJECTS:
        zones = compute.zones().list(project=project).execute()
        calls += 1
        for zone in zones.get("items", []):
            request = compute.disks().list(project=project, zone=zone["name"])
            while request is not None:
                response = request.execute()
                calls += 1
                found += sum(1 for d in response.get("items", []) if LABEL in (d.get("labels") or {}))
                request = compute.disks().list_next(request, response)
    total = time.perf_counter() - began
    return {"targets": found, "enqueued": 0, "calls": calls, "seconds": total, "requests": [total]}


def in_child(function: Any, *args: Any) -> dict[str, Any]:
    """Run ``function`` in a forked process; its result plus that process's own peak RSS."""
    parent, child = multiprocessing.Pipe()

    def body() -> None:
        result = function(*args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child.send(result)

    process = multiprocessing.get_context("fork").Process(target=body)
    process.start()
    result = parent.recv()
    process.join()
    return result


def main() -> None:
    context = multiprocessing.get_context("fork")
    port_pipe, port_child = context.Pipe()
    stop = context.Event()
    server = context.Process(target=serve, args=(port_child, stop), daemon=True)
    server.start()
    from bench.fanout import serve as serve_tasks

    tasks_server = serve_tasks(LATENCY_SECONDS)
    tasks_endpoint = f"http://127.0.0.1:{tasks_server.server_address[1]}"
    try:
        endpoint = port_pipe.recv()
        rows = [
            ("backup-scheduler, page 200", in_child(ours, endpoint, tasks_endpoint, 200)),
            ("backup-scheduler, page 500", in_child(ours, endpoint, tasks_endpoint, 500)),
            ("naive disks.list per zone", in_child(naive, endpoint)),
        ]
    finally:
        tasks_server.shutdown()
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()
    print(
        f"{LABELLED_DISKS} labelled + {UNLABELLED_DISKS} unlabelled disks, {len(ZONES)} zones, {len(PROJECTS)}"
        f" projects; fake Compute over HTTP on 127.0.0.1 answering after {LATENCY_SECONDS * 1000:.0f} ms"
    )
    header = (
        f"{'approach':30} {'disks':>6} {'enqueued':>8} {'requests':>9} {'total s':>8} {'disks/s':>8}"
        f" {'longest request s':>18}"
        f" {'p50 request s':>14} {'% of 600 s':>10} {'peak RSS MiB':>12}"
    )
    print(header)
    for name, r in rows:
        longest = max(r["requests"])
        print(
            f"{name:30} {r['targets']:>6} {r['enqueued']:>8} {r['calls']:>9} {r['seconds']:>8.2f}"
            f" {r['targets'] / r['seconds']:>8.0f}"
            f" {longest:>18.3f} {statistics.median(r['requests']):>14.3f}"
            f" {100 * longest / CRON_DEADLINE_SECONDS:>9.2f}% {r['peak_rss_mib']:>12.1f}"
        )
    base = rows[2][1]
    for name, r in rows[:2]:
        print(
            f"{name}: listed and enqueued {r['enqueued'] / r['seconds']:.0f} tasks/s; vs naive listing alone:"
            f" {r['seconds'] / base['seconds']:.1f}x the time,"
            f" longest single request {max(base['requests']) / max(r['requests']):.0f}x shorter"
        )


if __name__ == "__main__":
    main()
