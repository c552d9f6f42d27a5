"""The ``couchdb`` kind: backups of CouchDB / Cloudant databases, one target per database.

A plan names a server (through environment variables: credentials never live in plans.yaml), which databases
to take (names, globs, or ``*``), where backups go (``gs://bucket/prefix`` or a local directory) and how
(``full``: every leaf revision with its history, conflicts and tombstones; ``winning``: winning revisions with
their history). ``start`` runs the whole backup of one database in the request, streaming, then reads it back,
then applies retention. The streaming engine is services/couchdb_engine.py; the file format
services/couchdb_format.py.

    couch-nightly:
      kind: couchdb
      retention: {keep: 14, min_keep: 3}
      server: {url_env: COUCHDB_URL, user_env: COUCHDB_USER, password_env: COUCHDB_PASSWORD}
      select: {databases: ["orders", "customer-*"]}
      destination: {url: gs://acme-backups/couchdb}
      options: {mode: full, incremental: true, full_every: 7, reads_per_second: 20}
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Any

from services.couchdb_engine import (
    BackupOptions,
    backup_database,
    backup_name,
    backup_prefix,
    list_manifests,
    utc_stamp,
)
from services.couchdb_format import CREATED_BY, Manifest
from services.couchdb_http import CouchServer, redact_url
from services.couchdb_store import Store, open_store
from services.errors import PermanentError
from services.fields import Fields
from services.kinds import Done, Outcome, RunContext, Target, TargetPage

KIND = "couchdb"
DEFAULT_QUEUE = "backups"


@dataclass(frozen=True)
class ServerSettings:
    """Where the server is and how to log in, as names of environment variables (or a Secret Manager
    secret for the password). The values are read only when a worker needs them."""

    url_env: str = "COUCHDB_URL"
    user_env: str | None = "COUCHDB_USER"
    password_env: str | None = "COUCHDB_PASSWORD"
    password_secret: str | None = None  # projects/P/secrets/S/versions/V


@dataclass(frozen=True)
class CouchdbSettings:
    server: ServerSettings
    databases: tuple[str, ...]
    destination: str
    backup: BackupOptions
    incremental: bool = False
    full_every: int = 7  # in an incremental plan, a new full backup after this many backups in a chain
    reads_per_second: float | None = None


def parse_settings(fields: Fields) -> CouchdbSettings:
    server = fields.section("server")
    select = fields.section("select", required=True)
    destination = fields.section("destination", required=True)
    options = fields.section("options")
    server_settings = ServerSettings(
        url_env=server.str("url_env", "COUCHDB_URL"),
        user_env=server.str("user_env", "COUCHDB_USER"),
        password_env=server.str("password_env", "COUCHDB_PASSWORD"),
        password_secret=server.str("password_secret", None),
    )
    if server_settings.password_secret is not None and not server_settings.password_secret.startswith("projects/"):
        raise server.error("password_secret", "expected projects/PROJECT/secrets/NAME/versions/VERSION")
    databases = select.str_list("databases")
    if not databases:
        raise select.error("databases", "expected at least one database name or glob")
    url = destination.str("url")
    if not (url.startswith("gs://") or url.startswith("/") or url.startswith("file:///")):
        raise destination.error("url", "expected gs://BUCKET/PREFIX or an absolute local path", url)
    batch_docs = options.int("batch_docs", 500, minimum=1, maximum=10000)
    batch_bytes = options.int("batch_bytes", 8 * 1024 * 1024, minimum=64 * 1024, maximum=60 * 1024 * 1024)
    settings = CouchdbSettings(
        server=server_settings,
        databases=tuple(databases),
        destination=url,
        backup=BackupOptions(
            mode=options.str("mode", "full", choices=("full", "winning")),
            attachments=options.bool("attachments", True),
            batch_docs=batch_docs,
            batch_bytes=batch_bytes,
            page_size=options.int("page_size", 2000, minimum=1, maximum=10000),
        ),
        incremental=options.bool("incremental", False),
        full_every=options.int("full_every", 7, minimum=1, maximum=1000),
        reads_per_second=options.float("reads_per_second", None, minimum=0.1),
    )
    for section in (server, select, destination, options):
        section.done()
    return settings


# ------------------------------------------------------------------------------------------ server access


def server_from_env(
    server: ServerSettings,
    rt: Any = None,
    *,
    writes_per_second: float | None = None,
    reads_per_second: float | None = None,
    env: dict[str, str] | None = None,
) -> CouchServer:
    """A CouchServer from the environment variables ``server`` names (and Secret Manager for the password)."""
    env = dict(os.environ) if env is None else env
    url = env.get(server.url_env, "")
    if not url:
        raise PermanentError(f"environment variable {server.url_env} (the CouchDB server URL) is not set")
    user = env.get(server.user_env or "", "") or None
    password = env.get(server.password_env or "", "") or None
    if server.password_secret:
        if not user:
            raise PermanentError(
                f"server.password_secret is set but the user variable {server.user_env} is empty or not set"
            )
        password = access_secret(server.password_secret, rt)
    auth = (user, password or "") if user else None
    return CouchServer(url, auth=auth, writes_per_second=writes_per_second, reads_per_second=reads_per_second)


def access_secret(name: str, rt: Any) -> str:
    """The payload of Secret Manager secret version ``name``, through the runtime's one secrets seam."""
    return str(rt.secrets.secret(name))


