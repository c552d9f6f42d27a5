"""Datastore managed exports: one export per kind (or kinds grouped into few requests) to a GCS bucket.

Before exporting, the bucket is checked for the two mistakes users hit most: a location Datastore cannot export
to, and a cold storage class. Exports run as long operations polled by follow-up tasks; the run records the
output URL and the entity/byte counts. ``restore`` starts an import, after a safety export of what it overwrites.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.api_core import exceptions as core

from kinds.datastore import bigquery
from kinds.datastore.plan import Settings
from services.catalog import NAMESPACE as CATALOG_NAMESPACE
from services.errors import PermanentError, TargetGone, TransientError
from services.fanout import period_stamp
from services.gcp_errors import classify
from services.kinds import Done, DrillsIn, Execution, Outcome, Pending, RunContext, Target, TargetPage, find_by_listing
from services.plans import Plan
from services.runtime import Runtime

MAX_COMBINATIONS = 100  # kind x namespace pairs Datastore accepts in one export request
COLD_CLASSES = ("NEARLINE", "COLDLINE", "ARCHIVE")
POLL_SECONDS = 60.0
# Multi-region buckets and the Datastore locations they contain (region prefixes and multi-region ids).
_MULTI_REGIONS = {"US": ("us-", "nam"), "EU": ("europe-", "eur"), "ASIA": ("asia-",)}


# ----------------------------------------------------------------------------------------------------- discovery


def list_namespaces(client: Any) -> list[str]:
    query = client.query(kind="__namespace__")
    query.keys_only()
    names = []
    for entity in query.fetch():
        name = entity.key.name
        names.append(name if isinstance(name, str) else "")  # the default namespace has a numeric id
    return sorted(n for n in names if n != CATALOG_NAMESPACE)


def list_kinds(client: Any, namespace: str) -> list[str]:
    query = client.query(kind="__kind__", namespace=namespace or None)
    query.keys_only()
    return sorted(e.key.name for e in query.fetch() if not e.key.name.startswith("__"))


def _project(plan: Plan[Settings], rt: Runtime) -> str:
    return plan.settings.project or rt.settings.project


def _client(plan: Plan[Settings], rt: Runtime) -> Any:
    project = _project(plan, rt)
    if project == rt.settings.project:
        return rt.datastore()
    from google.cloud import datastore

    return rt.client(f"datastore:{project}", lambda: datastore.Client(project=project))


def group_pairs(pairs: list[tuple[str, str]]) -> list[tuple[list[str], list[str]]]:
    """Pack (namespace, kind) pairs into as few export requests as possible. A request exports every kind of its
    list in every namespace of its list, at most ``MAX_COMBINATIONS`` combinations. Namespaces that hold the same
    kinds (usual for multi-tenant apps) share requests."""
    by_namespace: dict[str, list[str]] = {}
    for ns, kind in pairs:
        by_namespace.setdefault(ns, []).append(kind)
    by_kinds: dict[tuple[str, ...], list[str]] = {}
    for ns, kinds in sorted(by_namespace.items()):
        for start in range(0, len(kinds), MAX_COMBINATIONS):
            by_kinds.setdefault(tuple(sorted(kinds)[start : start + MAX_COMBINATIONS]), []).append(ns)
    groups = []
    for kind_group, namespaces in sorted(by_kinds.items()):
        per_request = max(1, MAX_COMBINATIONS // len(kind_group))
        for start in range(0, len(namespaces), per_request):
            groups.append((namespaces[start : start + per_request], list(kind_group)))
    return groups


def _target(project: str, namespaces: list[str], kinds: list[str]) -> Target:
    if len(namespaces) == 1 and len(kinds) == 1:
        key = f"{namespaces[0]}/{kinds[0]}" if namespaces[0] else kinds[0]
    else:
        listed = ",".join(kinds)
        digest = hashlib.sha256(f"{namespaces}{kinds}".encode()).hexdigest()[:8]
        key = f"{len(namespaces)} namespaces x {len(kinds)} kinds ({listed[:60]}) {digest}"
    return Target(key, {"project": project, "namespaces": namespaces, "kinds": kinds})


# ----------------------------------------------------------------------------------------------------- pre-flight


def location_compatible(bucket_location: str, datastore_location: str) -> bool:
    bucket_location, datastore_location = bucket_location.upper(), datastore_location.lower()
    if bucket_location.lower() == datastore_location:
        return True
    return datastore_location.startswith(_MULTI_REGIONS.get(bucket_location, ()))


def check_bucket(rt: Runtime, bucket_name: str, datastore_location: str) -> None:
    """Refuse a bucket Datastore cannot export to, saying what to change. Raises PermanentError."""
    try:
        bucket = rt.storage().get_bucket(bucket_name)
    except core.NotFound:
        raise PermanentError(
            f"bucket gs://{bucket_name} does not exist: create it in {datastore_location} (the Datastore location)"
            f" with storage class STANDARD, or point destination.bucket at an existing one"
        ) from None
    except core.GoogleAPICallError as exc:
        raise classify(exc, f"reading bucket gs://{bucket_name}") from exc
    location = (bucket.location or "").upper()
    if not location_compatible(location, datastore_location):
        raise PermanentError(
            f"bucket gs://{bucket_name} is in {location or 'an unknown location'}, but the Datastore database is in"
            f" {datastore_location}: exports need a bucket in {datastore_location} (or a multi-region containing"
            f" it). Create a bucket there and set destination.bucket, or fix options.location if it is wrong"
        )
    storage_class = (bucket.storage_class or "STANDARD").upper()
    if storage_class in COLD_CLASSES:
        raise PermanentError(
            f"bucket gs://{bucket_name} has default storage class {storage_class}, which Datastore exports do not"
            f" support: use a STANDARD bucket (`gcloud storage buckets update gs://{bucket_name}"
            f" --default-storage-class=STANDARD`), and move old exports to colder classes with a lifecycle rule"
        )


# ------------------------------------------------------------------------------------------------- export / poll


def admin_client(rt: Runtime) -> Any:
    """The Datastore Admin client. ``BACKUP_DATASTORE_ADMIN_ENDPOINT=http://host:port`` points it at the emulator."""

    def make() -> Any:
        from google.api_core.client_options import ClientOptions
        from google.cloud import datastore_admin_v1

        endpoint = rt.settings.datastore_admin_endpoint
        if endpoint and endpoint.startswith("http://"):
            from google.auth.credentials import AnonymousCredentials

            return datastore_admin_v1.DatastoreAdminClient(
                transport="rest",
                client_options=ClientOptions(api_endpoint=endpoint),
                credentials=AnonymousCredentials(),
            )
        options = ClientOptions(api_endpoint=endpoint) if endpoint else None
        transport = "rest" if endpoint and endpoint.startswith("https://") else None
        return datastore_admin_v1.DatastoreAdminClient(
            client_options=options, transport=transport, credentials=rt.given_credentials
        )

    return rt.client("datastore-admin", make)


