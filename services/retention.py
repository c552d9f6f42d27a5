"""Retention: which old backups to delete, decided by one pure function for every kind of target.

The rules, the same everywhere (DESIGN.md): only backups this service made are ever candidates; only complete
(confirmed good) ones count; the newest ``keep`` by creation time are kept, and never fewer than the plan's floor;
and nothing is decided before the backup just made is confirmed good and listed. A kind lists its own backups as
``Backup`` records and deletes what ``to_delete`` returns; it never sorts or counts on its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backup(Generic[T]):
    """One backup as retention sees it. ``item`` is the kind's own description (a snapshot dict, a manifest),
    carried along so the kind can delete it."""

    name: str
    created: datetime
    ours: bool
    complete: bool = True
    item: T | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Policy:
    """``keep``: how many complete backups to keep (None: all); ``floor``: the fewest ever kept, whatever ``keep``
    says (a label set to 1 by mistake must not leave one copy)."""

    keep: int | None
    floor: int = 1

    @property
    def kept(self) -> int | None:
        return None if self.keep is None else max(self.keep, self.floor, 1)


# A label that says how many backups to keep (disks, Filestore) holds a whole number in this range.
LABEL_KEEP_MIN, LABEL_KEEP_MAX = 1, 1000
_COUNT = re.compile(r"^[0-9]{1,4}$")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


def count_from_label(value: str) -> int | None:
    """The number of backups to keep a label value says, or None when it is not a whole number in range."""
    value = value.strip()
    if _COUNT.match(value) and LABEL_KEEP_MIN <= int(value) <= LABEL_KEEP_MAX:
        return int(value)
    return None


class NotConfirmed(Exception):
    """The backup just made is not among the complete ones listed: nothing may be pruned."""


def to_delete(backups: Sequence[Backup[T]], policy: Policy, confirmed: str | None) -> list[Backup[T]]:
    """The backups to delete, oldest first.

    ``confirmed`` names the backup this run just made and confirmed good; it must be listed and complete, or
    NotConfirmed is raised (retention never runs on the strength of a backup it cannot see). With ``confirmed``
    None the call only answers "what would go" (a dry run, or a clean-up that made no new backup)."""
    ours = [b for b in backups if b.ours and b.complete]
    if confirmed is not None and all(b.name != confirmed for b in ours):
        raise NotConfirmed(f"{confirmed} is not among the complete backups listed; nothing is pruned")
    if policy.kept is None:
        return []
    newest_first = sorted(ours, key=lambda b: (b.created, b.name), reverse=True)
    return list(reversed(newest_first[policy.kept :]))


def prune(
    backups: Iterable[Backup[T]],
    policy: Policy,
    confirmed: str | None,
    delete: Callable[[Backup[T]], None],
    on_error: Callable[[Backup[T], Exception], None] | None = None,
) -> list[Backup[T]]:
    """Delete what ``to_delete`` chooses, oldest first; returns what was deleted. A failed delete is handed to
    ``on_error`` (the new backup is good; the old one is tried again next run) or, without it, raised."""
    deleted = []
    for backup in to_delete(list(backups), policy, confirmed):
        try:
            delete(backup)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(backup, exc)
            continue
        deleted.append(backup)
    return deleted
