"""YAML files read the one safe way: plans.yaml, cron.yaml and queue.yaml refuse a key that appears twice in the
same mapping. PyYAML would keep the last one silently, so a plan pasted twice, or an edited copy of a plan left
under the same name, would replace the first without a word."""

from __future__ import annotations

from typing import Any

import yaml

from services.errors import ConfigError


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"key {key!r} on line {line} is already on line {first_line}")
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML refuses it itself
            continue
        if first is not None:
            raise DuplicateKey(key, first, key_node.start_mark.line + 1)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)  # type: ignore[arg-type]


def load_yaml(text: str, source: str) -> Any:
    """``text`` parsed; ConfigError naming ``source`` and the line for invalid YAML or a repeated key."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as exc:
        raise ConfigError(
            f"{source}, line {exc.line}: {exc.key!r} is given twice (first on line {exc.first_line}); only one may stay"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
