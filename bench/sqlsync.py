"""Benchmark: a full masked sync (kind sqlsync, local profile) against the floor a user would otherwise pay, a plain
``mariadb-dump | mariadb`` copy of the same database, measured in the same run on the same servers.

    .venv/bin/python bench/sqlsync.py --users 1000000      # 1M users (email, phone, name) + 3M orders

Starts two throw-away MariaDB servers (production; staging, which also holds the scratch database, so the masked
tables are moved into staging by RENAME TABLE) on loopback ports and stops them at the end. The floor is the
faster of two plain copies, one before and one after the sync.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000, help="users (orders are 3x this)")
    parser.add_argument(
        "--users-table",
        default="users",
        help="name of the masked table; 'accounts' sorts before 'orders' in the dump (nothing to overlap with)",
    )
    parser.add_argument("--runs", type=int, default=2, help="syncs in a row (run 2 is the steady state)")
    parser.add_argument("--workers", type=int, default=1, help="masking processes (in-place mode)")
    parser.add_argument(
        "--mask-mode", choices=("stream", "in-place"), default="stream", help="the plan's options.mask_mode"
    )
    args = parser.parse_args()
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
