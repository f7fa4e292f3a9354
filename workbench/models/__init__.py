"""The lecture's ladder of models (``ladder``), the attention backends it may be handed
(``attention``), and the C kernel behind one of them (``native``); a model is built here, from
its config."""

from __future__ import annotations

import torch

from workbench.models.attention import (
    SDPA,
    AttentionBackend,
    AttentionUnavailable,
    resolve_attention,
)
from workbench.models.ladder import (
    Bigram,
    LanguageModel,
    MultiHead,
    Setup,
    SingleHead,
    SoftmaxAverage,
    Transformer,
    UniformAverage,
)
from workbench.models.source import SOURCE_DIGEST  # read now, with the modules
from workbench.spec import ATTENTION_KINDS, ModelConfig

__all__ = [
    "SOURCE_DIGEST",
    "AttentionBackend",
    "AttentionUnavailable",
    "LanguageModel",
    "attention_head_size",
    "build_model",
    "count_params",
    "resolve_attention",
]


MODELS: dict[str, type[LanguageModel]] = {
    "bigram": Bigram,
    "uniform_avg": UniformAverage,
    "softmax_avg": SoftmaxAverage,
    "single_head": SingleHead,
    "multi_head": MultiHead,
    "transformer": Transformer,
}


def attention_head_size(config: ModelConfig) -> int:
    """The head size of a model's attention (what the native kernel is compiled for)."""
    if config.kind == "single_head":
        return config.head_size or config.n_embd
    return config.n_embd // config.n_head


def build_model(
    config: ModelConfig,
    vocab_size: int,
    block_size: int,
    attention: AttentionBackend | None = None,
) -> LanguageModel:
    """The model of ``config``, its attention computed by ``attention`` (default: what
    ``train.attention: auto`` resolves to on a CPU; ``model.attention_backend.name`` says)."""
    if config.kind is None:
        raise ValueError("model.kind is not set")
    if config.kind not in ATTENTION_KINDS:
        attention = None
    elif attention is None:
        attention = resolve_attention(
            "auto", torch.device("cpu"), block_size, attention_head_size(config)
        )
    return MODELS[config.kind](config, Setup(vocab_size, block_size, attention))


def count_params(config: ModelConfig, vocab_size: int, block_size: int) -> int:
    """Parameters of a model, without allocating its weights (or building a kernel)."""
    with torch.device("meta"):
        return build_model(config, vocab_size, block_size, attention=SDPA).num_params()