def _slug(target: Target) -> str:
    text = re.sub(r"[^A-Za-z0-9_.-]+", "-", target.key).strip("-")[:80]
    return text or hashlib.sha256(target.key.encode()).hexdigest()[:12]


def _refuse_vanished(plan: Plan[Settings], rt: Runtime, namespaces: list[str], kinds: list[str]) -> None:
    """A kind deleted since enumeration would export nothing and look like success: call it skipped instead."""
    if len(namespaces) * len(kinds) != 1:
        return
    client = _client(plan, rt)
    query = client.query(kind=kinds[0], namespace=namespaces[0] or None)
    query.keys_only()
    try:
        if not list(query.fetch(limit=1)):
            raise TargetGone(f"kind {kinds[0]!r} has no entities any more (namespace {namespaces[0]!r})")
    except core.GoogleAPICallError as exc:
        raise classify(exc, f"checking kind {kinds[0]}") from exc


def _finished(
    plan: Plan[Settings], target: Target, rt: Runtime, operation: Any, state: dict[str, Any], run: RunContext
) -> Outcome:
    from google.cloud import datastore_admin_v1

    if operation.HasField("error") and operation.error.code:
        raise PermanentError(f"export failed (code {operation.error.code}): {operation.error.message}")
    response = datastore_admin_v1.ExportEntitiesResponse.deserialize(operation.response.value)
    metadata = datastore_admin_v1.ExportEntitiesMetadata.deserialize(operation.metadata.value)
    stats: dict[str, int | None] = {
        "entities": int(metadata.progress_entities.work_completed),
        "bytes": int(metadata.progress_bytes.work_completed),
    }
    output = response.output_url
    per_kind: dict[str, dict[str, int]] = {}
    namespaces, kinds = list(target.params["namespaces"]), list(target.params["kinds"])
    if len(namespaces) * len(kinds) == 1:
        key = f"{namespaces[0]}/{kinds[0]}" if namespaces[0] else kinds[0]
        per_kind[key] = {"entities": stats["entities"] or 0, "bytes": stats["bytes"] or 0}
    if rt.settings.export_local_root is not None:
        output = _mirror_local_export(rt, plan.settings.bucket, state, output)
        # The emulator reports no progress counts: count what it wrote instead (one log record per entity).
        per_kind = count_local_export(Path(state["prefix"]))
        stats = {
            "entities": sum(k["entities"] for k in per_kind.values()),
            "bytes": sum(k["bytes"] for k in per_kind.values()),
        }
    run.log(f"export done: {stats['entities']} entities, {stats['bytes']} bytes -> {output}")
    done = {**stats, "kinds": per_kind}
    tables = plan.settings.bigquery
    if tables is None:
        return Done(output=output, stats=done)
    jobs = bigquery.start_loads(rt, tables, _project(plan, rt), output, run.run_id, f"{run.period:%Y%m%d}")
    run.log(f"loading {len(jobs)} kind(s) into BigQuery dataset {tables.dataset}")
    state = {**state, "phase": "bigquery", "output": output, "export_stats": done, "jobs": jobs}
    return Pending(state, delay_seconds=bigquery.POLL_SECONDS)


