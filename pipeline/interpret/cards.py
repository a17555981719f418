"""The `interpret` stage's outputs joined with the steering sweep, as the report and the CLI
show them: class cards and predicted-vs-measured head shifts.

`interpret` predicts, before any experiment, how far steering moves each head's mean gate logit
(pipeline/interpret/latents.py); `steer` measures how each head's keep rate moves. This module joins the
two: the correlation over (strategy, class, alpha, head) points, and whether their signs agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.errors import PipelineError
from pipeline.interpret.latents import SHIFT_SETS, pearson, spearman
from pipeline.layout import interpret as files
from pipeline.storage import rounded


@dataclass(frozen=True)
class Interpretation:
    firing_rate: np.ndarray
    """(L,) fraction of training images a latent fires on."""
    mean_activation: np.ndarray
    """(L,) mean value where it fires."""
    label: list[str]
    purity: np.ndarray
    attribution: np.ndarray
    """(L, H) gate-logit change per unit activation."""
    gallery_rows: dict[int, list[int]]
    """latent -> training rows, most activating first."""
    unit_shifts: dict[tuple[str, str], np.ndarray]
    """(strategy, mode) -> (C, H) mean gate-logit shift at alpha = 1 (test split)."""


def load_interpretation() -> Interpretation:
    try:
        latents = pq.read_table(files.LATENTS).to_pydict()
        galleries = pq.read_table(files.GALLERIES, columns=["latent", "rank", "row"]).to_pydict()
        shifts = pq.read_table(files.SHIFTS).to_pydict()
    except (OSError, KeyError, ValueError) as exc:
        raise PipelineError(f"{files.INTERPRET}: missing or unreadable ({exc}); run `dvc repro interpret`") from None
    heads = sorted(int(k[len("attr_h"):]) for k in latents if k.startswith("attr_h"))
    rows: dict[int, list[int]] = {}
    for latent, _, row in sorted(zip(galleries["latent"], galleries["rank"], galleries["row"])):
        rows.setdefault(latent, []).append(row)
    n_classes = max(shifts["class_id"], default=-1) + 1
    unit = {}
    for strategy in SHIFT_SETS:
        for mode in ("scale", "add"):
            table = np.zeros((n_classes, len(heads)))
            for s, c, h, v in zip(shifts["strategy"], shifts["class_id"], shifts["head"], shifts[f"shift_{mode}"]):
                if s == strategy:
                    table[c, h] = v
            unit[(strategy, mode)] = table
    return Interpretation(
        firing_rate=np.asarray(latents["firing_rate"]),
        mean_activation=np.asarray(latents["mean_activation"]),
        label=list(latents["label"]),
        purity=np.asarray(latents["purity"]),
        attribution=np.stack([np.asarray(latents[f"attr_h{h}"]) for h in heads], axis=1),
        gallery_rows=rows,
        unit_shifts=unit,
    )


@dataclass(frozen=True)
class ShiftAgreement:
    """How far predicted gate-logit shifts and measured keep-rate changes agree over a set of points."""

    points: int
    pearson: float | None
    spearman: float | None
    moved: int
    """Points whose keep rate changed at all."""
    sign_agreement: float | None
    """Of the points that moved, the share whose change has the predicted sign."""


@dataclass(frozen=True)
class ShiftComparison:
    """Predicted mean gate-logit shift against measured keep-rate change, per point."""

    strategy: np.ndarray
    head: np.ndarray
    predicted: np.ndarray
    measured: np.ndarray

    def summary(self) -> dict[str, ShiftAgreement]:
        """Per strategy and over all points (`all`); floats rounded for the files, undefined ones None."""
        out = {}
        for name in ("all", *SHIFT_SETS):
            keep = np.ones(len(self.head), bool) if name == "all" else self.strategy == name
            p, m = self.predicted[keep], self.measured[keep]
            moved = m != 0
            out[name] = ShiftAgreement(**rounded({
                "points": int(keep.sum()),
                "pearson": pearson(torch.from_numpy(p), torch.from_numpy(m)) if keep.sum() > 1 else float("nan"),
                "spearman": spearman(torch.from_numpy(p), torch.from_numpy(m)) if keep.sum() > 1 else float("nan"),
                "moved": int(moved.sum()),
                "sign_agreement": float((np.sign(p[moved]) == np.sign(m[moved])).mean()) if moved.any() else float("nan"),
            }))
        return out


def compare_shifts(interp: Interpretation, rows: list[dict], mode: str, n_heads: int) -> ShiftComparison:
    """One point per (strategy, class, alpha != 0, head) of the test rows: alpha x the unit
    shift against the keep-rate change from the same class's alpha-0 row."""
    base = {(r["strategy"], r["class_id"]): r for r in rows if r["alpha"] == 0.0 and r["draw"] == 0}
    strategy, head, predicted, measured = [], [], [], []
    for r in rows:
        if r["strategy"] not in SHIFT_SETS or r["alpha"] == 0.0 or r["draw"] != 0:
            continue
        ref = base.get((r["strategy"], r["class_id"]))
        if ref is None:
            continue
        unit = interp.unit_shifts[(r["strategy"], mode)]
        for h in range(n_heads):
            strategy.append(r["strategy"])
            head.append(h)
            predicted.append(r["alpha"] * unit[r["class_id"], h])
            measured.append(r[f"keep_h{h}"] - ref[f"keep_h{h}"])
    return ShiftComparison(np.asarray(strategy), np.asarray(head, dtype=int), np.asarray(predicted), np.asarray(measured))


