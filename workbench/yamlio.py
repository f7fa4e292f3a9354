"""Safe YAML loading with two fixes users expect: ``3e-4`` is a float, and a key that appears
twice in one mapping is an error instead of silently keeping the last value.

Bounded, too: a spec is small, so a file over ``MAX_SPEC_BYTES``, or one whose aliases expand
to more than ``MAX_NODES`` values (a "billion laughs" bomb fits in 600 bytes), is refused before
anything walks it."""

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
        line = key_node.start_mark.line + 1
        if not isinstance(key, str | int | float | bool | type(None)):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "a key must be a plain value, not a list or mapping",
                key_node.start_mark,
            )
        if key in seen:
            loader.duplicates.append(f"line {line}: {key}: duplicate key")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


MAX_SPEC_BYTES = 1 << 20
MAX_NODES = 100_000  # values after alias expansion; the lecture's specs have a few hundred
MAX_DEPTH = 64


def _expanded_size(root: yaml.Node, source: str) -> None:
    """Count the values ``root`` stands for with every alias expanded, without expanding."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in in_progress:
            raise SpecError([f"{source}: line {node.start_mark.line + 1}: recursive alias"])
        if depth > MAX_DEPTH:
            raise SpecError([f"{source}: nested deeper than {MAX_DEPTH} levels"])
        in_progress.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        in_progress.discard(id(node))
        if total > MAX_NODES:
            raise SpecError(
                [f"{source}: more than {MAX_NODES:,} values once aliases are expanded: refused"]
            )
        sizes[id(node)] = total
        return total

    size(root, 0)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; problems raise SpecError naming ``source``."""
    if len(text) > MAX_SPEC_BYTES:  # characters, for --set values
        raise SpecError(
            [f"{source}: {len(text):,} characters; a spec is at most {MAX_SPEC_BYTES:,}"]
        )
    loader = _Loader(text)
    loader.duplicates = []
    try:
        node = loader.get_single_node()
        if node is not None:
            _expanded_size(node, source)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{source}: {where}invalid YAML: {problem}"]) from None
    except RecursionError:
        raise SpecError([f"{source}: nested too deeply"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise SpecError([f"{source}: {d}" for d in loader.duplicates])
    return data


def load_yaml_file(path: Path) -> Any:
    try:
        with path.open("rb") as spec:  # never more than the limit, whatever the file is
            data = spec.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError([f"{path}: over {MAX_SPEC_BYTES:,} bytes; a spec is at most 1 MiB"])
        text = data.decode("utf-8")
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
