"""The report's sensitivity figures: heatmaps over two grid axes and lines along each."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from workbench.naming import format_value, short_name
from workbench.report.analysis import LOSS, interval, same_value
from workbench.report.figures import (
    BEST_MEAN,
    Figure,
    palette,
    render,
    sort_key,
)

if TYPE_CHECKING:
    import pandas as pd

    from workbench.report.load import ExperimentData


def heatmaps(
    data: ExperimentData, points: pd.DataFrame, board: pd.DataFrame, pair: tuple[str, str]
) -> Figure | None:
    """Per variant, mean best val loss over two grid axes (the others at the variant's best
    values); variants with fewer than two values on either axis get no heatmap."""
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns
    from matplotlib.patches import Rectangle

    rows, cols = pair
    panels = []
    for variant in data.variants:
        sub = _at_best_of_others(points, board, variant, data.axes, keep=pair)
        sub = sub.dropna(subset=["mean"])
        if sub["grid." + rows].nunique() < 2 or sub["grid." + cols].nunique() < 2:
            continue
        table = sub.pivot_table(index="grid." + rows, columns="grid." + cols, values="mean")
        table = table.reindex(
            index=sorted(table.index, key=sort_key), columns=sorted(table.columns, key=sort_key)
        )
        panels.append((variant, table))
    if not panels:
        return None
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    figure, axs = plt.subplots(nrows, ncols, figsize=(4.1 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axs.flat[len(panels) :]:
        ax.set_visible(False)
    low = float(np.nanmin([np.nanmin(t.to_numpy()) for _, t in panels]))
    high = float(np.nanmax([np.nanmax(t.to_numpy()) for _, t in panels]))
    for ax, (variant, table) in zip(axs.flat, panels, strict=False):
        sns.heatmap(
            table, annot=True, fmt=".3f", cmap="viridis_r", cbar=False, linewidths=0.5, ax=ax,
            vmin=low, vmax=high if high > low else low + 1e-6,
            xticklabels=[format_value(v) for v in table.columns],
            yticklabels=[format_value(v) for v in table.index],
        )  # fmt: skip
        row, col = divmod(int(np.nanargmin(table.to_numpy())), table.shape[1])
        ax.add_patch(Rectangle((col, row), 1, 1, fill=False, lw=2.5, ec="red"))
        ax.set_title(variant)
        ax.set_xlabel(short_name(cols, data.axes))
        ax.set_ylabel(short_name(rows, data.axes))
        ax.tick_params(axis="y", rotation=0)
    figure.tight_layout()
    shown = [ax for ax in axs.flat if ax.get_visible()]
    figure.colorbar(shown[0].collections[0], ax=shown, shrink=0.8, label=BEST_MEAN)
    return render(
        figure,
        f"Mean over seeds of best val loss over {short_name(rows, data.axes)} × "
        f"{short_name(cols, data.axes)} (one colour scale for every panel)",
        "heatmaps of best val loss per variant",
    )


def _at_best_of_others(
    points: pd.DataFrame,
    board: pd.DataFrame,
    variant: str,
    axes: Sequence[str],
    keep: Sequence[str],
) -> pd.DataFrame:
    sub = points[points["variant"] == variant]
    best = board[board["variant"] == variant]
    if best.empty:
        return sub.iloc[0:0]
    for axis in axes:
        if axis not in keep:
            sub = sub[same_value(sub["grid." + axis], best["grid." + axis].iloc[0])]
    return sub


def axis_lines(
    data: ExperimentData, runs: pd.DataFrame, points: pd.DataFrame, intervals: bool
) -> Figure | None:
    """For each axis with two values or more: best val loss against it, one line per variant,
    the other axes tuned (each point at the best values of the others)."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    axes = [a for a in data.axes if points["grid." + a].nunique() > 1]
    if not axes:
        return None
    colors = palette(data.variants)
    figure, axs = plt.subplots(1, len(axes), figsize=(5.2 * len(axes), 3.8), squeeze=False)
    for ax, axis in zip(axs.flat, axes, strict=True):
        column = "grid." + axis
        best_points = points.loc[points.groupby(["variant", column])["mean"].idxmin()]
        keys = ["variant", *("grid." + a for a in data.axes)]
        chosen = runs.merge(best_points[keys], on=keys, how="inner")
        order = sorted(chosen[column].dropna().unique(), key=sort_key)
        chosen = chosen.assign(
            **{
                axis: pd.Categorical(
                    chosen[column].map(format_value), [format_value(v) for v in order]
                )
            }
        )
        hue_order = [v for v in data.variants if v in set(chosen["variant"])]
        dodge = 0.3 if intervals and len(hue_order) > 1 else False  # seaborn divides by hues − 1
        sns.pointplot(
            data=chosen, x=axis, y=LOSS, hue="variant", hue_order=hue_order, palette=colors,
            errorbar=interval if intervals else None, dodge=dodge,
            capsize=0.1, markers="o", ax=ax,
        )  # fmt: skip
        ax.set_xlabel(short_name(axis, data.axes))
        ax.set_ylabel(BEST_MEAN)
        if ax is not axs.flat[-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
        elif ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    figure.tight_layout()
    return render(
        figure, f"{BEST_MEAN.capitalize()} along each axis", "best val loss along each grid axis"
    )
