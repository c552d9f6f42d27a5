"""A local stand-in for App Engine cron: reads cron.yaml and calls each job's URL when its schedule fires.

Off App Engine the ``X-Appengine-Cron`` header is never trusted, so it authenticates with the local token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

import requests

from services.runtime import utcnow
from services.schedule import CronJob

log = logging.getLogger(__name__)


class LocalCron:
    def __init__(self, jobs: list[CronJob], base_url: str, token: str | None, clock: Callable[[], datetime] = utcnow):
        self.jobs = jobs
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.clock = clock
        now = clock()
        self.next_fire = {job.url: job.schedule.next_fire(now) for job in jobs}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fire(self, job: CronJob) -> int:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = requests.get(self.base_url + job.url, headers=headers, timeout=600)
        except requests.RequestException as exc:
            log.error("local cron: %s failed: %s", job.url, exc)
            return 0
        log.info("local cron: %s -> %s %s", job.url, response.status_code, response.text.strip()[:300])
        return response.status_code

    def run_pending(self) -> list[str]:
        """Fire every job whose time has come; returns the URLs fired."""
        now = self.clock()
        fired = []
        for job in self.jobs:
            if self.next_fire[job.url] <= now:
                self.next_fire[job.url] = job.schedule.next_fire(now)
                self.fire(job)
                fired.append(job.url)
        return fired

    def start(self) -> LocalCron:
        def loop() -> None:
            while not self._stop.wait(1.0):
                self.run_pending()

        self._thread = threading.Thread(target=loop, name="local-cron", daemon=True)
        self._thread.start()
        for job in self.jobs:
            log.info("local cron: %s (%s) next at %s", job.url, job.schedule.text, self.next_fire[job.url].isoformat())
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
