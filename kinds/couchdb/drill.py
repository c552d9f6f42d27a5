"""The restore drill of a CouchDB backup: the newest backup (with the chain it is an increment of) restored into a
scratch database on the same server, checked against the backup, timed, and dropped.

- The scratch database is ``backup-scheduler-drill-<plan>-<hash of the database name>``: one per target, so a
  drill first drops what a crashed (or ``keep_scratch``) drill of the same target left, and never anything else.
- The restore runs in the task's budget like a backup; a large one goes on in follow-up tasks from its checkpoint
  (which lines are applied), carried in the drill's state.
- Checked: the data files' checksums (before anything is written), the number of live documents (and deleted
  ones, where the server reports it) against what the backup holds, and ``options.drill_sample`` documents (a
  different sample each drill, the same on a redelivery) compared leaf by leaf: revision, deleted flag,
  attachment digests. ``restored_in_seconds`` is the time spent restoring, over all parts.
- The source database and the backup are only read.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any

from kinds.couchdb.http import CouchServer
from kinds.couchdb.kind import connect, store_for
from kinds.couchdb.plan import Settings
from kinds.couchdb.restore import RestoreOptions, restore_chain
from kinds.couchdb.store import resolve_chain
from kinds.couchdb.verify import check_sample
from services.errors import PermanentError, TargetGone
from services.kinds import DRILL_LABEL, BackupRef, Done, DrillStep, Outcome, Pending, RunContext, Target
from services.plans import Plan
from services.runtime import Runtime

RESERVE_SECONDS = 20.0  # of the task's budget, kept for the lines in flight and the checks after the restore


def scratch_name(plan: Plan[Settings], database: str) -> str:
    """The scratch database of ``database``'s drills: lowercase, as CouchDB requires, and labelled."""
    return f"{DRILL_LABEL}-{plan.name}-{hashlib.sha256(database.encode()).hexdigest()[:12]}"


def drill(
    plan: Plan[Settings], target: Target, backup: BackupRef, state: dict[str, Any] | None, run: RunContext, rt: Runtime
) -> Outcome:
    try:
        return _drill(plan, target, backup, state, run, rt)
    except TargetGone as exc:
        # Whatever is missing (the backup's files, the scratch database half way), the drill did not prove the
        # backup restores: a failure, never a skip.
        raise PermanentError(f"drill failed: {exc}") from exc


def _drill(
    plan: Plan[Settings], target: Target, backup: BackupRef, state: dict[str, Any] | None, run: RunContext, rt: Runtime
) -> Outcome:
    assert plan.drill is not None
    settings = plan.settings
    store = store_for(settings.destination, rt)
    chain = resolve_chain(store, store.name_of(backup.output))
    if chain[-1].database != target.key or chain[-1].plan != plan.name:
        raise PermanentError(f"refused: {backup.output} is not a backup of {target.key!r} by plan {plan.name}")
    scratch = scratch_name(plan, target.key)
    server = connect(settings.server, rt)
    try:
        if state is None:
            size = sum(m.bytes_uncompressed for m in chain)
            if plan.drill.max_bytes is not None and size > plan.drill.max_bytes:
                raise PermanentError(
                    f"the backup holds {size} bytes, over drill.max_bytes ({plan.drill.max_bytes}); not drilled"
                )
            _drop(server, scratch)
            state = {"seconds": 0.0, "restore": None}
        reserve = min(RESERVE_SECONDS, run.time_left() / 4)
        began = time.monotonic()
        try:
            result = restore_chain(
                server,
                scratch,
                store,
                chain,
                RestoreOptions(),
                resume=state["restore"],
                deadline=None if run.deadline is None else run.deadline - reserve,
            )
            seconds = round(float(state["seconds"]) + time.monotonic() - began, 3)
            if not result.finished:
                run.log(f"drill: restoring into {scratch}, {result.lines_done} lines in this part; going on")
                return Pending({"seconds": seconds, "restore": result.checkpoint}, delay_seconds=0)
            checked = check_sample(server, scratch, store, chain, sample=settings.drill_sample, seed=run.run_id)
        except PermanentError:
            if not plan.drill.keep_scratch:
                _drop(server, scratch)
            raise
        if not plan.drill.keep_scratch:
            _drop(server, scratch)
    finally:
        server.close()
    what = [
        f"{len(chain)} backup(s) up to {backup.output}: checksums of the data files",
        f"document counts {checked.expected} against the restored database's {checked.actual}",
        f"{checked.expected['sampled']} sampled documents compared leaf by leaf (revision, deleted, attachments)",
    ]
    if not checked.ok:
        differing = f"; sampled documents that differ: {', '.join(checked.differing_ids[:20])}"
        raise PermanentError(
            f"drill failed: restored {scratch} has {checked.actual}, the backup {checked.expected}"
            + (differing if checked.differing_ids else "")
        )
    run.log(f"drill: {backup.output} restored into {scratch} in {seconds} s and checked")
    return Done(output="drill", stats={"restored_in_seconds": seconds, "checked": what, "passed": True})


def _drop(server: CouchServer, scratch: str) -> None:
    with contextlib.suppress(TargetGone):  # nothing left behind
        server.request("DELETE", server.db_path(scratch), write=True)


_SIGNATURE: DrillStep[Settings] = drill  # mypy holds it to the contract
