"""Test data for the sqlsync tests: a small shop (accounts with personal data, orders referencing them) in
production, and staging's own rows (demo accounts with colliding ids, their orders, a stale copy)."""

from __future__ import annotations

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