def _loads_finished(plan: Plan[Settings], rt: Runtime, state: dict[str, Any], run: RunContext) -> Outcome:
    target = plan.settings.bigquery
    if target is None:  # the plan no longer loads into BigQuery: the export itself is done
        return Done(output=state["output"], stats=state["export_stats"])
    loaded = bigquery.poll_loads(rt, target, _project(plan, rt), state["jobs"])
    if loaded is None:
        return Pending(state, delay_seconds=bigquery.POLL_SECONDS)
    for kind, table in sorted(loaded.items()):
        run.log(f"BigQuery: {kind} -> {table['table']} ({table['rows']} rows)")
    return Done(output=state["output"], stats={**state["export_stats"], "bigquery": loaded})


def count_local_export(root: Path) -> dict[str, dict[str, int]]:
    """Entities and bytes per kind of an export written on local disk (the emulator's), from its files: every
    entity is one record of the LevelDB log format the output files use."""
    found: dict[str, dict[str, int]] = {}
    for folder in sorted(p for p in root.rglob("kind_*") if p.is_dir()):
        namespace = folder.parent.name.removeprefix("namespace_") if folder.parent.name.startswith("namespace_") else ""
        kind = folder.name.removeprefix("kind_")
        outputs = [p for p in folder.iterdir() if p.name.startswith("output-")]
        found[f"{namespace}/{kind}" if namespace else kind] = {
            "entities": sum(leveldb_log_records(p.read_bytes()) for p in outputs),
            "bytes": sum(p.stat().st_size for p in outputs),
        }
    return found


def leveldb_log_records(data: bytes, block: int = 32768) -> int:
    """How many records a LevelDB log holds: 32 KiB blocks of fragments, each behind a 7-byte header (checksum,
    little-endian length, type); a record is one FULL fragment or a FIRST ... LAST run, so FULL and FIRST count."""
    count, offset = 0, 0
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:  # a block's tail too short for a header is padding
            offset += room
            continue
        length = int.from_bytes(data[offset + 4 : offset + 6], "little")
        kind = data[offset + 6]
        if kind == 0 and length == 0:  # zeroed space after the last record of a block
            offset += room
            continue
        if kind in (1, 2):
            count += 1
        offset += 7 + length
    return count


