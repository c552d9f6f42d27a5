"""The deployment files read together at start-up: every plan's queue is in queue.yaml (with the queues the core
itself uses), and every cron.yaml entry names a plan or one of the service's own checks. A mistake here would
otherwise surface only when cron first fires or a task is first enqueued, possibly days after a deploy."""

from __future__ import annotations

from typing import Any

from services.errors import ConfigError
from services.plans import Plan
from services.queue import load_queue_configs
from services.schedule import load_cron

CORE_QUEUES = ("fanout", "polls", "notify")  # continuations, operation polls, notifications
OWN_CRON_URLS = ("/cron/_stale", "/cron/_digest", "/cron/_drills")


def check_deployment_files(plans: dict[str, Plan[Any]], queue_yaml: Any, cron_yaml: Any) -> None:
    """ConfigError naming the file, the entry and what is wrong; nothing when the three files agree."""
    queues = load_queue_configs(queue_yaml)
    for name in CORE_QUEUES:
        if name not in queues:
            raise ConfigError(f"queue.yaml: queue {name!r} is missing (the service itself uses it)")
    for plan in plans.values():
        if plan.queue not in queues:
            raise ConfigError(
                f"plans.yaml: plan '{plan.name}', field 'queue': {plan.queue!r} is not a queue in queue.yaml"
                f" (queues: {', '.join(sorted(queues))})"
            )
    for index, job in enumerate(load_cron(cron_yaml), start=1):
        url = job.url.split("?")[0]
        if job.plan is None and url not in OWN_CRON_URLS:
            raise ConfigError(f"cron.yaml: entry {index} ({job.url}): expected /cron/<plan> or one of {OWN_CRON_URLS}")
        if job.plan is not None and job.plan not in plans:
            raise ConfigError(
                f"cron.yaml: entry {index} ({job.url}): no plan named {job.plan!r} in plans.yaml"
                f" (plans: {', '.join(sorted(plans))})"
            )
