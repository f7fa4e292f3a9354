"""The experiment spec: strict, frozen pydantic models of one YAML file, and its loading.

A spec has three config sections (``data``, ``train``, ``model``) that every run starts from,
then ``variants`` (named overrides), ``grid``/``zip`` (dotted keys with lists of values),
``exclude`` and ``seeds``. One run's fully resolved config is a :class:`RunConfig`. Expanding a
spec into runs lives in :mod:`workbench.grid`; this module only knows the shapes.
"""

from __future__ import annotations

import difflib
import json
import reprlib
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ModelKind = Literal[
    "bigram", "uniform_avg", "softmax_avg", "single_head", "multi_head", "transformer"
]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+|mps)$"
AttentionSetting = Literal["auto", "sdpa", "torch", "native"]
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DEFAULT_SEEDS = (1337,)
MAX_SHOWN = 80  # characters of a user's value quoted in a message (a spec may hold huge ones)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class Section(BaseModel):
    """Base of every config object: unknown keys fail, no type coercion, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataConfig(Section):
    """Where the text comes from and how it is split."""

    dataset: str | None = Field(None, description="A known data set: tinyshakespeare.")
    path: str | None = Field(None, description="A local UTF-8 text file (relative to the spec).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Last fraction held out for val.")


class TrainConfig(Section):
    """Optimisation and evaluation; every key may be varied by the grid."""

    batch_size: PositiveInt = 32
    block_size: PositiveInt = Field(8, description="Context length in characters.")
    max_iters: PositiveInt = 5000
    eval_interval: PositiveInt = 500
    eval_iters: PositiveInt = Field(200, description="Batches per split in the fixed eval set.")
    learning_rate: PositiveFloat = 1.0e-3
    weight_decay: NonNegativeFloat = Field(0.01, description="AdamW weight decay (torch default).")
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_iters: NonNegativeInt = 0
    min_lr: NonNegativeFloat = Field(0.0, description="Floor of the cosine schedule.")
    grad_clip: NonNegativeFloat = Field(0.0, description="Max gradient norm; 0 turns it off.")
    divergence_factor: NonNegativeFloat = Field(
        3.0,
        description="Stop as diverged when the loss exceeds this many times the initial "
        "loss (non-finite always stops); 0 turns the ratio test off.",
    )
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)] = "auto"
    threads: PositiveInt | None = Field(None, description="Torch CPU threads; None: per job.")
    compile: bool = Field(False, description="torch.compile the model (CUDA only).")
    attention: AttentionSetting = Field(
        "auto",
        description="Attention backend: sdpa, torch (CPU ops), native (the C kernel, CPU blocks "
        "up to 32); auto: native or torch on a CPU for blocks up to 32, else sdpa. Same math.",
    )


class ModelConfig(Section):
    """One model of the ladder; keys a kind does not use are ignored by it."""

    kind: ModelKind | None = None
    n_embd: PositiveInt = 32
    n_head: PositiveInt = 4
    head_size: PositiveInt | None = Field(None, description="single_head only; default n_embd.")
    n_layer: NonNegativeInt = Field(3, description="transformer blocks (0: embeddings only).")
    ffwd: Literal["none", "linear", "mlp"] = Field(
        "mlp", description="none, the lecture's Linear+ReLU, or the 4x MLP with projection."
    )
    residual: bool = True
    layernorm: bool = Field(True, description="Pre-norm in blocks plus a final LayerNorm.")
    proj: bool | None = Field(
        None,
        description="Attention output projection; default off for multi_head, on for transformer.",
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Literal["default", "normal"] = Field(
        "default", description="torch default or N(0, 0.02)."
    )
    learnable: bool = Field(True, description="softmax_avg: learn the affinities (else uniform).")


class RunConfig(Section):
    """The fully resolved config of one run: what it trains, and what its key hashes."""

    data: DataConfig
    train: TrainConfig
    model: ModelConfig
    seed: int


class Variant(Section):
    """Named overrides of the config sections."""

    data: DataConfig | None = None
    train: TrainConfig | None = None
    model: ModelConfig | None = None


class Spec(Section):
    """One YAML file: one experiment, expanded into a grid of runs."""

    experiment: Annotated[str, Field(min_length=1, description="MLflow experiment name.")]
    data: DataConfig = DataConfig(dataset="tinyshakespeare")
    train: TrainConfig = TrainConfig()
    model: ModelConfig = ModelConfig()
    variants: dict[str, Variant] | None = Field(
        None, description="Named points on the ladder; each overrides the sections."
    )
    grid: dict[str, list[Any]] | None = Field(
        None, description="Cartesian product over dotted keys, e.g. train.block_size: [8, 16]."
    )
    zip: list[dict[str, list[Any]]] | None = Field(
        None, description="Groups of dotted keys whose lists vary together."
    )
    exclude: list[dict[str, Any]] | None = Field(
        None, description="Partial assignments (variant, seed or dotted keys) to drop."
    )
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS), min_length=1)
    reference: dict[str, float] | None = Field(
        None, description="Published val loss per variant, shown beside ours in the report."
    )


# The model keys each kind reads (workbench/models/ladder.py); the others do not change its model.
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "bigram": ("kind",),
    "uniform_avg": ("kind", "n_embd"),
    "softmax_avg": ("kind", "n_embd", "learnable"),
    "single_head": ("kind", "n_embd", "head_size", "dropout"),
    "multi_head": ("kind", "n_embd", "n_head", "proj", "dropout"),
    "transformer": (
        "kind", "n_embd", "n_head", "n_layer", "ffwd", "residual", "layernorm", "proj", "dropout",
        "init",
    ),
}  # fmt: skip

ATTENTION_KINDS = ("single_head", "multi_head", "transformer")  # the kinds that call attention


def lr_varies(train: TrainConfig) -> bool:
    """Whether the learning rate changes during training (warmup or a decaying schedule)."""
    return train.lr_schedule != "constant" or train.warmup_iters > 0


def applicable_config(config: RunConfig) -> dict[str, Any]:
    """The config as it says what the run was: only the model keys its kind reads, no unset
    (None) value, no cosine floor under a constant schedule, no attention backend for a model
    without attention. For params and ``config.yaml``; training always uses the full config."""
    full = config.model_dump(mode="json")
    kind = config.model.kind
    if kind is not None:
        full["model"] = {k: v for k, v in full["model"].items() if k in MODEL_FIELDS[kind]}
        if kind not in ATTENTION_KINDS:
            del full["train"]["attention"]
    if config.train.lr_schedule == "constant":
        del full["train"]["min_lr"]
    for section in SECTIONS:
        full[section] = {k: v for k, v in full[section].items() if v is not None}
    return full


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "train": TrainConfig,
    "model": ModelConfig,
}


def section_keys(section: str) -> list[str]:
    return list(SECTIONS[section].model_fields)


def all_dotted_keys() -> list[str]:
    return [f"{name}.{key}" for name in SECTIONS for key in section_keys(name)]


def check_dotted_key(key: str) -> str | None:
    """None when ``key`` names a config value (``train.block_size``), else the problem."""
    section, _, field = key.partition(".")
    if section in SECTIONS and field in SECTIONS[section].model_fields:
        return None
    return "unknown key" + _did_you_mean(key, all_dotted_keys())


def _did_you_mean(word: str, choices: list[str]) -> str:
    if len(word) > MAX_SHOWN:  # difflib's cost grows with the length of the word
        return ""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str] | None:
    """The keys allowed in the mapping that holds ``loc`` (for 'unknown key' messages)."""
    if len(loc) == 1:
        return list(Spec.model_fields)
    parent = loc[-2]
    if isinstance(parent, str) and parent in SECTIONS:
        return section_keys(parent)
    if len(loc) == 3 and loc[0] == "variants":
        return list(Variant.model_fields)
    return None


def describe_error(error: Any, allowed: list[str] | None = None) -> str:
    """One pydantic error as a short, plain sentence (without the key or the value)."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        hint = _did_you_mean(key, allowed) if allowed else ""
        if hint or not allowed:
            return f"unknown key{hint}"
        return f"unknown key (allowed: {', '.join(allowed)})"
    if kind == "missing":
        return "missing"
    if kind == "literal_error":
        expected = str(ctx["expected"]).replace("'", "").replace(" or ", ", ")
        return f"must be one of {expected}"
    if kind == "string_pattern_mismatch":
        return f"must be one of {DEVICE_CHOICES}"
    comparisons = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in comparisons:
        bound = next(iter(ctx.values()))
        return f"must be {comparisons[kind]} {bound}"
    types = {
        "int_type": "an integer",
        "float_type": "a number",
        "bool_type": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "int_from_float": "an integer",
    }
    if kind in types:
        return f"expected {types[kind]}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    return clip(str(error["msg"]))


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 6, 6, 4, 6
    short.maxstring = short.maxother = MAX_SHOWN
    return short


