"""A small stateful fake of the BigQuery v2 REST API: datasets, tables and load jobs.

There is no BigQuery emulator, so tests answer the real google-cloud-bigquery client from this fake through
``responses``. It models what loading Datastore exports needs and keeps state across calls:

- ``jobs.insert`` of a load job: the destination dataset must exist (404 ``notFound`` otherwise), a job id may be
  used once (409 ``duplicate``), and the source must be an existing object (checked with ``exists``);
- ``jobs.get``: a job goes PENDING -> RUNNING -> DONE over successive reads; when DONE its table exists with the
  rows ``rows_for(source)`` says, or the job carries an ``errorResult`` when its table is in ``failing_tables``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

JOBS = re.compile(r"/bigquery/v2/projects/([^/]+)/jobs(?:/([^/?]+))?$")


class BigQueryFake:
    def __init__(self, exists: Callable[[str], bool], rows_for: Callable[[str], int]):
        self.exists = exists
        self.rows_for = rows_for
        self.datasets: set[tuple[str, str]] = set()
        self.tables: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.reads: dict[tuple[str, str], int] = {}
        self.failing_tables: set[str] = set()
        self.inserted: list[dict[str, Any]] = []

    def add_dataset(self, project: str, dataset: str) -> None:
        self.datasets.add((project, dataset))

    def callback(self, request: Any) -> tuple[int, dict[str, str], str]:
        path = urlsplit(request.url).path
        found = JOBS.search(path)
        try:
            if not found:
                raise _Error(404, "notFound", f"no fake route for {request.method} {path}")
            project, job_id = found.groups()
            if request.method == "POST" and job_id is None:
                body = self._insert(project, json.loads(request.body))
            elif request.method == "GET" and job_id is not None:
                body = self._get(project, job_id)
            else:
                raise _Error(404, "notFound", f"no fake route for {request.method} {path}")
        except _Error as error:
            payload = {"code": error.status, "message": error.message, "errors": [{"reason": error.reason}]}
            return error.status, {"Content-Type": "application/json"}, json.dumps({"error": payload})
        return 200, {"Content-Type": "application/json"}, json.dumps(body)

    def _insert(self, project: str, job: dict[str, Any]) -> dict[str, Any]:
        reference = job["jobReference"]
        key = (reference.get("projectId", project), reference["jobId"])
        if key in self.jobs:
            raise _Error(409, "duplicate", f"Already Exists: Job {key[0]}:{key[1]}")
        load = job["configuration"]["load"]
        table = load["destinationTable"]
        if (table["projectId"], table["datasetId"]) not in self.datasets:
            raise _Error(404, "notFound", f"Not found: Dataset {table['projectId']}:{table['datasetId']}")
        if load.get("sourceFormat") != "DATASTORE_BACKUP":
            raise _Error(400, "invalid", f"this fake only loads DATASTORE_BACKUP, not {load.get('sourceFormat')}")
        for uri in load["sourceUris"]:
            if not uri.endswith(".export_metadata") or not self.exists(uri):
                raise _Error(404, "notFound", f"Not found: URI {uri}")
        stored = {**job, "id": f"{key[0]}:{key[1]}", "status": {"state": "PENDING"}, "statistics": {}}
        self.jobs[key] = stored
        self.reads[key] = 0
        self.inserted.append(job)
        return stored

    def _get(self, project: str, job_id: str) -> dict[str, Any]:
        key = (project, job_id)
        if key not in self.jobs:
            raise _Error(404, "notFound", f"Not found: Job {project}:{job_id}")
        job = self.jobs[key]
        self.reads[key] += 1
        if job["status"]["state"] != "DONE":
            job["status"] = {"state": "RUNNING" if self.reads[key] == 1 else "DONE"}
            if job["status"]["state"] == "DONE":
                self._finish(job)
        return job

    def _finish(self, job: dict[str, Any]) -> None:
        load = job["configuration"]["load"]
        table = load["destinationTable"]
        if table["tableId"] in self.failing_tables:
            error = {"reason": "invalid", "message": f"Error while reading data: {load['sourceUris'][0]} is corrupt"}
            job["status"] = {"state": "DONE", "errorResult": error, "errors": [error]}
            return
        rows = sum(self.rows_for(uri) for uri in load["sourceUris"])
        self.tables[(table["projectId"], table["datasetId"], table["tableId"])] = {
            "numRows": rows,
            "writeDisposition": load.get("writeDisposition"),
        }
        job["statistics"] = {"load": {"outputRows": str(rows), "inputFiles": str(len(load["sourceUris"]))}}


class _Error(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
