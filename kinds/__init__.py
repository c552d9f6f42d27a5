"""The kinds of target: one package each, registered here by name (the ``kind:`` of a plan).

Each kind package has ``plan.py`` (its part of a plan, ``Sections``: light, so reading plans.yaml loads no API
client) and ``kind.py`` (``KIND``, the object that keeps the contract in services/kinds.py, on top of the kind's
own engine modules). Adding a kind means adding a package and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from services.errors import ConfigError

if TYPE_CHECKING:
    from services.kinds import Kind

# name -> ("module:attribute" of its plan sections, "module:attribute" of its Kind object)
REGISTRY: dict[str, tuple[str, str]] = {
    "couchdb": ("kinds.couchdb.plan:Sections", "kinds.couchdb.kind:KIND"),
    "datastore": ("kinds.datastore.plan:Sections", "kinds.datastore.exports:KIND"),
    "directory": ("kinds.directory.plan:Sections", "kinds.directory.kind:KIND"),
    "disks": ("kinds.disks.plan:Sections", "kinds.disks.snapshots:KIND"),
    "filestore": ("kinds.filestore.plan:Sections", "kinds.filestore.backups:KIND"),
    "sqlsync": ("kinds.sqlsync.plan:Sections", "kinds.sqlsync.kind:KIND"),
}


def _load(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def plan_sections() -> dict[str, Any]:
    """Every kind's plan sections model, by kind name."""
    return {name: _load(sections) for name, (sections, _kind) in REGISTRY.items()}


def get(name: str) -> Kind[Any]:
    """The Kind object registered as ``name``; ConfigError listing the known kinds if there is none."""
    try:
        _sections, kind = REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown kind {name!r} (known kinds: {', '.join(sorted(REGISTRY))})") from None
    found: Kind[Any] = _load(kind)
    return found
