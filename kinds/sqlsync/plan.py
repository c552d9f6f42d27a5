"""A ``sqlsync`` plan: the production database, the staging and scratch databases it is copied through, and the
masking rules. Light on purpose (no database driver, no API client): reading plans.yaml imports only this.

Example::

    staging-refresh:
      kind: sqlsync
      select: {instance: "acme:europe-west1:prod", database: shop}
      destination:
        staging: {instance: "acme:europe-west1:staging", database: shop}
        scratch: {instance: "acme:europe-west1:staging", database: shop_scratch}
        bucket: gs://acme-dumps/sqlsync
      options:
        secret: projects/acme/secrets/mask-key/versions/3
        rules:
          users: {email: email, phone: phone, name: name, bio: text, country: {kind: fixed, value: XX}}
        preserve: {users: "demo = 1"}
      retention: {keep: 7}       # safety backups of staging made before each overwrite
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from kinds.sqlsync.masking import DEFAULT_DATE_DAYS, JSON_PATH_KINDS, KINDS, ColumnRule, is_reserved_email_domain
from services.plans import STRICT, FieldError, NonEmptyStr, PlanSections
from services.runtime import ROOT

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,63}$")
INSTANCE = re.compile(r"^[a-z][a-z0-9-:.]*:[a-z0-9-]+:[a-z][a-z0-9-]*$")
DEFAULT_DUMP_DIR = ROOT / ".local" / "sqlsync"
Profile = Literal["cloudsql", "local"]


@dataclass(frozen=True)
class DatabaseRef:
    """One side of the sync. Local profile: ``host``/``port`` or ``socket``. Cloud SQL: ``instance`` as
    ``project:region:name`` (SQL goes through the Python Connector, or over TCP to ``host`` when set, e.g. a
    Cloud SQL Auth Proxy). The plan names where the password is (``password_env`` or ``password_secret``);
    ``password`` is filled in from the runtime's secrets only for the step that connects (never in a plan)."""

    role: str
    database: str
    instance: str | None = None
    host: str | None = None
    port: int = 3306
    socket: str | None = None
    user: str = "root"
    password_env: str | None = None
    password_secret: str | None = None
    private_ip: bool = False
    password: str = field(default="", repr=False, compare=False)

    def label(self) -> str:
        where = self.instance or (self.socket if self.socket else f"{self.host}:{self.port}")
        return f"{where}/{self.database}"

    def location(self) -> tuple[str, ...]:
        """Where the server is, as far as the plan can tell (a resolved address, a real socket path): the plan-time
        half of the check that staging is not production; the servers are asked who they are before any copy."""
        if self.instance and not self.host:
            return ("instance", self.instance)
        if self.socket:
            return ("socket", os.path.realpath(self.socket))
        try:
            host = socket.gethostbyname(self.host or "127.0.0.1")
        except OSError:
            host = self.host or ""
        if host.startswith("127."):
            host = "127.0.0.1"
        return ("tcp", host, str(self.port))


@dataclass(frozen=True)
class Settings:
    profile: str  # "local" | "cloudsql"
    production: DatabaseRef
    scratch: DatabaseRef
    staging: DatabaseRef
    rules: tuple[ColumnRule, ...]
    preserve: dict[str, str]
    secret_env: str | None = None
    secret_name: str | None = None
    bucket: str | None = None  # cloudsql: gs://bucket[/prefix] for the dump files
    dump_dir: Path = DEFAULT_DUMP_DIR  # local: where dump files and staging safety dumps go
    endpoint: str | None = None  # Cloud SQL Admin API override (Private Service Connect, a local fake)
    verify_sample: int = 50
    poll_seconds: float = 20.0
    email_bits: int = 80
    move_tables: str = "auto"  # "auto": RENAME scratch tables into staging when they share a server; "never"
    mask_workers: int = 1  # processes computing masked values (big tables on a multi-core worker)
    # "stream": the production dump is masked on its way into scratch (local: piped into the loader; cloudsql: the
    # export object masked into another object, which Cloud SQL imports); "in-place": loaded as it is, then masked
    # by UPDATEs in scratch.
    mask_mode: str = "stream"
    drill_sample: int = 50  # production rows per ruled table a drill looks for in staging
    allow: tuple[str, ...] = ()  # "table.column" or "table.*": copied as they are, by decision

    @property
    def moves_tables(self) -> bool:
        """Scratch is a database on the staging server: the masked tables are moved into staging with one atomic
        RENAME TABLE instead of a dump and a reload (the reload is as slow as the whole production copy)."""
        return self.move_tables == "auto" and self.scratch.location() == self.staging.location()

    def refs(self) -> tuple[DatabaseRef, DatabaseRef, DatabaseRef]:
        return self.production, self.scratch, self.staging


