"""Kind ``couchdb``: backups of CouchDB / Cloudant databases, one target per database.

A plan names a server (through environment variables or a Secret Manager version, read with the runtime's
secrets: credentials never live in plans.yaml), which databases to take (names, globs, or ``*``), where backups go
(``gs://bucket/prefix`` or a local directory) and how (``full``: every leaf revision with its history, conflicts
and tombstones; ``winning``: winning revisions, with their history in increments). See kinds/couchdb/plan.py.

A ``job`` kind: ``start`` begins the backup and writes as much of it as the task's budget allows, one part per
task (kinds/couchdb/backup.py); while the changes feed is not read to its end, it answers ``Pending`` with the
checkpoint (the ``since`` sequence reached and the parts written so far) and the follow-up task's ``poll`` goes on
from there. The last step joins the parts, reads the file back, writes the manifest, and only then applies
retention (services/retention.py: only this plan's own backups, never one a kept increment needs).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from kinds.couchdb.backup import (
    PART_SUFFIX,
    BackupState,
    backup_name,
    backup_part,
    backup_prefix,
    begin_backup,
    finish_backup,
    utc_stamp,
)
from kinds.couchdb.format import CREATED_BY, Manifest
from kinds.couchdb.http import CouchServer, redact_url
from kinds.couchdb.plan import ServerSettings, Settings
from kinds.couchdb.store import Store, list_manifests, open_store
from services import retention
from services.errors import PermanentError, TargetGone, TransientError
from services.kinds import Done, DrillsIn, Execution, Outcome, Pending, RunContext, Target, TargetPage
from services.plans import Plan

# The part of a task's budget kept for what follows the last page of a part: closing the part, saving the state.
PART_RESERVE_SECONDS = 20.0
# One backup of a database at a time per plan: a lease beside its backups, renewed by every part, given up when
# the backup is finished or has failed; one older than this was left by a run that died, and is taken over.
LEASE_NAME = ".backup-in-progress.json"
LEASE_TIME = timedelta(hours=1)


def connect(
    server: ServerSettings,
    rt: Any,
    *,
    writes_per_second: float | None = None,
    reads_per_second: float | None = None,
) -> CouchServer:
    """A CouchServer for the variables ``server`` names, read through the runtime's secrets (and Secret Manager
    for the password when the plan names a version)."""
    secrets = rt.secrets
    url = secrets.require_env(server.url_env, "the CouchDB server URL")
    user = secrets.env(server.user_env) if server.user_env else None
    password = secrets.env(server.password_env) if server.password_env else None
    if server.password_secret:
        if not user:
            raise PermanentError(
                f"server.password_secret is set but the user variable {server.user_env} is empty or not set"
            )
        password = access_secret(server.password_secret, rt)
    auth = (user, password or "") if user else None
    return CouchServer(url, auth=auth, writes_per_second=writes_per_second, reads_per_second=reads_per_second)


def access_secret(version: str, rt: Any) -> str:
    """The text of Secret Manager secret version ``version``, through the runtime's secrets (cached there)."""
    value: str = rt.secrets.secret(version)
    return value


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


def our_backups(store: Store, plan: Plan[Settings], db: str) -> list[Manifest]:
    """The backups of ``db`` this plan made, oldest first (anything else in the folder is not looked at)."""
    listed = list_manifests(store, backup_prefix(plan.name, db))
    return [m for m in listed if m.created_by == CREATED_BY and m.plan == plan.name and m.database == db]


def _hold_lease(store: Store, backup: str, run: RunContext, rt: Any) -> None:
    """Take (or renew) the lease on backing up this database for ``run``; TransientError while another run of the
    plan holds it, so the queue tries again later (the CLI says so and stops)."""
    name = backup.rsplit("/", 1)[0] + "/" + LEASE_NAME
    now = rt.now()
    ours = json.dumps({"run_id": run.run_id, "backup": backup, "until": (now + LEASE_TIME).isoformat()}).encode()
    if store.create_exclusive(name, ours):
        return
    try:
        held = json.loads(store.read_bytes(name))
        holder, until = str(held["run_id"]), datetime.fromisoformat(held["until"])
    except (ValueError, KeyError, TypeError, TargetGone):
        holder, until = "", now  # unreadable, or gone since: take it
    if holder != run.run_id and until > now:
        raise TransientError(
            f"another backup of this database is in progress ({held.get('backup')}, run {holder}) until"
            f" {until.isoformat()} at the latest; not starting a second one alongside it"
        )
    store.write_bytes(name, ours)