def _mirror_local_export(rt: Runtime, bucket_name: str, state: dict[str, Any], local_metadata: str) -> str:
    """Copy an emulator export from local disk into the (emulated) bucket; return the gs:// metadata URL.
    (The emulator answers with the prefix itself as output URL; Datastore answers with the metadata file.)"""
    root = Path(state["prefix"])
    bucket = rt.storage().bucket(bucket_name)
    metadata = None
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = f"{state['relative']}/{path.relative_to(root).as_posix()}"
        bucket.blob(name).upload_from_filename(str(path))
        if name.endswith(".overall_export_metadata"):
            metadata = name
    if metadata is None:
        raise PermanentError(f"the emulator export at {local_metadata} has no .overall_export_metadata file")
    return f"gs://{bucket_name}/{metadata}"


# ------------------------------------------------------------------------------------------------------- restore


@dataclass
class RestoreResult:
    safety_export: str | None
    imported_from: str
    entities: int


def emulator_path(rt: Runtime, url: str) -> str:
    """``url`` (gs://bucket/name) as the Datastore admin API reads and writes it: itself in the cloud, or locally
    the emulator's own folder for that bucket (the emulator exports to and imports from local disk)."""
    local_root = rt.settings.export_local_root
    if local_root is None:
        return url
    bucket, _, name = url.removeprefix("gs://").partition("/")
    return str(Path(local_root) / bucket / name)


def metadata_url(rt: Runtime, export_url: str) -> str:
    """The ``.overall_export_metadata`` file of an export, given it or the export's folder."""
    if export_url.endswith(".overall_export_metadata"):
        return export_url
    match = re.match(r"^gs://([^/]+)/(.*)$", export_url)
    if not match:
        raise PermanentError(f"{export_url!r} is not a gs:// URL of an export")
    bucket, prefix = match.group(1), match.group(2).rstrip("/") + "/"
    found = [
        b.name for b in rt.storage().list_blobs(bucket, prefix=prefix) if b.name.endswith(".overall_export_metadata")
    ]
    if len(found) != 1:
        raise PermanentError(f"expected one .overall_export_metadata under {export_url}, found {len(found)}")
    return f"gs://{bucket}/{found[0]}"


def _finish(operation: Any, what: str, timeout: float) -> Any:
    """Wait for a long-running admin operation through the client's own operation object (which polls
    GetOperation with backoff): its response, TransientError if still running at ``timeout``, PermanentError with
    the operation's own error if it failed."""
    import concurrent.futures

    try:
        return operation.result(timeout=timeout)  # the CLI waits; request handlers never do
    except concurrent.futures.TimeoutError as exc:
        raise TransientError(
            f"{what}: operation {operation.operation.name} still running after {timeout:.0f}s"
        ) from exc
    except core.GoogleAPICallError as exc:
        raise PermanentError(f"{what} failed: {exc.message}") from exc


def restore(
    rt: Runtime,
    export_url: str,
    project: str | None = None,
    kinds: list[str] | None = None,
    namespaces: list[str] | None = None,
    safety_url_prefix: str | None = None,
    timeout: float = 6 * 3600,
) -> RestoreResult:
    """Import an export. Import overwrites entities with the same keys, so the kinds being restored are first
    exported to ``safety_url_prefix`` (default: a ``safety/`` folder beside the export) and that must succeed."""
    from google.cloud import datastore_admin_v1

    project = project or rt.settings.project
    source = metadata_url(rt, export_url)
    entity_filter = {"kinds": kinds or [], "namespace_ids": namespaces or []}
    if safety_url_prefix is None:
        bucket = re.match(r"^gs://([^/]+)/", source)
        stamp = time.strftime("%Y%m%dt%H%M%Sz", time.gmtime())
        safety_url_prefix = f"gs://{bucket.group(1) if bucket else 'unknown'}/safety/{stamp}"
    admin = admin_client(rt)
    safety = admin.export_entities(
        request={
            "project_id": project,
            "output_url_prefix": emulator_path(rt, safety_url_prefix),
            "entity_filter": entity_filter,
            "labels": {"managed-by": "backup-scheduler", "purpose": "safety-before-restore"},
        }
    )
    safety_output = _finish(safety, "safety export before restore", timeout).output_url
    imported = admin.import_entities(
        request={
            "project_id": project,
            "input_url": emulator_path(rt, source),
            "entity_filter": entity_filter,
            "labels": {"managed-by": "backup-scheduler"},
        }
    )
    _finish(imported, "import", timeout)
    metadata: datastore_admin_v1.ImportEntitiesMetadata = imported.metadata
    return RestoreResult(safety_output, source, int(metadata.progress_entities.work_completed))


