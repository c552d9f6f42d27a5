"""Test data for the sqlsync tests: a small shop (accounts with personal data, orders referencing them) in
production, and staging's own rows (demo accounts with colliding ids, their orders, a stale copy)."""

from __future__ import annotations

import itertools

from google.auth.credentials import AnonymousCredentials

from services.plans import parse_plan
from services.runtime import Runtime, Settings

SECRET_ENV = "SQLSYNC_TEST_SECRET"
SECRET = "a-test-secret-of-enough-length"
_names = itertools.count()

SCHEMA = """
CREATE TABLE accounts (
  id INT PRIMARY KEY AUTO_INCREMENT,
  email VARCHAR(255) NOT NULL,
  phone VARCHAR(32) NULL,
  name VARCHAR(100) NOT NULL,
  notes TEXT NULL,
  ssn VARCHAR(20) NULL,
  country CHAR(2) NOT NULL,
  demo TINYINT NOT NULL DEFAULT 0,
  UNIQUE KEY uq_email (email),
  UNIQUE KEY uq_phone (phone)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE orders (
  id INT PRIMARY KEY AUTO_INCREMENT,
  account_id INT NOT NULL,
  contact_email VARCHAR(255) NULL,
  total DECIMAL(10,2) NOT NULL,
  CONSTRAINT fk_orders_account FOREIGN KEY (account_id) REFERENCES accounts (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
"""


def create_schema(server, database: str) -> None:
    with server.connect(database) as conn, conn.cursor() as cur:
        for statement in filter(str.strip, SCHEMA.split(";")):
            cur.execute(statement)


def production_rows(n: int = 120) -> list[tuple]:
    # Original names are not in the masking name lists, so any equality in staging is a real leak.
    return [
        (
            i,
            f"Customer.{i}@Real-Mail.com",
            f"+44 7700 {900000 + i:06d}",
            f"Zebulon{i} Quixotic{i}",
            f"call me on +44 7700 {900000 + i:06d}",
            f"SSN-{i:05d}",
            "FR",
        )
        for i in range(1, n + 1)
    ]


def load_shop(production, prod_db: str, staging, staging_db: str) -> None:
    create_schema(production, prod_db)
    create_schema(staging, staging_db)
    with production.connect(prod_db) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO accounts (id, email, phone, name, notes, ssn, country) VALUES (%s,%s,%s,%s,%s,%s,%s)",
            production_rows(),
        )
        cur.executemany(
            "INSERT INTO orders (account_id, contact_email, total) VALUES (%s, %s, %s)",
            [(1 + i % 120, f"Customer.{1 + i % 120}@Real-Mail.com", 10 + i) for i in range(360)],
        )
    with staging.connect(staging_db) as conn, conn.cursor() as cur:
        # Staging's own rows: two demo accounts whose ids (1, 500) partly collide with production, a demo order
        # for each, and one stale copy of an old production row that is not demo and must go.
        cur.executemany(
            "INSERT INTO accounts (id, email, phone, name, country, demo) VALUES (%s,%s,%s,%s,%s,%s)",
            [
                (1, "demo.sales@demo.test", "+1 555 0100001", "Demo Sales", "US", 1),
                (500, "demo.support@demo.test", None, "Demo Support", "US", 1),
                (2, "old.copy@real-mail.com", None, "Old Copy", "US", 0),
            ],
        )
        cur.executemany(
            "INSERT INTO orders (id, account_id, contact_email, total) VALUES (%s,%s,%s,%s)",
            [(1, 1, "demo.sales@demo.test", 99), (2, 500, None, 42)],
        )


def make_sync_setup(mariadb_servers, tmp_path, monkeypatch, mask_mode: str | None = None) -> dict:
    """Fresh production/scratch/staging databases with data, and a plan pointing at them (``mask_mode`` unset:
    the profile's default, stream masking on import for the local profile)."""
    suffix = next(_names)
    production, scratch, staging = (mariadb_servers[k] for k in ("production", "scratch", "staging"))
    prod_db = production.fresh_database(f"shop_{suffix}")
    scratch_db = scratch.fresh_database(f"shop_scratch_{suffix}")
    staging_db = staging.fresh_database(f"shop_{suffix}")
    load_shop(production, prod_db, staging, staging_db)

    def ref(server, database):
        return {"host": "127.0.0.1", "port": server.port, "database": database, "user": "root"}

    raw = {
        "kind": "sqlsync",
        "retention": {"keep": 2},
        "select": ref(production, prod_db),
        "destination": {
            "staging": ref(staging, staging_db),
            "scratch": ref(scratch, scratch_db),
            "dump_dir": str(tmp_path / "dumps"),
        },
        "options": {
            "profile": "local",
            "secret_env": SECRET_ENV,
            "rules": {
                "accounts": {
                    "email": "email",
                    "phone": "phone",
                    "name": "name",
                    "notes": "text",
                    "ssn": "null",
                    "country": {"kind": "fixed", "value": "XX"},
                },
                "orders": {"contact_email": "email"},
            },
            "preserve": {"accounts": "demo = 1", "orders": "account_id IN (SELECT id FROM accounts WHERE demo = 1)"},
            "allow": ["accounts.demo", "orders.total"],
        },
    }
    if mask_mode:
        raw["options"]["mask_mode"] = mask_mode
    rt = Runtime(Settings.from_env({SECRET_ENV: SECRET}), plans={}, credentials=AnonymousCredentials())
    return {
        "raw": raw,
        "plan": parse_plan("staging-refresh", raw),
        "rt": rt,
        "production": (production, prod_db),
        "scratch": (scratch, scratch_db),
        "staging": (staging, staging_db),
        "dumps": tmp_path / "dumps",
    }
