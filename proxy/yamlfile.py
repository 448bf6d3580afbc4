"""YAML parsed strictly: a key given twice in a mapping is an error, not PyYAML's last one wins."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["safe_load"]

_MERGE = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader; a duplicate key raises ConstructorError at the second one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue  # `<<: *base` merges: a key it brings in may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                line = first.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            if line != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given at line {line + 1}); keep only one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load``, except that a duplicate key raises ``yaml.YAMLError`` with its line."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