class Datastore(DrillsIn):
    """The ``datastore`` kind: a managed export per kind (or per group of kinds) into a bucket, each a long
    operation polled by follow-up tasks. Targets are cheap to list (metadata queries), so ``resolve`` lists them."""

    name = "datastore"
    default_queue = "datastore-exports"
    execution: Execution = "operation"
    drill_module = "kinds.datastore.drill"

    def resolve(self, plan: Plan[Settings], key: str, rt: Runtime) -> Target:
        return find_by_listing(self, plan, key, rt)

    def enumerate(self, plan: Plan[Settings], page_token: str | None, rt: Runtime) -> TargetPage:
        """Every (namespace, kind) to export, as one target each or packed into groups. Kind lists are small
        (metadata queries), so everything fits in one page."""
        settings: Settings = plan.settings
        client = _client(plan, rt)
        try:
            namespaces = list(settings.namespaces) if settings.namespaces is not None else list_namespaces(client)
            pairs = [
                (ns, kind)
                for ns in namespaces
                for kind in (list(settings.kinds) if settings.kinds else list_kinds(client, ns))
            ]
        except core.GoogleAPICallError as exc:
            raise classify(exc, "listing Datastore kinds") from exc
        project = _project(plan, rt)
        groups = group_pairs(pairs) if settings.grouped else [([ns], [kind]) for ns, kind in pairs]
        return TargetPage([_target(project, namespaces_, kinds) for namespaces_, kinds in groups])

    def describe(self, plan: Plan[Settings], target: Target, rt: Runtime) -> str:
        settings: Settings = plan.settings
        return (
            f"would export {target.key} (namespaces {target.params['namespaces']}, kinds {target.params['kinds']})"
            f" to gs://{settings.bucket}/{settings.prefix}/<UTC timestamp>/{_slug(target)}"
        )

    def start(self, plan: Plan[Settings], target: Target, run: RunContext, rt: Runtime) -> Outcome:
        settings: Settings = plan.settings
        check_bucket(rt, settings.bucket, settings.location)
        kinds, namespaces = list(target.params["kinds"]), list(target.params["namespaces"])
        _refuse_vanished(plan, rt, namespaces, kinds)
        relative = f"{settings.prefix}/{period_stamp(run.period)}z/{_slug(target)}"
        # Locally the emulator writes exports to its own disk; they are mirrored into the bucket when done.
        prefix = emulator_path(rt, f"gs://{settings.bucket}/{relative}")
        request = {
            "project_id": target.params["project"],
            "output_url_prefix": prefix,
            "entity_filter": {"kinds": kinds, "namespace_ids": namespaces},
            "labels": {"managed-by": "backup-scheduler", "plan": plan.name},
        }
        run.log(f"exporting {len(kinds)} kind(s) in {len(namespaces)} namespace(s) to {prefix}")
        try:
            operation = admin_client(rt).export_entities(request=request).operation
        except core.GoogleAPICallError as exc:
            raise classify(exc, f"starting the export of {target.key}") from exc
        state = {"operation": operation.name, "prefix": prefix, "relative": relative}
        if operation.done:
            return _finished(plan, target, rt, operation, state, run)
        run.log(f"export operation {operation.name} started")
        return Pending(state, delay_seconds=POLL_SECONDS)

    def poll(
        self, plan: Plan[Settings], target: Target, state: dict[str, Any], run: RunContext, rt: Runtime
    ) -> Outcome:
        from google.longrunning import operations_pb2

        if state.get("phase") == "bigquery":
            return _loads_finished(plan, rt, state, run)
        try:
            operation = admin_client(rt).get_operation(operations_pb2.GetOperationRequest(name=state["operation"]))
        except core.NotFound as exc:
            raise PermanentError(f"export operation {state['operation']} is gone: {exc.message}") from exc
        except core.GoogleAPICallError as exc:
            raise classify(exc, f"polling export {state['operation']}") from exc
        if not operation.done:
            return Pending(state, delay_seconds=POLL_SECONDS)
        return _finished(plan, target, rt, operation, state, run)


KIND = Datastore()
