"""Parameter counts of a plan's runs, from their configs alone (models built on the meta device,
no weights allocated): for the plan table and the ``num_params`` param of each run."""

from __future__ import annotations

from workbench.datasets import vocab_size
from workbench.grid import Run


def parameter_counts(runs: list[Run]) -> dict[str, int]:
    """Parameter count per run key; runs of one model, vocabulary and block size are counted
    once."""
    from workbench.models import count_params

    cache: dict[str, int] = {}
    vocabs: dict[tuple[str | None, str | None], int] = {}
    counts: dict[str, int] = {}
    for run in runs:
        config = run.config
        source = (config.data.dataset, config.data.path)
        if source not in vocabs:
            vocabs[source] = vocab_size(*source)
        vocab = vocabs[source]
        signature = f"{config.model.model_dump_json()}|{vocab}|{config.train.block_size}"
        if signature not in cache:
            cache[signature] = count_params(config.model, vocab, config.train.block_size)
        counts[run.key] = cache[signature]
    return counts
