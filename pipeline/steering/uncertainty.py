"""How large a steering effect is against noise: bootstrap intervals and random-set nulls.

Pure tensor functions. Images are resampled with replacement *within each class* (a stratified
bootstrap: every resample keeps each class's size), so a per-class interval reflects that
class's images and the mean over classes keeps every class's weight. Quantities computed on the
same images (accuracy change and usage change) share their resamples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_bootstrap(values: Tensor, labels: Tensor, n_classes: int, resamples: int, seed: int) -> Tensor:
    """Per-class means of per-image `values` (Q, N) over `resamples` stratified resamples:
    (Q, resamples, C) float64; NaN for a class without images."""
    values = values.double().reshape(-1, values.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((values.shape[0], resamples, n_classes), float("nan"), dtype=torch.float64)
    for c in range(n_classes):
        members = (labels == c).nonzero().squeeze(1)
        if len(members) == 0:
            continue
        picks = members[torch.randint(len(members), (resamples, len(members)), generator=gen)]
        out[:, :, c] = values[:, picks].mean(-1)
    return out


def interval(samples: Tensor, confidence: float, dim: int = 0) -> tuple[Tensor, Tensor]:
    """The central `confidence` interval of `samples` along `dim` (linear interpolation
    between order statistics; NaN where the samples are NaN)."""
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    bounds = torch.quantile(samples.double(), q, dim=dim)
    return bounds[0], bounds[1]


def class_means(values: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """(..., C) mean of per-image `values` (..., N) over each class's images (NaN if none)."""
    values = values.double()
    counts = torch.bincount(labels, minlength=n_classes).double()
    sums = torch.zeros(*values.shape[:-1], n_classes, dtype=torch.float64).index_add_(-1, labels, values)
    return sums / counts.where(counts > 0, torch.tensor(float("nan"), dtype=torch.float64))


def pooled(class_values: Tensor, counts: Tensor) -> Tensor:
    """Per-class means (..., C) -> the mean over all images, each class weighted by its size."""
    weights = counts.double() / counts.sum()
    return (class_values.nan_to_num(0.0) * weights).sum(-1)


def side(effect: float, low: float, high: float) -> int:
    """Where an observed effect lies against a null's interval: -1 below, 0 inside, +1 above."""
    return -1 if effect < low else 1 if effect > high else 0
