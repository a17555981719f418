"""Latent statistics: which SAE latents fire, how often, for which class (docs/METHOD.md, section 4).

Everything here is a pure tensor function. The input is a TopK code in its sparse form, the
`(values, indices)` pair of shape (N, k) that `TopKSAE.encode_topk` returns; counting goes
through `bincount` over the N*k active entries, never a Python loop over samples.

Conventions (chosen here, tested in tests/test_stats.py):
- A latent *fires* on a sample when its value is > 0. TopK is applied after the ReLU, so a
  selected entry can be exactly 0: it is not counted.
- Frequency = fraction of samples (of the class, or of all samples) on which the latent fires.
  A class without samples has frequency 0 everywhere.
- Mean activation = mean value over the samples on which the latent fires; 0 if it never does.
- Ranking: higher frequency first, ties broken by the lower latent index (a stable sort).
- A top-K set holds only latents that fire at least once: a never-firing latent carries no
  information about a class, and letting dead latents fill up sets (always the lowest indices)
  would create overlap between unrelated classes. A set can therefore be smaller than K.
- Overlap `|A ∩ B| / K` divides by the nominal K (so a short set lowers it); Jaccard is
  `|A ∩ B| / |A ∪ B|`, and 0 for two empty sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.progress import progress


@dataclass(frozen=True)
class LatentStats:
    """Firing counts and activation sums; add two (disjoint sample batches) to combine them."""

    class_counts: Tensor
    """(C,) int64 samples per class."""
    fire_count_class: Tensor
    """(C, L) int64 samples of class c on which latent j fires."""
    value_sum_class: Tensor
    """(C, L) float64 sum of latent j's values over class c's samples on which it fires."""

    def __add__(self, other: LatentStats) -> LatentStats:
        return LatentStats(
            class_counts=self.class_counts + other.class_counts,
            fire_count_class=self.fire_count_class + other.fire_count_class,
            value_sum_class=self.value_sum_class + other.value_sum_class,
        )

    @property
    def n_classes(self) -> int:
        return int(self.fire_count_class.shape[0])

    @property
    def n_latents(self) -> int:
        return int(self.fire_count_class.shape[1])

    @property
    def n_samples(self) -> int:
        return int(self.class_counts.sum())

    @property
    def fire_count_all(self) -> Tensor:
        """(L,) int64 samples on which latent j fires."""
        return self.fire_count_class.sum(0)

    @property
    def freq_all(self) -> Tensor:
        """(L,) float64 fraction of all samples on which latent j fires."""
        return self.fire_count_all.double() / max(self.n_samples, 1)

    @property
    def freq_class(self) -> Tensor:
        """(C, L) float64 fraction of class c's samples on which latent j fires."""
        return self.fire_count_class.double() / self.class_counts.clamp(min=1).double()[:, None]

    @property
    def mean_active_all(self) -> Tensor:
        """(L,) float64 mean value of latent j where it fires (0 if it never does)."""
        return _safe_div(self.value_sum_class.sum(0), self.fire_count_all)

    @property
    def mean_active_class(self) -> Tensor:
        """(C, L) float64 mean value of latent j on class c's samples where it fires."""
        return _safe_div(self.value_sum_class, self.fire_count_class)

    @property
    def alive(self) -> Tensor:
        """(L,) bool: latent fires on at least one sample."""
        return self.fire_count_all > 0

    @property
    def mean_l0(self) -> float:
        """Mean number of firing latents per sample."""
        return float(self.fire_count_all.sum()) / max(self.n_samples, 1)


def _safe_div(total: Tensor, count: Tensor) -> Tensor:
    return torch.where(count > 0, total / count.clamp(min=1).double(), torch.zeros_like(total))


def firing_stats(values: Tensor, indices: Tensor, labels: Tensor, n_latents: int, n_classes: int) -> LatentStats:
    """Count, per class and latent, the samples on which the latent fires and its values there.

    values, indices: (N, k) TopK code (indices distinct within a row); labels: (N,) in [0, C).
    """
    if values.shape != indices.shape or values.ndim != 2 or labels.shape != values.shape[:1]:
        raise ValueError(f"shapes do not match: values {tuple(values.shape)}, indices "
                         f"{tuple(indices.shape)}, labels {tuple(labels.shape)}")
    labels = labels.long().cpu()
    indices = indices.long().cpu()
    values = values.detach().cpu().double()
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if indices.numel() and (indices.min() < 0 or indices.max() >= n_latents):
        raise ValueError(f"latent indices must lie in [0, {n_latents})")
    fired = values > 0
    # one bin per (class, latent) pair: class * L + latent, for the entries that fire
    cell = (labels[:, None] * n_latents + indices)[fired]
    size = n_classes * n_latents
    fire_count = torch.bincount(cell, minlength=size)
    value_sum = torch.bincount(cell, weights=values[fired], minlength=size)
    return LatentStats(
        class_counts=torch.bincount(labels, minlength=n_classes),
        fire_count_class=fire_count.view(n_classes, n_latents),
        value_sum_class=value_sum.view(n_classes, n_latents),
    )