def same_database_problem(settings: Settings) -> str | None:
    """Staging or scratch pointing at production (or scratch at staging), as far as the plan can tell: refused.
    The servers themselves are asked again in the ``check`` step (a name that differs only in case, a host alias)."""
    pairs = (
        (settings.staging, settings.production),
        (settings.scratch, settings.production),
        (settings.scratch, settings.staging),
    )
    for a, b in pairs:
        if a.location() == b.location() and a.database.lower() == b.database.lower():
            return f"{a.role} resolves to the {b.role} database ({a.label()}); refusing to sync"
    return None


class Database(BaseModel):
    model_config = STRICT
    instance: NonEmptyStr | None = None
    host: NonEmptyStr | None = None
    port: int = Field(3306, ge=1, le=65535)
    socket: NonEmptyStr | None = None
    database: NonEmptyStr
    user: NonEmptyStr = "root"
    password_env: NonEmptyStr | None = None
    password_secret: NonEmptyStr | None = None
    private_ip: bool = False

    @field_validator("instance")
    @classmethod
    def _connection_name(cls, instance: str | None) -> str | None:
        if instance is not None and not INSTANCE.match(instance):
            raise ValueError("expected a connection name project:region:instance")
        return instance

    @field_validator("database")
    @classmethod
    def _plain_name(cls, database: str) -> str:
        if not IDENTIFIER.match(database):
            raise ValueError("expected a plain database name (letters, digits, _ and $)")
        return database

    def ref(self, role: str, where: str, profile: str) -> DatabaseRef:
        if profile == "cloudsql" and not self.instance:
            raise FieldError(f"{where}.instance", "is required with profile cloudsql (project:region:instance)")
        if profile == "local" and not (self.host or self.socket):
            raise FieldError(f"{where}.host", "is required with profile local (or give socket)")
        if self.password_env and self.password_secret:
            raise FieldError(f"{where}.password_env", "give at most one of password_env or password_secret")
        return DatabaseRef(role=role, **self.model_dump())


class Rule(BaseModel):
    """How one column is masked: a kind, written alone (``email``) or as a mapping with its parameters."""

    model_config = STRICT
    kind: Literal[KINDS]  # type: ignore[valid-type]
    domain: NonEmptyStr | None = None
    value: str | int | float | bool | None = None
    length: int | None = Field(None, ge=8, le=64)
    email_domain: NonEmptyStr = "example.com"
    days: int = Field(DEFAULT_DATE_DAYS, ge=1, le=3650)
    paths: dict[NonEmptyStr, Literal[JSON_PATH_KINDS]] | None = None  # type: ignore[valid-type]

    @field_validator("email_domain")
    @classmethod
    def _reserved(cls, domain: str) -> str:
        if not is_reserved_email_domain(domain):
            raise ValueError("expected a reserved domain (example.com/.net/.org, *.test, *.example)")
        return domain


def _kind_alone(raw: Any) -> Any:
    """``email: email`` is short for ``email: {kind: email}``."""
    if not isinstance(raw, dict):
        return raw
    return {
        table: {column: {"kind": rule} if isinstance(rule, str) else rule for column, rule in columns.items()}
        if isinstance(columns, dict)
        else columns
        for table, columns in raw.items()
    }


class Select(Database):
    pass


class Destination(BaseModel):
    model_config = STRICT
    staging: Database
    scratch: Database
    bucket: NonEmptyStr | None = None
    dump_dir: NonEmptyStr | None = None