def pushes(interp: Interpretation, latent: int, head_names: list[str], top: int = 2) -> str:
    """The heads a latent pushes hardest at its mean activation: 'h2 on (+1.3), h5 off (-0.4)'."""
    effect = interp.attribution[latent] * interp.mean_activation[latent]
    order = np.argsort(-np.abs(effect), kind="stable")[:top]
    return ", ".join(f"{head_names[h]} {'on' if effect[h] > 0 else 'off'} ({effect[h]:+.3g})" for h in order if effect[h] != 0) or "none"


def latent_line(interp: Interpretation, latent: int) -> str:
    label = interp.label[latent] or "-"
    return f"latent {latent}: '{label}', purity {interp.purity[latent]:.2f}, fires on {interp.firing_rate[latent]:.1%}"


@dataclass(frozen=True)
class GlobalSetShift:
    """The global set at the largest alpha: the mean gate-logit shift `interpret` predicts per
    head, and the keep-rate change the sweep measured (test split, pooled over classes)."""

    alpha: float
    predicted_logit_shift: list[float]
    measured_keep_change: list[float]


def global_set_shift(interp: Interpretation, rows: list[dict], mode: str, alpha: float, n_heads: int) -> GlobalSetShift | None:
    """None when `alpha` is not positive or the rows hold no `global` strategy."""
    name = SHIFT_SETS[1]
    counts = {r["class_id"]: r["n"] for r in rows if r["strategy"] == name and r["alpha"] == 0.0 and r["draw"] == 0}
    unit = interp.unit_shifts[(name, mode)]
    weights = np.array([counts.get(c, 0) for c in range(unit.shape[0])], dtype=float)
    if alpha <= 0 or not weights.sum():
        return None
    predicted = alpha * (weights @ unit) / weights.sum()
    measured = [0.0] * n_heads
    for r in rows:
        if r["strategy"] == name and r["draw"] == 0 and r["alpha"] in (0.0, alpha):
            sign = 1.0 if r["alpha"] == alpha else -1.0
            for h in range(n_heads):
                measured[h] += sign * r["n"] * r[f"keep_h{h}"] / weights.sum()
    return GlobalSetShift(alpha=alpha, predicted_logit_shift=[rounded(v) for v in predicted.tolist()],
                          measured_keep_change=[rounded(v) for v in measured])


@dataclass(frozen=True)
class CardLatent:
    latent: int
    line: str
    """Label, purity and firing rate (`latent_line`)."""
    pushes: str
    """The heads it pushes hardest (`pushes`)."""


@dataclass(frozen=True)
class ClassCard:
    """One featured class: its most frequent latents, its steering outcome, its related classes."""

    name: str
    latents: list[CardLatent]
    alpha: float
    usage: tuple[float, float]
    """Unsteered and at the headline alpha (test split)."""
    accuracy: tuple[float, float]
    related: list[str]


def card_latents(interp: Interpretation, latents: list[int], head_names: list[str]) -> list[CardLatent]:
    return [CardLatent(j, latent_line(interp, j), pushes(interp, j, head_names)) for j in latents]
