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

from pipeline.storage import atomic_path

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


def steering_curves(
    curves: dict[str, dict[str, list[float]]], styles: dict[str, tuple[str, str]], path: Path | str
) -> None:
    """Accuracy and final-block head usage vs alpha, one line per strategy (the paper's
    Figures 2 and 3, side by side). `curves[strategy]` holds lists `alpha`, `accuracy`,
    `head_usage`; `styles[strategy]` is its (colour, marker)."""
    with matplotlib.rc_context(_RC):
        fig = _new_figure(10.0, 4.0)
        axes = fig.subplots(1, 2)
        for strategy, curve in curves.items():
            colour, marker = styles.get(strategy, ("black", "x"))
            for ax, key in zip(axes, ("accuracy", "head_usage")):
                ax.plot(curve["alpha"], curve[key], marker=marker, color=colour, label=strategy)
        for ax, label in zip(axes, ("test accuracy", "final-block head usage")):
            ax.axvline(0.0, color="black", linewidth=0.6, linestyle=":")
            ax.set_xscale("symlog", linthresh=1.0)  # linear within [-1, 1], logarithmic beyond: a grid to +32 reads
            ticks = sorted({a for curve in curves.values() for a in curve["alpha"]})
            ax.set_xticks(ticks, [f"{a:g}" for a in ticks], fontsize=7)
            ax.set_xlabel("steering strength alpha (symlog axis)")
            ax.set_ylabel(label)
            ax.set_title(f"{label} vs alpha")
            ax.grid(alpha=0.3)
        axes[1].set_ylim(-0.02, 1.02)
        axes[0].legend()
        save_figure(fig, path)


def keep_rate_heatmap(
    baseline: object, steered: object, class_names: Sequence[str], head_names: Sequence[str], path: Path | str
) -> None:
    """Class x head keep rates of the final block: unsteered and at each class's headline
    alpha, side by side."""
    before, after = _as_array(baseline), _as_array(steered)
    n = len(class_names)
    if before.shape != (n, len(head_names)) or after.shape != before.shape:
        raise ValueError(f"keep-rate shapes {before.shape}, {after.shape} do not match {n} classes x {len(head_names)} heads")
    height = float(np.clip(2.0 + 0.22 * n, 4.0, 24.0))
    tick_size = float(np.clip(0.7 * 0.8 * height * 72 / max(n, 1), 4.0, 9.0))
    with matplotlib.rc_context(_RC):
        fig = _new_figure(3.0 + 0.9 * len(head_names), height)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, data, title in zip(axes, (before, after), ("unsteered", "headline alpha")):
            image = ax.imshow(data, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            ax.set_xticks(np.arange(len(head_names)), labels=list(head_names))
            ax.set_title(f"head keep rate, {title}")
        axes[0].set_yticks(np.arange(n), labels=list(class_names), fontsize=tick_size)
        fig.colorbar(image, ax=axes, shrink=0.8)
        save_figure(fig, path)


def usage_scatter(baseline: object, steered: object, class_names: Sequence[str], path: Path | str) -> None:
    """Per-class final-block head usage, unsteered (x) vs at the headline alpha (y)."""
    x, y = _as_array(baseline), _as_array(steered)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(5.0, 5.0)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle="--")
        ax.scatter(x, y, color="tab:green", s=18)
        if len(class_names) <= 20:
            for xi, yi, name in zip(x, y, class_names):
                ax.annotate(name, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("head usage, unsteered")
        ax.set_ylabel("head usage, per-class steering (headline alpha)")
        ax.set_title("per-class final-block head usage")
        save_figure(fig, path)


def runs_usage_curves(curves: dict[str, dict[str, dict[str, list[float]]]], path: Path | str) -> None:
    """Final-block head usage vs alpha, one panel per strategy, one line per run
    (`curves[run][strategy]` holds lists `alpha` and `head_usage`): how far runs agree."""
    strategies = sorted({s for run in curves.values() for s in run})
    with matplotlib.rc_context(_RC):
        fig = _new_figure(3.2 * max(len(strategies), 1), 3.4)
        axes = np.atleast_1d(fig.subplots(1, max(len(strategies), 1), sharey=True))
        for ax, strategy in zip(axes, strategies):
            for run, by_strategy in sorted(curves.items()):
                if strategy in by_strategy:
                    curve = by_strategy[strategy]
                    ax.plot(curve["alpha"], curve["head_usage"], marker="o", markersize=3, linewidth=1, label=run)
            ax.axvline(0.0, color="black", linewidth=0.6, linestyle=":")
            ax.set_title(strategy)
            ax.set_xlabel("steering strength alpha")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("final-block head usage")
        axes[-1].legend(fontsize=6)
        save_figure(fig, path)


# ------------------------------------------------------------------------------ interpretation
def image_rows(rows: Sequence[tuple[str, np.ndarray]], path: Path | str, title: str, header: str | None = None) -> None:
    """One row of thumbnails per entry: (row title, (M, H, W, 3) uint8 images; M may be 0).
    Used for latent galleries (a row per latent) and class cards (a row per card latent)."""
    columns = max([len(images) for _, images in rows] + [1])
    with matplotlib.rc_context(_RC):
        fig = _new_figure(1.0 * columns + 0.4, 1.25 * max(len(rows), 1) + 0.5)
        fig.suptitle(title, fontsize="medium")
        grid = fig.subfigures(max(len(rows), 1), 1, squeeze=False)[:, 0]
        for sub, (label, images) in zip(grid, rows):
            sub.suptitle(label, fontsize=7, x=0.0, ha="left")
            axes = sub.subplots(1, columns, squeeze=False)[0]
            for i, ax in enumerate(axes):
                ax.set_axis_off()
                if i < len(images):
                    ax.imshow(images[i], interpolation="nearest")
        if header:
            fig.text(0.0, 0.0, header, fontsize=6, ha="left", va="top")
        save_figure(fig, path)


def purity_histograms(purities: dict[str, object], chance: float, path: Path | str) -> None:
    """Distribution of class purity per basis (SAE latents, random and PCA directions)."""
    colours = {"SAE latents": "tab:blue", "random directions": "tab:gray", "PCA directions": "tab:orange"}
    bins = np.linspace(0.0, 1.0, 41)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(6.5, 4.0)
        ax = fig.add_subplot()
        for name, values in purities.items():
            v = _as_array(values)
            if len(v):
                ax.hist(v, bins=bins, histtype="step", linewidth=1.5, density=True, color=colours.get(name),
                        label=f"{name} (n={len(v)}, mean {v.mean():.2f})")
        ax.axvline(chance, color="black", linestyle=":", linewidth=1, label=f"largest class share {chance:.2f}")
        ax.set_xlabel("class purity (share of activation mass on the top class)")
        ax.set_ylabel("density")
        ax.set_title("Are SAE latents more class-pure than other bases?")
        ax.legend(fontsize=7)
        save_figure(fig, path)


def attribution_heatmap(matrix: object, row_names: Sequence[str], head_names: Sequence[str], path: Path | str, title: str) -> None:
    """Latents x heads gate-logit change per unit activation (diverging, centred on 0)."""
    data = _as_array(matrix)
    n = max(len(row_names), 1)
    limit = float(np.abs(data).max()) if data.size else 1.0
    height = float(np.clip(1.5 + 0.2 * n, 3.0, 24.0))
    with matplotlib.rc_context(_RC):
        fig = _new_figure(3.5 + 0.6 * len(head_names), height)
        ax = fig.add_subplot()
        image = ax.imshow(data, cmap="RdBu_r", vmin=-limit or -1, vmax=limit or 1, aspect="auto", interpolation="nearest")
        ax.set_xticks(np.arange(len(head_names)), labels=list(head_names))
        ax.set_yticks(np.arange(len(row_names)), labels=list(row_names), fontsize=float(np.clip(0.6 * height * 72 / n, 4, 8)))
        ax.set_xlabel("final-block head")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8, label="gate-logit change per unit activation")
        save_figure(fig, path)