def select_databases(patterns: tuple[str, ...] | list[str], available: list[str]) -> list[str]:
    """The databases matching ``patterns`` (names or globs). System databases (``_users``...) only match a
    pattern that itself starts with '_', so ``*`` means "every user database"."""
    chosen = []
    for db in available:
        for pattern in patterns:
            if db.startswith("_") and not pattern.startswith("_"):
                continue
            if fnmatch.fnmatchcase(db, pattern):
                chosen.append(db)
                break
    return sorted(chosen)


def store_for(url: str, rt: Any) -> Store:
    return open_store(url, rt.storage() if url.startswith("gs://") else None)


# ------------------------------------------------------------------------------------------ kind interface


def enumerate_targets(plan: Any, page_token: str | None, rt: Any) -> TargetPage:
    settings: CouchdbSettings = plan.settings
    server = server_from_env(settings.server, rt, reads_per_second=settings.reads_per_second)
    try:
        names = select_databases(settings.databases, server.all_dbs())
    finally:
        server.close()
    offset = int(page_token or 0)
    page = names[offset : offset + plan.fanout_page_size]
    following = offset + len(page)
    return TargetPage(
        targets=[Target(key=db, params={"database": db}) for db in page],
        next_page_token=str(following) if following < len(names) else None,
    )


def resolve_target(plan: Any, key: str, rt: Any) -> Target:
    """The database ``key`` names, if the plan's selection covers it (the server is asked when backing up)."""
    settings: CouchdbSettings = plan.settings
    if not select_databases(settings.databases, [key]):
        raise PermanentError(f"refused: database {key[:200]!r} is not selected by plan {plan.name}")
    return Target(key=key, params={"database": key})


def start(plan: Any, target: Target, run: RunContext, rt: Any) -> Outcome:
    """Back up one database now (streamed), confirm the file reads back, then prune older backups."""
    settings: CouchdbSettings = plan.settings
    db = str(target.params.get("database", target.key))
    store = store_for(settings.destination, rt)
    prefix = backup_prefix(plan.name, db)
    existing = [m for m in list_manifests(store, prefix) if m.plan == plan.name and m.database == db]
    stamp = utc_stamp(run.period)
    same_run = [m for m in existing if m.name.startswith(prefix + stamp + "-")]
    if same_run:
        # A redelivered task: the backup of this period is already written and confirmed.
        manifest = same_run[0]
        run.log(f"backup {store.url(manifest.manifest_name)} already exists for this period")
    else:
        previous = _previous_for_increment(settings, existing)
        name = backup_name(plan.name, db, run.period, settings.backup.mode, previous is not None)
        server = server_from_env(settings.server, rt, reads_per_second=settings.reads_per_second)
        try:
            run.log(f"backing up {db} from {redact_url(server.url)} to {store.url(name)}")
            manifest = backup_database(
                server, db, store, name, settings.backup, plan=plan.name, previous=previous, now=rt.now
            )
        finally:
            server.close()
        existing.append(manifest)
    pruned = prune_backups(store, [m for m in existing if m.name != manifest.name], manifest, plan.retention)
    for name in pruned:
        run.log(f"retention: deleted {store.url(name)}")
    return Done(
        output=store.url(manifest.manifest_name),
        stats={
            "docs": manifest.docs,
            "deleted": manifest.deleted,
            "attachments": manifest.attachment_count,
            "bytes": manifest.bytes,
            "batches": manifest.batches,
            "mode": manifest.mode,
            "incremental": manifest.incremental,
            "seq": manifest.seq,
            "data": store.url(manifest.data_name),
            "pruned": len(pruned),
        },
        message=f"{manifest.docs} document revisions, {manifest.bytes} bytes",
    )


def poll(plan: Any, target: Target, state: dict[str, Any], run: RunContext, rt: Any) -> Outcome:
    raise PermanentError("couchdb backups finish inside start(); there is no operation to poll")


def describe(plan: Any, target: Target, rt: Any) -> str:
    settings: CouchdbSettings = plan.settings
    how = f"{settings.backup.mode} mode" + (", incremental" if settings.incremental else "")
    return f"back up CouchDB database {target.key!r} ({how}) to {settings.destination}"


def _previous_for_increment(settings: CouchdbSettings, existing: list[Manifest]) -> Manifest | None:
    if not settings.incremental:
        return None
    same_mode = [m for m in existing if m.mode == settings.backup.mode and m.attachments == settings.backup.attachments]
    if not same_mode:
        return None
    latest = same_mode[-1]
    return latest if latest.chain_length < settings.full_every else None


def prune_backups(store: Store, older: list[Manifest], newest: Manifest, retention: Any) -> list[str]:
    """Delete backups beyond ``retention.keep`` (never fewer than ``min_keep`` kept), newest first counted,
    keeping every backup a kept increment depends on. Only manifests this tool wrote are considered; the
    manifest goes first so a half-pruned backup is never mistaken for a whole one."""
    if retention.keep is None:
        return []
    keep_count = max(retention.keep, retention.min_keep)
    ours = sorted([m for m in older if m.created_by == CREATED_BY] + [newest], key=lambda m: m.name)
    by_name = {m.name: m for m in ours}
    kept: set[str] = set()
    for manifest in ours[-keep_count:]:
        current: Manifest | None = manifest
        while current is not None and current.name not in kept:
            kept.add(current.name)
            current = by_name.get(current.previous) if current.previous else None
    deleted = []
    for manifest in ours:
        if manifest.name in kept:
            continue
        store.delete(manifest.manifest_name)
        store.delete(manifest.data_name)
        deleted.append(manifest.manifest_name)
    return deleted
