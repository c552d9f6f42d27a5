"""The status page, /api/status and /metrics at 100,000 targets with a week of run history in the Datastore
emulator, served by gunicorn as App Engine runs it; and one shared cause on 10,000 targets through the alert groups.

Part 1 seeds the emulator with what the service itself writes (run records, target states, summary shards,
attention entities: the same code builds them, in bulk), starts the app (gunicorn, 1 worker, 8 threads, as in
app.yaml) and times each URL as a browser or Prometheus would fetch it: median of several requests, and the
worker's peak memory per request (its high-water mark reset before each request, through /proc). The naive
alternative is what the page did before summaries existed and what a first version does: read every target's state
(and stale alert) for every request; it is timed once in this process on the same data.

Part 2 records one cause (PERMISSION_DENIED) on 10,000 targets of one plan, then the stale check, then recovery,
each stage flushed as the notify queue would, and counts the messages that reach a local webhook server.

    .venv/bin/python bench/status.py --lock "$BENCH_LOCK" [--targets 100000] [--days 7] [--alert-targets 10000]

Seeding 800,000 entities takes minutes and is not timed, so the shared benchmark lock (``--lock``, an flock file)
is held only while timing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services import summary  # noqa: E402
from services.catalog import DRILL, FAILED, NAMESPACE, SUCCEEDED, Catalog, RunRecord, TargetState  # noqa: E402
from services.local_emulators import datastore_emulator_command  # noqa: E402

PROJECT = "bench-status"
TOKEN = "bench-status-token"
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
# Plans: (name, kind, share of the targets). The datastore plan has 40 kinds (it gets the growth chart and drills).
PLANS = [
    ("disks-prod", "disks", 0.40),
    ("disks-dev", "disks", 0.25),
    ("shares-prod", "filestore", 0.15),
    ("disks-batch", "disks", 0.10),
    ("disks-edge", "disks", 0.0996),
    ("datastore-nightly", "datastore", 0.0004),
]


def plans_yaml(path: Path) -> None:
    lines = ["plans:"]
    for name, kind, _share in PLANS:
        lines.append(f"  {name}:")
        lines.append(f"    kind: {kind}")
        lines.append("    rpo_hours: 26")
        if kind == "datastore":
            lines += [
                "    destination: {bucket: bench-backups}",
                "    options: {location: us-central1}",
                "    drill: {every: 7d}",
            ]
        elif kind == "filestore":
            lines.append("    select: {projects: [bench-prod], label: backup-keep}")
        else:
            lines.append("    select: {projects: [bench-prod]}")
    path.write_text("\n".join(lines) + "\n")


def start_emulator(port: int, workdir: Path) -> subprocess.Popen:
    log = open(workdir / "emulator.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(datastore_emulator_command(port, workdir / "data"), stdout=log, stderr=log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}", timeout=1).ok:
                return process
        except requests.ConnectionError:
            time.sleep(0.2)
    raise SystemExit("the Datastore emulator did not start")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------------ seeding


def seed(client, targets: int, days: int) -> dict[str, int]:
    """Targets spread over the plans; each ran once a day for ``days`` days. About 1 % fail since yesterday, 0.3 %
    stopped running 3 days ago (stale), the rest are fine. Written in bulk with the service's own entity code."""
    catalog = Catalog(client)
    rng = random.Random(17)
    counts = {"targets": 0, "runs": 0, "failing": 0, "stale": 0}
    batch: list = []

    def flush(force: bool = False) -> None:
        if batch and (force or len(batch) >= 400):
            client.put_multi(batch)
            batch.clear()

    for plan, kind, share in PLANS:
        n = max(1, round(targets * share))
        shards = [summary.Shard() for _ in range(summary.SHARDS)]
        for i in range(n):
            target = (
                f"kind{i:02d}"
                if kind == "datastore"
                else f"projects/bench-prod/zones/us-central1-a/disks/{plan}-{i:06d}"
            )
            roll = rng.random()
            fate = "failing" if roll < 0.01 else "stale" if roll < 0.013 else "fine"
            state = TargetState(plan, target)
            last_day = days - (3 if fate == "stale" else 0)
            for day in range(last_day):
                at = NOW - timedelta(days=days - day - 1, hours=10, minutes=rng.randrange(0, 50))
                status = FAILED if fate == "failing" and day == last_day - 1 else SUCCEEDED
                record = RunRecord(
                    run_id=f"{plan}-{i:06d}-{day}",
                    plan=plan,
                    target=target,
                    kind=kind,
                    period=at.replace(minute=0),
                    status=status,
                    created=at - timedelta(minutes=2),
                    started=at - timedelta(minutes=2),
                    ended=at,
                    attempts=1,
                    error="PERMISSION_DENIED: compute.snapshots.create" if status == FAILED else None,
                    output=None if status == FAILED else f"projects/bench-prod/global/snapshots/{plan}-{i}-{day}",
                    stats={"kinds": {target: {"entities": 1000 + 40 * day + i, "bytes": 400_000 + day * 9000}}}
                    if kind == "datastore"
                    else {"bytes": 10_000_000_000},
                    log=[f"snapshot of {target} started", status],
                )
                state.record_run(record)
                batch.append(catalog._to_entity(record))
                counts["runs"] += 1
                flush()
            if kind == "datastore":
                drill = RunRecord(
                    run_id=f"{plan}-{i:06d}-drill",
                    plan=plan,
                    target=target,
                    kind=kind,
                    period=NOW - timedelta(days=1),
                    status=SUCCEEDED,
                    ended=NOW - timedelta(hours=20),
                    stats={"restored_in_seconds": 30.0 + i},
                    purpose=DRILL,
                )
                state.record_run(drill)
            part = summary.Contribution.of(state)
            shards[summary.shard_of(plan, target)].apply(target, None, part)
            batch.append(catalog._target_entity(catalog._target_key(plan, target), state))
            if part is not None and part.needs_attention:
                key = summary.attention_key(client, NAMESPACE, plan, summary.STATE_REASON, target)
                batch.append(summary.attention_entity(client, key, plan, summary.STATE_REASON, target, NOW))
            if fate == "stale":  # what the hourly stale check has marked
                key = summary.attention_key(client, NAMESPACE, plan, summary.STALE_REASON, target)
                batch.append(summary.attention_entity(client, key, plan, summary.STALE_REASON, target, NOW))
            counts["targets"] += 1
            counts[fate] = counts.get(fate, 0) + 1
            flush()
        for index, shard in enumerate(shards):
            batch.append(summary.shard_entity(client, summary.shard_key(client, NAMESPACE, plan, index), plan, shard))
        marker = summary.datastore_entity(summary.built_key(client, NAMESPACE, plan))
        marker.update({"plan": plan, "built_at": NOW})
        batch.append(marker)
        flush(force=True)
    flush(force=True)
    return counts