_SHORT_REPR = _short_repr()


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: Any) -> str:
    """A user's value for a message: its repr, bounded in work and length whatever its size
    (reprlib stops at a few items per level, so a huge nested value is never formatted)."""
    return clip(_SHORT_REPR.repr(value))


def format_problem(origin: str, key: str, message: str, value: Any = ..., show: bool = True) -> str:
    where = f"{origin}: {clip(key)}" if key else origin
    got = f" (got {shown(value)})" if show and value is not ... else ""
    return f"{where}: {message}{got}"


def spec_problems(exc: ValidationError, origin: str) -> list[str]:
    """A spec's pydantic errors as one line each: origin, dotted key, problem, bad value."""
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc)
        key = key.replace(".[", "[")
        message = describe_error(error, _allowed_keys(loc))
        show = error["type"] not in ("missing", "extra_forbidden")
        problems.append(format_problem(origin, key, message, error.get("input", ...), show))
    return problems


def spec_json_schema() -> dict[str, Any]:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "workbench experiment spec"
    return schema


# What may differ between the members of one pack (besides the seed).
PER_MEMBER = ("learning_rate", "lr_schedule", "warmup_iters", "min_lr", "weight_decay",
              "grad_clip", "divergence_factor")  # fmt: skip


def pack_key(config: RunConfig) -> str | None:
    """Runs with equal keys may be packed; None: this run is never packed (dropout: a solo
    run's masks cannot be reproduced; ``train.compile``: the pack's forward is not compiled).
    The key is a JSON string of the config without the per-member values."""
    if config.model.dropout > 0 or config.train.compile:
        return None
    shared = config.model_dump(mode="json")
    del shared["seed"]
    for name in PER_MEMBER:
        del shared["train"][name]
    return json.dumps(shared, sort_keys=True)
