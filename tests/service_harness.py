"""The app as a test drives it: the local queue, a clock the test moves, and the real catalog in the Datastore
emulator; tasks are delivered over the app's own HTTP interface, polls and continuations included."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from google.auth.credentials import AnonymousCredentials

from main import create_app
from services.catalog import Catalog
from services.fanout import backup_task, current_period
from services.kinds import Target
from services.queue import LocalQueue
from tests.helpers import LOCAL_TOKEN, make_runtime

AUTH = {"Authorization": f"Bearer {LOCAL_TOKEN}"}


class Service:
    """The app with the local queue, a clock the test moves, and the real catalog in the Datastore emulator."""

    def __init__(self, tmp_path: Path, datastore: Any, plans: dict[str, Any], clock: Any, **settings: Any):
        self.clock = clock
        self.rt = make_runtime(tmp_path, plans=plans, clock=clock, credentials=AnonymousCredentials(), **settings)
        self.queue = LocalQueue(tmp_path / "q.sqlite3", clock=clock)
        self.client = create_app(self.rt, queue=self.queue).test_client()
        self.catalog = Catalog(datastore)

    def post(self, path: str, body: Any) -> Any:
        return self.client.post(path, data=json.dumps(body), headers=AUTH, content_type="application/json")

    def task(self, plan_name: str, key: str, params: dict[str, Any] | None = None, period: Any = None) -> Any:
        plan = self.rt.plans[plan_name]
        return backup_task(plan, Target(key, params or {}), period or current_period(self.rt, plan))

    def run(self, task: Any) -> Any:
        """Deliver a backup (or drill) task, then every follow-up task it leads to, as the queue would: each when
        it is due, the clock moved on to that moment."""
        answer = self.post(task.path, task.payload)
        while True:
            follow_ups = [t for t in self.queue.tasks("pending") if t["name"].startswith(task.name + "-poll-")]
            if not follow_ups:
                return answer
            for follow_up in follow_ups:
                due = datetime.fromtimestamp(follow_up["eta"], UTC)
                if due > self.clock():
                    self.clock.advance(seconds=(due - self.clock()).total_seconds())
                self.queue.settle(follow_up["name"], state="done", status=200, error=None)
                answer = self.post(follow_up["path"], json.loads(follow_up["payload"]))

    def cron(self, path: str) -> Any:
        return self.client.get(path, headers=AUTH)

    def run_drills(self) -> tuple[list[dict[str, Any]], list[Any]]:
        """The hourly drills cron, then each drill task it enqueued run to the end (follow-ups too): what the cron
        answered per plan, and the last answer of each drill."""
        scheduled = self.cron("/cron/_drills").get_json()["plans"]
        answers = []
        for task in [t for t in self.queue.tasks("pending") if t["path"].endswith("/drill")]:
            self.queue.settle(task["name"], state="done", status=200, error=None)
            spec = SimpleNamespace(name=task["name"], path=task["path"], payload=json.loads(task["payload"]))
            answers.append(self.run(spec))
        return scheduled, answers
