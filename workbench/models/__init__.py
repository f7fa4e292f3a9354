"""The lecture's ladder of models (``ladder``) and the attention kernel it may use (``native``)."""

from workbench.models.ladder import LanguageModel, build_model, count_params

__all__ = ["LanguageModel", "build_model", "count_params"]
