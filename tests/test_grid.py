"""Expanding a spec into runs: counts, order, precedence, names, duplicates, --set/--only, and
the stability of run keys."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from specs import spec_dict, write_spec

from workbench.errors import SpecError
from workbench.grid import Plan, expand, run_key
from workbench.naming import format_value, name_value, run_name_labels, short_names
from workbench.spec import all_dotted_keys


def names(plan: Plan) -> list[str]:
    return [run.name for run in plan.runs]


def keys(plan: Plan) -> list[str]:
    return [run.key for run in plan.runs]


BIG = """\
experiment: big
train: {max_iters: 100, eval_interval: 10}
model: {n_embd: 32}
variants:
  bigram: {model: {kind: bigram}}
  multi_head: {model: {kind: multi_head, n_head: 4}}
grid:
  train.block_size: [8, 16, 32]
  train.learning_rate: [1.0e-3, 3e-3]
zip:
  - {model.n_embd: [32, 64], train.batch_size: [8, 16]}
seeds: [1, 2, 3]
"""


# --- counts and order ---------------------------------------------------------------------------


def test_variants_times_grid_times_zip_times_seeds(tmp_path: Path) -> None:
    plan = expand(write_spec(tmp_path, BIG))
    assert len(plan.runs) == 2 * 3 * 2 * 2 * 3 == 72
    assert plan.excluded == 0
    assert plan.duplicates == []
    assert len(set(keys(plan))) == 72
    assert len(set(names(plan))) == 72
    seen = {
        (
            r.variant,
            r.config.train.block_size,
            r.config.train.learning_rate,
            r.config.model.n_embd,
            r.config.train.batch_size,
            r.seed,
        )
        for r in plan.runs
    }
    expected = {
        (v, b, lr, e, bs, s)
        for v, b, lr, (e, bs), s in itertools.product(
            ["bigram", "multi_head"], [8, 16, 32], [1e-3, 3e-3], [(32, 8), (64, 16)], [1, 2, 3]
        )
    }
    assert seen == expected  # zip values move together: n_embd 32 always with batch_size 8
    assert plan.varying_keys == [
        "train.block_size",
        "train.learning_rate",
        "model.n_embd",
        "train.batch_size",
    ]


def test_order_is_variants_then_grid_then_zip_then_seeds(tmp_path: Path) -> None:
    plan = expand(write_spec(tmp_path, BIG))
    assert names(plan)[:7] == [
        "bigram bs=8 lr=1e-3 emb=32 batch=8 s=1",
        "bigram bs=8 lr=1e-3 emb=32 batch=8 s=2",
        "bigram bs=8 lr=1e-3 emb=32 batch=8 s=3",
        "bigram bs=8 lr=1e-3 emb=64 batch=16 s=1",
        "bigram bs=8 lr=1e-3 emb=64 batch=16 s=2",
        "bigram bs=8 lr=1e-3 emb=64 batch=16 s=3",
        "bigram bs=8 lr=3e-3 emb=32 batch=8 s=1",
    ]
    assert names(plan)[36] == "multi_head bs=8 lr=1e-3 emb=32 batch=8 s=1"
    assert names(plan)[-1] == "multi_head bs=32 lr=3e-3 emb=64 batch=16 s=3"


def test_variants_and_grid_values_keep_their_yaml_order(tmp_path: Path) -> None:
    spec = spec_dict(
        model={"kind": None},
        variants={
            "zeta": {"model": {"kind": "bigram"}},
            "alpha": {"model": {"kind": "bigram", "n_embd": 16}},
        },
        grid={"train.block_size": [16, 8]},
    )
    assert names(expand(write_spec(tmp_path, spec))) == [
        "zeta bs=16 s=1337",
        "zeta bs=8 s=1337",
        "alpha bs=16 s=1337",
        "alpha bs=8 s=1337",
    ]


def test_expansion_is_deterministic(tmp_path: Path) -> None:
    path = write_spec(tmp_path, BIG)
    first, second = expand(path), expand(path)
    assert names(first) == names(second)
    assert keys(first) == keys(second)
    assert [r.config for r in first.runs] == [r.config for r in second.runs]


def test_seeds_default_to_1337(tmp_path: Path) -> None:
    plan = expand(write_spec(tmp_path, spec_dict()))
    assert [(r.name, r.seed, r.config.seed) for r in plan.runs] == [("bigram s=1337", 1337, 1337)]


def test_each_seed_is_a_run(tmp_path: Path) -> None:
    plan = expand(write_spec(tmp_path, spec_dict(seeds=[3, 1, 2])))
    assert [r.seed for r in plan.runs] == [3, 1, 2]
    assert names(plan) == ["bigram s=3", "bigram s=1", "bigram s=2"]


def test_tokens_of_a_run(tmp_path: Path) -> None:
    plan = expand(write_spec(tmp_path, spec_dict(train={"batch_size": 4, "block_size": 16})))
    assert plan.runs[0].tokens == 100 * 4 * 16


# --- exclude ------------------------------------------------------------------------------------


TWO_VARIANTS = spec_dict(
    model={"kind": None},
    variants={"bigram": {"model": {"kind": "bigram"}}, "mh": {"model": {"kind": "multi_head"}}},
    grid={"train.block_size": [8, 16]},
    zip=[{"model.n_embd": [32, 64], "train.batch_size": [4, 8]}],
    seeds=[1, 2],
)


def test_exclude_drops_the_matching_runs(tmp_path: Path) -> None:
    spec = copy.deepcopy(TWO_VARIANTS)
    spec["exclude"] = [
        {"variant": "bigram", "train.block_size": 16},  # every key must match: 4 runs
        {"seed": 2, "variant": "mh"},  # 4 runs
        {"model.n_embd": 64, "train.block_size": 8, "seed": 1},  # 2 runs, one per variant
        {"variant": "mh", "seed": 2, "train.batch_size": 8},  # 2 runs, both dropped already
    ]
    plan = expand(write_spec(tmp_path, spec))
    assert plan.excluded == 10
    assert names(plan) == [
        "bigram bs=8 emb=32 batch=4 s=1",
        "bigram bs=8 emb=32 batch=4 s=2",
        "bigram bs=8 emb=64 batch=8 s=2",
        "mh bs=8 emb=32 batch=4 s=1",
        "mh bs=16 emb=32 batch=4 s=1",
        "mh bs=16 emb=64 batch=8 s=1",
    ]
    for run in plan.runs:
        assert not (run.variant == "bigram" and run.config.train.block_size == 16)
        assert not (run.variant == "mh" and run.seed == 2)


def test_exclude_can_match_a_value_that_does_not_vary(tmp_path: Path) -> None:
    spec = copy.deepcopy(TWO_VARIANTS)
    spec["exclude"] = [{"model.kind": "multi_head"}]
    plan = expand(write_spec(tmp_path, spec))
    assert plan.excluded == 8
    assert {r.variant for r in plan.runs} == {"bigram"}


def test_exclude_that_matches_nothing_changes_nothing(tmp_path: Path) -> None:
    spec = copy.deepcopy(TWO_VARIANTS)
    spec["exclude"] = [{"variant": "bigram", "train.block_size": 32}]
    plan = expand(write_spec(tmp_path, spec))
    assert plan.excluded == 0
    assert len(plan.runs) == 16


# --- precedence ---------------------------------------------------------------------------------


PRECEDENCE = spec_dict(
    train={"block_size": 4, "batch_size": 4, "learning_rate": 0.1, "eval_iters": 5},
    model={"kind": "bigram", "n_embd": 16, "n_layer": 1},
    variants={
        "v": {"train": {"block_size": 8, "batch_size": 8, "eval_iters": 7}, "model": {"n_embd": 24}}
    },
    grid={"train.block_size": [16]},
    zip=[{"train.batch_size": [12]}],
)


def test_precedence_top_level_then_variant_then_grid_and_zip(tmp_path: Path) -> None:
    (run,) = expand(write_spec(tmp_path, PRECEDENCE)).runs
    assert run.config.train.learning_rate == 0.1  # top level only
    assert run.config.model.n_layer == 1  # top level, not replaced by the variant's model section
    assert run.config.model.kind == "bigram"  # same
    assert run.config.model.n_embd == 24  # variant over top level
    assert run.config.train.eval_iters == 7  # variant over top level
    assert run.config.train.block_size == 16  # grid over variant
    assert run.config.train.batch_size == 12  # zip over variant
    assert run.config.train.weight_decay == 0.01  # default, written nowhere


def test_set_beats_everything(tmp_path: Path) -> None:
    sets = [
        "train.block_size=64",
        "train.batch_size=2",
        "model.n_embd=48",
        "train.learning_rate=0.5",
    ]
    (run,) = expand(write_spec(tmp_path, PRECEDENCE), sets).runs
    assert run.config.train.block_size == 64  # over grid
    assert run.config.train.batch_size == 2  # over zip
    assert run.config.model.n_embd == 48  # over variant
    assert run.config.train.learning_rate == 0.5  # over top level


def test_later_set_of_the_same_key_wins(tmp_path: Path) -> None:
    sets = ["train.batch_size=2", "train.batch_size=3"]
    (run,) = expand(write_spec(tmp_path, spec_dict()), sets).runs
    assert run.config.train.batch_size == 3


# --- run names ----------------------------------------------------------------------------------


def test_run_name_is_variant_then_varying_values_then_seed(tmp_path: Path) -> None:
    spec = spec_dict(
        model={"kind": None, "n_embd": 32},
        variants={
            "bigram": {"model": {"kind": "bigram"}},
            "multi_head": {"model": {"kind": "multi_head", "n_head": 4}},
        },
        grid={
            "train.block_size": [8, 16],
            "train.learning_rate": [0.001, 0.003],
            "train.eval_iters": [20],
        },  # one value: does not vary, not in the name
        zip=[{"train.batch_size": [32, 32]}, {"model.n_layer": [1, 2]}],
    )
    plan = expand(write_spec(tmp_path, spec))
    assert "multi_head bs=16 lr=1e-3 layers=1 s=1337" in names(plan)
    assert plan.varying_keys == ["train.block_size", "train.learning_rate", "model.n_layer"]
    assert all("eval_iters" not in n and "batch_size" not in n for n in names(plan))
    prefix = "multi_head bs=16 lr=1e-3 "
    run = next(r for r in plan.runs if r.name.startswith(prefix))
    assert run.varying == {"train.block_size": 16, "train.learning_rate": 0.001, "model.n_layer": 1}


def test_without_variants_the_name_starts_with_the_model_kind(tmp_path: Path) -> None:
    spec = spec_dict(model={"kind": "transformer"}, grid={"model.dropout": [0.0, 0.2]})
    assert names(expand(write_spec(tmp_path, spec))) == [
        "transformer drop=0.0 s=1337",
        "transformer drop=0.2 s=1337",
    ]


def test_name_values_are_formatted_like_yaml(tmp_path: Path) -> None:
    spec = spec_dict(grid={"model.residual": [True, False], "train.learning_rate": [3e-4, 1e-3]})
    assert names(expand(write_spec(tmp_path, spec))) == [
        "bigram residual=true lr=3e-4 s=1337",
        "bigram residual=true lr=1e-3 s=1337",
        "bigram residual=false lr=3e-4 s=1337",
        "bigram residual=false lr=1e-3 s=1337",
    ]


def test_format_value() -> None:
    assert format_value(True) == "true"
    assert format_value(False) == "false"
    assert format_value(0.001) == "0.001"
    assert format_value(1e-5) == "1e-05"
    assert format_value(16) == "16"
    assert format_value("cosine") == "cosine"
    assert format_value(None) == format_value(float("nan")) == "null"  # as YAML writes it
    assert format_value(0.1 + 0.2) != format_value(0.3)  # exact: two values, two spellings


def test_name_values_take_the_shortest_exact_form() -> None:
    assert name_value(0.003) == "3e-3" and name_value(3e-4) == "3e-4"
    assert name_value(1.5e-5) == "1.5e-5" and name_value(1e16) == "1e16"
    assert name_value(0.1) == "0.1" and name_value(0.25) == "0.25"  # not longer as 1e-1
    assert name_value(0.0) == "0.0" and name_value(2.0) == "2.0"
    assert name_value(0.1 + 0.2) == "0.30000000000000004"  # exact, never rounded
    assert name_value(True) == "true" and name_value(None) == "null" and name_value(32) == "32"
    for value in (0.003, 3e-4, 1.5e-5, 1e16, 0.1 + 0.2, 1 / 3, 2.5e-7, -1e-3):
        assert float(name_value(value)) == value


def test_run_names_abbreviate_common_keys_unless_that_would_clash() -> None:
    keys = ["train.block_size", "train.learning_rate", "model.n_embd", "model.residual"]
    assert run_name_labels(keys) == {
        "train.block_size": "bs",
        "train.learning_rate": "lr",
        "model.n_embd": "emb",
        "model.residual": "residual",
    }
    assert run_name_labels(["train.dropout", "model.dropout"]) == {
        "train.dropout": "train.dropout",
        "model.dropout": "model.dropout",
    }
    assert run_name_labels(["model.bs", "train.block_size"]) == {  # a key already named bs
        "model.bs": "bs",
        "train.block_size": "block_size",
    }


def test_names_of_different_configs_that_format_alike_get_their_key(tmp_path: Path) -> None:
    from dataclasses import replace

    from workbench.grid import _unique_names

    runs = expand(write_spec(tmp_path, spec_dict(seeds=[1, 2, 3]))).runs
    alike = [replace(r, name="bigram s=1") for r in runs[:2]] + runs[2:]
    named = _unique_names(alike)
    assert [r.name for r in named] == [
        f"bigram s=1 {runs[0].key[:8]}",
        f"bigram s=1 {runs[1].key[:8]}",
        "bigram s=3",
    ]


def test_short_names_keep_the_section_when_two_keys_clash() -> None:
    assert short_names(["train.block_size", "model.n_embd"]) == {
        "train.block_size": "block_size",
        "model.n_embd": "n_embd",
    }
    assert short_names(["train.size", "model.size", "model.n_embd"]) == {
        "train.size": "train.size",
        "model.size": "model.size",
        "model.n_embd": "n_embd",
    }


# --- identical runs -----------------------------------------------------------------------------


def test_variants_that_resolve_to_one_config_are_refused_naming_both(tmp_path: Path) -> None:
    """Ten names for one config trained once under one of them, the others nowhere (the second
    hostile round): two variants that are one config are a spec error, one line per pair."""
    spec = spec_dict(
        model={"kind": None},
        variants={
            "a": {"model": {"kind": "bigram"}},
            "b": {"model": {"kind": "bigram", "n_embd": 32}},  # n_embd 32 is the default
            "c": {"model": {"kind": "bigram", "n_embd": 16}},
            "d": {"model": {"kind": "multi_head"}},
            "e": {"model": {"kind": "multi_head", "n_head": 4}},  # n_head 4 is the default
        },
        seeds=[1, 2],
    )
    path = write_spec(tmp_path, spec)
    with pytest.raises(SpecError) as info:
        expand(path)
    assert info.value.problems == [
        f"{path}: variants: 'a' and 'b' resolve to the same config ('b s=1' = 'a s=1'): "
        "make them differ, or keep one",
        f"{path}: variants: 'd' and 'e' resolve to the same config ('e s=1' = 'd s=1'): "
        "make them differ, or keep one",
    ]


def test_set_over_a_grid_key_makes_the_grid_points_identical(tmp_path: Path) -> None:
    spec = spec_dict(grid={"train.block_size": [8, 16, 32], "train.batch_size": [4, 8]})
    plan = expand(write_spec(tmp_path, spec), ["train.block_size=64"])
    assert plan.varying_keys == ["train.batch_size"]
    assert names(plan) == [
        "bigram batch=4 bs=64 s=1337",
        "bigram batch=8 bs=64 s=1337",
    ]
    assert [r.config.train.block_size for r in plan.runs] == [64, 64]
    assert len(plan.duplicates) == 4
    same = "bigram batch=4 bs=64 s=1337"
    assert (same, same) in plan.duplicates


# --- --set --------------------------------------------------------------------------------------


def test_set_values_unlike_the_spec_are_in_the_name(tmp_path: Path) -> None:
    spec = spec_dict(
        model={"kind": None},
        variants={"a": {"model": {"kind": "bigram"}}, "b": {"model": {"kind": "uniform_avg"}}},
        grid={"train.block_size": [8, 16]},
    )
    path = write_spec(tmp_path, spec)
    plain = expand(path)
    sets = ["train.max_iters=200", "train.eval_interval=10", "train.weight_decay=0.01"]
    changed = expand(path, sets)  # eval_interval and weight_decay: as the spec already has them
    assert names(changed) == [
        "a bs=8 iters=200 s=1337",
        "a bs=16 iters=200 s=1337",
        "b bs=8 iters=200 s=1337",
        "b bs=16 iters=200 s=1337",
    ]
    assert [r.changed for r in changed.runs] == [{"train.max_iters": 200}] * 4
    assert not set(names(changed)) & set(names(plain))  # never the name of another config
    assert expand(path, ["train.max_iters=100"]).runs == plain.runs  # the spec's own value
    assert keys(changed) == keys(
        expand(
            write_spec(
                tmp_path,
                spec_dict(**{**spec, "train": {"max_iters": 200, "eval_interval": 10}}),
                "edited.yaml",
            )
        )
    )


def test_a_set_value_shows_only_in_the_runs_it_changes(tmp_path: Path) -> None:
    spec = spec_dict(
        model={"kind": None, "n_embd": 32},
        variants={
            "a": {"model": {"kind": "uniform_avg"}},
            "b": {"model": {"kind": "softmax_avg", "n_embd": 16}},
        },
    )
    plan = expand(write_spec(tmp_path, spec), ["model.n_embd=16", "model.n_embd=32"])
    assert names(plan) == ["a s=1337", "b emb=32 s=1337"]  # the last --set wins


def test_names_are_unique_per_config_and_deterministic(tmp_path: Path) -> None:
    path = write_spec(tmp_path, BIG)
    sets = ["train.max_iters=50", "model.n_embd=64", "train.batch_size=8"]
    plan = expand(path, sets)
    assert len(set(names(plan))) == len(set(keys(plan))) == len(plan.runs)
    assert names(expand(path, sets)) == names(plan)
    assert "bigram bs=8 lr=1e-3 iters=50 emb=64 s=1" in names(plan)


def test_the_variant_index_is_its_position_in_the_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, BIG)
    assert {(r.variant, r.variant_index) for r in expand(path).runs} == {
        ("bigram", 0),
        ("multi_head", 1),
    }
    only_second = expand(path, [], ["multi_head *"])
    assert {r.variant_index for r in only_second.runs} == {1}


def test_set_values_are_typed_by_yaml(tmp_path: Path) -> None:
    sets = [
        "train.max_iters=200",
        "train.learning_rate=3e-4",
        "model.residual=false",
        "train.device=cuda:0",
        "train.threads=2",
    ]
    (run,) = expand(write_spec(tmp_path, spec_dict()), sets).runs
    assert run.config.train.max_iters == 200 and type(run.config.train.max_iters) is int
    assert run.config.train.learning_rate == pytest.approx(3e-4)
    assert type(run.config.train.learning_rate) is float
    assert run.config.model.residual is False
    assert run.config.train.device == "cuda:0"
    assert run.config.train.threads == 2


def test_set_seeds_and_experiment(tmp_path: Path) -> None:
    plan = expand(write_spec(tmp_path, spec_dict(seeds=[7])), ["seeds=[1,2]", "experiment=other"])
    assert [r.seed for r in plan.runs] == [1, 2]
    assert plan.experiment == "other"
    assert plan.spec.seeds == [1, 2]


def test_set_does_not_change_the_file(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec_dict())
    before = path.read_text(encoding="utf-8")
    expand(path, ["train.max_iters=200", "seeds=[1,2]"])
    assert path.read_text(encoding="utf-8") == before
    assert [r.config.train.max_iters for r in expand(path).runs] == [100]


# --- --only -------------------------------------------------------------------------------------


def test_only_keeps_runs_matching_any_glob_in_plan_order(tmp_path: Path) -> None:
    path = write_spec(tmp_path, TWO_VARIANTS)
    plan = expand(path, [], ["mh * s=2"])
    assert names(plan) == [
        "mh bs=8 emb=32 batch=4 s=2",
        "mh bs=8 emb=64 batch=8 s=2",
        "mh bs=16 emb=32 batch=4 s=2",
        "mh bs=16 emb=64 batch=8 s=2",
    ]
    plan = expand(path, [], ["*bs=16 emb=64*s=1", "bigram bs=8 emb=32*"])
    assert names(plan) == [
        "bigram bs=8 emb=32 batch=4 s=1",
        "bigram bs=8 emb=32 batch=4 s=2",
        "bigram bs=16 emb=64 batch=8 s=1",
        "mh bs=16 emb=64 batch=8 s=1",
    ]


def test_only_is_a_glob_not_a_substring_and_is_case_sensitive(tmp_path: Path) -> None:
    path = write_spec(tmp_path, TWO_VARIANTS)
    assert len(expand(path, [], ["bigram bs=8 emb=32 batch=4 s=[12]"]).runs) == 2
    assert len(expand(path, [], ["mh bs=? *"]).runs) == 4
    for glob in ["mh", "MH-*"]:
        with pytest.raises(Exception, match="no run name matches"):
            expand(path, [], [glob])


def test_only_keeps_keys_unchanged(tmp_path: Path) -> None:
    path = write_spec(tmp_path, TWO_VARIANTS)
    full = {r.name: r.key for r in expand(path).runs}
    some = expand(path, [], ["mh *"])
    expected = {n: k for n, k in full.items() if n.startswith("mh ")}
    assert {r.name: r.key for r in some.runs} == expected


# --- run keys -----------------------------------------------------------------------------------


def only_key(path: Path, sets: list[str] | None = None) -> str:
    (run,) = expand(path, sets).runs
    return run.key


def test_run_key_is_16_hex_characters(tmp_path: Path) -> None:
    key = only_key(write_spec(tmp_path, spec_dict()))
    assert len(key) == 16
    int(key, 16)


def test_run_key_is_stable_across_expansions_and_folders(tmp_path: Path) -> None:
    first = only_key(write_spec(tmp_path / "a", spec_dict()))
    second = only_key(write_spec(tmp_path / "b", spec_dict(), name="other.yaml"))
    assert first == second


def test_run_key_ignores_the_order_of_yaml_keys(tmp_path: Path) -> None:
    one = write_spec(
        tmp_path / "one",
        """\
        experiment: t
        data: {dataset: tinyshakespeare, val_fraction: 0.2}
        train: {max_iters: 100, eval_interval: 10, learning_rate: 0.003}
        model: {kind: transformer, n_embd: 64, n_head: 8}
        variants:
          a: {train: {block_size: 16}}
          b: {model: {n_layer: 2}}
        seeds: [1, 2]
        """,
    )
    two = write_spec(
        tmp_path / "two",
        """\
        seeds: [1, 2]
        variants:
          b: {model: {n_layer: 2}}
          a: {train: {block_size: 16}}
        model: {n_head: 8, n_embd: 64, kind: transformer}
        train: {learning_rate: 3.0e-3, eval_interval: 10, max_iters: 100}
        data: {val_fraction: 0.2, dataset: tinyshakespeare}
        experiment: t
        """,
    )
    assert {r.name: r.key for r in expand(one).runs} == {r.name: r.key for r in expand(two).runs}


def test_run_key_depends_on_values_not_on_where_they_were_written(tmp_path: Path) -> None:
    plain = only_key(write_spec(tmp_path / "plain", spec_dict()))
    explicit_default = only_key(
        write_spec(
            tmp_path / "explicit",
            spec_dict(train={"batch_size": 32, "learning_rate": 1.0e-3}, model={"n_embd": 32}),
        )
    )
    via_grid = only_key(write_spec(tmp_path / "grid", spec_dict(grid={"model.n_embd": [32]})))
    via_variant = only_key(
        write_spec(
            tmp_path / "variant",
            spec_dict(model={"kind": None}, variants={"other_name": {"model": {"kind": "bigram"}}}),
        )
    )
    via_set = only_key(write_spec(tmp_path / "set", spec_dict()), ["train.batch_size=32"])
    assert plain == explicit_default == via_grid == via_variant == via_set


def test_run_key_ignores_the_experiment_name(tmp_path: Path) -> None:
    assert only_key(write_spec(tmp_path / "a", spec_dict())) == only_key(
        write_spec(tmp_path / "b", spec_dict(experiment="renamed"))
    )


# One other valid value for every config key (data.dataset and data.path are tested apart).
OTHER_VALUES: dict[str, Any] = {
    "data.val_fraction": 0.2,
    "train.batch_size": 16,
    "train.block_size": 16,
    "train.max_iters": 200,
    "train.eval_interval": 20,
    "train.eval_iters": 50,
    "train.learning_rate": 3e-4,
    "train.weight_decay": 0.1,
    "train.lr_schedule": "cosine",
    "train.warmup_iters": 10,
    "train.min_lr": 1e-5,
    "train.grad_clip": 1.0,
    "train.divergence_factor": 5.0,
    "train.device": "cpu",
    "train.compile": True,
    "model.kind": "multi_head",
    "model.n_embd": 64,
    "model.n_head": 8,
    "model.head_size": 16,
    "model.n_layer": 2,
    "model.ffwd": "linear",
    "model.residual": False,
    "model.layernorm": False,
    "model.proj": True,
    "model.dropout": 0.1,
    "model.init": "normal",
    "model.learnable": False,
}


def test_other_values_cover_every_config_key() -> None:
    tested_apart = {"data.dataset", "data.path", "train.threads", "train.attention"}
    assert set(OTHER_VALUES) | tested_apart == set(all_dotted_keys())


def test_thread_count_is_not_part_of_the_run_key(tmp_path: Path) -> None:
    before = only_key(write_spec(tmp_path / "before", spec_dict()))
    assert only_key(write_spec(tmp_path / "set", spec_dict()), ["train.threads=2"]) == before


def test_attention_backend_is_not_part_of_the_run_key(tmp_path: Path) -> None:
    """Another backend computes the same math: the run is the same run."""
    before = only_key(write_spec(tmp_path / "before", spec_dict()))
    for setting in ("sdpa", "torch", "native"):
        spec = write_spec(tmp_path / setting, spec_dict())
        assert only_key(spec, [f"train.attention={setting}"]) == before


@pytest.mark.parametrize(("dotted", "value"), sorted(OTHER_VALUES.items()))
def test_any_config_change_gives_a_new_run_key(tmp_path: Path, dotted: str, value: Any) -> None:
    section, _, name = dotted.partition(".")
    changed = {name: value, "dataset": "tinyshakespeare"} if section == "data" else {name: value}
    before = only_key(write_spec(tmp_path / "before", spec_dict()))
    after = only_key(write_spec(tmp_path / "after", spec_dict(**{section: changed})))
    assert before != after
    assert only_key(write_spec(tmp_path / "set", spec_dict()), [f"{dotted}={value}"]) == after


def test_a_new_seed_gives_a_new_run_key(tmp_path: Path) -> None:
    plan = expand(write_spec(tmp_path, spec_dict(seeds=[1, 2])))
    assert len(set(keys(plan))) == 2


def test_grid_values_give_distinct_run_keys(tmp_path: Path) -> None:
    spec = spec_dict(grid={"train.learning_rate": [1e-3, 2e-3], "data.val_fraction": [0.1, 0.2]})
    assert len(set(keys(expand(write_spec(tmp_path, spec))))) == 4


def text_spec(directory: Path, text: str, data_path: str = "corpus.txt") -> Path:
    target = directory / data_path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text * 10, encoding="utf-8")  # longer than a block per split
    return write_spec(directory, spec_dict(data={"path": data_path}))


def test_moving_the_data_file_with_the_spec_keeps_the_run_key(tmp_path: Path) -> None:
    old = text_spec(tmp_path / "old", "to be or not to be\n")
    old_key = only_key(old)
    new_folder = tmp_path / "moved" / "deeper"
    shutil.copytree(tmp_path / "old", new_folder)
    shutil.rmtree(tmp_path / "old")
    (run,) = expand(new_folder / "spec.yaml").runs
    assert run.key == old_key
    assert run.config.data.path == str((new_folder / "corpus.txt").resolve())


def test_same_content_at_another_path_keeps_the_run_key(tmp_path: Path) -> None:
    relative = text_spec(tmp_path / "a", "to be or not to be\n", "data/in.txt")
    absolute_target = tmp_path / "elsewhere" / "other-name.txt"
    absolute_target.parent.mkdir()
    absolute_target.write_text("to be or not to be\n" * 10, encoding="utf-8")
    absolute = write_spec(tmp_path / "b", spec_dict(data={"path": str(absolute_target)}))
    assert only_key(relative) == only_key(absolute)


def test_different_data_content_gives_a_new_run_key(tmp_path: Path) -> None:
    one = only_key(text_spec(tmp_path / "one", "to be or not to be\n"))
    two = only_key(text_spec(tmp_path / "two", "to be or not to bee\n"))
    assert one != two


def test_a_file_and_the_known_dataset_give_different_keys(tmp_path: Path) -> None:
    assert only_key(text_spec(tmp_path / "file", "hello there\n")) != only_key(
        write_spec(tmp_path / "known", spec_dict())
    )


def test_data_rewritten_in_place_gives_a_new_run_key(tmp_path: Path) -> None:
    spec = text_spec(tmp_path, "to be or not to be\n")
    before = only_key(spec)
    corpus = tmp_path / "corpus.txt"
    stat = corpus.stat()
    corpus.write_text("TO BE OR NOT TO BE\n" * 10, encoding="utf-8")
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same tick: same mtime
    assert only_key(spec) != before


def test_run_key_recipe_is_unchanged(tmp_path: Path) -> None:
    """Run keys identify finished runs across versions: changing the recipe, or adding a config
    key, orphans every recorded run. Update this test only on purpose."""
    spec = spec_dict(model={"kind": "transformer", "n_embd": 32, "n_head": 4}, experiment="golden")
    (run,) = expand(write_spec(tmp_path, spec)).runs
    config = {
        "data": {"dataset": "tinyshakespeare", "path": None, "val_fraction": 0.1},
        "train": {
            "batch_size": 32,
            "block_size": 8,
            "max_iters": 100,
            "eval_interval": 10,
            "eval_iters": 200,
            "learning_rate": 0.001,
            "weight_decay": 0.01,
            "lr_schedule": "constant",
            "warmup_iters": 0,
            "min_lr": 0.0,
            "grad_clip": 0.0,
            "divergence_factor": 3.0,
            "device": "auto",
            "compile": False,
        },
        "model": {
            "kind": "transformer",
            "n_embd": 32,
            "n_head": 4,
            "head_size": None,
            "n_layer": 3,
            "ffwd": "mlp",
            "residual": True,
            "layernorm": True,
            "proj": None,
            "dropout": 0.0,
            "init": "default",
            "learnable": True,
        },
        "seed": 1337,
    }
    sha = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    blob = json.dumps({"config": config, "data_sha256": sha}, sort_keys=True)
    assert run.data_sha256 == sha
    assert run.key == hashlib.sha256(blob.encode()).hexdigest()[:16] == "82f5dc70bd65ff38"
    assert run_key(run.config, sha) == run.key


def test_exclude_drops_combinations_that_would_be_invalid(tmp_path: Path) -> None:
    spec = spec_dict(
        model={"n_embd": 32},
        variants={"mh": {"model": {"kind": "multi_head"}}},
        grid={"model.n_head": [4, 5]},
        exclude=[{"model.n_head": 5}],
    )
    plan = expand(write_spec(tmp_path, spec))
    assert [run.config.model.n_head for run in plan.runs] == [4]
    assert plan.excluded == 1


def test_exclude_compares_unset_keys_with_their_defaults(tmp_path: Path) -> None:
    spec = spec_dict(
        variants={"a": {"model": {"kind": "bigram"}}, "b": {"model": {"kind": "bigram"}}},
        exclude=[{"variant": "b", "train.batch_size": 32}],  # 32 is the default batch size
    )
    plan = expand(write_spec(tmp_path, spec))
    assert {run.variant for run in plan.runs} == {"a"}


@pytest.mark.parametrize("where", ["set", "variant"])
def test_a_data_path_replaces_the_dataset_below_it(tmp_path: Path, where: str) -> None:
    (tmp_path / "mine.txt").write_text("hello world, hello there\n" * 50)
    variant: dict[str, Any] = {"model": {"kind": "bigram"}}
    if where == "variant":
        variant["data"] = {"path": "mine.txt"}
    spec = spec_dict(data={"dataset": "tinyshakespeare"}, variants={"v": variant})
    sets = [f"data.path={tmp_path / 'mine.txt'}"] if where == "set" else []
    (run,) = expand(write_spec(tmp_path, spec), sets).runs
    assert run.config.data.dataset is None
    assert run.config.data.path == str((tmp_path / "mine.txt").resolve())
