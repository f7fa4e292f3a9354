"""Safe YAML loading with two fixes users expect: ``3e-4`` is a float, and a key that appears
twice in one mapping is an error instead of silently keeping the last value."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import SpecError


class _Loader(yaml.SafeLoader):
    """SafeLoader (no Python tags) that records duplicate keys."""

    duplicates: list[str]


# YAML 1.1 (PyYAML) reads ``3e-4`` as a string because it wants a dot; YAML 1.2 does not.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            line = key_node.start_mark.line + 1
            loader.duplicates.append(f"line {line}: {key}: duplicate key")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; problems raise SpecError naming ``source``."""
    loader = _Loader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{source}: {where}invalid YAML: {problem}"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise SpecError([f"{source}: {d}" for d in loader.duplicates])
    return data


def load_yaml_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}: cannot read: {exc}"]) from None
    return parse_yaml(text, str(path))


def parse_value(text: str) -> Any:
    """A ``--set`` value, typed as YAML would type it (``3e-4`` → float, ``[8, 16]`` → list)."""
    try:
        return parse_yaml(text, "--set")
    except SpecError:
        return text
