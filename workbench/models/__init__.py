"""The lecture's ladder of models (``ladder``), the attention backends it may be handed
(``attention``), and the C kernel behind one of them (``native``)."""

from workbench.models.attention import (
    AttentionBackend,
    AttentionUnavailable,
    resolve_attention,
)
from workbench.models.ladder import LanguageModel, attention_head_size, build_model, count_params
from workbench.models.source import SOURCE_DIGEST  # read now, with the modules

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
