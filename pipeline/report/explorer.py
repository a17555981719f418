"""The latent explorer: a static site that opens from disk, offline, with no server.

`index.html` is the whole site: the data (one JSON blob, built by `site_data`) and the plain
JavaScript and CSS that draw it (`pipeline.report.explorer_page`), inline. The address's `#`
part picks what it shows: the index of alive latents (`#latents`, sortable and filterable), one
latent (`#latent/<j>`: its most activating training images, its activation mass by class, its
gate-logit attribution to each final-block head, the top sets it is in), the index of classes
(`#classes`) and one class (`#class/<name>`: its top set with images, its steering outcome, the
ceiling's pattern). The thumbnails are files beside the page, one strip per alive latent
(`img/latent_<j>.webp`; WebP at quality 80 is a sixth of PNG's size on these 32 px images). The same run
gives the same bytes: everything is in a fixed order, floats are rounded, nothing is dated.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.interpret.cards import Interpretation, pushes
from pipeline.interpret.latents import SHIFT_SETS
from pipeline.interpret.records import RelatedClass
from pipeline.interpret.top_sets import TopSets
from pipeline.model.config import head_names
from pipeline.report.explorer_page import PAGE
from pipeline.steering.ceiling import OWN, CeilingClass
from pipeline.steering.headline import ClassHeadline
from pipeline.steering.results import ResultRows, Settings
from pipeline.steering.strategies import PER_CLASS
from pipeline.storage import read_table, rounded

DIGITS = 4
"""Significant digits of the floats in the page's data (what the page prints, and a smaller file)."""
MASS_CLASSES = 10
"""Classes listed per latent in its activation mass by class (the largest shares)."""
WEBP_QUALITY = 80


@dataclass(frozen=True)
class GalleryImage:
    row: int
    """Row in the train split."""
    label: int
    activation: float


@dataclass(frozen=True)
class ClassShare:
    class_id: int
    mass: float
    """Share of the latent's activation mass on the training images that falls on this class."""
    rate: float
    """Fraction of the class's training images the latent fires on."""


@dataclass(frozen=True)
class ExplorerInputs:
    """What the site shows, read from the outputs of `interpret`, `latent_stats`, `steer` and `ceiling`."""

    interp: Interpretation
    top_sets: TopSets
    related: dict[str, list[RelatedClass]]
    """Class name -> the classes whose top sets overlap its own most (`latent_stats`)."""
    class_mass: dict[int, list[ClassShare]]
    """Latent -> every class it fires on, largest mass share first."""
    gallery: dict[int, list[GalleryImage]]
    """Latent -> the training images in its strip, most activating first."""
    headline: list[ClassHeadline]
    steer_rows: ResultRows
    """steer's result rows of the test split."""
    settings: Settings
    ceiling: list[CeilingClass]


def read_gallery(path: Path | str, per_latent: int) -> dict[int, list[GalleryImage]]:
    """data/interpret/galleries.parquet: each latent's first `per_latent` images by rank."""
    table, _ = read_table(path, {"latent": pa.int32(), "rank": pa.int32(), "row": pa.int64(), "label": pa.int32(),
                                 "activation": pa.float32()})
    out: dict[int, list[GalleryImage]] = {}
    columns = [table.column(c).to_pylist() for c in ("latent", "rank", "row", "label", "activation")]
    for latent, rank, row, label, activation in sorted(zip(*columns)):
        if rank < per_latent:
            out.setdefault(latent, []).append(GalleryImage(row, label, activation))
    return out


def read_class_mass(path: Path | str) -> dict[int, list[ClassShare]]:
    """data/stats/latents.parquet (train split): per latent, each class's share of its activation
    mass (fires x mean value; the largest share is the latent's purity) and its firing rate there."""
    table, _ = read_table(path, {"split": pa.string(), "class_id": pa.int32(), "latent": pa.int32(),
                                 "frequency": pa.float64(), "mean_activation": pa.float64(), "count": pa.int64()})
    rows = [r for r in table.to_pylist() if r["split"] == "train" and r["class_id"] >= 0]
    mass: dict[int, list[tuple[int, float, float]]] = {}
    for r in rows:
        mass.setdefault(r["latent"], []).append((r["class_id"], r["count"] * r["mean_activation"], r["frequency"]))
    out = {}
    for latent, entries in sorted(mass.items()):
        total = sum(m for _, m, _ in entries) or 1.0
        out[latent] = sorted((ClassShare(c, m / total, f) for c, m, f in entries), key=lambda s: (-s.mass, s.class_id))
    return out