# ------------------------------------------------------------------------------------------------ part 1


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def time_urls(base: str, pid: int, repeats: int) -> list[dict]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    rows = []
    for path in ("/", "/api/status", "/metrics"):
        requests.get(base + path, headers=headers, timeout=600).raise_for_status()  # warm (clients, templates)
        seconds, peaks, sizes = [], [], []
        for _ in range(repeats):
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the worker's peak RSS
            before = rss_kib(pid, "VmRSS")
            start = time.perf_counter()
            response = requests.get(base + path, headers=headers, timeout=600)
            seconds.append(time.perf_counter() - start)
            response.raise_for_status()
            peaks.append((rss_kib(pid, "VmHWM") - before) / 1024)
            sizes.append(len(response.content))
        rows.append(
            {
                "url": path,
                "median_s": statistics.median(seconds),
                "max_s": max(seconds),
                "peak_mb": max(peaks),
                "bytes": statistics.median(sizes),
            }
        )
    return rows


def naive(client) -> dict:
    """Every target's state and every stale alert, read for one request (the page before summaries)."""
    from services.stale import STALE_KIND

    tracemalloc.start()
    start = time.perf_counter()
    states = Catalog(client).target_states()
    alerts = list(client.query(kind=STALE_KIND, namespace=NAMESPACE).fetch())
    body = json.dumps([s.to_json() for s in states])
    seconds = time.perf_counter() - start
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "seconds": seconds,
        "peak_mb": peak / 2**20,
        "targets": len(states),
        "alerts": len(alerts),
        "bytes": len(body),
    }