def _give_up_lease(store: Store, backup: str, run: RunContext) -> None:
    name = backup.rsplit("/", 1)[0] + "/" + LEASE_NAME
    with contextlib.suppress(ValueError, KeyError, TypeError, TargetGone):
        if json.loads(store.read_bytes(name))["run_id"] == run.run_id:
            store.delete(name)


def _go_on(
    plan: Plan[Settings], store: Store, server: CouchServer, state: BackupState, run: RunContext, rt: Any
) -> Outcome:
    _hold_lease(store, state.manifest.name, run, rt)
    try:
        return _next_step(plan, store, server, state, run, rt)
    except (PermanentError, TargetGone):  # this run is over; a transient error is retried by the same run
        _give_up_lease(store, state.manifest.name, run)
        raise


def _next_step(
    plan: Plan[Settings], store: Store, server: CouchServer, state: BackupState, run: RunContext, rt: Any
) -> Outcome:
    reserve = min(PART_RESERVE_SECONDS, run.time_left() / 4)
    if not state.feed_done:
        deadline = None if run.deadline is None else run.deadline - reserve
        backup_part(server, store, state, plan.settings.backup, deadline=deadline)
        manifest = state.manifest
        run.log(
            f"part {len(state.parts)}: {state.parts[-1].lines} lines, {manifest.docs} revisions so far,"
            f" seq {str(manifest.seq)[:40]}" + ("" if state.feed_done else "; going on in a follow-up task")
        )
        if not state.feed_done or run.out_of_time(reserve):
            return Pending({"backup": state.to_json()}, delay_seconds=0)
    manifest = finish_backup(store, state, rt.now)
    done = _done(plan, store, manifest, run)
    for leftover in _leftovers(store, manifest):
        store.delete(leftover)
        run.log(f"removed {store.url(leftover)}, left by a backup that did not finish")
    _give_up_lease(store, manifest.name, run)
    return done


def _leftovers(store: Store, finished: Manifest) -> list[str]:
    """Parts and half-written files beside the backup just finished: left by runs that died (only the lease
    holder writes here, and it has just joined its own parts)."""
    folder = finished.name.rsplit("/", 1)[0] + "/"
    return [n for n in store.list(folder) if PART_SUFFIX in n or n.endswith(".partial")]


def _done(plan: Plan[Settings], store: Store, manifest: Manifest, run: RunContext) -> Done:
    pruned = prune_backups(store, plan, manifest)
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


def _previous_for_increment(settings: Settings, existing: list[Manifest]) -> Manifest | None:
    if not settings.incremental:
        return None
    same_mode = [m for m in existing if m.mode == settings.backup.mode and m.attachments == settings.backup.attachments]
    if not same_mode:
        return None
    latest = same_mode[-1]
    return latest if latest.chain_length < settings.full_every else None


def _created(manifest: Manifest) -> datetime:
    """When a backup began: its manifest says, else the stamp in its name (the run's period)."""
    try:
        return datetime.fromisoformat(manifest.started)
    except ValueError:
        stamp = manifest.name.rsplit("/", 1)[-1][:16]
        return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def prune_backups(store: Store, plan: Plan[Settings], newest: Manifest) -> list[str]:
    """Apply the plan's retention to its backups of ``newest.database`` once ``newest`` is confirmed (listed back
    from the store): services/retention.py chooses, and a backup that a kept increment is built on stays whatever
    it says. The manifest goes first, so a half-pruned backup is never mistaken for a whole one."""
    ours = our_backups(store, plan, newest.database)
    listed = [retention.Backup(m.name, _created(m), ours=True, item=m) for m in ours]
    policy = retention.Policy(keep=plan.retention.keep, floor=plan.retention.min_keep)
    chosen = retention.to_delete(listed, policy, confirmed=newest.name)
    by_name = {m.name: m for m in ours}
    needed: set[str] = set()
    for manifest in ours:
        if manifest.name in {c.name for c in chosen}:
            continue
        current: Manifest | None = manifest
        while current is not None and current.name not in needed:
            needed.add(current.name)
            current = by_name.get(current.previous) if current.previous else None
    deleted = []
    for backup in chosen:
        if backup.name in needed or backup.item is None:
            continue
        store.delete(backup.item.manifest_name)
        store.delete(backup.item.data_name)
        deleted.append(backup.item.manifest_name)
    return deleted


