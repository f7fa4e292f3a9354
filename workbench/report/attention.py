"""Attention maps, drawn alike for the report and for the PNG each run logs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from workbench.report.figures import (
    ATTENTION_CMAP,
    Figure,
    new_figure,
    plain_text,
    png_bytes,
    render,
)

if TYPE_CHECKING:
    pass


def display_char(char: str) -> str:
    if char == "\n":
        return "↵"
    if char == " ":
        return "␣"
    if not char.isprintable():
        return repr(char)[1:-1]
    return char


def draw_attention_map(ax: Any, weights: Any, left: float = 0.0) -> Any:
    """One head's attention map into ``ax``: query (rows, top to bottom) attending to key
    (columns), 0 to 1 in one colour scale, its first column at ``x = left`` (a run's figure
    puts a layer's heads side by side in one axes). Returns the image."""
    queries, keys = weights.shape
    ax.grid(False)
    return ax.imshow(
        weights, vmin=0.0, vmax=1.0, cmap=ATTENTION_CMAP, interpolation="nearest",
        extent=(left - 0.5, left + keys - 0.5, queries - 0.5, -0.5),
    )  # fmt: skip


def attention_plot(title: str, prompt: str, weights: list[Any]) -> Figure:
    """The report's attention maps: one panel per layer and head, each labelled with the
    prompt's characters, one colour bar."""
    import matplotlib.pyplot as plt
    import numpy as np

    array = np.asarray(weights, dtype=float)  # (layer, head, query, key)
    layers, heads, queries, keys = array.shape
    chars = [display_char(c) for c in prompt]
    cols = min(heads, 2 if keys > 16 else 4)
    side = max(2.4, 0.17 * max(queries, keys) + 1.2)
    rows = layers * math.ceil(heads / cols)
    figure, axs = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    for ax in axs.flat:
        ax.set_visible(False)
    images = []
    for layer in range(layers):
        for head in range(heads):
            ax = axs.flat[layer * math.ceil(heads / cols) * cols + head]
            ax.set_visible(True)
            images.append(draw_attention_map(ax, array[layer, head]))
            ax.set_xticks(range(keys), chars[:keys], fontfamily="DejaVu Sans Mono")
            ax.set_yticks(range(queries), chars[:queries], fontfamily="DejaVu Sans Mono")
            ax.tick_params(axis="both", length=0, labelsize=8, rotation=0)
            ax.set_title(f"layer {layer}, head {head}" if layers > 1 else f"head {head}")
            ax.set_xlabel("key")
            ax.set_ylabel("query")
    figure.tight_layout()
    figure.colorbar(images[0], ax=[i.axes for i in images], shrink=0.6, label="attention weight")
    return render(figure, title, f"attention weights of {title}")


def attention_png(prompt: str, weights: Any) -> bytes:
    """A run's attention maps, small and cheap (drawn at the end of every run with attention):
    one axes per layer with its heads side by side, no tick labels, the prompt in the title."""
    import numpy as np

    array = np.asarray(weights, dtype=float)  # (layer, head, query, key)
    layers, heads, queries, keys = array.shape
    gap = max(1, keys // 8)
    with plain_text():
        figure = new_figure(0.4 + 1.5 * heads, 0.45 + 1.5 * layers * queries / keys)
        axs = figure.subplots(layers, 1, squeeze=False)
        for layer, ax in enumerate(axs.flat):
            ax.set_axis_off()  # no ticks made or drawn: most of an axes' cost
            for head in range(heads):
                left = head * (keys + gap)
                draw_attention_map(ax, array[layer, head], left)
                name = f"layer {layer}, head {head}" if layers > 1 else f"head {head}"
                ax.text(left + keys / 2 - 0.5, -1.0, name, ha="center", fontsize=7)
            ax.set_xlim(-0.5, heads * (keys + gap) - gap - 0.5)
        shown = "".join(display_char(c) for c in prompt)
        figure.suptitle(f"attention, query row → key column: {shown}", fontsize=8)
        figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.8, hspace=0.3)
        return png_bytes(figure)
