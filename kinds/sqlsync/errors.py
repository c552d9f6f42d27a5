"""What can go wrong in a sync, as types: the step runner turns each into retry-or-stop (naming the step), and the
CLI chooses its exit code and hint from the type, never from the wording."""

from __future__ import annotations


class SyncError(Exception):
    """Base of the engine's own errors: all stop the run (PermanentError once a step reports them)."""


class Refused(SyncError):
    """A safety rule says no: staging or scratch is production, no safety backup of staging, a leak was found."""


class SchemaDrift(SyncError):
    """The plan's rules and the live schema disagree (a ruled column is gone, an unruled one appeared ...)."""


class LeakFound(Refused):
    """An original personal value was found where only masked data may be."""


class HalfDone(SyncError):
    """An earlier attempt of an in-place step stopped half-way: scratch must be loaded again (``restart_at``)."""

    def __init__(self, message: str, restart_at: str):
        super().__init__(message)
        self.restart_at = restart_at


class DumpMissing(SyncError):
    """A dump file a step needs is not there (deleted, or the run it belongs to never made it)."""


class DumpError(Exception):
    """``mariadb-dump`` or ``mariadb`` failed; ``stderr`` is kept for classification."""

    def __init__(self, message: str, stderr: str):
        super().__init__(f"{message}: {stderr.strip()[-500:]}")
        self.stderr = stderr
