"""Datastore exports loaded into BigQuery, one table per kind, so a team can query its data and watch it grow.

After an export is confirmed good, one load job per exported kind (and namespace) reads the kind's
``.export_metadata`` file with source format ``DATASTORE_BACKUP``. Tables are named ``<prefix><Kind>`` (namespaced
kinds ``<prefix><namespace>__<Kind>``), with ``_YYYYMMDD`` of the run's period in ``snapshot`` mode (one dated table
per day, a second run the same day replaces it) or without in ``replace`` mode. Job ids are derived from the run,
so a redelivered task finds its job ("already exists") instead of loading twice. The load jobs are polled like the
export itself; a failed load fails the run with BigQuery's own message (the export stays: it is good).

The client is google-cloud-bigquery; ``BACKUP_BIGQUERY_ENDPOINT`` overrides where it connects.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from google.api_core import exceptions as core

from kinds.datastore.plan import BigQueryTarget
from services.errors import PermanentError
from services.gcp_errors import classify
from services.runtime import Runtime

POLL_SECONDS = 30.0
_KIND_METADATA = re.compile(
    r"/(default_namespace|all_namespaces|namespace_([^/]*))/kind_([^/]+)/[^/]+\.export_metadata$"
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def client(rt: Runtime, project: str) -> Any:
    from google.cloud import bigquery

    def make() -> Any:
        endpoint = rt.settings.endpoint("bigquery")
        options = {"api_endpoint": endpoint} if endpoint else None
        return bigquery.Client(project=project, credentials=rt.given_credentials, client_options=options)

    return rt.client(f"bigquery:{project}", make)


def table_name(target: BigQueryTarget, namespace: str, kind: str, period_day: str) -> str:
    """The table a kind loads into: letters, digits and underscores only, as BigQuery requires."""
    base = f"{namespace}__{kind}" if namespace else kind
    name = _UNSAFE.sub("_", f"{target.table_prefix}{base}")
    return f"{name}_{period_day}" if target.mode == "snapshot" else name


def kind_metadata_files(rt: Runtime, export_output: str) -> dict[tuple[str, str], str]:
    """(namespace, kind) -> gs:// URL of the kind's ``.export_metadata``, listed beside the export's overall
    metadata file (``export_output``)."""
    match = re.match(r"^gs://([^/]+)/(.*)/[^/]+$", export_output)
    if not match:
        raise PermanentError(f"export output {export_output!r} is not a gs:// metadata URL")
    bucket, folder = match.groups()
    found = {}
    for blob in rt.storage().list_blobs(bucket, prefix=folder + "/"):
        kind_file = _KIND_METADATA.search(blob.name)
        if kind_file:
            namespace = kind_file.group(2) or ""
            found[(namespace, kind_file.group(3))] = f"gs://{bucket}/{blob.name}"
    return found


def start_loads(
    rt: Runtime, target: BigQueryTarget, project: str, export_output: str, run_id: str, period_day: str
) -> dict[str, dict[str, str]]:
    """Start one load job per kind of the export; returns {job id: {"table", "source"}} for ``poll_loads``."""
    from google.cloud import bigquery

    sources = kind_metadata_files(rt, export_output)
    if not sources:
        raise PermanentError(f"the export at {export_output} has no kind metadata files to load into BigQuery")
    bq = client(rt, target.project or project)
    dataset = f"{target.project or project}.{target.dataset}"
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.DATASTORE_BACKUP,
        write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
    )
    jobs: dict[str, dict[str, str]] = {}
    for (namespace, kind), source in sorted(sources.items()):
        table = f"{dataset}.{table_name(target, namespace, kind, period_day)}"
        job_id = "backup_" + hashlib.sha256(f"{run_id}\n{namespace}\n{kind}".encode()).hexdigest()[:32]
        doing = f"loading {kind} into BigQuery table {table}"
        try:
            bq.load_table_from_uri(source, table, job_id=job_id, location=target.location, job_config=config)
        except core.Conflict:
            pass  # an earlier delivery of this run started it: poll_loads follows it like any other
        except Exception as exc:
            raise classify(exc, doing) from exc
        jobs[job_id] = {"table": table, "source": source, "kind": f"{namespace}/{kind}" if namespace else kind}
    return jobs


def poll_loads(
    rt: Runtime, target: BigQueryTarget, project: str, jobs: dict[str, dict[str, str]]
) -> dict[str, dict[str, Any]] | None:
    """None while any load job runs; then {kind: {"table", "rows"}}. A failed job raises PermanentError with
    BigQuery's message."""
    bq = client(rt, target.project or project)
    loaded: dict[str, dict[str, Any]] = {}
    for job_id, job in sorted(jobs.items()):
        try:
            found = bq.get_job(job_id, location=target.location)
        except Exception as exc:
            raise classify(exc, f"checking BigQuery load job {job_id}") from exc
        if found.state != "DONE":
            return None
        if found.error_result:
            reason = found.error_result.get("reason", "")
            message = found.error_result.get("message", "")
            raise PermanentError(f"loading {job['kind']} into {job['table']} failed ({reason}): {message}")
        loaded[job["kind"]] = {"table": job["table"], "rows": found.output_rows}
    return loaded
