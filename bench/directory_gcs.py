"""Benchmark: directory copies to a bucket (kinds/directory/bucket.py) on the GCS emulator behind a loopback delay line:
what an incremental copy costs against the first, in requests and in time.

The emulator (gcp-storage-emulator, in memory, without its per-write metadata dump: see ``EMULATOR``) runs as
its own process; a delay line (bench/delayline.py) holds
every chunk ``--delay-ms`` in each direction, so each request pays a round trip as it would to Cloud Storage.
One generated tree of ``--files`` files (mixed sizes, as bench/directory.py makes them); a first copy, then
``--repeats`` incremental copies, each after a fresh ``--changed`` fraction of the files changed. Requests are
counted on the client's HTTP session (kinds/directory/bucket.py ``RequestMeter``), retries included.

Targets (issue 13): incremental <= 3% of the first copy's requests and <= 0.2x its time.

Run: ``flock "$BENCH_LOCK" .venv/bin/python bench/directory_gcs.py [--files 20000] [--total-mb 160]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from delayline import DelayLine  # noqa: E402
from directory import change_files, make_tree  # noqa: E402

from kinds.directory import bucket as gcscopy  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# gcp-storage-emulator rewrites all its metadata as one JSON document on every write, even in memory (where
# nothing reads it back): each upload then costs in proportion to the objects already stored, and a first copy of
# 20,000 files stalls. The bench's emulator process skips that write, so its speed does not depend on how many
# objects it holds (as Cloud Storage's does not). Objects and metadata are kept in memory as before.
EMULATOR = """
import sys, time
from gcp_storage_emulator import storage
from gcp_storage_emulator.server import create_server
storage.Storage._write_config_to_file = lambda self: None
server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True)
server.start()
while True:
    time.sleep(3600)
"""


def start_emulator(port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", EMULATOR, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.1)
    process.kill()
    sys.exit("the GCS emulator did not start (pip install -r requirements-dev.txt)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--total-mb", type=int, default=160)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay of the loopback delay line")
    args = parser.parse_args()

    port = free_port()
    emulator = start_emulator(port)
    work = Path(tempfile.mkdtemp(prefix="bench-gcscopy-"))
    try:
        with DelayLine(port, args.delay_ms / 1000) as line:
            os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{line.port}"
            from google.cloud import storage

            client = storage.Client(project="bench")
            client.create_bucket("bench-copies")
            url = "gs://bench-copies/share"
            source = work / "source"
            source.mkdir()
            paths = make_tree(source, args.files, args.total_mb << 20)
            size = sum(p.stat().st_size for p in paths)
            print(
                f"tree: {len(paths)} files, {size / 2**20:.0f} MiB; emulator behind a {args.delay_ms:g} ms"
                f" (one way) delay line; {args.threads} upload threads; cpus: {os.cpu_count()}"
            )
            when = datetime(2026, 12, 1, tzinfo=UTC)
            t0 = time.perf_counter()
            first = gcscopy.copy_tree_to_bucket(source, client, url, when, threads=args.threads)
            first_s = time.perf_counter() - t0
            print(
                f"first copy: {first_s:.1f} s, {first.cost.requests} requests, {first.cost.objects_written} objects,"
                f" {first.cost.bytes_uploaded / 2**20:.1f} MiB uploaded"
            )
            runs = []
            for repeat in range(1, args.repeats + 1):
                changed = change_files(paths, args.changed, seed=100 + repeat)
                t0 = time.perf_counter()
                result = gcscopy.copy_tree_to_bucket(
                    source, client, url, when + timedelta(hours=repeat), threads=args.threads
                )
                seconds = time.perf_counter() - t0
                runs.append((seconds, result.cost.requests))
                print(
                    f"incremental {repeat} ({changed} changed): {seconds:.2f} s, {result.cost.requests} requests,"
                    f" {result.cost.objects_written} objects, {result.cost.bytes_uploaded / 2**20:.2f} MiB uploaded"
                )
            t0 = time.perf_counter()
            pruned = gcscopy.prune_bucket_copies(client, url, keep=2, min_keep=1, now=when + timedelta(days=1))
            print(
                f"retention keep=2: {time.perf_counter() - t0:.2f} s, {len(pruned.deleted)} copies and"
                f" {pruned.cost.objects_deleted} objects deleted, {pruned.cost.requests} requests"
            )
            seconds = statistics.median(s for s, _ in runs)
            requests = statistics.median(r for _, r in runs)
            print(
                f"\nincremental / first (medians of {len(runs)}): requests {requests / first.cost.requests:.2%}"
                f" (target <= 3%), time {seconds / first_s:.3f}x (target <= 0.2x)"
            )
    finally:
        emulator.terminate()
        emulator.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
