"""Validation of experiment specs: every rule, and the exact one-line message it produces.

The format is one line per problem: ``{file}: {dotted key}: {message} (got {value!r})``; unknown
and missing keys have no ``(got ...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from specs import spec_dict, write_spec

from workbench.errors import SpecError
from workbench.grid import expand
from workbench.spec import (
    MODEL_KINDS,
    ModelConfig,
    Spec,
    TrainConfig,
    section_keys,
    spec_json_schema,
)
from workbench.yamlio import parse_value, parse_yaml

KINDS = ", ".join(MODEL_KINDS)
TOP_KEYS = "experiment, data, train, model, variants, grid, zip, exclude, seeds, reference"


def problems_of(
    path: Path, sets: list[str] | None = None, only: list[str] | None = None
) -> list[str]:
    with pytest.raises(SpecError) as info:
        expand(path, sets, only)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(path: Path, sets: list[str] | None = None) -> str:
    problems = problems_of(path, sets)
    assert len(problems) == 1, problems
    return problems[0]


# --- YAML loading -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3e-4", 3e-4),
        ("1e3", 1000.0),
        ("-2E+2", -200.0),
        ("1.0e-3", 1e-3),
        ("0.5", 0.5),
        (".5", 0.5),
        ("+1e-2", 0.01),
    ],
)
def test_scientific_notation_is_a_float(text: str, expected: float) -> None:
    value = parse_yaml(f"x: {text}", "t.yaml")["x"]
    assert isinstance(value, float)
    assert value == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8", 8),
        ("-3", -3),
        ("true", True),
        ("null", None),
        ("1e", "1e"),
        ("1.2.3", "1.2.3"),
        ("cuda:0", "cuda:0"),
        ("'3e-4'", "3e-4"),
        ("[8, 16]", [8, 16]),
    ],
)
def test_other_scalars_keep_their_yaml_types(text: str, expected: Any) -> None:
    value = parse_yaml(f"x: {text}", "t.yaml")["x"]
    assert value == expected
    assert type(value) is type(expected)


def test_learning_rate_written_3e_4_validates_as_float(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        """\
        experiment: t
        train: {max_iters: 100, eval_interval: 10, learning_rate: 3e-4}
        model: {kind: bigram}
        """,
    )
    (run,) = expand(path).runs
    assert isinstance(run.config.train.learning_rate, float)
    assert run.config.train.learning_rate == pytest.approx(3e-4)


def test_set_values_are_typed_like_yaml() -> None:
    assert parse_value("200") == 200
    assert isinstance(parse_value("200"), int)
    assert parse_value("3e-4") == pytest.approx(3e-4)
    assert isinstance(parse_value("3e-4"), float)
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("false") is False
    assert parse_value("cuda:1") == "cuda:1"
    assert parse_value("[unclosed") == "[unclosed"  # not YAML: kept as the text


@pytest.mark.parametrize(
    "tag",
    [
        '!!python/object/apply:builtins.open ["{marker}", "w"]',
        '!!python/object/new:builtins.open ["{marker}", "w"]',
        "!!python/name:os.system",
        "!!python/object:collections.OrderedDict {{}}",
    ],
)
def test_python_tags_are_rejected_not_executed(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "executed"
    text = f"experiment: {tag.format(marker=marker)}\nmodel: {{kind: bigram}}\n"
    path = write_spec(tmp_path, text)
    line = only_problem(path)
    assert line.startswith(f"{path}: line 1: invalid YAML: could not determine a constructor")
    assert "python/" in line
    assert not marker.exists()


def test_invalid_yaml_is_one_line_with_its_line_number(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "experiment: t\nmodel: {kind: bigram\n")
    assert only_problem(path).startswith(f"{path}: line 3: invalid YAML: ")


def test_duplicate_variant_name_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        """\
        experiment: t
        variants:
          bigram: {model: {kind: bigram}}
          multi_head: {model: {kind: multi_head}}
          multi_head: {model: {kind: multi_head, n_head: 2}}
        """,
    )
    assert problems_of(path) == [f"{path}: line 5: multi_head: duplicate key"]


def test_every_duplicate_key_is_reported(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        """\
        experiment: t
        model: {kind: bigram, kind: transformer}
        grid:
          train.block_size: [8]
          train.block_size: [16]
        """,
    )
    assert problems_of(path) == [
        f"{path}: line 2: kind: duplicate key",
        f"{path}: line 5: train.block_size: duplicate key",
    ]


def test_missing_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems_of(path) == [f"{path}: no such file"]


@pytest.mark.parametrize(("text", "shown"), [("", "None"), ("- 1\n", "[1]"), ("7\n", "7")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, shown: str) -> None:
    path = write_spec(tmp_path, text)
    assert problems_of(path) == [f"{path}: expected a mapping at the top level (got {shown})"]


# --- unknown and missing keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        (spec_dict(varaints={"a": {}}), "varaints: unknown key (did you mean variants?)"),
        (spec_dict(foo=1), f"foo: unknown key (allowed: {TOP_KEYS})"),
        (
            spec_dict(train={"learnin_rate": 0.1}),
            "train.learnin_rate: unknown key (did you mean learning_rate?)",
        ),
        (
            spec_dict(data={"dataset": "tinyshakespeare", "zzzzz": 1}),
            "data.zzzzz: unknown key (allowed: dataset, path, val_fraction)",
        ),
        (
            spec_dict(model={"kind": "bigram", "compile": True}),
            f"model.compile: unknown key (allowed: {', '.join(section_keys('model'))})",
        ),
        (
            spec_dict(variants={"a": {"modle": {"kind": "bigram"}}}),
            "variants.a.modle: unknown key (did you mean model?)",
        ),
        (
            spec_dict(variants={"a": {"zzz": {}}}),
            "variants.a.zzz: unknown key (allowed: data, train, model)",
        ),
        (
            spec_dict(variants={"a": {"train": {"bach_size": 8}}}),
            "variants.a.train.bach_size: unknown key (did you mean batch_size?)",
        ),
    ],
)
def test_unknown_key(tmp_path: Path, spec: dict[str, Any], line: str) -> None:
    path = write_spec(tmp_path, spec)
    assert problems_of(path) == [f"{path}: {line}"]
    assert "(got" not in line


def test_missing_experiment(tmp_path: Path) -> None:
    spec = spec_dict()
    del spec["experiment"]
    path = write_spec(tmp_path, spec)
    assert problems_of(path) == [f"{path}: experiment: missing"]


def test_empty_experiment_name(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(experiment=""))
    assert problems_of(path) == [f"{path}: experiment: must not be empty (got '')"]


def test_missing_model_kind_lists_the_kinds(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(model={"kind": None}))
    assert problems_of(path) == [
        f"{path}: model.kind: missing; set it under model: or in each variant (allowed: {KINDS})"
    ]


# --- types --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        (spec_dict(train={"batch_size": "32"}), "train.batch_size: expected an integer (got '32')"),
        (spec_dict(train={"block_size": 8.0}), "train.block_size: expected an integer (got 8.0)"),
        (
            spec_dict(train={"block_size": 1e3}),
            "train.block_size: expected an integer (got 1000.0)",
        ),
        (spec_dict(train={"batch_size": True}), "train.batch_size: expected an integer (got True)"),
        (
            spec_dict(train={"learning_rate": "0.001"}),
            "train.learning_rate: expected a number (got '0.001')",
        ),
        (spec_dict(train={"compile": 1}), "train.compile: expected true or false (got 1)"),
        (
            spec_dict(model={"residual": "true"}),
            "model.residual: expected true or false (got 'true')",
        ),
        (spec_dict(data={"dataset": 5}), "data.dataset: expected a string (got 5)"),
        (spec_dict(experiment=5), "experiment: expected a string (got 5)"),
        (spec_dict(seeds=[1.5]), "seeds[0]: expected an integer (got 1.5)"),
        (spec_dict(seeds=5), "seeds: expected a list (got 5)"),
        (spec_dict(train=5), "train: expected a mapping (got 5)"),
        (spec_dict(model=None), "model: expected a mapping (got None)"),
        (spec_dict(grid=[1]), "grid: expected a mapping (got [1])"),
        (spec_dict(grid={"train.block_size": 8}), "grid.train.block_size: expected a list (got 8)"),
        (
            spec_dict(zip={"train.block_size": [8]}),
            "zip: expected a list (got {'train.block_size': [8]})",
        ),
        (spec_dict(variants=["a"]), "variants: expected a mapping (got ['a'])"),
        (
            spec_dict(variants={"a": {"model": {"kind": "bigram", "n_embd": "32"}}}),
            "variants.a.model.n_embd: expected an integer (got '32')",
        ),
        (spec_dict(exclude={"variant": "a"}), "exclude: expected a list (got {'variant': 'a'})"),
        (spec_dict(reference={"a": "x"}), "reference.a: expected a number (got 'x')"),
    ],
)
def test_wrong_type(tmp_path: Path, spec: dict[str, Any], line: str) -> None:
    path = write_spec(tmp_path, spec)
    assert problems_of(path) == [f"{path}: {line}"]


def test_types_are_strict_in_the_models() -> None:
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"batch_size": "32"})
    with pytest.raises(ValidationError):
        ModelConfig.model_validate({"residual": 1})
    assert TrainConfig.model_validate({"learning_rate": 1}).learning_rate == 1.0  # int is a number


def test_configs_are_frozen() -> None:
    config = TrainConfig()
    with pytest.raises(ValidationError):
        config.batch_size = 64  # type: ignore[misc]


def test_spec_defaults() -> None:
    spec = Spec.model_validate({"experiment": "x"})
    assert spec.data.dataset == "tinyshakespeare"
    assert spec.seeds == [1337]
    assert spec.variants is None and spec.grid is None


# --- sizes and ranges ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "batch_size", 0, "must be > 0"),
        ("train", "block_size", -1, "must be > 0"),
        ("train", "max_iters", 0, "must be > 0"),
        ("train", "eval_interval", 0, "must be > 0"),
        ("train", "eval_iters", -5, "must be > 0"),
        ("train", "threads", 0, "must be > 0"),
        ("train", "warmup_iters", -1, "must be >= 0"),
        ("train", "learning_rate", 0, "must be > 0.0"),
        ("train", "learning_rate", -0.1, "must be > 0.0"),
        ("train", "weight_decay", -0.1, "must be >= 0.0"),
        ("train", "grad_clip", -1.0, "must be >= 0.0"),
        ("model", "n_embd", 0, "must be > 0"),
        ("model", "n_head", 0, "must be > 0"),
        ("model", "head_size", 0, "must be > 0"),
        ("model", "n_layer", -1, "must be >= 0"),
        ("model", "dropout", 1, "must be < 1.0"),
        ("model", "dropout", -0.5, "must be >= 0.0"),
        ("data", "val_fraction", 0, "must be > 0.0"),
        ("data", "val_fraction", 1, "must be < 1.0"),
    ],
)
def test_out_of_range(tmp_path: Path, section: str, key: str, value: Any, message: str) -> None:
    path = write_spec(tmp_path, spec_dict(**{section: {key: value}}))
    assert problems_of(path) == [f"{path}: {section}.{key}: {message} (got {value!r})"]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("train", "warmup_iters"),
        ("model", "n_layer"),
        ("train", "weight_decay"),
        ("model", "dropout"),
    ],
)
def test_zero_is_allowed_where_it_means_off(tmp_path: Path, section: str, key: str) -> None:
    path = write_spec(tmp_path, spec_dict(**{section: {key: 0}}))
    (run,) = expand(path).runs
    assert getattr(getattr(run.config, section), key) == 0


# --- rules across keys --------------------------------------------------------------------------


def test_n_head_must_divide_n_embd_blamed_on_the_variant(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        spec_dict(
            model={"kind": None, "n_embd": 30},
            variants={
                "bigram": {"model": {"kind": "bigram"}},
                "multi_head": {"model": {"kind": "multi_head", "n_head": 4}},
            },
        ),
    )
    assert problems_of(path) == [
        f"{path}: variants.multi_head.model.n_head: must divide model.n_embd (30) (got 4)"
    ]


def test_n_head_must_divide_n_embd_for_transformer_at_the_top(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(model={"kind": "transformer", "n_embd": 32, "n_head": 5}))
    assert problems_of(path) == [f"{path}: model.n_head: must divide model.n_embd (32) (got 5)"]


def test_n_head_must_divide_n_embd_blamed_on_the_grid(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        spec_dict(model={"kind": "multi_head", "n_embd": 32}, grid={"model.n_head": [2, 3, 4]}),
    )
    assert problems_of(path) == [
        f"{path}: grid.model.n_head: must divide model.n_embd (32) (got 3)"
    ]


def test_n_head_must_divide_n_embd_blamed_on_set(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(model={"kind": "transformer", "n_embd": 32}))
    assert problems_of(path, ["model.n_head=5"]) == [
        "--set: model.n_head: must divide model.n_embd (32) (got 5)"
    ]


@pytest.mark.parametrize("kind", ["bigram", "uniform_avg", "softmax_avg", "single_head"])
def test_n_head_divisibility_only_applies_to_multi_head_kinds(tmp_path: Path, kind: str) -> None:
    path = write_spec(tmp_path, spec_dict(model={"kind": kind, "n_embd": 30, "n_head": 4}))
    assert len(expand(path).runs) == 1


@pytest.mark.parametrize("interval", [101, 200])
def test_eval_interval_must_not_exceed_max_iters(tmp_path: Path, interval: int) -> None:
    path = write_spec(tmp_path, spec_dict(train={"max_iters": 100, "eval_interval": interval}))
    assert problems_of(path) == [
        f"{path}: train.eval_interval: must be <= train.max_iters (100) (got {interval})"
    ]


def test_eval_interval_equal_to_max_iters_is_fine(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(train={"max_iters": 100, "eval_interval": 100}))
    assert len(expand(path).runs) == 1


def test_eval_interval_checked_against_a_grid_of_max_iters(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path, spec_dict(train={"eval_interval": 50}, grid={"train.max_iters": [100, 20]})
    )
    assert problems_of(path) == [
        f"{path}: train.eval_interval: must be <= train.max_iters (20) (got 50)"
    ]


def test_min_lr_must_not_exceed_learning_rate(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(train={"learning_rate": 0.1, "min_lr": 1.0}))
    assert problems_of(path) == [
        f"{path}: train.min_lr: must be <= train.learning_rate (0.1) (got 1.0)"
    ]


# --- grid, zip, exclude, seeds ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ({"grid": {}}, "grid: empty (remove it or add a key)"),
        ({"zip": []}, "zip: empty (remove it or add a group)"),
        ({"zip": [{}]}, "zip[0]: empty (remove it or add a key)"),
        ({"variants": {}}, "variants: empty (remove it or add a variant)"),
        ({"grid": {"train.block_size": []}}, "grid.train.block_size: empty list of values"),
        ({"zip": [{"train.block_size": []}]}, "zip[0].train.block_size: empty list of values"),
        (
            {"grid": {"train.blok_size": [8, 16]}},
            "grid.train.blok_size: unknown key (did you mean train.block_size?)",
        ),
        (
            {"grid": {"block_size": [8, 16]}},
            "grid.block_size: unknown key (did you mean train.block_size?)",
        ),
        ({"grid": {"foo.bar": [1]}}, "grid.foo.bar: unknown key"),
        (
            {"zip": [{"model.n_emb": [16, 32]}]},
            "zip[0].model.n_emb: unknown key (did you mean model.n_embd?)",
        ),
        (
            {"grid": {"train.block_size": [8, 16]}, "zip": [{"train.block_size": [32, 64]}]},
            "zip[0].train.block_size: also varied by grid.train.block_size",
        ),
        (
            {"zip": [{"train.block_size": [8, 16], "train.batch_size": [4, 8, 16]}]},
            "zip[0]: lists differ in length (train.block_size: 2, train.batch_size: 3)",
        ),
        ({"seeds": [1, 1]}, "seeds: repeated seed (got [1, 1])"),
        ({"seeds": []}, "seeds: must not be empty (got [])"),
        (
            {"exclude": [{"variant": "c"}]},
            "exclude[0].variant: no such variant (allowed: none defined) (got 'c')",
        ),
        ({"exclude": [{}]}, "exclude[0]: empty assignment"),
        (
            {"exclude": [{"train.blok_size": 8}]},
            "exclude[0].train.blok_size: unknown key (did you mean train.block_size?)",
        ),
        ({"exclude": [{"seed": 1337}]}, "exclude: every run is excluded"),
        (  # a list would match no value and exclude nothing
            {"exclude": [{"train.block_size": [8]}]},
            "exclude[0].train.block_size: expected one value (for several, write one exclude "
            "entry per value) (got [8])",
        ),
        (
            {"exclude": [{"seed": {"a": 1}}]},
            "exclude[0].seed: expected one value (for several, write one exclude entry per "
            "value) (got {'a': 1})",
        ),
    ],
)
def test_grid_zip_exclude_seeds_problems(tmp_path: Path, extra: dict[str, Any], line: str) -> None:
    path = write_spec(tmp_path, spec_dict(**extra))
    assert problems_of(path) == [f"{path}: {line}"]


def test_variant_names_alike_after_unicode_normalisation_are_refused(tmp_path: Path) -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # both print as café
    variants = {
        composed: {"model": {"kind": "bigram"}},
        decomposed: {"model": {"kind": "multi_head"}},
    }
    path = write_spec(tmp_path, spec_dict(model={"kind": None}, variants=variants))
    assert problems_of(path) == [
        f"{path}: variants: 'cafe\\u0301' and 'caf\\xe9' differ only in their Unicode form "
        "(NFC), so they read alike"
    ]


def test_exclude_naming_an_unknown_variant_lists_the_variants(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        spec_dict(
            model={"kind": None},
            variants={"b": {"model": {"kind": "bigram"}}, "a": {"model": {"kind": "bigram"}}},
            exclude=[{"variant": "a"}, {"variant": "c", "seed": 1337}],
        ),
    )
    assert problems_of(path) == [
        f"{path}: exclude[1].variant: no such variant (allowed: a, b) (got 'c')"
    ]


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ({"grid": {"train.block_size": [8, 0]}}, "grid.train.block_size: must be > 0 (got 0)"),
        (
            {"grid": {"train.block_size": ["8"]}},
            "grid.train.block_size: expected an integer (got '8')",
        ),
        ({"zip": [{"train.batch_size": [4, -1]}]}, "zip[0].train.batch_size: must be > 0 (got -1)"),
        (
            {"grid": {"model.kind": ["bigram", "gpt"]}},
            f"grid.model.kind: must be one of {KINDS} (got 'gpt')",
        ),
    ],
)
def test_bad_grid_values_are_blamed_on_the_grid(
    tmp_path: Path, extra: dict[str, Any], line: str
) -> None:
    path = write_spec(tmp_path, spec_dict(**extra))
    assert problems_of(path) == [f"{path}: {line}"]


# --- data ---------------------------------------------------------------------------------------


def test_unknown_dataset(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(data={"dataset": "wikitext"}))
    assert problems_of(path) == [
        f"{path}: data.dataset: unknown data set (allowed: tinyshakespeare, or data.path: FILE) "
        "(got 'wikitext')"
    ]


def test_unknown_dataset_in_a_variant(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(variants={"a": {"data": {"dataset": "enwik8"}}}))
    assert problems_of(path) == [
        f"{path}: variants.a.data.dataset: unknown data set (allowed: tinyshakespeare, or "
        "data.path: FILE) (got 'enwik8')"
    ]


def test_data_path_that_does_not_exist(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(data={"path": "missing.txt"}))
    assert problems_of(path) == [
        f"{path}: data.path: no such file (looked in {tmp_path.resolve()}) (got 'missing.txt')"
    ]


def test_data_path_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "texts").mkdir()
    path = write_spec(tmp_path, spec_dict(data={"path": "texts"}))
    assert problems_of(path) == [
        f"{path}: data.path: no such file (looked in {tmp_path.resolve()}) (got 'texts')"
    ]


def test_data_path_is_relative_to_the_spec_not_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "tiny.txt").write_text("hello world\n" * 20, encoding="utf-8")
    write_spec(tmp_path / "specs", spec_dict(data={"path": "tiny.txt"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (run,) = expand(Path("..") / "specs" / "spec.yaml").runs
    assert run.config.data.path == str((tmp_path / "specs" / "tiny.txt").resolve())


def test_dataset_and_path_together(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("hello\n", encoding="utf-8")
    path = write_spec(tmp_path, spec_dict(data={"dataset": "tinyshakespeare", "path": "tiny.txt"}))
    assert problems_of(path) == [
        f"{path}: data.path: set data.dataset or data.path, not both (got 'tiny.txt')"
    ]


def test_partial_data_section_keeps_the_default_dataset(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(data={"val_fraction": 0.2}))
    data = expand(path).runs[0].config.data
    assert (data.dataset, data.val_fraction) == ("tinyshakespeare", 0.2)


def test_neither_dataset_nor_path(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(data={"dataset": None}))
    assert problems_of(path) == [f"{path}: data: set data.dataset or data.path"]


# --- choices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_valid_devices(tmp_path: Path, device: str) -> None:
    path = write_spec(tmp_path, spec_dict(train={"device": device}))
    assert expand(path).runs[0].config.train.device == device


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda0", " cpu", "tpu"])
def test_invalid_device(tmp_path: Path, device: str) -> None:
    path = write_spec(tmp_path, spec_dict(train={"device": device}))
    assert problems_of(path) == [
        f"{path}: train.device: must be one of auto, cpu, cuda, cuda:N, mps (got {device!r})"
    ]


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        (spec_dict(model={"kind": "gpt"}), f"model.kind: must be one of {KINDS} (got 'gpt')"),
        (
            spec_dict(variants={"a": {"model": {"kind": "Bigram"}}}),
            f"variants.a.model.kind: must be one of {KINDS} (got 'Bigram')",
        ),
        (
            spec_dict(train={"lr_schedule": "step"}),
            "train.lr_schedule: must be one of constant, cosine (got 'step')",
        ),
        (
            spec_dict(model={"ffwd": "relu"}),
            "model.ffwd: must be one of none, linear, mlp (got 'relu')",
        ),
        (
            spec_dict(model={"init": "xavier"}),
            "model.init: must be one of default, normal (got 'xavier')",
        ),
    ],
)
def test_choices_list_the_allowed_values(tmp_path: Path, spec: dict[str, Any], line: str) -> None:
    path = write_spec(tmp_path, spec)
    assert problems_of(path) == [f"{path}: {line}"]


def test_model_kinds_are_the_ladder() -> None:
    assert MODEL_KINDS == (
        "bigram",
        "uniform_avg",
        "softmax_avg",
        "single_head",
        "multi_head",
        "transformer",
    )


# --- several problems at once -------------------------------------------------------------------


def test_several_shape_problems_are_reported_together(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        spec_dict(
            model={"kind": None},
            train={"batch_size": "32", "device": "gpu"},
            foo=1,
            variants={"a": {"model": {"kind": "bigram"}}},
            grid={"train.blok_size": [8, 16], "model.n_embd": []},
            exclude=[{"variant": "b"}],
        ),
    )
    problems = problems_of(path)
    assert sorted(problems) == sorted(
        f"{path}: {line}"
        for line in [
            f"foo: unknown key (allowed: {TOP_KEYS})",
            "train.batch_size: expected an integer (got '32')",
            "train.device: must be one of auto, cpu, cuda, cuda:N, mps (got 'gpu')",
            "grid.train.blok_size: unknown key (did you mean train.block_size?)",
            "grid.model.n_embd: empty list of values",
            "exclude[0].variant: no such variant (allowed: a) (got 'b')",
        ]
    )


def test_several_rule_problems_are_reported_together(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        spec_dict(
            data={"dataset": "wiki"},
            train={"max_iters": 10, "eval_interval": 20},
            model={"kind": "transformer", "n_embd": 30, "n_head": 4},
            grid={"train.block_size": [0, 8]},
            seeds=[1, 2, 3],
        ),
    )
    problems = problems_of(path)
    assert sorted(problems) == sorted(
        f"{path}: {line}"
        for line in [
            "grid.train.block_size: must be > 0 (got 0)",
            "model.n_head: must divide model.n_embd (30) (got 4)",
            "train.eval_interval: must be <= train.max_iters (10) (got 20)",
            "data.dataset: unknown data set (allowed: tinyshakespeare, or data.path: FILE) "
            "(got 'wiki')",
        ]
    )  # each problem once, although 6 grid points x 3 seeds share them


def test_set_problems_are_reported_with_the_spec_problems(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict(train={"batch_size": "32"}))
    assert problems_of(path, ["trian.max_iters=3"]) == [
        f"{path}: train.batch_size: expected an integer (got '32')",
        "--set: trian.max_iters: unknown key (did you mean train.max_iters?)",
    ]


@pytest.mark.parametrize(
    ("extra", "sets", "line"),
    [
        (
            {"zip": [{"train.block_size": [8, 16], "train.batch_size": [4]}]},
            [],
            "zip[0]: lists differ in length (train.block_size: 2, train.batch_size: 1)",
        ),
        (
            {"grid": {"trian.block_size": [8]}},
            [],
            "grid.trian.block_size: unknown key (did you mean train.block_size?)",
        ),
        (
            {"grid": {"block_size": [8]}},
            [],
            "grid.block_size: unknown key (did you mean train.block_size?)",
        ),
        ({"zip": [{}]}, [], "zip[0]: empty (remove it or add a key)"),
        ({}, ["trian.max_iters=3"], "trian.max_iters: unknown key (did you mean train.max_iters?)"),
    ],
)
def test_a_structural_problem_beside_a_bad_value_is_reported_not_crashed_on(
    tmp_path: Path, extra: dict[str, Any], sets: list[str], line: str
) -> None:
    # Regression: a bad value inside a section used to let expansion go on, and the broken grid
    # then raised IndexError/KeyError instead of SpecError.
    path = write_spec(tmp_path, spec_dict(train={"max_iters": "x"}, **extra))
    problems = problems_of(path, sets)
    assert f"{path}: train.max_iters: expected an integer (got 'x')" in problems
    assert any(p.endswith(line) for p in problems), problems
    assert len(problems) == 2


def test_exclude_with_unknown_key_beside_a_bad_variant_is_reported(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        spec_dict(
            model={"kind": None},
            variants={
                "a": {"model": {"kind": "bigram", "n_embd": "x"}},
                "b": {"model": {"kind": "bigram"}},
            },
            exclude=[{"train.foo": 1}],
        ),
    )
    problems = problems_of(path)
    assert problems[0] == f"{path}: variants.a.model.n_embd: expected an integer (got 'x')"
    assert problems[1].startswith(f"{path}: exclude[0].train.foo: unknown key")
    assert len(problems) == 2


# --- --set and --only -----------------------------------------------------------------------------


@pytest.mark.parametrize("item", ["train.max_iters", "=3", "", " =1"])
def test_set_without_key_value(tmp_path: Path, item: str) -> None:
    path = write_spec(tmp_path, spec_dict())
    assert problems_of(path, [item]) == [
        f"--set {item!r}: expected KEY=VALUE, e.g. train.max_iters=200"
    ]


@pytest.mark.parametrize(
    ("item", "line"),
    [
        ("train.max_iter=3", "--set: train.max_iter: unknown key (did you mean train.max_iters?)"),
        (
            "trian.max_iters=3",
            "--set: trian.max_iters: unknown key (did you mean train.max_iters?)",
        ),
        ("model.zzzzzz=1", "--set: model.zzzzzz: unknown key"),
        (
            "foo=3",
            "--set: foo: unknown key (allowed: experiment, seeds, or a dotted key such as "
            "train.max_iters)",
        ),
        ("train.batch_size='32'", "--set: train.batch_size: expected an integer (got '32')"),
        (
            "train.device=gpu",
            "--set: train.device: must be one of auto, cpu, cuda, cuda:N, mps (got 'gpu')",
        ),
    ],
)
def test_bad_set(tmp_path: Path, item: str, line: str) -> None:
    path = write_spec(tmp_path, spec_dict())
    assert problems_of(path, [item]) == [line]


def test_only_matching_nothing(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict())
    with pytest.raises(SpecError) as info:
        expand(path, [], ["nope*", "bigram-seed=1"])
    assert info.value.problems == ["--only nope* bigram-seed=1: no run name matches"]


# --- JSON Schema --------------------------------------------------------------------------------


def test_json_schema_describes_the_spec() -> None:
    schema = spec_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["experiment"]
    assert set(schema["properties"]) == set(Spec.model_fields)
    assert schema["additionalProperties"] is False
    train = schema["$defs"]["TrainConfig"]
    assert train["additionalProperties"] is False
    assert set(train["properties"]) == set(section_keys("train"))


def test_json_schema_accepts_a_good_spec_and_rejects_unknown_keys() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = spec_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = spec_dict(
        variants={"a": {"model": {"kind": "multi_head"}}},
        grid={"train.block_size": [8, 16]},
        zip=[{"train.learning_rate": [1e-3, 3e-3]}],
        exclude=[{"variant": "a", "seed": 1}],
        seeds=[1, 2],
    )
    assert list(validator.iter_errors(good)) == []
    assert list(validator.iter_errors(spec_dict(train={"learnin_rate": 1.0})))
    assert list(validator.iter_errors(spec_dict(model={"kind": "gpt"})))


def test_data_path_that_is_not_utf8_or_too_short(tmp_path: Path) -> None:
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    path = write_spec(tmp_path, spec_dict(data={"path": "binary.txt"}))
    assert problems_of(path) == [f"{path}: data.path: not a UTF-8 text file (got 'binary.txt')"]
    (tmp_path / "short.txt").write_text("x" * 50, encoding="utf-8")  # val split: 5 chars
    path = write_spec(tmp_path, spec_dict(data={"path": "short.txt"}), name="short.yaml")
    assert problems_of(path) == [
        f"{path}: data.path: too short: a split has 5 characters, not more than "
        "train.block_size (8) (got 'short.txt')"
    ]


# --- hostile input: unhashable values, enormous grids, huge values ------------------------------


@pytest.mark.parametrize("value", [["a"], {"a": 1}])
def test_exclude_with_an_unhashable_variant_is_one_line(tmp_path: Path, value: Any) -> None:
    spec = spec_dict(variants={"a": {"model": {"kind": "bigram"}}}, exclude=[{"variant": value}])
    path = write_spec(tmp_path, spec)
    assert only_problem(path) == (
        f"{path}: exclude[0].variant: no such variant (allowed: a) (got {value!r})"
    )


def test_an_enormous_grid_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    import subprocess
    import sys

    from workbench.grid import MAX_RUNS

    grid = {f"train.{key}": list(range(1, 11)) for key in section_keys("train")[:5]}
    grid.update({f"model.{key}": list(range(1, 11)) for key in ("n_embd", "n_head", "n_layer")})
    grid["train.learning_rate"] = [0.1 * i for i in range(1, 11)]
    grid["model.dropout"] = [0.05 * i for i in range(10)]
    path = write_spec(tmp_path, spec_dict(grid=grid))  # 10 keys x 10 values: 1e10 runs
    done = subprocess.run(  # in a subprocess: expanding it would never end
        [sys.executable, "-m", "workbench", "plan", str(path), "--no-store"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"{path}: grid: 10,000,000,000 runs (variants x grid x zip x seeds) is more than "
        f"{MAX_RUNS:,}; split the spec or narrow the grid"
    ]


def test_a_grid_at_the_bound_is_not_refused_for_its_size(tmp_path: Path) -> None:
    spec = spec_dict(grid={"train.max_iters": list(range(100, 120))}, seeds=[1, 2])
    assert len(expand(write_spec(tmp_path, spec)).runs) == 40


def test_huge_values_in_messages_are_clipped(tmp_path: Path) -> None:
    # (An alias bomb is refused before validation: workbench.yamlio, tests/test_failures.py.)
    text = "experiment: t\nmodel: {kind: [" + ", ".join(["x"] * 50_000) + "]}\n"
    text += "train: {device: '" + "c" * 100_000 + "'}\n"
    problems = problems_of(write_spec(tmp_path, text))
    kind = next(p for p in problems if ": model.kind:" in p)
    device = next(p for p in problems if ": train.device:" in p)
    for line in (kind, device):
        assert len(line) < 300, line[:400]
        assert "..." in line, line


def test_a_cpu_attention_path_with_dropout_is_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from workbench.cli import app

    spec = write_spec(tmp_path, model={"kind": "multi_head", "dropout": 0.1},
                      train={"attention": "native"})  # fmt: skip
    result = CliRunner().invoke(app, ["plan", str(spec), "--no-store"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "train.attention: computes no attention dropout" in line and "native" in line
