"""Issue 17 as a user sees it: a smoke grid opened in `mlflow server`'s own web UI, in a real
headless Chromium, shows each run's datasets, source and logged model in the runs table.

MLflow 3.17's "Training runs" page (``#/experiments/<id>/runs``) shows Run Name, Created,
Dataset, Duration, Source and Models by default; a sweep's runs are nested under its parent run,
collapsed until its row is expanded. The table is an ag-grid rendered by JavaScript after the
page loads, so the test polls the DOM for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from browser import Page, browse, chromium
from runs import Store, invoke, mlflow_server
from specs import write_spec

# Every body row of the runs table: {row index: {column id: {text, links, titles}}}. The grid
# draws pinned and scrolling columns in separate containers; the row index joins them.
TABLE = """JSON.stringify((() => {
  const rows = {};
  for (const cell of document.querySelectorAll(".ag-row[row-index] [col-id]")) {
    const row = cell.closest(".ag-row").getAttribute("row-index");
    (rows[row] ||= {})[cell.getAttribute("col-id")] = {
      text: cell.innerText,
      links: [...cell.querySelectorAll("a")].map(a => [a.innerText, a.getAttribute("href")]),
      titles: [...cell.querySelectorAll("[title]")].map(e => e.getAttribute("title")),
    };
  }
  return rows;
})())"""
HEADERS = """[...document.querySelectorAll(".ag-header-row-column .ag-header-cell")]
  .map(cell => cell.innerText.trim()).filter(Boolean)"""
ROW_INDICES = (
    "[...document.querySelectorAll('.ag-row[row-index]')].map(r => r.getAttribute('row-index'))"
)
EXPAND = """(() => {
  const button = document.querySelector(".ag-row[row-index='0'] [col-id*='Run Name'] button");
  if (button) button.click();
  return Boolean(button);
})()"""


def table(page: Page) -> dict[str, dict[str, dict[str, Any]]]:
    """The runs table by run name (the link in the Run Name column), then column title."""
    rows: dict[str, dict[str, dict[str, Any]]] = json.loads(page.evaluate(TABLE))
    by_name = {}
    for cells in rows.values():
        ((name, _href),) = cells["attributes.`Run Name`"]["links"]
        by_name[name] = {
            column.split("`")[1]: cell for column, cell in cells.items() if "`" in column
        }
    return by_name


@pytest.mark.slow
def test_mlflow_ui_shows_each_run_s_datasets_source_and_model(store: Store, tmp_path: Path) -> None:
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    spec = write_spec(tmp_path, name="smoke.yaml")
    result = invoke("run", str(spec), *store.args())
    assert result.exit_code == 0, result.output
    (parent,) = store.parents()
    experiment = parent.info.experiment_id
    runs = store.by_name()
    assert sorted(runs) == ["bigram s=1", "multi_head s=1"]

    with (
        mlflow_server(store.uri, tmp_path) as url,
        browse(f"{url}/#/experiments/{experiment}/runs", tmp_path / "profile", 2000) as page,
    ):
        # What a new user sees first: the default columns, and the sweep's parent run alone.
        # The grid draws its header cells as they come into view, one after another (MLflow
        # 3.18 opens an assistant panel beside the table): wait for the sixth.
        every = f"(() => {{ const h = {HEADERS}; return h.includes('Models') ? h : null; }})()"
        headers = page.wait_until(every, timeout=120)
        assert headers[:6] == ["Run Name", "Created", "Dataset", "Duration", "Source", "Models"]
        page.wait_until(f"new Set({ROW_INDICES}).size > 0", timeout=60)
        shown = table(page)
        assert list(shown) == [parent.info.run_name], shown
        assert shown[parent.info.run_name]["Source"]["text"] == "smoke.yaml"

        assert page.wait_until(EXPAND)  # the parent's expander shows the runs under it
        page.wait_until(f"new Set({ROW_INDICES}).size == {1 + len(runs)}")
        shown = table(page)
        assert sorted(shown) == sorted([parent.info.run_name, *runs]), shown
        for name, run in runs.items():
            cells = shown[name]
            digests = {d.dataset.digest for d in run.inputs.dataset_inputs}
            assert len(digests) == 2  # training and evaluation splits
            assert set(cells["Dataset"]["titles"]) == {f"tinyshakespeare ({d})" for d in digests}
            assert "training" in cells["Dataset"]["text"].lower()
            assert "evaluation" in cells["Dataset"]["text"].lower()
            assert cells["Source"]["text"] == "smoke.yaml"
            (model,) = run.outputs.model_outputs
            assert cells["Models"]["links"] == [
                ["model", f"#/experiments/{experiment}/models/{model.model_id}"]
            ], cells["Models"]
