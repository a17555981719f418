"""Figures for `dvc plots` and the report: small, independent functions, one PNG each.

Every function takes plain arrays/lists plus an output path and writes the PNG atomically.
Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg canvas (no pyplot global
state, no display needed), at a fixed dpi and without the `Software` PNG text chunk, so the
same inputs give byte-identical files (DVC hashes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.io import atomic_path

DPI = 100
# rc settings that could otherwise leak in from a user's matplotlibrc and change the bytes
_RC = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: same glyphs everywhere
    "svg.hashsalt": "sae-head-steering",
    "path.simplify": True,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "axes.titlesize": "medium",
}


def _new_figure(width: float, height: float) -> Figure:
    # constrained layout makes room for rotated tick labels and the colorbar
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path | str) -> None:
    """Write `fig` as a deterministic PNG (no version/timestamp metadata), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # bbox "tight" keeps long rotated tick labels inside the image
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)


def _as_array(values: object) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def overlap_heatmap(
    matrix: object,
    class_names: Sequence[str],
    path: Path | str,
    title: str = "Top-K latent overlap |A ∩ B| / K",
    vmax: float = 1.0,
) -> None:
    """Class-by-class heatmap with every class named on both axes; cell values printed when
    there are few classes. Figure and font sizes scale so 100 classes stay legible."""
    m = _as_array(matrix)
    n = len(class_names)
    if m.shape != (n, n):
        raise ValueError(f"matrix shape {m.shape} does not match {n} class names")
    side = float(np.clip(3.0 + 0.15 * n, 5.0, 18.0))
    # about 80% of the side is the grid: size the labels to the spacing of the rows (points)
    tick_size = float(np.clip(0.7 * 0.8 * side * 72 / max(n, 1), 4.0, 9.0))
    with matplotlib.rc_context(_RC):
        fig = _new_figure(side + 1.2, side)
        ax = fig.add_subplot()
        image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ticks = np.arange(n)
        ax.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize=tick_size)
        ax.set_yticks(ticks, labels=list(class_names), fontsize=tick_size)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    colour = "black" if m[i, j] > 0.6 * vmax else "white"
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8)
        save_figure(fig, path)


def frequency_histogram(
    freq: object,
    path: Path | str,
    bins: int = 50,
    title: str = "Global firing frequency of SAE latents",
) -> None:
    """Histogram of per-latent firing frequencies (alive latents; log-scaled counts). The
    number of dead latents (frequency 0) goes in the title, since a log axis cannot show them
    next to the others honestly."""
    f = _as_array(freq).ravel()
    alive = f[f > 0]
    dead = int((f <= 0).sum())
    with matplotlib.rc_context(_RC):
        fig = _new_figure(6.4, 4.0)
        ax = fig.add_subplot()
        if alive.size:
            upper = float(alive.max())
            ax.hist(alive, bins=bins, range=(0.0, upper if upper > 0 else 1.0), color="tab:blue", log=True)
        ax.set_xlabel("fraction of samples on which the latent fires")
        ax.set_ylabel("latents (log scale)")
        ax.set_title(f"{title}\n{alive.size} alive, {dead} dead of {f.size}")
        save_figure(fig, path)
