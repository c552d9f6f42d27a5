"""The masking engine: deterministic, unique (proved on 1M values with forced collisions) and realistic."""

from __future__ import annotations

import random
import re

import pytest

from kinds.sqlsync.masking import FIRST_NAMES, LAST_NAMES, ColumnRule, Masker, is_reserved_email_domain

SECRET = b"test-secret-0123456789abcdef"
EMAIL = ColumnRule("users", "email", "email", "email")
PHONE = ColumnRule("users", "phone", "phone", "phone")
HASH = ColumnRule("users", "token", "hash", "hash", length=8)
EMAIL_SHAPE = re.compile(r"^[a-z]+\.[a-z]+\.[0-9a-f]{20}@example\.com$")


def test_same_input_masks_alike_across_maskers_tables_and_runs():
    first_run, second_run = Masker(SECRET), Masker(SECRET)
    orders_email = ColumnRule("orders", "contact_email", "email", "email")

    users = first_run.mapping(EMAIL, ["ann@shop.io", "bob@shop.io"])
    orders = second_run.mapping(orders_email, ["Ann@Shop.io ", "carl@shop.io"])

    assert users["ann@shop.io"] == orders["Ann@Shop.io "]
    assert first_run.phone("+44 20 7946 0958") == second_run.phone("+44 20 7946 0958")
    assert first_run.name("Ann Lee") == second_run.name("Ann Lee")


def test_a_different_secret_gives_different_values():
    assert Masker(SECRET).mask_value(EMAIL, "ann@shop.io") != Masker(b"x" * 32).mask_value(EMAIL, "ann@shop.io")
    assert Masker(SECRET).phone("+1 415 555 0100") != Masker(b"x" * 32).phone("+1 415 555 0100")


def test_emails_are_valid_lowercase_addresses_on_a_reserved_domain():
    masker = Masker(SECRET)

    masked = masker.mapping(EMAIL, [f"Person.{i}@Corp.EXAMPLE-real.com" for i in range(200)])

    assert all(EMAIL_SHAPE.match(value) for value in masked.values())
    assert all(value.split("@")[0] not in original.lower() for original, value in masked.items())
    assert is_reserved_email_domain("example.org") and is_reserved_email_domain("qa.test")
    assert not is_reserved_email_domain("gmail.com")


@pytest.mark.parametrize(
    ("original", "kept"),
    [
        ("+1 (415) 555-0100", "+1 ("),
        ("+44 20 7946 0958", "+44 "),
        ("0044 20 7946 0958", "0044 "),
        ("+353 1 555 0199", "+353 "),
    ],
)
def test_phones_keep_country_code_separators_and_length(original, kept):
    masked = Masker(SECRET).phone(original)

    assert masked.startswith(kept)
    assert len(masked) == len(original)
    assert re.sub(r"\d", "9", masked) == re.sub(r"\d", "9", original)
    assert masked != original


def test_the_phone_permutation_is_a_bijection_on_every_short_length():
    masker = Masker(SECRET)
    for length in (1, 2, 3, 4):
        inputs = [f"+44 {i:0{length}d}" for i in range(10**length)]

        outputs = {masker.phone(value) for value in inputs}

        assert outputs == set(inputs)  # a permutation: every string of that length is hit exactly once


def test_names_come_from_the_lists_and_keep_their_shape():
    masker = Masker(SECRET)

    full, single = masker.name("Margaret Thatcher-Jones"), masker.name("Cher")

    first, last = full.split(" ")
    assert first in FIRST_NAMES and last in LAST_NAMES
    assert single in FIRST_NAMES
    assert masker.first_name("Zed") in FIRST_NAMES and masker.last_name("Zed") in LAST_NAMES


def test_text_is_redacted_keeping_length_and_whitespace():
    assert Masker.text("Call me at 555 0100\nthanks") == "xxxx xx xx xxx xxxx\nxxxxxx"


def test_null_fixed_and_nulls_pass_through():
    masker = Masker(SECRET)

    assert masker.mask_value(ColumnRule("t", "c", "null", "null"), "secret") is None
    assert masker.mask_value(ColumnRule("t", "c", "fixed", "fixed", value="XX"), "FR") == "XX"
    assert masker.mask_value(EMAIL, None) is None


def test_email_resolution_does_not_depend_on_input_order():
    # 8-bit tags (about 4M distinct addresses with the name part) for 20k addresses: dozens of forced collisions
    masker = Masker(SECRET, email_bits=8)
    values = [f"user{i}@corp.com" for i in range(20_000)]
    shuffled = values[:]
    random.Random(7).shuffle(shuffled)

    forward, backward = masker.mapping(EMAIL, values), masker.mapping(EMAIL, shuffled)

    assert len({masker.email_candidate(v) for v in values}) < len(values)  # collisions were forced
    assert forward == backward
    assert len(set(forward.values())) == len(values)


def test_one_million_emails_phones_and_hashes_stay_unique_under_forced_collisions():
    # 8-bit email tags (about 4M distinct candidates) and 8-hex-char hashes for 1M values force many collisions;
    # the phones all share "+1 555" and differ only in their last 7 digits.
    masker = Masker(SECRET, email_bits=8)
    n = 1_000_000
    emails = [f"customer{i}@shop.example-prod.com" for i in range(n)]
    phones = [f"+1 555 {i:07d}" for i in range(n)]

    email_map = masker.mapping(EMAIL, emails)
    hash_map = masker.mapping(HASH, (str(i) for i in range(n)))
    masked_phones = [masker.phone(value) for value in phones]

    email_candidates = {masker.email_candidate(e.lower()) for e in emails[:200_000]}
    assert len(email_candidates) < 200_000  # the collisions really were forced
    assert len(set(email_map.values())) == n
    assert len(set(hash_map.values())) == n
    assert len(set(masked_phones)) == n
    assert all(p.startswith("+1 ") and len(p) == len("+1 555 0000000") for p in masked_phones[:1000])
