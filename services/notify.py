"""Telling people how a run ended. Today: a structured log line per finished run, at error level for failures,
which Cloud Logging alerting can match. Per-plan channels (Pub/Sub, webhooks) plug in here."""

from __future__ import annotations

import logging
from typing import Any

from services.catalog import FAILED, SUCCEEDED

log = logging.getLogger("backup.notify")


def run_finished(rt: Any, plan: Any, record: Any) -> None:
    if record.status == FAILED and plan.notify.on_failure:
        log.error(
            "backup failed: plan %s, target %s: %s",
            plan.name,
            record.target,
            record.error,
            extra={"plan": plan.name, "run_id": record.run_id},
        )
    elif record.status == SUCCEEDED and plan.notify.on_success:
        log.info(
            "backup succeeded: plan %s, target %s -> %s",
            plan.name,
            record.target,
            record.output,
            extra={"plan": plan.name, "run_id": record.run_id},
        )
