"""How config values and keys are written wherever a user reads them: run names, the plan table,
the report's labels and axes. One formatter, so a value reads the same in every place.

Values are written as in YAML (``true``, ``null``) and floats by ``repr``, which is exact: two
different learning rates never print alike, and ``0.003`` in a spec reads ``0.003`` everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def format_value(value: object) -> str:
    """A config value as a user writes it in YAML; a missing value (None, NaN) is ``null``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def short_name(key: str, keys: Sequence[str]) -> str:
    """``train.block_size`` → ``block_size``, unless another of ``keys`` ends the same way."""
    last = key.rsplit(".", 1)[-1]
    clash = sum(1 for k in keys if k.rsplit(".", 1)[-1] == last) > 1
    return key if clash else last


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each of ``keys`` by its ``short_name`` among them."""
    return {key: short_name(key, keys) for key in keys}


def human_count(n: float) -> str:
    """``1234567`` → ``1.23M``: counts of tokens, parameters, tokens per second; NaN is ``—``."""
    if n != n:
        return "—"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"