def site_data(inputs: ExplorerInputs) -> dict:
    """The page's data: plain JSON values, floats rounded, lists in a fixed order."""
    interp, sets, settings = inputs.interp, inputs.top_sets, inputs.settings
    n_latents, n_heads = interp.attribution.shape
    heads = head_names(n_heads, settings.head_index_base)
    classes = sets.class_names
    alive = [j for j in range(n_latents) if interp.firing_rate[j] > 0]
    in_sets: dict[int, list[list[int]]] = {}
    for c, name in enumerate(classes):
        for rank, j in enumerate(sets.per_class[name]):
            in_sets.setdefault(j, []).append([c, rank])
    global_rank = {j: rank for rank, j in enumerate(sets.global_set)}
    latents = []
    for j in alive:
        shares = inputs.class_mass.get(j, [])
        gallery = inputs.gallery.get(j, [])
        latents.append({
            "id": j,
            "label": interp.label[j],
            "purity": float(interp.purity[j]),
            "rate": float(interp.firing_rate[j]),
            "act": float(interp.mean_activation[j]),
            "attr": [float(a) for a in interp.attribution[j]],
            "pushes": pushes(interp, j, heads),
            "global": global_rank.get(j),
            "sets": in_sets.get(j, []),
            "mass": [[s.class_id, s.mass, s.rate] for s in shares[:MASS_CLASSES]],
            "fires_in": len(shares),
            "top": [[g.row, g.label, g.activation] for g in gallery],
            "img": f"img/latent_{j}.webp" if gallery else None,
        })
    headline = {c.name: c for c in inputs.headline}
    ceiling = {c.name: c for c in inputs.ceiling}
    curves: dict[str, list[list[float]]] = {}
    for r in sorted(inputs.steer_rows, key=lambda r: (r["class"], r["alpha"])):
        if r["strategy"] == PER_CLASS and r["draw"] == 0:
            curves.setdefault(r["class"], []).append([r["alpha"], r["accuracy"], r["head_usage"]])
    shift = interp.unit_shifts.get((SHIFT_SETS[0], settings.mode))
    name_id = {name: c for c, name in enumerate(classes)}
    class_rows = []
    for c, name in enumerate(classes):
        h, k = headline.get(name), ceiling.get(name)
        class_rows.append({
            "id": c,
            "name": name,
            "set": list(sets.per_class[name]),
            "related": [[name_id[r.name], r.overlap] for r in inputs.related.get(name, []) if r.name in name_id],
            "steer": None if h is None else {
                "alpha": h.alpha, "acc0": h.baseline_accuracy, "acc": h.accuracy, "use0": h.baseline_usage, "use": h.usage,
                "heads0": h.baseline_heads, "heads": h.heads, "keep": h.keep_rates, "acc_ci": h.accuracy_change_ci,
                "use_ci": h.usage_change_ci, "null": h.null_usage_change, "beyond_null": h.beyond_null,
            },
            "curve": curves.get(name, []),
            "ceiling": None if k is None else {
                "pattern": None if k.pattern == OWN else k.pattern, "heads": k.heads, "acc0": k.baseline_accuracy,
                "acc": k.accuracy, "use0": k.baseline_usage, "use": k.usage, "acc_ci": k.accuracy_change_ci,
                "use_ci": k.usage_change_ci,
            },
            "shift": None if shift is None or c >= len(shift) else [float(v) for v in shift[c]],
        })
    return rounded({
        "heads": heads,
        "n_latents": n_latents,
        "latents": latents,
        "classes": class_rows,
        "global_set": list(sets.global_set),
        "top_k": sets.top_k,
        "settings": {"select_on": settings.select_on, "mode": settings.mode, "accuracy_tolerance": settings.accuracy_tolerance},
    }, DIGITS)


def strip(images: np.ndarray) -> bytes:
    """(K, H, W, 3) uint8 thumbnails side by side as one WebP image, K*W wide."""
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(list(images), axis=1)).save(buffer, "WEBP", quality=WEBP_QUALITY)
    return buffer.getvalue()


def page(data: dict) -> str:
    """index.html: the page with `data` inline (a `</` inside a string cannot end its script tag)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return PAGE.replace("/*DATA*/", blob)


def write_site(directory: Path, data: dict, strips: dict[int, np.ndarray]) -> None:
    """index.html and img/latent_<j>.webp (one per latent in `strips`) into `directory`."""
    (directory / "img").mkdir(parents=True, exist_ok=True)
    for latent, images in sorted(strips.items()):
        (directory / "img" / f"latent_{latent}.webp").write_bytes(strip(images))
    (directory / "index.html").write_text(page(data), encoding="utf-8")
