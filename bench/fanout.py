"""Fan-out throughput: targets enqueued through the real Cloud Tasks client (REST transport) against a local
stand-in that answers every create after ~20 ms, our paged concurrent fan-out side by side with one-at-a-time
enqueueing, each in its own child process so peak RSS is its own.

    .venv/bin/python bench/fanout.py [--targets 10000] [--sequential 2000] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class TasksStandIn(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def serve(latency: float) -> TasksStandIn:
    names: set[str] = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Google's front ends do

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            name = body["task"].get("name", "")
            with lock:
                duplicate = name in names
                names.add(name)
            status, reply = (
                (409, {"error": {"code": 409, "message": "exists", "status": "ALREADY_EXISTS"}})
                if duplicate
                else (200, body["task"])
            )
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = TasksStandIn(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _settings(endpoint: str):
    from services.runtime import Settings

    return Settings(
        project="bench",
        on_app_engine=False,
        queue_backend="cloudtasks",
        tasks_endpoint=endpoint,
        tasks_transport="rest",
    )


def run_ours(endpoint: str, count: int, plan_name: str, out) -> None:
    """The service's own path: fan_out page by page (each page is one cron/continuation request)."""
    import kinds
    from bench import synthetic_kind
    from services.fanout import fan_out
    from services.plans import parse_plan
    from services.queue import CloudTasksQueue
    from services.runtime import Runtime

    kinds.REGISTRY["synthetic"] = synthetic_kind.REGISTRATION
    plan = parse_plan(plan_name, {"kind": "synthetic", "fanout_page_size": 500, "select": {"count": count}})
    settings = _settings(endpoint)
    rt = Runtime(settings, plans={plan_name: plan})
    queue = CloudTasksQueue(settings)
    period = datetime(2026, 11, 23, 2, tzinfo=UTC)
    token, page, enqueued, pages = None, 0, 0, []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        result = fan_out(rt, queue, plan, period, token, page)
        pages.append(time.perf_counter() - t0)
        enqueued += result.enqueued
        if not result.continuation:
            break
        page += 1
        token = str(page * plan.fanout_page_size)
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.send(
        {
            "enqueued": enqueued,
            "seconds": elapsed,
            "rss_mb": peak,
            "page_median": statistics.median(pages),
            "page_max": max(pages),
        }
    )


def run_sequential(endpoint: str, count: int, out) -> None:
    """What a user would write first: one create_task after another with the same client library."""
    from google.cloud import tasks_v2

    from services.queue import make_tasks_client

    client = make_tasks_client(_settings(endpoint))
    parent = client.queue_path("bench", "us-central1", "backups")
    started = time.perf_counter()
    for i in range(count):
        task = tasks_v2.Task(
            name=client.task_path("bench", "us-central1", "backups", f"seq-{i}"),
            app_engine_http_request=tasks_v2.AppEngineHttpRequest(relative_uri="/tasks/bench", body=b"{}"),
        )
        client.create_task(parent=parent, task=task)
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.send({"enqueued": count, "seconds": elapsed, "rss_mb": peak})


def in_child(target, *args) -> dict:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(target=target, args=(*args, child))
    process.start()
    result = parent.recv()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=2_000, help="a smaller fan-out, to show memory is flat")
    parser.add_argument("--sequential", type=int, default=2_000, help="targets for the one-at-a-time baseline")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    server = serve(args.latency_ms / 1000)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    small = in_child(run_ours, endpoint, args.small, "bench-small")
    ours = in_child(run_ours, endpoint, args.targets, "bench")
    sequential = in_child(run_sequential, endpoint, args.sequential)
    server.shutdown()
    rate = ours["enqueued"] / ours["seconds"]
    seq_rate = sequential["enqueued"] / sequential["seconds"]
    print(f"Cloud Tasks stand-in answering each create after {args.latency_ms:.0f} ms (real client, REST)")
    print(f"{'':34}{'tasks':>8}{'seconds':>10}{'tasks/s':>10}{'peak RSS MB':>13}")
    print(
        f"{'backup-scheduler fan-out':34}{ours['enqueued']:>8}{ours['seconds']:>10.1f}{rate:>10.0f}"
        f"{ours['rss_mb']:>13.0f}"
    )
    print(
        f"{'backup-scheduler fan-out (small)':34}{small['enqueued']:>8}{small['seconds']:>10.1f}"
        f"{small['enqueued'] / small['seconds']:>10.0f}{small['rss_mb']:>13.0f}"
    )
    print(
        f"{'one create_task at a time':34}{sequential['enqueued']:>8}{sequential['seconds']:>10.1f}"
        f"{seq_rate:>10.0f}{sequential['rss_mb']:>13.0f}"
    )
    print(f"throughput ratio (ours / one at a time): {rate / seq_rate:.1f}x")
    print(f"peak RSS {args.targets} vs {args.small} targets: {ours['rss_mb']:.0f} MB vs {small['rss_mb']:.0f} MB")
    print(
        f"one fan-out request (500 targets): median {ours['page_median']:.2f} s, max {ours['page_max']:.2f} s"
        " (App Engine cron/task request deadline: 600 s)"
    )


if __name__ == "__main__":
    main()
