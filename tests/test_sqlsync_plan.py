"""Parsing a sqlsync plan: mistakes in plans.yaml are refused with the plan and field named."""

from __future__ import annotations

import copy

import pytest

from services.errors import ConfigError
from services.plans import parse_plan

BASE = {
    "kind": "sqlsync",
    "select": {"instance": "acme:europe-west1:prod", "database": "shop"},
    "destination": {
        "staging": {"instance": "acme:europe-west1:staging", "database": "shop"},
        "scratch": {"instance": "acme:europe-west1:staging", "database": "shop_scratch"},
        "bucket": "gs://acme-dumps/sqlsync",
    },
    "options": {
        "secret_env": "MASK_KEY",
        "rules": {"users": {"email": "email", "bio": "text", "country": {"kind": "fixed", "value": "XX"}}},
        "preserve": {"users": "demo = 1"},
    },
}


def _with(path: str, value):
    raw = copy.deepcopy(BASE)
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


def test_a_cloudsql_plan_parses_into_typed_settings():
    plan = parse_plan("staging-refresh", BASE)

    settings = plan.settings
    assert settings.profile == "cloudsql" and settings.bucket == "gs://acme-dumps/sqlsync"
    assert settings.moves_tables  # scratch is a database on the staging instance
    assert [(r.table, r.column, r.kind, r.domain) for r in settings.rules] == [
        ("users", "bio", "text", "text"),
        ("users", "country", "fixed", "fixed"),
        ("users", "email", "email", "email"),
    ]
    assert settings.preserve == {"users": "demo = 1"}


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("options.rules.users.email", "mail", "field 'options.rules.users.email.kind': expected one of email, phone"),
        ("options.rules.users.country", {"kind": "fixed"}, "'options.rules.users.country.value': is required"),
        (
            "options.rules.users.email",
            {"kind": "email", "email_domain": "gmail.com"},
            "'options.rules.users.email.email_domain': expected a reserved domain",
        ),
        ("options.secret_env", KeyError, "give exactly one of secret_env (an environment variable) or secret"),
        ("destination.bucket", KeyError, "'destination.bucket': expected gs://bucket[/prefix] with profile cloudsql"),
        ("select.instance", "prod", "'select.instance': expected a connection name project:region:instance"),
        ("options.preserve", {"users": "demo = 1; DROP TABLE users"}, "expected one WHERE condition (no ';')"),
        ("options.rules", {"users; --": {"email": "email"}}, "field 'options.rules.users; --': expected a plain"),
        ("options.retension", 3, "field 'options.retension': unknown field"),
    ],
)
def test_mistakes_are_refused_naming_the_field(path, value, message):
    with pytest.raises(ConfigError) as error:
        parse_plan("staging-refresh", _with(path, value))

    assert "plan 'staging-refresh'" in str(error.value)
    assert message in str(error.value)


def test_staging_on_the_production_instance_and_database_is_refused():
    raw = _with("destination.staging", {"instance": "acme:europe-west1:prod", "database": "shop"})

    with pytest.raises(ConfigError, match="staging resolves to the production database"):
        parse_plan("staging-refresh", raw)


def test_columns_of_one_domain_must_share_an_email_domain():
    raw = _with(
        "options.rules",
        {"users": {"email": "email"}, "orders": {"contact": {"kind": "email", "email_domain": "qa.test"}}},
    )

    with pytest.raises(ConfigError, match="must share one email_domain"):
        parse_plan("staging-refresh", raw)


def test_allow_entries_must_name_a_table_and_a_column():
    with pytest.raises(ConfigError, match=r"field 'options.allow': expected table.column or table.\*, got 'users'"):
        parse_plan("staging-refresh", _with("options.allow", ["users.*", "users"]))
