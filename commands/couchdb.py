"""``backup couchdb backup|restore|verify|import``: CouchDB / Cloudant backups from the command line.

The server comes from the environment (``COUCHDB_URL``, ``COUCHDB_USER``, ``COUCHDB_PASSWORD``, or the variables
named with ``--url-env`` ...), never from the command line, so credentials stay out of shell history and logs.
Also runnable on its own: ``python -m commands.couchdb backup ...``.

Exit codes: 0 done; 1 failed (the message says why); 2 bad usage; 3 verification found differences;
4 restore refused because the target is not empty (use --overwrite); 5 the server kept answering 429/5xx.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from google.api_core.retry import Retry

from commands import current_runtime
from kinds.couchdb.backup import BackupOptions, backup_database, backup_name, import_documents
from kinds.couchdb.format import DATA_SUFFIX, MANIFEST_SUFFIX, ForeignFile, Manifest
from kinds.couchdb.http import CouchServer
from kinds.couchdb.kind import KIND, connect, select_databases, store_for
from kinds.couchdb.plan import ServerSettings, Settings
from kinds.couchdb.restore import RestoreOptions, restore_chain
from kinds.couchdb.store import Store, read_manifest, resolve_chain
from kinds.couchdb.verify import BackupRows, verify_database
from services.errors import BackupError, PermanentError, TargetGone, TargetNotEmpty, TransientError
from services.jobs import drive
from services.kinds import Pending, RunContext, Target
from services.plans import Plan
from services.runtime import ROOT, Runtime

EXIT_FAILED = 1
EXIT_MISMATCH = 3
EXIT_NOT_EMPTY = 4
EXIT_UNAVAILABLE = 5


def _server_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--password-env", default="COUCHDB_PASSWORD", show_default=True, help="Env var with the password."
    )(func)
    func = click.option("--user-env", default="COUCHDB_USER", show_default=True, help="Env var with the user name.")(
        func
    )
    func = click.option("--url-env", default="COUCHDB_URL", show_default=True, help="Env var with the server URL.")(
        func
    )
    return func


def _server_settings(url_env: str, user_env: str, password_env: str) -> ServerSettings:
    return ServerSettings(url_env=url_env, user_env=user_env, password_env=password_env)


def _server(url_env: str, user_env: str, password_env: str, **limits: float | None) -> CouchServer:
    return connect(_server_settings(url_env, user_env, password_env), current_runtime(), **limits)


# Every request to the server is already retried with backoff (kinds/couchdb/http.py); a person at a terminal is
# told at once when that was not enough, rather than waiting through the queue's quarter of an hour of retries.
NO_MORE_RETRIES = Retry(predicate=lambda exc: isinstance(exc, TransientError), timeout=0.0)


@contextmanager
def _exit_codes() -> Iterator[None]:
    """Turn the service's errors into one line on stderr and a documented exit code."""
    try:
        yield
    except TargetNotEmpty as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_NOT_EMPTY)
    except TransientError as exc:
        click.echo(f"error: server unavailable or rate limiting: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except (BackupError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)


def open_backup(url: str, rt: Runtime) -> tuple[Store, list[Manifest]]:
    """The store rooted where backup ``url`` (its manifest or data file) was written, and its restore chain."""
    given = url
    for suffix in (MANIFEST_SUFFIX, DATA_SUFFIX):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    directory, _, base = url.rpartition("/")
    if not directory or not base:
        raise PermanentError(f"{url!r}: expected the URL or path of a backup's .manifest.json")
    try:
        first = read_manifest(store_for(directory, rt), base)
    except (PermanentError, TargetGone):
        made_by = _other_format(given)
        if made_by:
            raise PermanentError(f"{given} is {made_by}, not a backup made by this tool (a .manifest.json)") from None
        raise
    if not url.endswith("/" + first.name) and url != first.name:
        raise PermanentError(f"{url!r}: the manifest there calls itself {first.name!r}; was it moved?")
    root = url[: -len(first.name)].rstrip("/") or "/"
    store = store_for(root, rt)
    return store, resolve_chain(store, first.name)


def _other_format(path: str) -> str | None:
    """What made the local file ``path``, when it is a backup file of another tool we know (IBM's couchbackup)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).split(b"\n", 1)[0]
    except OSError:
        return None
    try:
        first = json.loads(head)
    except ValueError:
        return None
    if isinstance(first, dict) and str(first.get("name", "")).endswith("couchbackup"):
        version, mode = first.get("version", ""), first.get("mode", "?")
        return f"a couchbackup {version} file ({mode} mode); `backup couchdb import` makes a backup of it to restore"
    if isinstance(first, list) and all(isinstance(d, dict) and "_id" in d for d in first):
        return "a couchbackup file (lines of document arrays); `backup couchdb import` makes a backup of it to restore"
    return None


def _progress(label: str, total: int | None, quiet: bool) -> Any:
    if quiet:
        return _NoBar()
    return click.progressbar(length=total or 0, label=label, file=sys.stderr, show_pos=True)


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


@click.group("couchdb")
def couchdb() -> None:
    """Back up, restore and verify CouchDB / Cloudant databases."""


@couchdb.command("backup")
@click.argument("databases", nargs=-1)
@click.option("--to", "destination", required=True, help="gs://BUCKET/PREFIX or an absolute local directory.")
@click.option("--all", "all_dbs", is_flag=True, help="Every user database (system databases only when named).")
@click.option("--mode", type=click.Choice(["full", "winning"]), default="full", show_default=True)
@click.option("--attachments/--no-attachments", default=True, show_default=True)
@click.option("--incremental", is_flag=True, help="Store only changes since the latest backup of the same mode.")
@click.option(
    "--full-every",
    default=7,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="With --incremental: a new full backup once a chain holds this many backups.",
)
@click.option("--prefix", "name_prefix", default="cli", show_default=True, help="First path element of the names.")
@click.option("--batch-docs", default=500, show_default=True, type=click.IntRange(1, 10000))
@click.option("--batch-bytes", default=8 * 1024 * 1024, show_default=True, type=click.IntRange(64 * 1024))
@click.option(
    "--page-size", default=2000, show_default=True, type=click.IntRange(1, 10000), help="_changes rows per read."
)
@click.option(
    "--read-bytes", default=4 * 1024 * 1024, show_default=True, type=click.IntRange(16 * 1024), help="Aim per read."
)
@click.option("--reads-per-second", type=click.FloatRange(0.1), default=None)
@click.option(
    "--fetchers", default=4, show_default=True, type=click.IntRange(1, 16), help="_bulk_get requests in flight."
)
@click.option(
    "--part-seconds",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.0),
    help="Each part of a backup runs this long, as one task of the service would, then checkpoints and goes on.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_server_options
def backup_command(
    databases: tuple[str, ...],
    destination: str,
    all_dbs: bool,
    mode: str,
    attachments: bool,
    incremental: bool,
    full_every: int,
    name_prefix: str,
    batch_docs: int,
    batch_bytes: int,
    page_size: int,
    read_bytes: int,
    reads_per_second: float | None,
    fetchers: int,
    part_seconds: float,
    quiet: bool,
    url_env: str,
    user_env: str,
    password_env: str,
) -> None:
    """Back up DATABASES (names or globs) to --to; prints each backup's manifest URL.

    Each database is backed up by the couchdb kind itself, in the same budgeted parts a queued task runs."""
    if not databases and not all_dbs:
        raise click.UsageError("name at least one database (names or globs), or pass --all")
    rt = current_runtime()
    settings = Settings(
        server=_server_settings(url_env, user_env, password_env),
        databases=("*",) if all_dbs else databases,
        destination=destination,
        backup=BackupOptions(mode, attachments, batch_docs, batch_bytes, page_size, read_bytes, fetchers),
        incremental=incremental,
        full_every=full_every,
        reads_per_second=reads_per_second,
    )
    plan = Plan(name=name_prefix, kind=KIND.name, settings=settings)
    with _exit_codes():
        server = connect(settings.server, rt, reads_per_second=reads_per_second)
        try:
            available = server.all_dbs()
        finally:
            server.close()
        chosen = select_databases(settings.databases, available)
        # A database named exactly is taken even when it is a system database.
        chosen = sorted(set(chosen) | {d for d in databases if d in available})
        if not chosen:
            raise PermanentError(f"no database on {server.url} matches {', '.join(databases) or '--all'}")
        for db in chosen:
            period = rt.now()
            # A run of its own, however many are started in the same second (the lease tells them apart).
            run_id = f"cli-{period:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
            run = RunContext(run_id=run_id, plan=plan.name, target_key=db, period=period)
            with _progress(f"backup {db}", None if quiet else _doc_count(settings.server, db, rt), quiet) as bar:
                done_docs = [0]

                def show(pending: Pending, bar: Any = bar, done_docs: list[int] = done_docs) -> None:
                    docs = int(pending.state.get("backup", {}).get("manifest", {}).get("docs", 0))
                    bar.update(docs - done_docs[0])
                    done_docs[0] = docs

                done = drive(
                    KIND,
                    plan,
                    Target(key=db, params={"database": db}),
                    run,
                    rt,
                    budget_seconds=part_seconds,
                    retry=NO_MORE_RETRIES,
                    on_pending=show,
                )
            click.echo(done.output)
            stats = done.stats
            click.echo(
                f"{db}: {stats['docs']} revisions ({stats['deleted']} deleted), {stats['attachments']}"
                f" attachments, {stats['bytes']} bytes, seq {stats['seq']}",
                err=True,
            )


def _doc_count(server_settings: ServerSettings, db: str, rt: Runtime) -> int | None:
    server = connect(server_settings, rt)
    try:
        count = server.db_info(db).get("doc_count")
    finally:
        server.close()
    return count if isinstance(count, int) else None


@couchdb.command("restore")
@click.argument("backup")
@click.option("--db", "target", required=True, help="Database to restore into (created if missing).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty target, after a safety backup of it.")
@click.option("--safety-to", default=None, help="Where the safety backup goes (default: next to the backup).")
@click.option("--writes-per-second", type=click.FloatRange(0.1), default=None, help="E.g. 10 for Cloudant Lite.")
@click.option("--batch-docs", default=500, show_default=True, type=click.IntRange(1, 10000))
@click.option("--batch-bytes", default=8 * 1024 * 1024, show_default=True, type=click.IntRange(64 * 1024))
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 32), help="Requests in flight.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Then compare the target with the backup: every document's leaf revisions, as the changes feed lists them.",
)
@click.option(
    "--verify-bodies", is_flag=True, help="Verify by reading every document back (attachment digests too): slower."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_server_options
def restore_command(
    backup: str,
    target: str,
    overwrite: bool,
    safety_to: str | None,
    writes_per_second: float | None,
    batch_docs: int,
    batch_bytes: int,
    concurrency: int,
    checkpoint: Path | None,
    verify: bool,
    verify_bodies: bool,
    quiet: bool,
    url_env: str,
    user_env: str,
    password_env: str,
) -> None:
    """Restore BACKUP (a manifest URL or path; increments bring their full backup) into --db, then verify."""
    rt = current_runtime()
    with _exit_codes():
        server = _server(url_env, user_env, password_env, writes_per_second=writes_per_second)
        store, chain = open_backup(backup, rt)
        safety_store = store_for(safety_to, rt) if safety_to else store

        def safety_backup() -> Manifest:
            name = backup_name("safety", target, rt.now(), "full", False)
            click.echo(f"target {target} is not empty: safety backup to {safety_store.url(name)}", err=True)
            return backup_database(server, target, safety_store, name, BackupOptions(mode="full"), plan="safety")

        if checkpoint is None:
            key = hashlib.sha256(f"{server.url}|{target}|{chain[-1].name}".encode()).hexdigest()[:16]
            checkpoint = ROOT / ".local" / "couchdb-restore" / f"{key}.json"
        opts = RestoreOptions(
            batch_docs=batch_docs, batch_bytes=batch_bytes, overwrite=overwrite, concurrency=concurrency
        )
        total = sum(m.batches for m in chain)
        checking = verify or verify_bodies
        # The backup's side of the verify is loaded from the lines as the restore reads them, while the server
        # works on the ones in flight, rather than by reading the backup once more afterwards.
        rows = BackupRows(digests=verify_bodies) if checking else None
        with contextlib.ExitStack() as stack:
            if rows is not None:
                stack.enter_context(rows)
            with _progress(f"restore {target}", total, quiet) as bar:
                result = restore_chain(
                    server,
                    target,
                    store,
                    chain,
                    opts,
                    checkpoint_path=checkpoint,
                    safety_backup=safety_backup,
                    progress=bar.update,
                    on_line=rows.add_line if rows is not None else None,
                )
            click.echo(
                f"{target}: restored {len(chain)} backup(s), {result.lines_done} batches"
                + (f" (resumed, {result.lines_skipped} already applied)" if result.resumed else "")
                + (f"; safety backup {result.safety_backup}" if result.safety_backup else ""),
                err=True,
            )
            if rows is not None:
                # The restore has read the backup's files through already; the database is what is checked now.
                _verify(server, target, store, chain, quiet, check_files=False, bodies=verify_bodies, loaded=rows)
        server.close()


@couchdb.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--db", "database", required=True, help="The database the file is a backup of (names the backup).")
@click.option("--to", "destination", required=True, help="gs://BUCKET/PREFIX or an absolute local directory.")
@click.option("--prefix", "name_prefix", default="import", show_default=True, help="First path element of the name.")
def import_command(file: Path, database: str, destination: str, name_prefix: str) -> None:
    """Turn FILE, a backup made by IBM's couchbackup (full or shallow mode), into a backup of this tool under --to;
    prints its manifest, which `restore` and `verify` take like any other. A full-mode file keeps every revision
    history it holds; attachments the file only names (couchbackup without --attachments) cannot come back."""
    rt = current_runtime()
    with _exit_codes():
        store = store_for(destination, rt)
        name = backup_name(name_prefix, database, rt.now(), "full", False)
        foreign = ForeignFile()

        def pages() -> Iterator[list[dict[str, Any]]]:
            with open(file, "rb") as lines:
                yield from foreign.pages(iter(lines), str(file))

        try:
            manifest = import_documents(store, name, database, pages(), mode="full", source=f"couchbackup file {file}")
        except ValueError as exc:
            raise PermanentError(f"{exc}: not a couchbackup file") from None
        click.echo(store.url(manifest.manifest_name))
        click.echo(
            f"{database}: {manifest.docs} documents from a couchbackup {foreign.version} file ({foreign.mode} mode)"
            + (
                f"; {foreign.stubs_dropped} attachments were not in the file and are left out"
                if foreign.stubs_dropped
                else ""
            ),
            err=True,
        )


@couchdb.command("verify")
@click.argument("backup")
@click.option("--db", "target", required=True, help="The database to compare with the backup.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_server_options
def verify_command(backup: str, target: str, quiet: bool, url_env: str, user_env: str, password_env: str) -> None:
    """Compare --db with BACKUP: counts, (id, rev) pairs and attachment digests. Exit 3 on a difference."""
    rt = current_runtime()
    with _exit_codes():
        server = _server(url_env, user_env, password_env)
        store, chain = open_backup(backup, rt)
        _verify(server, target, store, chain, quiet)
        server.close()


def _verify(
    server: CouchServer,
    target: str,
    store: Store,
    chain: list[Manifest],
    quiet: bool,
    check_files: bool = True,
    bodies: bool = True,
    loaded: BackupRows | None = None,
) -> None:
    try:
        total = server.db_info(target).get("doc_count")
    except TargetGone:
        raise PermanentError(f"database {target!r} does not exist on {server.url}") from None
    with _progress(f"verify {target}", total, quiet) as bar:
        result = verify_database(
            server, target, store, chain, progress=bar.update, check_files=check_files, bodies=bodies, loaded=loaded
        )
    click.echo(result.summary(), err=True)
    if not result.ok:
        sys.exit(EXIT_MISMATCH)


commands = [couchdb]

if __name__ == "__main__":
    couchdb(prog_name="couchdb")