def shift_scatter(points: dict[str, tuple[object, object]], path: Path | str, title: str) -> None:
    """Predicted mean gate-logit shift (x) against the measured keep-rate change (y), one colour
    per series (a head)."""
    with matplotlib.rc_context(_RC):
        fig = _new_figure(6.0, 4.5)
        ax = fig.add_subplot()
        ax.axhline(0, color="gray", linewidth=0.6)
        ax.axvline(0, color="gray", linewidth=0.6)
        for name, (x, y) in points.items():
            ax.scatter(_as_array(x), _as_array(y), s=6, alpha=0.6, label=name)
        ax.set_xlabel("predicted mean gate-logit shift (attribution x alpha x mean activation)")
        ax.set_ylabel("measured keep-rate change (steer, test)")
        ax.set_title(title)
        ax.legend(fontsize=7, markerscale=2)
        save_figure(fig, path)


def frontier_grid(panels: Sequence[dict], path: Path | str, title: str) -> None:
    """One panel per class, test accuracy (y) against final-block usage (x): every fixed pattern
    (grey), the selection split's Pareto frontier (line), the ceiling's choice (star), the
    model's own gates (black) and per-class steering at each alpha (green, alpha 0 ringed).
    A panel is {"name", "patterns": (usage, accuracy), "frontier": (usage, accuracy),
    "ceiling": (usage, accuracy), "own": (usage, accuracy), "steering": (usage, accuracy)}."""
    n = max(len(panels), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(3.0 * cols, 2.7 * rows + 0.4)
        for i, panel in enumerate(panels):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.scatter(*panel["patterns"], color="lightgray", s=10, label="fixed patterns (test)")
            ax.plot(*panel["frontier"], color="tab:gray", linewidth=1.0, label="frontier (chosen on selection split)")
            ax.plot(*panel["steering"], color="tab:green", marker="o", markersize=3, linewidth=1.0, label="per-class steering")
            ax.scatter(*panel["own"], color="black", s=30, zorder=3, label="own gates (unsteered)")
            ax.scatter(*panel["ceiling"], color="tab:red", marker="*", s=90, zorder=4, label="ceiling's choice")
            ax.set_xlim(-0.05, 1.05)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(panel["name"], fontsize=9)
            ax.set_xlabel("final-block head usage")
            ax.set_ylabel("test accuracy")
            if i == 0:
                ax.legend(fontsize=6, loc="lower right")
        if not panels:
            fig.add_subplot().text(0.5, 0.5, "no classes to show", ha="center")
        fig.suptitle(title, fontsize=10)
        save_figure(fig, path)


def block_usage_bars(blocks: Sequence[str], series: dict[str, Sequence[float]], path: Path | str, title: str) -> None:
    """Head usage per gated block (x), one bar per series (unsteered, steering, ceiling...)."""
    with matplotlib.rc_context(_RC):
        fig = _new_figure(max(4.0, 1.2 * len(blocks) + 2.5), 3.6)
        ax = fig.add_subplot()
        x = np.arange(len(blocks))
        width = 0.8 / max(len(series), 1)
        for i, (name, usage) in enumerate(series.items()):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, usage, width, label=name)
        ax.set_xticks(x, blocks)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("gated block")
        ax.set_ylabel("fraction of heads kept (test, class mean)")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
        save_figure(fig, path)
