"""How config values and keys are written wherever a user reads them: run names, the plan table,
the report's labels and axes. One formatter, so a value reads the same in every place.

Values are written as in YAML (``true``, ``null``) and floats by ``repr``, which is exact: two
different learning rates never print alike, and ``0.003`` in a spec reads ``0.003`` everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def format_value(value: object) -> str:
    """A config value as a user writes it in YAML; a missing value (None, NaN) is ``null``.
    A numpy scalar (what pandas hands back from ``unique()``) reads as the Python value it
    holds: ``np.float64(0.001)`` is ``0.001``, as the same value taken from a Series."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


# Run names: the runs table of ``mlflow ui`` cuts a name at about 25 characters, so each key the
# grid varies is written short. A key not listed here is written by its ``short_name``.
RUN_NAME_KEYS = {
    "block_size": "bs",
    "learning_rate": "lr",
    "batch_size": "batch",
    "n_embd": "emb",
    "n_head": "heads",
    "n_layer": "layers",
    "dropout": "drop",
    "max_iters": "iters",
    "seed": "s",
}


def name_value(value: object) -> str:
    """A config value as short as it can be written exactly, for run names: as
    :func:`format_value`, except that a float takes its exponent form where that is shorter
    (``3e-3`` for ``0.003``, ``1e-4``); both read back as the same float."""
    if not isinstance(value, float) or not math.isfinite(value):
        return format_value(value)
    decimal = repr(value)
    for digits in range(17):  # the fewest digits that read back as the same float
        mantissa, _, exponent = f"{value:.{digits}e}".partition("e")
        if float(f"{mantissa}e{exponent}") == value:
            break
    exponential = f"{mantissa}e{int(exponent)}"
    return exponential if len(exponential) < len(decimal) else decimal


def run_name_labels(keys: Sequence[str]) -> dict[str, str]:
    """Each of ``keys`` as a run name writes it: its abbreviation (``train.block_size`` →
    ``bs``), else its ``short_name``; a label two keys would share, or that another key's short
    name already is, is left long (names must tell every config apart)."""
    short = short_names(keys)
    labels = {k: RUN_NAME_KEYS.get(name, name) for k, name in short.items()}
    taken = [*labels.values(), *short.values(), RUN_NAME_KEYS["seed"]]
    return {
        key: label if label == short[key] or taken.count(label) == 1 else short[key]
        for key, label in labels.items()
    }


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
