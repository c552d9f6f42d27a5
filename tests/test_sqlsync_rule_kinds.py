"""Masking kinds for real schemas (issue 16 #10): dates, card numbers, addresses and paths inside JSON; unit-tested,
then through a whole sync on real MariaDB, streamed and in place alike."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import pytest

from kinds.sqlsync import kind as sqlsync
from kinds.sqlsync.masking import ColumnRule, Masker, _luhn_digit
from services.kinds import RunContext
from services.plans import parse_plan
from tests.sqlsync_data import make_sync_setup

SECRET = b"test-secret-0123456789abcdef"
MASKER = Masker(SECRET)


def _card(body: str, separator: str) -> str:
    """``body`` with its Luhn check digit, in groups of four."""
    digits = body + _luhn_digit(body)
    return separator.join(digits[i : i + 4] for i in range(0, len(digits), 4))


def _passes_luhn(number: str) -> bool:
    digits = "".join(c for c in number if c.isdigit())
    return _luhn_digit(digits[:-1]) == digits[-1]


def test_dates_move_by_at_most_the_rules_days_and_keep_their_form():
    moved = [MASKER.date(f"1980-03-{day:02d} 12:30:00", days=30) for day in range(1, 29)]

    shifts = [
        (date.fromisoformat(m[:10]) - date(1980, 3, day)).days for day, m in zip(range(1, 29), moved, strict=True)
    ]
    assert all(-30 <= s <= 30 for s in shifts) and len(set(shifts)) > 5
    assert all(m.endswith(" 12:30:00") for m in moved)
    assert MASKER.date("1980-03-01") == Masker(SECRET).date("1980-03-01")  # the same date moves alike everywhere
    assert MASKER.date("0000-00-00") == "0000-00-00"


def test_card_numbers_keep_issuer_length_and_separators_and_pass_luhn():
    bodies = [f"411111111111{n:03d}" for n in range(200)]
    cards = [_card(b, " ") for b in bodies]

    masked = [MASKER.card(c) for c in cards]

    assert all(
        m[:7] == "4111 11" and len(m) == len(c) and m[4] == m[9] == m[14] == " "
        for m, c in zip(masked, cards, strict=True)
    )
    assert all(_passes_luhn(m) for m in masked)
    assert len({m[:-1] for m in masked}) == 200 and not set(masked) & set(cards)


def test_addresses_are_replaced_whole_and_alike_for_the_same_address():
    one, same = MASKER.address("221B Baker Street, London"), MASKER.address("221b  baker street, london")

    assert one == same and "221" not in one and "London" not in one


def test_json_paths_are_masked_and_everything_else_is_kept():
    rule = ColumnRule("accounts", "prefs", "json", "json", paths=(("contact.email", "email"), ("phones", "phone")))
    document = {"contact": {"email": "ann@real-mail.com", "lang": "fr"}, "phones": ["+44 20 7946 0958"], "n": 3}

    masked = json.loads(MASKER.json_value(rule, json.dumps(document)))

    assert masked["contact"]["lang"] == "fr" and masked["n"] == 3
    assert masked["contact"]["email"].endswith("@example.com") and masked["phones"][0].startswith("+44 ")
    assert masked["phones"][0] != document["phones"][0]


def test_a_json_rule_without_paths_is_refused_in_the_plan(mariadb_servers, tmp_path, monkeypatch):
    from services.errors import ConfigError

    setup = make_sync_setup(mariadb_servers, tmp_path, monkeypatch)
    setup["raw"]["options"]["rules"]["accounts"]["notes"] = "json"

    with pytest.raises(ConfigError, match="'options.rules.accounts.notes.paths': give paths"):
        parse_plan("staging-refresh", setup["raw"])


EXTRA = (
    "CREATE TABLE profiles (id INT PRIMARY KEY, born DATE NULL, card VARCHAR(25) NULL, home VARCHAR(120) NULL,"
    " prefs JSON NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
)


def _profiles(n: int = 40) -> list[tuple]:
    return [
        (
            i,
            f"19{50 + i % 40}-0{1 + i % 9}-1{i % 10}",
            _card(f"550000000000{i:03d}", "-"),
            f"{i} Zebulon Quixotic Road",
            json.dumps({"contact": {"email": f"Profile.{i}@Real-Mail.com"}, "theme": "dark"}),
        )
        for i in range(1, n + 1)
    ]


@pytest.mark.parametrize("mask_mode", ["stream", "in-place"])
def test_the_new_kinds_mask_a_real_table_alike_streamed_and_in_place(mariadb_servers, tmp_path, monkeypatch, mask_mode):
    setup = make_sync_setup(mariadb_servers, tmp_path, monkeypatch, mask_mode=mask_mode)
    production, prod_db = setup["production"]
    production.execute(EXTRA, database=prod_db)
    with production.connect(prod_db) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO profiles VALUES (%s, %s, %s, %s, %s)", _profiles())
    setup["raw"]["options"]["rules"]["profiles"] = {
        "born": {"kind": "date", "days": 60},
        "card": "card",
        "home": "address",
        "prefs": {"kind": "json", "paths": {"contact.email": "email"}},
    }
    plan = parse_plan("staging-refresh", setup["raw"])

    sqlsync.drive(plan, RunContext("r1", plan.name, "t", datetime(2026, 11, 23, 2, tzinfo=UTC)), setup["rt"])

    staging, staging_db = setup["staging"]
    rows = staging.execute("SELECT id, born, card, home, prefs FROM profiles ORDER BY id", database=staging_db)
    originals = {row[0]: row for row in _profiles()}
    assert len(rows) == 40
    for pid, born, card, home, prefs in rows:
        original = originals[pid]
        assert abs((born - date.fromisoformat(original[1])).days) <= 60
        assert card != original[2] and card.startswith("5500-00") and _passes_luhn(card)
        assert "Zebulon" not in home and home == Masker(b"a-test-secret-of-enough-length").address(original[3])
        assert json.loads(prefs)["theme"] == "dark" and "Real-Mail" not in prefs
    expected = {pid: Masker(b"a-test-secret-of-enough-length").card(row[2]) for pid, row in originals.items()}
    assert {pid: card for pid, _, card, _, _ in rows} == expected  # the same in both modes: one Masker
