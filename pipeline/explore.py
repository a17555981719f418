"""`pipeline latent N` and `pipeline class NAME`: one latent or one class, from the outputs of
`interpret` (and `latent_stats`, and `steer` when it has run), for a person exploring a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.dataset import read_images_at
from pipeline.errors import PipelineError
from pipeline.interpret.cards import Interpretation, latent_line, load_interpretation, pushes
from pipeline.interpret.latents import SHIFT_SETS
from pipeline.interpret.records import read_stats_record
from pipeline.interpret.top_sets import TopSets, read_top_sets
from pipeline.layout import download, latent_stats, steer
from pipeline.layout import interpret as files
from pipeline.model.config import head_names
from pipeline.report import plots
from pipeline.steering.results import read_details

EXPLORE = Path("explore")
"""Where the commands write their figures (git-ignored): explore/latent_<N>.png."""


def _interpretation() -> Interpretation:
    if not files.LATENTS.exists() or not files.GALLERIES.exists():
        raise PipelineError(f"{files.INTERPRET} is missing: run `dvc repro interpret` (or `pipeline interpret`) first")
    return load_interpretation()


def _top_sets() -> TopSets:
    if not latent_stats.TOP_SETS.exists():
        raise PipelineError(f"{latent_stats.TOP_SETS} is missing: run `dvc repro latent_stats` first")
    return read_top_sets(latent_stats.TOP_SETS)


def describe_latent(latent: int, out_dir: Path = EXPLORE, images: int = 16, head_base: int = 0) -> tuple[str, Path]:
    """Text about one latent and the path of its image grid (written here)."""
    interp = _interpretation()
    n_latents, n_heads = interp.attribution.shape
    if not 0 <= latent < n_latents:
        raise PipelineError(f"latent {latent} does not exist: the SAE has latents 0..{n_latents - 1}")
    heads = head_names(n_heads, head_base)
    top_sets = _top_sets()
    in_sets = [name for name, members in top_sets.per_class.items() if latent in members]
    lines = [
        latent_line(interp, latent),
        f"mean activation where it fires: {interp.mean_activation[latent]:.4g}",
        "gate-logit change per unit activation: " + ", ".join(f"{h} {a:+.3f}" for h, a in zip(heads, interp.attribution[latent])),
        f"pushes hardest at its mean activation: {pushes(interp, latent, heads)}",
        f"in the global top set: {'yes' if latent in top_sets.global_set else 'no'}; in the top sets of: {', '.join(in_sets) or 'no class'}",
    ]
    rows = interp.gallery_rows.get(latent, [])[:images]
    path = out_dir / f"latent_{latent}.png"
    if rows:
        pixels, labels, _ = read_images_at(download.dataset_split("train"), rows)
        names = top_sets.class_names
        lines.append("most activating training images (row: class): " + ", ".join(f"{r}: {names[c]}" for r, c in zip(rows, labels)))
        out_dir.mkdir(parents=True, exist_ok=True)
        plots.image_rows([(latent_line(interp, latent), pixels)], path, f"latent {latent}: its {len(rows)} most activating training images")
    else:
        lines.append("it never fires on a training image: no gallery")
        path = None
    return "\n".join(lines), path


def describe_class(name: str, card_latents: int = 3, head_base: int = 0) -> str:
    """A class card: its top latents (label, purity, firing rate, heads pushed), the classes it
    shares latents with, and its steering outcome when `steer` has run."""
    interp = _interpretation()
    top_sets = _top_sets()
    classes = top_sets.class_names
    if name not in classes:
        close = [c for c in classes if name.lower() in c.lower()][:5]
        raise PipelineError(f"no class '{name}' in this run" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    heads = head_names(interp.attribution.shape[1], head_base)
    if not latent_stats.DETAILS.exists():
        raise PipelineError(f"{latent_stats.DETAILS} is missing: run `dvc repro latent_stats` first")
    related = read_stats_record(latent_stats.DETAILS).related.get(name, [])
    lines = [f"class {name}: top latents (most frequent first)"]
    for j in top_sets.per_class[name][:card_latents]:
        lines.append(f"  {latent_line(interp, j)}; pushes {pushes(interp, j, heads)}")
    lines.append("shares latents with: " + (", ".join(f"{r.name} (overlap {r.overlap:.2f})" for r in related) or "no class"))
    if steer.DETAILS.exists():
        headline = read_details(steer.DETAILS).per_class_headline
        if headline is not None and name in headline.alpha:
            lines.append(f"steering (headline, chosen on {headline.selected_on}): alpha {headline.alpha[name]:+g}, "
                         f"usage change {headline.usage_change[name]:+.3f} on test")
    else:
        lines.append(f"steering outcome: {steer.DETAILS} is missing (run `dvc repro steer`)")
    shift = interp.unit_shifts[(SHIFT_SETS[0], "scale")][classes.index(name)]
    lines.append("predicted mean gate-logit shift per unit alpha (own set, mode scale): "
                 + ", ".join(f"{h} {s:+.3f}" for h, s in zip(heads, np.asarray(shift))))
    return "\n".join(lines)
