"""Typed reading of one YAML mapping, with errors that say exactly where the bad value is.

Every kind module parses its part of a plan with ``Fields`` so that a mistake in plans.yaml reads as
``plans.yaml: plan 'nightly', field 'select.kinds': expected a list of strings, got 'Customer'``.
"""

from __future__ import annotations

import builtins
from typing import Any

from services.errors import ConfigError

_REQUIRED = object()


class Fields:
    """A view over one mapping of plans.yaml. Unknown keys are an error once ``done()`` is called."""

    def __init__(self, raw: Any, where: str, prefix: str = ""):
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}, field '{prefix.rstrip('.') or '(top)'}': expected a mapping, got {raw!r}")
        self.raw: dict[str, Any] = raw
        self.where = where
        self.prefix = prefix
        self._seen: set[str] = set()

    def error(self, key: str, expected: str, got: Any = _REQUIRED) -> ConfigError:
        detail = "" if got is _REQUIRED else f", got {got!r}"
        return ConfigError(f"{self.where}, field '{self.prefix}{key}': {expected}{detail}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key not in self.raw or self.raw[key] is None:
            if default is _REQUIRED:
                raise self.error(key, "is required")
            return default
        return self.raw[key]

    def str(self, key: builtins.str, default: Any = _REQUIRED, choices: tuple[builtins.str, ...] | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, str) or not value:
            raise self.error(key, "expected a non-empty string", value)
        if choices is not None and value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}", value)
        return value

    def int(
        self, key: builtins.str, default: Any = _REQUIRED, minimum: int | None = None, maximum: int | None = None
    ) -> Any:
        value = self._get(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, "expected an integer", value)
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected an integer >= {minimum}", value)
        if maximum is not None and value > maximum:
            raise self.error(key, f"expected an integer <= {maximum}", value)
        return value

    def float(self, key: builtins.str, default: Any = _REQUIRED, minimum: float | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, "expected a number", value)
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected a number >= {minimum}", value)
        return float(value)

    def bool(self, key: builtins.str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if not isinstance(value, bool):
            # YAML's "false" in quotes is a string, and a non-empty string is truthy: refuse it.
            raise self.error(key, "expected true or false (unquoted)", value)
        return value

    def str_list(self, key: builtins.str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "expected a list of non-empty strings", value)
        return list(value)

    def section(self, key: builtins.str, required: builtins.bool = False) -> Fields:
        value = self._get(key, _REQUIRED if required else {})
        return Fields(value, self.where, f"{self.prefix}{key}.")

    def any(self, key: builtins.str, default: Any = _REQUIRED) -> Any:
        return self._get(key, default)

    def done(self) -> None:
        """Refuse keys nobody read: a typo such as ``retension`` must not be silently ignored."""
        unknown = sorted(set(self.raw) - self._seen)
        if unknown:
            raise ConfigError(
                f"{self.where}, field '{self.prefix}{unknown[0]}': unknown field"
                f" (known here: {', '.join(sorted(self._seen)) or 'none'})"
            )