class Options(BaseModel):
    model_config = STRICT
    profile: Profile = "cloudsql"
    rules: dict[str, dict[str, Rule]]
    preserve: dict[str, NonEmptyStr] = {}
    secret_env: NonEmptyStr | None = None
    secret: NonEmptyStr | None = None
    endpoint: NonEmptyStr | None = None
    verify_sample: int = Field(50, ge=1, le=10000)
    poll_seconds: float = Field(20.0, ge=0.0)
    email_bits: int = Field(80, ge=40, le=160)
    move_tables: Literal["auto", "never"] = "auto"
    mask_workers: int = Field(1, ge=1, le=64)
    mask_mode: Literal["stream", "in-place"] | None = None
    drill_sample: int = Field(50, ge=1, le=10000)
    allow: list[NonEmptyStr] = []

    @field_validator("allow")
    @classmethod
    def _columns(cls, allow: list[str]) -> list[str]:
        for entry in allow:
            table, dot, column = entry.partition(".")
            if not (dot and IDENTIFIER.match(table) and (column == "*" or IDENTIFIER.match(column))):
                raise ValueError(f"expected table.column or table.*, got {entry!r}")
        return allow

    @field_validator("rules", mode="before")
    @classmethod
    def _short_rules(cls, raw: Any) -> Any:
        return _kind_alone(raw)


# Options that go into the settings as they are.
PASSED_ON = {"endpoint", "verify_sample", "poll_seconds", "email_bits", "move_tables", "mask_workers", "drill_sample"}


class Sections(PlanSections[Settings]):
    """The plan's sections as written; ``settings()`` checks them together (profile, secrets, same database)."""

    default_queue = "sqlsync"
    select: Select
    destination: Destination
    options: Options

    def settings(self) -> Settings:
        options, destination = self.options, self.destination
        profile = options.profile
        production = self.select.ref("production", "select", profile)
        staging = destination.staging.ref("staging", "destination.staging", profile)
        scratch = destination.scratch.ref("scratch", "destination.scratch", profile)
        bucket = destination.bucket
        if profile == "cloudsql" and not (bucket and bucket.startswith("gs://")):
            raise FieldError("destination.bucket", "expected gs://bucket[/prefix] with profile cloudsql", bucket)
        rules = _rules(options.rules)
        preserve = {}
        for table, where in sorted(options.preserve.items()):
            if not IDENTIFIER.match(table):
                raise FieldError(f"options.preserve.{table}", "expected a plain table name")
            if ";" in where:
                raise FieldError(f"options.preserve.{table}", "expected one WHERE condition (no ';')", where)
            preserve[table] = where
        if bool(options.secret_env) == bool(options.secret):
            raise FieldError("options.secret_env", "give exactly one of secret_env (an environment variable) or secret")
        mask_mode = options.mask_mode or "stream"
        settings = Settings(
            profile,
            production,
            scratch,
            staging,
            rules,
            preserve,
            secret_env=options.secret_env,
            secret_name=options.secret,
            bucket=bucket.rstrip("/") if bucket else None,
            dump_dir=Path(destination.dump_dir) if destination.dump_dir else DEFAULT_DUMP_DIR,
            mask_mode=mask_mode,
            allow=tuple(options.allow),
            **options.model_dump(include=PASSED_ON),
        )
        problem = same_database_problem(settings)
        if problem:
            raise FieldError("destination", problem)
        return settings


def _rules(tables: dict[str, dict[str, Rule]]) -> tuple[ColumnRule, ...]:
    if not tables:
        raise FieldError("options.rules", "expected at least one table with masking rules")
    rules: list[ColumnRule] = []
    email_domains: dict[tuple[str, str], str] = {}
    for table in sorted(tables):
        if not IDENTIFIER.match(table):
            raise FieldError(f"options.rules.{table}", "expected a plain table name")
        for column in sorted(tables[table]):
            where = f"options.rules.{table}.{column}"
            if not IDENTIFIER.match(column):
                raise FieldError(where, "expected a plain column name")
            rule = tables[table][column]
            if rule.kind == "fixed" and rule.value is None:
                raise FieldError(f"{where}.value", "is required for kind fixed")
            if (rule.kind == "json") != bool(rule.paths):
                raise FieldError(f"{where}.paths", "give paths (dotted keys: kind) with kind json, and only with it")
            column_rule = ColumnRule(
                table=table,
                column=column,
                kind=rule.kind,
                domain=rule.domain or rule.kind,
                value=None if rule.value is None else str(rule.value),
                length=rule.length,
                email_domain=rule.email_domain,
                days=rule.days,
                paths=tuple(sorted((rule.paths or {}).items())),
            )
            seen = email_domains.setdefault((column_rule.kind, column_rule.domain), column_rule.email_domain)
            if seen != column_rule.email_domain:
                raise FieldError(
                    f"{where}.email_domain",
                    f"columns of domain {column_rule.domain!r} must share one email_domain (so they stay joinable)",
                )
            rules.append(column_rule)
    return tuple(rules)
