"""Small helpers shared by tests: free ports, waiting for servers, building a Runtime for a test."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.runtime import ROOT, Runtime, Settings

LOCAL_TOKEN = "test-local-token-5f0c"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime | None = None):
        self.now = now or datetime(2026, 11, 23, 2, 0, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        from datetime import timedelta

        self.now += timedelta(**delta)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "project": "test-project",
        "on_app_engine": False,
        "local_token": LOCAL_TOKEN,
        "queue_backend": "local",
        "local_queue_db": tmp_path / "queue.sqlite3",
        "plans_path": ROOT / "plans.yaml",
        "queue_yaml": ROOT / "queue.yaml",
        "cron_yaml": ROOT / "cron.yaml",
    }
    values.update(overrides)
    return Settings(**values)


def make_runtime(
    tmp_path: Path, plans: dict[str, Any] | None = None, clock: Any = None, credentials: Any = None, **overrides: Any
) -> Runtime:
    if plans is not None and "cron_yaml" not in overrides:
        overrides["cron_yaml"] = cron_for(tmp_path, plans)
    return Runtime(make_settings(tmp_path, **overrides), plans=plans, clock=clock or Clock(), credentials=credentials)


def cron_for(tmp_path: Path, plans: dict[str, Any]) -> Path:
    """The project's cron.yaml with only the entries for ``plans`` (and the service's own checks), as a deploy
    of just those plans would have it."""
    import yaml

    entries = yaml.safe_load((ROOT / "cron.yaml").read_text())["cron"]
    kept = [e for e in entries if e["url"].startswith("/cron/_") or e["url"].removeprefix("/cron/") in plans]
    path = tmp_path / "cron-for-plans.yaml"
    path.write_text(yaml.safe_dump({"cron": kept}))
    return path
