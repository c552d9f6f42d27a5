"""Benchmark: a full masked sync (kind sqlsync, local profile) against the floor a user would otherwise pay, a plain
``mariadb-dump | mariadb`` copy of the same database, measured in the same run on the same servers.

    .venv/bin/python bench/sqlsync.py --users 1000000      # 1M users (email, phone, name) + 3M orders
    .venv/bin/python bench/sqlsync.py --users 1000000 --stage cloud-mask

``--stage cloud-mask`` measures the cloudsql profile's masking stage instead: the production export as Cloud SQL
writes it (a gzip'd dump object, here in a GCS emulator running as its own process) masked into another object
(kinds/sqlsync/cloud.py ``mask_export``: download, unzip, mask, zip, upload), against the same object copied without
masking (download, unzip, zip, upload: what a user's own ``gsutil cat | gunzip | gzip | gsutil cp`` would cost),
and the masking alone (the unzipped dump masked into nothing).

Starts two throw-away MariaDB servers (production; staging, which also holds the scratch database, so the masked
tables are moved into staging by RENAME TABLE) on loopback ports and stops them at the end. The floor is the
faster of two plain copies, one before and one after the sync.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.auth.credentials import AnonymousCredentials  # noqa: E402

from kinds.sqlsync import kind as sqlsync  # noqa: E402
from services.kinds import RunContext  # noqa: E402
from services.plans import parse_plan  # noqa: E402
from services.runtime import Runtime, Settings  # noqa: E402
from tests.fixtures.mariadb import start_mariadb  # noqa: E402


def schema(users_table: str) -> list[str]:
    return [statement.replace("users", users_table) for statement in SCHEMA]


SCHEMA = [
    "CREATE TABLE users (id INT PRIMARY KEY, email VARCHAR(255) NOT NULL, phone VARCHAR(32) NOT NULL,"
    " name VARCHAR(100) NOT NULL, demo TINYINT NOT NULL DEFAULT 0, UNIQUE KEY uq_email (email),"
    " UNIQUE KEY uq_phone (phone)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE orders (id INT PRIMARY KEY, user_id INT NOT NULL, total DECIMAL(10,2) NOT NULL,"
    " created DATETIME NOT NULL, CONSTRAINT fk_user FOREIGN KEY (user_id) REFERENCES users (id))"
    " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
]


def load_production(server, database: str, users: int, users_table: str = "users") -> None:
    """Generated in the server (sequence engine), so loading is not part of any measured figure."""
    with server.connect(database) as conn, conn.cursor() as cur:
        for statement in schema(users_table):
            cur.execute(statement)
        # Every phone shares "+1 555" and the users' emails share a domain: the masking's collision handling is
        # exercised on realistic, clustered values.
        cur.execute(
            f"INSERT INTO {users_table} (id, email, phone, name) SELECT seq, CONCAT('user', seq, '@corp-mail.com'),"
            f" CONCAT('+1 555 ', LPAD(seq, 7, '0')), CONCAT('Given', seq, ' Family', seq % 977)"
            f" FROM seq_1_to_{users}"
        )
        cur.execute(
            f"INSERT INTO orders (id, user_id, total, created) SELECT seq, 1 + (seq * 7919) % {users},"
            f" (seq % 10000) / 100, '2026-01-01' + INTERVAL (seq % 300) DAY FROM seq_1_to_{users * 3}"
        )


def plain_copy(production, database: str, target, target_db: str) -> float:
    """The floor: ``mariadb-dump | mariadb`` between the same servers, with the same dump options."""
    started = time.perf_counter()
    dump = subprocess.Popen(
        [
            "mariadb-dump",
            "--protocol=TCP",
            "-h127.0.0.1",
            f"-P{production.port}",
            "-uroot",
            "--single-transaction",
            "--quick",
            "--skip-lock-tables",
            "--hex-blob",
            "--no-tablespaces",
            database,
        ],
        stdout=subprocess.PIPE,
    )
    load = subprocess.run(
        ["mariadb", "--protocol=TCP", "-h127.0.0.1", f"-P{target.port}", "-uroot", target_db], stdin=dump.stdout
    )
    dump.stdout.close()  # type: ignore[union-attr]
    if dump.wait() != 0 or load.returncode != 0:
        raise SystemExit("plain copy failed")
    return time.perf_counter() - started


def cloud_mask_stage(args: argparse.Namespace) -> None:
    import gzip
    import shutil
    import socket
    import statistics

    from google.cloud import storage

    from kinds.sqlsync import cloud, dumps, stream
    from kinds.sqlsync.masking import Masker
    from kinds.sqlsync.plan import DatabaseRef

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prod = start_mariadb("production", root, buffer_pool="2G")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        emulator = subprocess.Popen(
            [str(Path(sys.executable).parent / "gcp-storage-emulator"), "start", f"--port={port}", "--in-memory", "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
            prod.fresh_database("shop")
            load_production(prod, "shop", args.users, args.users_table)
            dump = root / "export.sql"
            dumps.dump_database(DatabaseRef("production", "shop", host="127.0.0.1", port=prod.port), dump)
            client = storage.Client(project="bench", credentials=AnonymousCredentials())
            for _ in range(100):
                try:
                    client.create_bucket("bench-dumps")
                    break
                except Exception:
                    time.sleep(0.1)
            plan = parse_plan(
                "bench",
                {
                    "kind": "sqlsync",
                    "select": {"instance": "bench:r:prod", "database": "shop"},
                    "destination": {
                        "staging": {"instance": "bench:r:staging", "database": "shop"},
                        "scratch": {"instance": "bench:r:staging", "database": "shop_scratch"},
                        "bucket": "gs://bench-dumps/x",
                    },
                    "options": {
                        "secret_env": "SQLSYNC_BENCH_SECRET",
                        "mask_workers": args.workers,
                        "rules": {args.users_table: {"email": "email", "phone": "phone", "name": "name"}},
                    },
                },
            )
            rt = Runtime(Settings.from_env({}), plans={}, credentials=AnonymousCredentials())
            rt.client("storage", lambda: client)
            masker = Masker(b"bench-secret-not-for-production")
            rules = list(plan.settings.rules)
            packed = root / "export.sql.gz"
            with open(dump, "rb") as source, gzip.open(packed, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            print(f"export: {dump.stat().st_size / 2**20:.0f} MiB, {packed.stat().st_size / 2**20:.0f} MiB gzip'd")
            masked, copied, alone = [], [], []
            for number in range(args.runs):
                run = RunContext(f"bench-{number}", "bench", "staging-shop", datetime(2026, 12, 2, number, tzinfo=UTC))
                source = client.bucket("bench-dumps").blob(
                    cloud.dump_uri(plan, run, "production")[len("gs://bench-dumps/") :]
                )
                source.upload_from_filename(str(packed))
                started = time.perf_counter()
                report = cloud.mask_export(plan, plan.settings, masker, run, rt)
                masked.append((time.perf_counter() - started, report.rows))
                source.upload_from_filename(str(packed))
                started = time.perf_counter()
                _copy_object(source, client.bucket("bench-dumps").blob(source.name + ".copy"), root)
                copied.append(time.perf_counter() - started)
                started = time.perf_counter()
                rows = stream.mask_dump(
                    str(dump), rules, masker, lambda data: None, workers=args.workers, spool_dir=str(root)
                ).rows
                alone.append((time.perf_counter() - started, rows))
            print()
            print(f"{'':44}" + "".join(f"{'run ' + str(n + 1) + ' s':>12}" for n in range(args.runs)))
            print(f"{'copy without masking (the floor)':44}" + "".join(f"{s:12.1f}" for s in copied))
            print(f"{'mask_export (object in -> masked object out)':44}" + "".join(f"{s:12.1f}" for s, _ in masked))
            print(
                f"{'  ratio to the floor':44}"
                + "".join(f"{m / c:11.2f}x" for (m, _), c in zip(masked, copied, strict=True))
            )
            print(f"{'masking alone (no GCS, no gzip)':44}" + "".join(f"{s:12.1f}" for s, _ in alone))
            rates = [rows / seconds for seconds, rows in masked]
            each = ", ".join(f"{r:,.0f}" for r in rates)
            print(f"masked rows/s over the stage: median {statistics.median(rates):,.0f} ({each})")
            print(f"target >= 40,000 masked rows/s: {'met' if statistics.median(rates) >= 40_000 else 'NOT met'}")
        finally:
            emulator.terminate()
            emulator.wait()
            prod.stop()


def _copy_object(source, target, root: Path) -> None:
    """The same object handling as mask_export, without the masking."""
    import gzip
    import shutil

    packed, plain, repacked = root / "c.gz", root / "c.sql", root / "c2.gz"
    source.download_to_filename(str(packed), checksum=None)
    with gzip.open(packed, "rb") as unzipped, open(plain, "wb") as out:
        shutil.copyfileobj(unzipped, out, 1 << 20)
    with open(plain, "rb") as source_file, gzip.open(repacked, "wb", compresslevel=1) as out:
        shutil.copyfileobj(source_file, out, 1 << 20)
    target.upload_from_filename(str(repacked), content_type="application/gzip")
    for path in (packed, plain, repacked):
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000, help="users (orders are 3x this)")
    parser.add_argument(
        "--users-table",
        default="users",
        help="name of the masked table; 'accounts' sorts before 'orders' in the dump (nothing to overlap with)",
    )
    parser.add_argument("--runs", type=int, default=2, help="syncs in a row (run 2 is the steady state)")
    parser.add_argument("--workers", type=int, default=1, help="masking processes (options.mask_workers)")
    parser.add_argument(
        "--mask-mode", choices=("stream", "in-place"), default="stream", help="the plan's options.mask_mode"
    )
    parser.add_argument("--stage", choices=("sync", "cloud-mask"), default="sync", help="what to measure")
    args = parser.parse_args()
    if args.stage == "cloud-mask":
        cloud_mask_stage(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        servers = {}
        try:
            for name in ("production", "staging"):
                servers[name] = start_mariadb(name, root, buffer_pool="2G")
            prod, staging = servers["production"], servers["staging"]
            scratch = staging
            for server, database in ((prod, "shop"), (scratch, "shop_scratch"), (staging, "shop"), (staging, "copy")):
                server.fresh_database(database)
            started = time.perf_counter()
            load_production(prod, "shop", args.users, args.users_table)
            print(f"generated {args.users} users + {3 * args.users} orders in {time.perf_counter() - started:.1f}s")
            with staging.connect("shop") as conn, conn.cursor() as cur:
                for statement in schema(args.users_table):
                    cur.execute(statement)
                cur.execute(
                    f"INSERT INTO {args.users_table} VALUES (1, 'demo@demo.test', '+1 555 9999999', 'Demo User', 1)"
                )

            floor_before = plain_copy(prod, "shop", staging, "copy")
            staging.execute("DROP DATABASE copy")

            def ref(server, database):
                return {"host": "127.0.0.1", "port": server.port, "database": database}

            plan = parse_plan(
                "bench",
                {
                    "kind": "sqlsync",
                    "select": ref(prod, "shop"),
                    "destination": {
                        "staging": ref(staging, "shop"),
                        "scratch": ref(scratch, "shop_scratch"),
                        "dump_dir": str(root / "dumps"),
                    },
                    "options": {
                        "profile": "local",
                        "secret_env": "SQLSYNC_BENCH_SECRET",
                        "mask_workers": args.workers,
                        "mask_mode": args.mask_mode,
                        "rules": {args.users_table: {"email": "email", "phone": "phone", "name": "name"}},
                        "preserve": {args.users_table: "demo = 1"},
                        "allow": [f"{args.users_table}.demo", "orders.total", "orders.created"],
                    },
                },
            )
            rt = Runtime(
                Settings.from_env({"SQLSYNC_BENCH_SECRET": "bench-secret-not-for-production"}),
                plans={},
                credentials=AnonymousCredentials(),
            )
            results = []
            for number in range(1, args.runs + 1):
                # Run 1 finds staging nearly empty; later runs find the previous sync there (the steady state:
                # the safety dump of staging then costs as much as the production dump).
                run = RunContext(f"bench-{number}", "bench", "staging-shop", datetime.now(UTC))
                started = time.perf_counter()
                outcome = sqlsync.drive(plan, run, rt)
                results.append((number, time.perf_counter() - started, outcome, run))
            staging.fresh_database("copy")
            floor_after = plain_copy(prod, "shop", staging, "copy")
            staging.execute("DROP DATABASE copy")
            floor = min(floor_before, floor_after)
            print(f"plain copy: {floor_before:.1f}s before, {floor_after:.1f}s after the syncs; floor = the faster")
            print()
            header = "".join(f"{'run ' + str(number) + ' s':>12}" for number, *_ in results)
            print(f"{'':34}{header}")
            print(f"{'mariadb-dump | mariadb (floor)':34}" + "".join(f"{floor:12.1f}" for _ in results))
            print(f"{'sqlsync full sync (masked)':34}" + "".join(f"{total:12.1f}" for _, total, *_ in results))
            print(f"{'  ratio to the floor':34}" + "".join(f"{total / floor:11.2f}x" for _, total, *_ in results))
            for step in sqlsync.STEPS:
                cells = "".join(f"{outcome.stats['timings'][step]:12.1f}" for _, _, outcome, _ in results)
                print(f"{'  ' + step:34}{cells}")
            # Stream masking happens inside import-scratch, in-place masking in its own step.
            masking_step = "import-scratch" if args.mask_mode == "stream" else "mask"
            for number, _, outcome, run in results:
                masked = outcome.stats["masked_rows"]
                rate = masked / outcome.stats["timings"][masking_step]
                print(f"run {number}: {masked} masked rows, {rate:.0f} rows/s over step {masking_step}")
                print(*[line for line in run.log_lines if line.startswith(f"step {masking_step}:")], sep="\n")
            worst = max(total for _, total, *_ in results) / floor
            print(
                f"mask mode: {args.mask_mode}"
                + (f", {args.workers} process(es)" if args.mask_mode == "in-place" else "")
            )
            print(f"target <= 1.5x floor: {'met' if worst <= 1.5 else 'NOT met'} (worst run {worst:.2f}x)")
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
