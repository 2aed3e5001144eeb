"""Pictures of expert load: a layers x experts heatmap and a histogram of relative expert loads.

Shape legend: L MoE layers, E experts (the most experts of any layer; rows of layers with fewer are NaN).

Matplotlib is imported inside the functions and used through its object API (``Figure`` and the Agg
canvas), so importing this module is cheap and nothing touches pyplot's global figure state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _draw_heatmap(fig: Figure, ax: Axes, share_LE: np.ndarray, layer_names: Sequence[str], step: int) -> None:
    # Colour is the share relative to a balanced layer (share x E) on a log scale, so an expert with twice
    # the mean load and one with half of it are equally far from white whatever E is; dead experts are
    # black, and padding (layers with fewer experts than the widest) is grey.
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    num_layers, num_experts = share_LE.shape
    experts_L = np.isfinite(share_LE).sum(axis=1, keepdims=True)
    # Loads below 1/8 are drawn as 1/8; only dead experts fall below the range and turn black.
    relative_LE = np.where(share_LE > 0, np.maximum(share_LE * experts_L, 1 / 8), 1e-30)
    relative_LE = np.ma.masked_invalid(np.where(np.isfinite(share_LE), relative_LE, np.nan))
    cmap = colormaps["RdBu_r"].with_extremes(under="black", bad="0.85")
    image = ax.imshow(relative_LE, aspect="auto", cmap=cmap, norm=LogNorm(vmin=1 / 8, vmax=8), interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(num_layers), labels=list(layer_names), fontsize=7 if num_layers > 12 else 9)
    if num_experts <= 32:
        ax.set_xticks(range(num_experts))
    ax.set_title(f"expert load, step {step}: share of tokens x E (1 = balanced, black = dead)", fontsize=10)
    ticks = [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]
    colorbar = fig.colorbar(image, ax=ax, extend="both", label="share of tokens x E")
    colorbar.set_ticks(ticks, labels=["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    colorbar.minorticks_off()


def _draw_histogram(ax: Axes, relative_load: np.ndarray, step: int) -> None:
    ax.hist(relative_load, bins=min(50, max(10, relative_load.size // 4)), color="tab:blue")
    ax.axvline(1.0, color="tab:red", linestyle="--", linewidth=1, label="balanced")
    ax.set_xlabel("tokens / mean tokens of its layer")
    ax.set_ylabel("experts")
    ax.set_title(f"expert loads, step {step}", fontsize=10)
    ax.legend(fontsize=8)


def _heatmap_size(share_LE: np.ndarray) -> tuple[float, float]:
    num_layers, num_experts = share_LE.shape
    return min(16.0, 3.5 + 0.2 * num_experts), min(12.0, 1.8 + 0.3 * num_layers)


def heatmap_rgb(share_LE: np.ndarray, layer_names: Sequence[str], step: int) -> np.ndarray:
    """Renders the load heatmap.

    Args:
        share_LE: ``[L, E]`` share of each layer's tokens that went to each expert (rows sum to 1).
        layer_names: ``L`` names for the rows.
        step: Training step, shown in the title.

    Returns:
        ``[height, width, 3]`` uint8 RGB image.
    """
    fig = _new_figure(*_heatmap_size(share_LE))
    _draw_heatmap(fig, fig.add_subplot(), share_LE, layer_names, step)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]


def save_load_png(
    path: str | Path, share_LE: np.ndarray, relative_load: np.ndarray, layer_names: Sequence[str], step: int
) -> None:
    """Writes the heatmap and the histogram side by side to one PNG file.

    Args:
        path: File to write; missing parent directories are created.
        share_LE: ``[L, E]`` share of each layer's tokens per expert.
        relative_load: Tokens of every (layer, expert) over the mean tokens of its layer, flattened.
        layer_names: ``L`` names for the heatmap's rows.
        step: Training step, shown in the titles.
    """
    width, height = _heatmap_size(share_LE)
    fig = _new_figure(width + 5.0, max(height, 3.5))
    heat_ax, hist_ax = fig.subplots(1, 2, width_ratios=[width, 5.0])
    _draw_heatmap(fig, heat_ax, share_LE, layer_names, step)
    _draw_histogram(hist_ax, relative_load, step)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