class CouchDB(DrillsIn):
    """The ``couchdb`` kind: database backups written by this code in budgeted parts (see the module docstring)."""

    name = "couchdb"
    execution: Execution = "job"
    default_queue = "backups"
    drill_module = "kinds.couchdb.drill"

    def enumerate(self, plan: Plan[Settings], page_token: str | None, rt: Any) -> TargetPage:
        """One page of the databases on the server that the plan selects (the page token is an offset)."""
        settings = plan.settings
        server = connect(settings.server, rt, reads_per_second=settings.reads_per_second)
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

    def resolve(self, plan: Plan[Settings], key: str, rt: Any) -> Target:
        """The database ``key`` names, if the plan's selection covers it (the server is asked when backing up)."""
        if not select_databases(plan.settings.databases, [key]):
            raise PermanentError(f"refused: database {key[:200]!r} is not selected by plan {plan.name}")
        return Target(key=key, params={"database": key})

    def start(self, plan: Plan[Settings], target: Target, run: RunContext, rt: Any) -> Outcome:
        """Begin the backup of one database for this run's period (or find it already made), then write its
        first part."""
        settings = plan.settings
        db = target.key
        store = store_for(settings.destination, rt)
        existing = our_backups(store, plan, db)
        stamp = utc_stamp(run.period)
        same_run = [m for m in existing if m.name.startswith(backup_prefix(plan.name, db) + stamp + "-")]
        if same_run:
            # A redelivered task: the backup of this period is already written and confirmed.
            run.log(f"backup {store.url(same_run[0].manifest_name)} already exists for this period")
            return _done(plan, store, same_run[0], run)
        previous = _previous_for_increment(settings, existing)
        name = backup_name(plan.name, db, run.period, settings.backup.mode, previous is not None)
        server = connect(settings.server, rt, reads_per_second=settings.reads_per_second)
        try:
            run.log(f"backing up {db} from {redact_url(server.url)} to {store.url(name)}")
            state = begin_backup(server, db, name, settings.backup, plan=plan.name, previous=previous, now=rt.now)
            return _go_on(plan, store, server, state, run, rt)
        finally:
            server.close()

    def poll(self, plan: Plan[Settings], target: Target, state: dict[str, Any], run: RunContext, rt: Any) -> Outcome:
        """The next part of the backup the checkpoint ``state`` describes."""
        backup = BackupState.from_json(state.get("backup"))
        # The checkpoint comes from this run's own record, yet it must still name this plan's backup of this target.
        expected = backup_prefix(plan.name, target.key)
        if backup.manifest.database != target.key or not backup.manifest.name.startswith(expected):
            raise PermanentError(
                f"refused: checkpoint names backup {backup.manifest.name[:200]!r}, not one of {expected}"
            )
        store = store_for(plan.settings.destination, rt)
        server = connect(plan.settings.server, rt, reads_per_second=plan.settings.reads_per_second)
        try:
            return _go_on(plan, store, server, backup, run, rt)
        finally:
            server.close()

    def describe(self, plan: Plan[Settings], target: Target, rt: Any) -> str:
        settings = plan.settings
        how = f"{settings.backup.mode} mode" + (", incremental" if settings.incremental else "")
        return f"back up CouchDB database {target.key!r} ({how}) to {settings.destination}"


KIND = CouchDB()
enumerate_targets = KIND.enumerate
start = KIND.start
