"""The small error hierarchy that decides, in one place, whether a task is retried or recorded and stopped.

- ``TransientError``: the queue should retry (the worker answers 503, or 429 when rate limited).
- ``PermanentError``: retrying cannot help; the run is recorded as failed and the task answered 2xx.
- ``TargetGone``: the target vanished since enumeration; recorded as skipped, answered 2xx.
- ``TargetNotEmpty``: a restore refused to write into a place that already holds data (a PermanentError); the
  CLI tells it apart by type (its own exit code), never by the wording of the message.
- ``ConfigError``: plans.yaml (or a setting) is wrong; start-up stops with the plan and field named.
"""

from __future__ import annotations


class BackupError(Exception):
    """Base class for every error this service raises on purpose."""


class ConfigError(BackupError):
    """Invalid configuration. The message names the file, plan and field, and what was expected."""


class TransientError(BackupError):
    """A failure that may succeed on retry (quota, 5xx, an operation still in flight elsewhere)."""

    def __init__(self, message: str, *, rate_limited: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.rate_limited = rate_limited
        self.retry_after = retry_after


class PermanentError(BackupError):
    """A failure that retrying cannot fix (bad input, permission denied, incompatible bucket)."""


class TargetGone(BackupError):
    """The target no longer exists (deleted since enumeration). Recorded as skipped, not failed."""


class TargetNotEmpty(PermanentError):
    """A restore target already holds data and overwriting was not asked for: nothing was touched."""