def empty_stats(n_latents: int, n_classes: int) -> LatentStats:
    """The neutral element of `+`, to start an accumulation over batches."""
    return LatentStats(
        class_counts=torch.zeros(n_classes, dtype=torch.int64),
        fire_count_class=torch.zeros(n_classes, n_latents, dtype=torch.int64),
        value_sum_class=torch.zeros(n_classes, n_latents, dtype=torch.float64),
    )


# --------------------------------------------------------------------------------- rankings
def frequency_order(freq: Tensor) -> Tensor:
    """Latents by decreasing frequency along the last axis, ties by lower index (stable sort)."""
    return torch.sort(freq, dim=-1, descending=True, stable=True).indices


def frequency_rank(freq: Tensor) -> Tensor:
    """0-based rank of each latent in `frequency_order` (same shape as `freq`, int64)."""
    order = frequency_order(freq)
    positions = torch.arange(freq.shape[-1]).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def top_set(freq: Tensor, top_k: int) -> Tensor:
    """The (at most) `top_k` most frequent latents of a (L,) frequency vector, most frequent
    first; latents with frequency 0 are never included, so the set may be shorter."""
    if freq.ndim != 1:
        raise ValueError(f"top_set expects a (L,) vector, got shape {tuple(freq.shape)}")
    order = frequency_order(freq)[:top_k]
    return order[freq[order] > 0]


def top_sets(freq: Tensor, top_k: int) -> list[Tensor]:
    """`top_set` for every row of a (C, L) frequency matrix."""
    return [top_set(row, top_k) for row in freq]


# --------------------------------------------------------------------------------- overlaps
def membership(sets: Sequence[Sequence[int] | Tensor], n_latents: int) -> Tensor:
    """(S, L) bool one-hot matrix: row s marks the latents in sets[s] (index tensors, or lists
    of ints as the top sets are stored)."""
    out = torch.zeros(len(sets), n_latents, dtype=torch.bool)
    for row, latents in enumerate(sets):
        out[row, torch.as_tensor(latents, dtype=torch.long)] = True
    return out


def _overlaps(a: Tensor, b: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Pairwise overlaps between the rows of two membership matrices (Sa, L) and (Sb, L)."""
    a, b = a.double(), b.double()
    inter = a @ b.T  # exact: small integers in float64
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    return inter / top_k, jaccard


def set_overlap(a: Tensor, b: Tensor, top_k: int) -> tuple[float, float]:
    """(|A ∩ B| / K, Jaccard) of two latent sets given as index tensors."""
    both = torch.cat([a.long(), b.long()])
    n = int(both.max()) + 1 if both.numel() else 0
    overlap, jaccard = _overlaps(membership([a], n), membership([b], n), top_k)
    return float(overlap[0, 0]), float(jaccard[0, 0])


def overlap_matrix(class_sets: list[Tensor], n_latents: int, top_k: int) -> tuple[Tensor, Tensor]:
    """Class-by-class (C, C) float64 matrices of |A ∩ B| / K and of Jaccard."""
    m = membership(class_sets, n_latents)
    return _overlaps(m, m, top_k)


def global_vs_class(global_set: Tensor, class_sets: list[Tensor], n_latents: int, top_k: int) -> tuple[Tensor, Tensor]:
    """(C,) float64 overlaps (|A ∩ B| / K, Jaccard) of the global set with each class's set;
    their means over classes are the paper's headline overlap."""
    overlap, jaccard = _overlaps(membership([global_set], n_latents), membership(class_sets, n_latents), top_k)
    return overlap[0], jaccard[0]


def most_related(matrix: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """For each class, the `n` other classes with the largest overlap, largest first, ties by
    lower class index; returns (indices (C, n'), values (C, n')) with n' = min(n, C - 1)."""
    c = matrix.shape[0]
    n = min(n, c - 1)
    masked = matrix.double().clone()
    masked.fill_diagonal_(float("-inf"))  # a class is not related to itself
    order = frequency_order(masked)[:, :n]
    return order, torch.gather(matrix.double(), 1, order)


def paired_overlap(sets_a: list[Tensor], sets_b: list[Tensor], n_latents: int, top_k: int) -> tuple[Tensor, Tensor]:
    """(S,) overlaps (|A ∩ B| / K, Jaccard) of sets_a[s] with sets_b[s], e.g. a class's train
    set with its test set."""
    a, b = membership(sets_a, n_latents), membership(sets_b, n_latents)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    return inter / top_k, jaccard


# --------------------------------------------------------------------------------- encoding
def encode_stats(
    encode_topk: Callable[[Tensor], tuple[Tensor, Tensor]],
    x: Tensor,
    labels: Tensor,
    n_latents: int,
    n_classes: int,
    batch_size: int,
    desc: str = "encode",
) -> LatentStats:
    """Encode `x` in batches with a TopK encoder (e.g. `TopKSAE.encode_topk`) and accumulate
    `firing_stats`; memory stays at one batch of codes."""
    stats = empty_stats(n_latents, n_classes)
    starts = range(0, x.shape[0], batch_size)
    with torch.no_grad():
        for start in progress(starts, desc=desc, total=len(starts), unit="batch"):
            values, indices = encode_topk(x[start : start + batch_size])
            stats = stats + firing_stats(values, indices, labels[start : start + batch_size], n_latents, n_classes)
    return stats
