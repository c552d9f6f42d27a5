"""Benchmark: enumerating 10,000 labelled disks (100 zones, 3 projects) for one cron run.

The fake Compute (tests/fakes_compute.py) runs as a real HTTP server on 127.0.0.1 in a child process and waits
~20 ms before answering each call; the real googleapiclient talks to it over HTTP. Compared in the same run:

- backup-scheduler: ``services.disks.enumerate_targets``, one ``disks.aggregatedList`` page (label filter) per
  fan-out request, each page turned into task bodies, the page token handed on;
- naive: what a script would do by hand: per project ``zones.list``, then ``disks.list`` zone by zone, keeping
  the labelled disks, all inside one request.

Each approach runs in its own forked process so its peak RSS is its own. Enqueueing into Cloud Tasks is not part
of this measurement (the queue is not in this branch): a fan-out request's time here is list + task bodies.

Run: ``/work/venv/bin/python bench/disks.py`` (about a minute).
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
import sys
import time
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


def ours(endpoint: str, page_size: int) -> dict[str, Any]:
    """The fan-out as the service does it: each loop turn is one fan-out request (page + task bodies)."""
    from services import disks
    from services.plans import parse_plan

    plan = parse_plan("bench", {"kind": "disks", "select": {"projects": list(PROJECTS)}, "fanout_page_size": page_size})
    rt = runtime(endpoint)
    disks.enumerate_targets(plan, None, rt)  # warm-up: builds the client, opens the connection
    request_seconds: list[float] = []
    targets, token, began = 0, None, time.perf_counter()
    while True:
        start = time.perf_counter()
        page = disks.enumerate_targets(plan, token, rt)
        bodies = [json.dumps({"plan": plan.name, "target": t.to_json()}) for t in page.targets]
        request_seconds.append(time.perf_counter() - start)
        targets += len(bodies)
        token = page.next_page_token
        if token is None:
            break
    total = time.perf_counter() - began
    return {"targets": targets, "calls": len(request_seconds), "seconds": total, "requests": request_seconds}


def naive(endpoint: str) -> dict[str, Any]:
    """Zone by zone with disks.list, the loop a user writes first; all of it in one request."""
    from services import disks

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
    return {"targets": found, "calls": calls, "seconds": total, "requests": [total]}


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
    try:
        endpoint = port_pipe.recv()
        rows = [
            ("backup-scheduler, page 200", in_child(ours, endpoint, 200)),
            ("backup-scheduler, page 500", in_child(ours, endpoint, 500)),
            ("naive disks.list per zone", in_child(naive, endpoint)),
        ]
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()
    print(
        f"{LABELLED_DISKS} labelled + {UNLABELLED_DISKS} unlabelled disks, {len(ZONES)} zones, {len(PROJECTS)}"
        f" projects; fake Compute over HTTP on 127.0.0.1 answering after {LATENCY_SECONDS * 1000:.0f} ms"
    )
    header = (
        f"{'approach':30} {'disks':>6} {'API calls':>9} {'total s':>8} {'disks/s':>8} {'longest request s':>18}"
        f" {'p50 request s':>14} {'% of 600 s':>10} {'peak RSS MiB':>12}"
    )
    print(header)
    for name, r in rows:
        longest = max(r["requests"])
        print(
            f"{name:30} {r['targets']:>6} {r['calls']:>9} {r['seconds']:>8.2f} {r['targets'] / r['seconds']:>8.0f}"
            f" {longest:>18.3f} {statistics.median(r['requests']):>14.3f}"
            f" {100 * longest / CRON_DEADLINE_SECONDS:>9.2f}% {r['peak_rss_mib']:>12.1f}"
        )
    base = rows[2][1]
    for name, r in rows[:2]:
        print(
            f"{name} vs naive: {base['seconds'] / r['seconds']:.1f}x faster in total,"
            f" {base['calls'] / r['calls']:.1f}x fewer API calls,"
            f" longest single request {max(base['requests']) / max(r['requests']):.0f}x shorter"
        )


if __name__ == "__main__":
    main()