# ------------------------------------------------------------------------------------------------ part 2


class Webhook(ThreadingHTTPServer):
    daemon_threads = True


def webhook() -> tuple[Webhook, list[dict]]:
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = Webhook(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def alerts_bench(client, count: int, workdir: Path) -> list[dict]:
    import logging

    from services import alerts, notify
    from services.plans import parse_plan
    from services.queue import LocalQueue
    from services.runtime import Runtime, Settings
    from services.stale import check_stale

    logging.disable(logging.ERROR)  # one log line per target and stage is what the service logs; not the figures
    server, received = webhook()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    plan = parse_plan(
        "disks-alerting",
        {"kind": "disks", "rpo_hours": 26, "select": {"projects": ["bench-prod"]}, "notify": {"webhook_env": "HOOK"}},
    )
    clock = {"now": NOW}
    env = {"BACKUP_PROJECT": PROJECT, "HOOK": url, "DATASTORE_EMULATOR_HOST": os.environ["DATASTORE_EMULATOR_HOST"]}
    rt = Runtime(Settings.from_env(env), plans={plan.name: plan}, clock=lambda: clock["now"])
    queue = LocalQueue(workdir / "alerts-queue.sqlite3")
    catalog = Catalog(client)
    names = [f"projects/bench-prod/zones/us-central1-a/disks/alerting-{i:05d}" for i in range(count)]

    def deliver_stage(stage: str, started: float) -> dict:
        before = len(received)
        flushed = 0
        while True:
            flushes = [t for t in queue.tasks("pending") if t["path"] == alerts.FLUSH_PATH]
            if not flushes:
                break
            for task in flushes:
                queue.settle(task["name"], state="done", status=200, error=None)
                body = json.loads(task["payload"])
                alerts.flush(rt, body["plan"], body["group"], queue=queue)
                flushed += 1
        for task in queue.tasks("pending"):
            if task["path"] == notify.NOTIFY_PATH:
                queue.settle(task["name"], state="done", status=200, error=None)
                notify.deliver(rt, notify.Message.from_json(json.loads(task["payload"])))
        return {
            "stage": stage,
            "targets": count,
            "messages": len(received) - before,
            "flush_tasks": flushed,
            "seconds": time.perf_counter() - started,
            "first_line": received[-1]["text"].splitlines()[0] if len(received) > before else "",
        }

    stages = []
    for name in names:  # a good copy a day ago
        catalog.save(_run(plan.name, name, SUCCEEDED, NOW - timedelta(hours=24)))
    started = time.perf_counter()
    for name in names:  # the role is revoked: every run fails the same way
        record = _run(plan.name, name, FAILED, NOW - timedelta(minutes=30))
        catalog.save(record)
        notify.run_finished(rt, plan, record, queue)
    stages.append(deliver_stage("failed", started))
    clock["now"] = NOW + timedelta(hours=3)  # 27 h since the last good copies
    started = time.perf_counter()
    check_stale(rt, catalog, queue=queue)
    stages.append(deliver_stage("stale", started))
    clock["now"] = NOW + timedelta(hours=4)
    started = time.perf_counter()
    for name in names:  # the role is back
        record = _run(plan.name, name, SUCCEEDED, clock["now"] - timedelta(minutes=5))
        catalog.save(record)
        notify.run_finished(rt, plan, record, queue)
    check_stale(rt, catalog, queue=queue)
    stages.append(deliver_stage("recovered", started))
    server.shutdown()
    return stages


def _run(plan: str, target: str, status: str, at: datetime) -> RunRecord:
    return RunRecord(
        run_id=f"{plan}-{target.rsplit('/', 1)[-1]}-{at:%Y%m%d%H%M}",
        plan=plan,
        target=target,
        kind="disks",
        period=at,
        status=status,
        created=at,
        started=at,
        ended=at,
        attempts=1,
        error=f"PERMISSION_DENIED: backup@bench lacks compute.snapshots.create on {target}"
        if status == FAILED
        else None,
        output=f"projects/bench-prod/global/snapshots/{target.rsplit('/', 1)[-1]}" if status == SUCCEEDED else None,
    )


# ------------------------------------------------------------------------------------------------ main


@contextlib.contextmanager
def bench_lock(path: str | None):
    """Hold the shared benchmark lock (flock) while timing, so other benchmarks on the machine wait."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--alert-targets", type=int, default=10_000)
    parser.add_argument("--skip-naive", action="store_true", help="do not time the read-everything request")
    parser.add_argument("--lock", default=os.environ.get("BENCH_LOCK"), help="flock file held while timing")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-status-"))
    ds_port, app_port = free_port(), free_port()
    emulator = start_emulator(ds_port, workdir)
    os.environ["DATASTORE_EMULATOR_HOST"] = f"127.0.0.1:{ds_port}"
    os.environ["DATASTORE_PROJECT_ID"] = PROJECT
    from google.cloud import datastore

    client = datastore.Client(project=PROJECT)
    app = None
    try:
        start = time.perf_counter()
        counts = seed(client, args.targets, args.days)
        print(f"seeded {counts} in {time.perf_counter() - start:.0f} s", flush=True)
        plans_yaml(workdir / "plans.yaml")
        (workdir / "cron.yaml").write_text("cron: []\n")
        env = os.environ | {
            "BACKUP_PROJECT": PROJECT,
            "BACKUP_PLANS": str(workdir / "plans.yaml"),
            "BACKUP_CRON_YAML": str(workdir / "cron.yaml"),
            "BACKUP_LOCAL_TOKEN": TOKEN,
            "BACKUP_LOCAL_QUEUE_DB": str(workdir / "queue.sqlite3"),
        }
        app_log = open(workdir / "app.log", "w")  # noqa: SIM115 - lives as long as the app
        app = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{app_port}", "--workers", "1", "--threads", "8",
             "--timeout", "0", "main:app"],
            cwd=ROOT, env=env, stdout=app_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{app_port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(base + "/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        with bench_lock(args.lock):
            rows = time_urls(base, worker_pid(app.pid), args.repeats)
            result = None if args.skip_naive else naive(client)
        print(f"\n{counts['targets']:,} targets, {counts['runs']:,} run records ({counts['failing']:,} failing,"
              f" {counts['stale']:,} stale), gunicorn 1 worker x 8 threads, {args.repeats} requests each")  # fmt: skip
        print("| request | median s | max s | peak MB per request | response KB |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(f"| `{row['url']}` | {row['median_s']:.3f} | {row['max_s']:.3f} | {row['peak_mb']:.1f} |"
                  f" {row['bytes'] / 1000:.0f} |")  # fmt: skip
        if result is not None:
            slowest = max(r["median_s"] for r in rows)
            print(f"| naive: read every target's state and alert | {result['seconds']:.1f} | - |"
                  f" {result['peak_mb']:.0f} (Python heap) | {result['bytes'] / 1000:.0f} |")  # fmt: skip
            print(f"\nnaive / slowest of ours: {result['seconds'] / slowest:.0f}x ({result['targets']:,} states read)")
        app.terminate()
        app.wait(timeout=20)
        app = None
        with bench_lock(args.lock):
            stages = alerts_bench(client, args.alert_targets, workdir)
        print("\n| stage | targets | messages | flush tasks | seconds | first line |")
        print("|---|---|---|---|---|---|")
        for s in stages:
            print(f"| {s['stage']} | {s['targets']:,} | {s['messages']} | {s['flush_tasks']} | {s['seconds']:.1f} |"
                  f" {s['first_line'][:90]} |")  # fmt: skip
    finally:
        if app is not None:
            app.terminate()
        emulator.terminate()
        emulator.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
