"""Masking of personal data for the production -> staging sync: pure functions, no database, no I/O.

Three promises, and how each is kept (docs/sqlsync.md has the longer argument):

- Deterministic: every masked value is derived from a keyed HMAC-SHA256 of the (normalised) original value and
  the rule's *domain* (``email``, ``phone`` ...), never of the table or column, so the same input masks to the
  same output in every table and every run, and join columns stay joinable.
- Unique: ``phone`` is a keyed permutation of the national digits (a Feistel network over decimal strings), so
  two different inputs can never give the same output. ``email`` and ``hash`` take a truncated HMAC; the rare
  truncation collisions are found set-wise over all values of the domain and resolved in an order that depends
  only on the set of inputs (members of a colliding group are ranked by their full 256-bit HMAC), so the result
  is the same whatever the order of rows or tables.
- Realistic: emails are valid addresses on a reserved domain (RFC 2606 / RFC 6761), phones keep their country
  code, separators and length, names are drawn from lists of common names, free text keeps its length and
  spacing.

The secret never appears in plans.yaml: callers read it from an environment variable or Secret Manager.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

KINDS = (
    "email",
    "phone",
    "name",
    "first_name",
    "last_name",
    "text",
    "null",
    "fixed",
    "hash",
    "date",
    "card",
    "address",
    "json",
)
# What a ``json`` rule may apply to the values at its paths.
JSON_PATH_KINDS = (
    "email",
    "phone",
    "name",
    "first_name",
    "last_name",
    "text",
    "null",
    "fixed",
    "hash",
    "date",
    "card",
    "address",
)
STREET_SUFFIXES = ("Street", "Road", "Avenue", "Lane", "Way", "Close", "Drive", "Place", "Court", "Gardens")
DEFAULT_DATE_DAYS = 30
# Kinds whose output is unique whenever the inputs are (per domain): safe on a UNIQUE column.
INJECTIVE_KINDS = ("email", "phone", "hash")
# Kinds computed from a whole set of values (collision resolution); the others are per-value functions.
SET_KINDS = ("email", "hash")

RESERVED_EMAIL_DOMAINS = ("example.com", "example.net", "example.org")
RESERVED_EMAIL_SUFFIXES = (".test", ".example", ".invalid")

DEFAULT_EMAIL_BITS = 80  # 20 hex characters: ~4e-13 chance of any collision among 1M addresses
MAX_RESOLUTION_TRIES = 10_000

FIRST_NAMES = [
    "Aaron",
    "Abigail",
    "Adam",
    "Adrian",
    "Aisha",
    "Alan",
    "Albert",
    "Alice",
    "Amara",
    "Amelia",
    "Ana",
    "Andrea",
    "Andrew",
    "Angela",
    "Anna",
    "Anthony",
    "Arjun",
    "Ava",
    "Barbara",
    "Ben",
    "Bianca",
    "Brian",
    "Carla",
    "Carlos",
    "Caroline",
    "Catherine",
    "Charles",
    "Chen",
    "Chloe",
    "Christopher",
    "Clara",
    "Daniel",
    "David",
    "Diana",
    "Diego",
    "Dmitri",
    "Elena",
    "Elijah",
    "Elizabeth",
    "Ella",
    "Emily",
    "Emma",
    "Eric",
    "Ethan",
    "Eva",
    "Fatima",
    "Felix",
    "Fiona",
    "Francesca",
    "Frank",
    "Gabriel",
    "George",
    "Grace",
    "Hannah",
    "Hassan",
    "Helen",
    "Henry",
    "Hiroshi",
    "Ian",
    "Ines",
    "Irene",
    "Isaac",
    "Isabel",
    "Ivan",
    "Jack",
    "Jacob",
    "James",
    "Jane",
    "Javier",
    "Jennifer",
    "Jessica",
    "Joan",
    "John",
    "Jonas",
    "Jose",
    "Joseph",
    "Julia",
    "Kai",
    "Karen",
    "Kate",
    "Kevin",
    "Laura",
    "Leo",
    "Liam",
    "Lina",
    "Lucas",
    "Lucia",
    "Luis",
    "Maria",
    "Mark",
    "Marta",
    "Martin",
    "Mary",
    "Mateo",
    "Maya",
    "Mei",
    "Michael",
    "Mia",
    "Mohamed",
    "Nadia",
    "Natalie",
    "Nina",
    "Noah",
    "Olivia",
    "Omar",
    "Oscar",
    "Paul",
    "Paula",
    "Peter",
    "Priya",
    "Rachel",
    "Rafael",
    "Ravi",
    "Rebecca",
    "Robert",
    "Rosa",
    "Ruth",
    "Samuel",
    "Sara",
    "Sofia",
    "Sophie",
    "Stephen",
    "Susan",
    "Thomas",
    "Tom",
    "Valentina",
    "Victor",
    "Wei",
    "William",
    "Yuki",
    "Zoe",
]
LAST_NAMES = [
    "Abbott",
    "Adams",
    "Ahmed",
    "Alvarez",
    "Anderson",
    "Bailey",
    "Baker",
    "Banerjee",
    "Bauer",
    "Becker",
    "Bell",
    "Bennett",
    "Berg",
    "Brooks",
    "Brown",
    "Campbell",
    "Carter",
    "Castillo",
    "Chen",
    "Clark",
    "Collins",
    "Cook",
    "Cooper",
    "Costa",
    "Cruz",
    "Davies",
    "Diaz",
    "Dubois",
    "Edwards",
    "Evans",
    "Fischer",
    "Fernandez",
    "Fontaine",
    "Garcia",
    "Gomez",
    "Gonzalez",
    "Green",
    "Gupta",
    "Hall",
    "Hansen",
    "Harris",
    "Hernandez",
    "Hill",
    "Hoffmann",
    "Hughes",
    "Ito",
    "Jackson",
    "Jansen",
    "Johnson",
    "Jones",
    "Kaur",
    "Kelly",
    "Khan",
    "Kim",
    "King",
    "Klein",
    "Kowalski",
    "Kumar",
    "Lambert",
    "Larsen",
    "Lee",
    "Lewis",
    "Lopez",
    "Martin",
    "Martinez",
    "Meyer",
    "Miller",
    "Mitchell",
    "Moore",
    "Morales",
    "Morgan",
    "Muller",
    "Murphy",
    "Nakamura",
    "Nguyen",
    "Nielsen",
    "Novak",
    "Okafor",
    "Olsen",
    "Ortiz",
    "Parker",
    "Patel",
    "Perez",
    "Peters",
    "Petrov",
    "Phillips",
    "Reed",
    "Reyes",
    "Richter",
    "Rivera",
    "Roberts",
    "Robinson",
    "Rossi",
    "Sanchez",
    "Santos",
    "Sato",
    "Schmidt",
    "Schneider",
    "Scott",
    "Silva",
    "Singh",
    "Smith",
    "Sousa",
    "Stewart",
    "Suzuki",
    "Tanaka",
    "Taylor",
    "Thomas",
    "Thompson",
    "Torres",
    "Turner",
    "Walker",
    "Wang",
    "Ward",
    "Watson",
    "White",
    "Williams",
    "Wilson",
    "Wong",
    "Wright",
    "Yamamoto",
    "Young",
    "Zhang",
]

_FIRST_LOWER = [name.lower() for name in FIRST_NAMES]
_LAST_LOWER = [name.lower() for name in LAST_NAMES]
_DIGIT_RUNS = re.compile(r"(\d+)")
# E.164 country calling codes are prefix-free: 1 and 7 are one digit, these two-digit codes are assigned,
# every other code is three digits. That is enough to keep the country code of any "+..." number.
_TWO_DIGIT_CODES = frozenset(
    [
        "20",
        "27",
        "30",
        "31",
        "32",
        "33",
        "34",
        "36",
        "39",
        "40",
        "41",
        "43",
        "44",
        "45",
        "46",
        "47",
        "48",
        "49",
        "51",
        "52",
        "53",
        "54",
        "55",
        "56",
        "57",
        "58",
        "60",
        "61",
        "62",
        "63",
        "64",
        "65",
        "66",
        "81",
        "82",
        "84",
        "86",
        "90",
        "91",
        "92",
        "93",
        "94",
        "95",
        "98",
    ]
)
_FEISTEL_ROUNDS = 8


@dataclass(frozen=True)
class ColumnRule:
    """How one column is masked. ``domain`` groups columns that hold the same kind of value (users.email and
    orders.contact_email) so they mask alike and stay joinable; it defaults to the kind."""

    table: str
    column: str
    kind: str
    domain: str
    value: str | None = None  # for ``fixed``
    length: int | None = None  # for ``hash``: hex characters kept (default 64)
    email_domain: str = "example.com"
    days: int = DEFAULT_DATE_DAYS  # for ``date``: dates move by at most this many days either way
    paths: tuple[tuple[str, str], ...] = ()  # for ``json``: (dotted path, kind) of the values masked inside


def longest_output(rule: ColumnRule, email_bits: int = DEFAULT_EMAIL_BITS) -> int | None:
    """The most characters ``rule`` can write into a column; None when the output is as long as the input (``phone``,
    ``text``), which fits wherever the original did."""
    if rule.kind == "email":
        longest_name = max(map(len, FIRST_NAMES)) + 1 + max(map(len, LAST_NAMES))
        return longest_name + 1 + email_bits // 4 + 1 + len(rule.email_domain)
    if rule.kind == "name":
        return max(map(len, FIRST_NAMES)) + 1 + max(map(len, LAST_NAMES))
    if rule.kind == "first_name":
        return max(map(len, FIRST_NAMES))
    if rule.kind == "last_name":
        return max(map(len, LAST_NAMES))
    if rule.kind == "hash":
        return rule.length or 64
    if rule.kind == "fixed":
        return len(rule.value or "")
    if rule.kind == "address":
        return 3 + 1 + max(map(len, LAST_NAMES)) + 1 + max(map(len, STREET_SUFFIXES))
    return None if rule.kind in ("phone", "text", "date", "card", "json") else 0


def is_reserved_email_domain(domain: str) -> bool:
    """True for domains that can never belong to a real person (RFC 2606 and RFC 6761)."""
    domain = domain.lower()
    return domain in RESERVED_EMAIL_DOMAINS or any(
        domain.endswith(suffix) or domain == suffix[1:] for suffix in RESERVED_EMAIL_SUFFIXES
    )


def normalise_email(value: str) -> str:
    """Email addresses compare without case and surrounding spaces (as a MySQL *_ci collation does), so
    ``Ann@X.com`` in one table and ``ann@x.com`` in another mask alike. Case is folded the Unicode way (``casefold``):
    letters a *_ci collation holds equal, such as Greek final sigma and sigma, fold alike too."""
    return value.strip().casefold()


class Masker:
    """Masks values with a secret key. Per-value methods are pure; ``mapping`` masks a whole set of values of one
    domain and is the only way to get the uniqueness guarantee for ``email`` and ``hash``."""

    def __init__(self, secret: bytes, *, email_bits: int = DEFAULT_EMAIL_BITS):
        if len(secret) < 16:
            raise ValueError("masking secret: expected at least 16 bytes")
        if not 8 <= email_bits <= 160 or email_bits % 8:
            raise ValueError("email_bits: expected a multiple of 8 between 8 and 160")
        self._secret = secret
        self.email_bits = email_bits
        self._email_bytes = email_bits // 8
        # Subkeys per purpose so that, say, a phone digest can never be replayed as an email digest.
        self._keys = {
            purpose: hmac.digest(secret, b"sqlsync-subkey\0" + purpose.encode(), "sha256")
            for purpose in ("email", "hash", "name", "phone", "date", "address")
        }
        self._networks: dict[tuple[int, str], _Feistel] = {}  # phone permutations by length and kept prefix

    def digest(self, purpose: str, data: str, counter: int = 0) -> bytes:
        """The keyed HMAC-SHA256 every masked value is derived from. ``counter`` > 0 re-derives after a collision."""
        message = data.encode("utf-8", "surrogatepass")
        if counter:
            message = b"%d\0" % counter + message
        return hmac.digest(self._keys[purpose], message, "sha256")

    # ---- email -------------------------------------------------------------------------------------------------

    def email_candidate(self, normalised: str, counter: int = 0, email_domain: str = "example.com") -> str:
        mac = self.digest("email", normalised, counter)
        first = _FIRST_LOWER[int.from_bytes(mac[-4:-2], "big") % len(_FIRST_LOWER)]
        last = _LAST_LOWER[int.from_bytes(mac[-2:], "big") % len(_LAST_LOWER)]
        return f"{first}.{last}.{mac[: self._email_bytes].hex()}@{email_domain}"

    # ---- phone -------------------------------------------------------------------------------------------------

    def phone(self, value: str) -> str:
        """Keep the leading ``+``/``00`` and country code (or a national trunk ``0``) and every non-digit; the
        remaining digits go through a keyed permutation of all strings of that many digits. A permutation is a
        bijection, so different inputs never share an output: uniqueness holds by construction."""
        pieces = _DIGIT_RUNS.split(value)  # non-digit text and digit runs, alternating
        digits = "".join(pieces[1::2])
        kept = _kept_phone_digits(value, digits)
        if kept >= len(digits):
            return value
        replaced = digits[:kept] + self._permute_digits(digits[kept:], prefix=digits[:kept])
        out = [pieces[0]]
        at = 0
        for i in range(1, len(pieces), 2):
            end = at + len(pieces[i])
            out.append(replaced[at:end])
            out.append(pieces[i + 1])
            at = end
        return "".join(out)

    def _permute_digits(self, digits: str, prefix: str) -> str:
        """A Feistel network over decimal strings of a fixed length (the shape of NIST FF1, without its
        key schedule). Each round adds a keyed function of one half to the other modulo 10^len, which is
        invertible, so the whole network is a permutation of the 10^n strings of length n. Round functions are
        keyed BLAKE2b (fast) with a key derived from the secret by HMAC-SHA256, tweaked by the kept prefix."""
        n = len(digits)
        if n == 1:
            # Too short to split: a keyed rotation of 0-9 is still a permutation.
            shift = self.digest("phone", f"1\0{prefix}")[0] % 10
            return str((int(digits) + shift) % 10)
        network = self._networks.get((n, prefix))
        if network is None:
            network = self._networks[(n, prefix)] = _Feistel(self._keys["phone"], n, prefix)
        return network.permute(digits)

    # ---- dates, cards, addresses, JSON -------------------------------------------------------------------------

    def date(self, value: str, days: int = DEFAULT_DATE_DAYS) -> str:
        """A date (``YYYY-MM-DD``, maybe followed by a time, kept as it is) moved by a keyed number of days in
        [-days, +days]: ages and orderings stay plausible, the same date moves alike everywhere. Anything that is not
        a calendar date (``0000-00-00``) is left alone."""
        found = _DATE.match(value)
        if found is None:
            return value
        try:
            original = datetime.date(int(found[1]), int(found[2]), int(found[3]))
        except ValueError:
            return value
        shift = int.from_bytes(self.digest("date", found[0])[:4], "big") % (2 * days + 1) - days
        try:
            moved = original + datetime.timedelta(days=shift)
        except OverflowError:
            return value
        return moved.isoformat() + value[len(found[0]) :]

    def card(self, value: str) -> str:
        """A payment card number: the issuer prefix (first six digits) and the length kept, the digits between
        permuted with a key, the last digit a new Luhn check digit; spaces and dashes where they were."""
        pieces = _DIGIT_RUNS.split(value)
        digits = "".join(pieces[1::2])
        if not 12 <= len(digits) <= 19:
            return self.text(value)  # not a card number: nothing of it is kept
        body = digits[:6] + self._permute_digits(digits[6:-1], prefix=f"card\0{digits[:6]}")
        replaced = body + _luhn_digit(body)
        out, at = [pieces[0]], 0
        for i in range(1, len(pieces), 2):
            out.append(replaced[at : at + len(pieces[i])])
            out.append(pieces[i + 1])
            at += len(pieces[i])
        return "".join(out)

    def address(self, value: str) -> str:
        """A street address: a keyed house number, street name and suffix (the original is not kept in any part)."""
        if not value.strip():
            return value
        mac = self.digest("address", " ".join(value.casefold().split()))
        number = 1 + int.from_bytes(mac[:2], "big") % 399
        street = LAST_NAMES[int.from_bytes(mac[2:4], "big") % len(LAST_NAMES)]
        return f"{number} {street} {STREET_SUFFIXES[mac[4] % len(STREET_SUFFIXES)]}"

    def json_value(self, rule: ColumnRule, value: str) -> str:
        """A JSON document with the values at ``rule.paths`` (dotted keys; a list applies to each item) masked by
        their kinds; everything else as it was. A value that is not JSON stops the masking (nothing passes
        unmasked)."""
        import json

        try:
            document = json.loads(value)
        except ValueError:
            raise ValueError(
                f"{rule.table}.{rule.column}: a value is not JSON, so its paths cannot be masked"
            ) from None
        for path, kind in rule.paths:
            inner = ColumnRule(rule.table, rule.column, kind, kind, email_domain=rule.email_domain, days=rule.days)
            document = _at_path(document, path.split("."), self.value_function(inner))
        return json.dumps(document, ensure_ascii=False)

    # ---- names, text, hash -------------------------------------------------------------------------------------

    def first_name(self, value: str) -> str:
        mac = self.digest("name", value.strip().lower())
        return FIRST_NAMES[int.from_bytes(mac[:4], "big") % len(FIRST_NAMES)]

    def last_name(self, value: str) -> str:
        mac = self.digest("name", value.strip().lower())
        return LAST_NAMES[int.from_bytes(mac[4:8], "big") % len(LAST_NAMES)]

    def name(self, value: str) -> str:
        """A full name keeps its shape: one word gives a first name, more give "First Last"."""
        if not value.strip():
            return value
        mac = self.digest("name", value.strip().lower())
        first = FIRST_NAMES[int.from_bytes(mac[:4], "big") % len(FIRST_NAMES)]
        if len(value.split()) == 1:
            return first
        return f"{first} {LAST_NAMES[int.from_bytes(mac[4:8], 'big') % len(LAST_NAMES)]}"

    @staticmethod
    def text(value: str) -> str:
        """Redact free text, keeping its length and whitespace (so layouts and length limits still get tested)."""
        return "".join(ch if ch.isspace() else "x" for ch in value)

    def hash_candidate(self, value: str, counter: int = 0, length: int | None = None) -> str:
        return self.digest("hash", value, counter).hex()[: length or 64]

    # ---- whole columns -----------------------------------------------------------------------------------------

    def mask_value(self, rule: ColumnRule, value: str | None) -> str | None:
        """One value, without set-wise collision resolution (use ``mapping`` for email and hash columns)."""
        if value is None:
            return None
        return self.value_function(rule)(value)

    def value_function(self, rule: ColumnRule) -> Callable[[str], str | None]:
        """The per-value masking function of ``rule`` for non-null values (chosen once, for big columns)."""
        kind = rule.kind
        if kind == "null":
            return lambda value: None
        if kind == "fixed":
            return lambda value: rule.value
        if kind == "email":
            return lambda value: (
                self.email_candidate(normalise_email(value), 0, rule.email_domain) if value.strip() else value
            )
        if kind == "hash":
            return lambda value: self.hash_candidate(value, 0, rule.length)
        if kind == "phone":
            return self.phone
        if kind == "name":
            return self.name
        if kind == "first_name":
            return lambda value: self.first_name(value) if value.strip() else value
        if kind == "last_name":
            return lambda value: self.last_name(value) if value.strip() else value
        if kind == "text":
            return self.text
        if kind == "date":
            return lambda value: self.date(value, rule.days)
        if kind == "card":
            return self.card
        if kind == "address":
            return self.address
        if kind == "json":
            return lambda value: self.json_value(rule, value)
        raise ValueError(f"unknown masking kind {kind!r}")

    def mapping(self, rule: ColumnRule, values: Iterable[str], map_fn: Callable = map) -> dict[str, str]:
        """Original -> masked for every distinct non-null value of ``rule``'s domain.

        For ``email`` and ``hash`` the result is injective over the normalised inputs: candidates come from a
        truncated HMAC, and inputs whose candidates collide are resolved deterministically, independent of
        the order of ``values``. ``map_fn`` (like ``map``) may spread the per-value work over processes.
        """
        distinct = set(values)
        distinct.discard(None)  # type: ignore[arg-type]
        if rule.kind == "email":
            norm_of = {value: normalise_email(value) for value in distinct}
            norms = list({norm for norm in norm_of.values() if norm})
            first = dict(
                zip(norms, map_fn(partial(_email_first_candidate, self, rule.email_domain), norms), strict=True)
            )
            resolved = self._resolve_unique(
                first, lambda norm, counter: self.email_candidate(norm, counter, rule.email_domain), "email"
            )
            # Blank values stay as they are; every spelling of one address gets that address's output.
            return {value: resolved[norm] if norm else value for value, norm in norm_of.items()}
        if rule.kind == "hash":
            inputs = list(distinct)
            first = dict(zip(inputs, map_fn(partial(_hash_first_candidate, self, rule.length), inputs), strict=True))
            return self._resolve_unique(
                first, lambda value, counter: self.hash_candidate(value, counter, rule.length), "hash"
            )
        inputs = list(distinct)
        return dict(zip(inputs, map_fn(partial(_mask_one, self, rule), inputs), strict=True))

    def _resolve_unique(self, candidates: dict[str, str], derive: Callable, purpose: str) -> dict[str, str]:
        """``candidates`` holds each input's first candidate (counter 0); where several inputs share one, the
        input with the smallest full HMAC keeps it and the others re-derive with counters 1, 2 ... skipping
        every output already taken. Groups are visited in candidate order and members in full-HMAC order, so the result
        depends only on the set of inputs. Terminates because each retry draws a fresh pseudo-random
        candidate from a space much larger than the set (or raises rather than loop)."""
        if len(set(candidates.values())) == len(candidates):
            return candidates  # no two inputs share a candidate: the usual case at 80 bits
        counts = Counter(candidates.values())
        out: dict[str, str] = {}
        groups: dict[str, list[str]] = {}
        for value, candidate in candidates.items():
            if counts[candidate] == 1:
                out[value] = candidate
            else:
                groups.setdefault(candidate, []).append(value)
        if not groups:
            return out
        taken = set(counts)  # every first-choice candidate is reserved, including the colliding ones
        for candidate in sorted(groups):
            members = sorted(groups[candidate], key=lambda value: self.digest(purpose, value))
            out[members[0]] = candidate
            for value in members[1:]:
                for counter in range(1, MAX_RESOLUTION_TRIES + 1):
                    retry = derive(value, counter)
                    if retry not in taken:
                        taken.add(retry)
                        out[value] = retry
                        break
                else:
                    raise ValueError(
                        f"{purpose}: could not find a unique masked value after {MAX_RESOLUTION_TRIES} tries "
                        "(the output space is too small for this many values)"
                    )
        return out


class _Feistel:
    """The phone permutation for one digit count and kept prefix. A round function only ever sees one half of
    the digits, so for short halves (up to ``MEMO_HALF_DIGITS``) its values are remembered: a million phone
    numbers of one country share at most 10^5 distinct halves per round, and each round is a list lookup after
    its first use. The outputs are exactly those of computing every round afresh."""

    MEMO_HALF_DIGITS = 5

    def __init__(self, key: bytes, n: int, prefix: str):
        self.u = n // 2
        self.v = n - self.u
        self.mod_a, self.mod_b = 10**self.u, 10**self.v
        self.layout = f"%0{self.u}d%0{self.v}d"
        self.keyed = hashlib.blake2b(key=key, digest_size=16)
        self.keyed.update(f"{n}\0{prefix}\0".encode())
        # One list per round, indexed by the half it reads (-1: not computed yet); even rounds read b, odd ones a.
        # Made once this network has permuted as many numbers as a half has values (then it pays for itself),
        # so rarely seen lengths and country codes cost no memory.
        self.memo: list[list[int]] | None = None
        self.until_memo = self.mod_b if self.v <= self.MEMO_HALF_DIGITS else -1

    def _round(self, rnd: int, half: int) -> int:
        round_fn = self.keyed.copy()
        round_fn.update(b"%d\0%d" % (rnd, half))
        return int.from_bytes(round_fn.digest(), "big")

    def permute(self, digits: str) -> str:
        u = self.u
        a, b = int(digits[:u]), int(digits[u:])
        mod_a, mod_b, memo = self.mod_a, self.mod_b, self.memo
        if memo is None and self.until_memo > 0:
            self.until_memo -= 1
            if not self.until_memo:
                memo = self.memo = [[-1] * (mod_b if r % 2 == 0 else mod_a) for r in range(_FEISTEL_ROUNDS)]
        if memo is None:
            for rnd in range(0, _FEISTEL_ROUNDS, 2):
                a = (a + self._round(rnd, b)) % mod_a
                b = (b + self._round(rnd + 1, a)) % mod_b
            return self.layout % (a, b)
        # Rounds alternate: even ones add to a (mod 10^u), odd ones to b (mod 10^v). The memo keeps each round
        # value already reduced by its modulus, which leaves the sums unchanged and the integers small.
        for rnd in range(0, _FEISTEL_ROUNDS, 2):
            add = memo[rnd][b]
            if add < 0:
                add = memo[rnd][b] = self._round(rnd, b) % mod_a
            a = (a + add) % mod_a
            add = memo[rnd + 1][a]
            if add < 0:
                add = memo[rnd + 1][a] = self._round(rnd + 1, a) % mod_b
            b = (b + add) % mod_b
        return self.layout % (a, b)


# Module-level so that they pickle: a process pool runs them for big columns.
def _email_first_candidate(masker: Masker, email_domain: str, normalised: str) -> str:
    return masker.email_candidate(normalised, 0, email_domain)


def _hash_first_candidate(masker: Masker, length: int | None, value: str) -> str:
    return masker.hash_candidate(value, 0, length)


def _mask_one(masker: Masker, rule: ColumnRule, value: str) -> str | None:
    return masker.mask_value(rule, value)


_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})")


def _luhn_digit(body: str) -> str:
    """The check digit that makes ``body`` + it pass the Luhn test."""
    total = 0
    for position, digit in enumerate(reversed(body)):
        value = int(digit) * (2 if position % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return str((10 - total % 10) % 10)


def _at_path(node: object, keys: list[str], mask: Callable[[str], str | None]) -> object:
    """``node`` with the value at ``keys`` masked (lists: every item); absent paths change nothing."""
    if isinstance(node, list):
        return [_at_path(item, keys, mask) for item in node]
    if not keys:
        if node is None or isinstance(node, (dict, bool)):
            return node
        return mask(str(node))
    if isinstance(node, dict) and keys[0] in node:
        return {**node, keys[0]: _at_path(node[keys[0]], keys[1:], mask)}
    return node


def _kept_phone_digits(value: str, digits: str) -> int:
    """How many leading digits are the country code (international form) or trunk prefix (national form)."""
    stripped = value.lstrip()
    if stripped.startswith("+"):
        international = digits
    elif digits.startswith("00") and stripped.startswith("00"):
        international = digits[2:]
        if not international:
            return len(digits)
        return 2 + _country_code_length(international)
    elif digits.startswith("0"):
        return 1
    else:
        return 0
    if not international:
        return 0
    return _country_code_length(international)


def _country_code_length(digits: str) -> int:
    if digits[0] in "17":
        return 1
    if digits[:2] in _TWO_DIGIT_CODES:
        return 2
    return min(3, len(digits))
