"""What a latent means and which heads it moves: galleries, class purity, head attribution.

Pure tensor functions; the `interpret` stage (pipeline/stages/interpret.py) wires them to files.

- **Galleries.** `TopImages` keeps, for every latent, the N images with the largest activation,
  updated batch by batch from TopK codes in their sparse form: one scatter into a dense
  (latents x batch) block and one stable sort per batch, never a Python loop over latents or
  images. Ties go to the lower image row (rows arrive in ascending order and the sort is stable).
- **Labels and purity.** A latent's class distribution is the activation mass per class,
  `p(c) = sum of its values on class c / sum of its values`; its label is the top class (the
  lower class id on ties), its purity that class's share, its entropy `-sum p log2 p` (bits).
- **Baselines.** The same statistics for directions that are not an SAE's: random unit vectors
  and principal directions of the embeddings (both signs: a component's sign is arbitrary).
  A direction's activation on an image is its projection above the direction's own
  `(1 - f)` quantile, minus that quantile, with `f` the firing rate of an SAE latent paired with
  the direction: both sides then fire on the same fractions of images, so purity compares bases,
  not sparsity levels.
- **Attribution.** The final block's decision network is linear in its CLS input:
  `logits = W x + b`. Steering moves the input by `sum_j delta_j d_j` (d_j: latent j's decoder
  direction in raw input space, the SAE's input scaling included), so head h's gate logit moves
  by `sum_j delta_j (W_h . d_j)`; `A[j, h] = W_h . d_j` is exact, before any experiment.
  With `keep_error` the image's own reconstruction error cancels; in mode `scale` a set S moves
  the mean logit of a group of images by `alpha * sum_{j in S} E[z_j] A[j, h]` (E over the
  group, zeros included), in mode `add` by `alpha * sum_{j in S} m_j A[j, h]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------- galleries
@dataclass
class TopImages:
    """Running top-N images per latent. values (L, N) descending, rows (L, N) int64; an empty
    slot holds value 0 and row -1 (a latent that fired on fewer than N images)."""

    values: Tensor
    rows: Tensor

    @classmethod
    def empty(cls, n_latents: int, top_n: int) -> TopImages:
        return cls(torch.zeros(n_latents, top_n), torch.full((n_latents, top_n), -1, dtype=torch.long))

    def update(self, values: Tensor, indices: Tensor, first_row: int) -> None:
        """Merge one batch of sparse codes (B, k) whose images are rows first_row .. first_row+B-1."""
        n_latents, top_n = self.values.shape
        b = values.shape[0]
        dense = torch.zeros(n_latents, b, dtype=self.values.dtype)
        dense[indices.T.flatten(), torch.arange(b).repeat(indices.shape[1])] = values.T.flatten().to(self.values.dtype)
        merged_values = torch.cat([self.values, dense], dim=1)
        merged_rows = torch.cat([self.rows, torch.arange(first_row, first_row + b).expand(n_latents, b)], dim=1)
        # stable: among equal values the earlier column wins, and columns are in ascending row
        # order (the kept ones all come from earlier batches)
        order = torch.sort(merged_values, dim=1, descending=True, stable=True).indices[:, :top_n]
        self.values = merged_values.gather(1, order)
        self.rows = torch.where(self.values > 0, merged_rows.gather(1, order), -1)


def top_images(codes: list[tuple[Tensor, Tensor]], n_latents: int, top_n: int) -> TopImages:
    """TopImages over batches of sparse codes given in row order."""
    top, row = TopImages.empty(n_latents, top_n), 0
    for values, indices in codes:
        top.update(values, indices, row)
        row += values.shape[0]
    return top


# ------------------------------------------------------------------------------------- purity
@dataclass(frozen=True)
class Purity:
    """Per direction: label (top class; -1 if it never fires), purity, entropy in bits."""

    label: Tensor
    purity: Tensor
    entropy: Tensor


def class_purity(mass: Tensor) -> Purity:
    """From (L, C) non-negative activation mass per latent and class."""
    mass = mass.double()
    total = mass.sum(1, keepdim=True)
    p = torch.where(total > 0, mass / total.clamp_min(1e-300), torch.zeros_like(mass))
    purity, label = p.max(1)  # max returns the first maximal index: the lower class id
    entropy = -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(1)
    fired = total[:, 0] > 0
    return Purity(torch.where(fired, label, -1), purity, entropy)


def class_mass(activations: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """(N, M) non-negative activations of M directions -> (M, C) mass per class."""
    mass = torch.zeros(n_classes, activations.shape[1], dtype=torch.float64)
    mass.index_add_(0, labels.long(), activations.double())
    return mass.T


def thresholded(projections: Tensor, rates: Tensor) -> Tensor:
    """Each column's values above its own (1 - rate) quantile, minus that quantile (else 0): a
    direction that fires on a `rate` fraction of the rows. (N, M) -> (N, M)."""
    n = projections.shape[0]
    fire = (rates * n).round().long().clamp(1, n)  # rows that fire in each column
    ordered = torch.sort(projections, dim=0, descending=True).values
    cut = ordered.gather(0, fire[None, :].clamp_max(n - 1))  # the first value that does not fire
    cut = torch.where(fire[None, :] >= n, ordered[-1:] - 1, cut)
    return (projections - cut).clamp_min(0)


def direction_purity(x: Tensor, directions: Tensor, rates: Tensor, labels: Tensor, n_classes: int,
                     top_n: int = 16, chunk: int = 256) -> tuple[Purity, Tensor]:
    """Purity of (M, D) directions on embeddings x (N, D), direction i firing on a rates[i]
    fraction of the images (the paired SAE latent's), and the top-N gallery's label share
    (`top_label_share`). Chunked over directions."""
    centred = x.double() - x.double().mean(0)
    masses, shares = [], []
    for start in range(0, directions.shape[0], chunk):
        proj = centred @ directions[start:start + chunk].double().T
        acts = thresholded(proj, rates[start:start + chunk].double())
        masses.append(class_mass(acts, labels, n_classes))
        shares.append(top_label_share(top_rows(acts, top_n), labels))
    if not masses:
        return class_purity(torch.zeros(0, n_classes)), torch.zeros(0, dtype=torch.float64)
    return class_purity(torch.cat(masses)), torch.cat(shares)


def top_label_share(rows: Tensor, labels: Tensor) -> Tensor:
    """(M, N) gallery rows (-1: empty) -> per direction, the share of its gallery images that
    belong to the gallery's most common class (NaN for an empty gallery): what a person looking
    at the top images sees, where purity weighs every image the direction fires on."""
    valid = rows >= 0
    classes = torch.where(valid, labels[rows.clamp_min(0)], -1)
    n_classes = int(labels.max()) + 2
    counts = torch.zeros(rows.shape[0], n_classes, dtype=torch.float64)
    counts.scatter_add_(1, (classes + 1).long(), valid.double())
    top = counts[:, 1:].max(1).values
    size = valid.sum(1).double()
    return torch.where(size > 0, top / size.clamp_min(1), torch.full_like(top, float("nan")))


def top_rows(activations: Tensor, n: int) -> Tensor:
    """(N, M) activations -> (M, n) rows of each column's n largest positive values (stable:
    ties to the lower row), -1 where fewer than n are positive."""
    order = torch.sort(activations, dim=0, descending=True, stable=True)
    values, rows = order.values[:n].T, order.indices[:n].T
    return torch.where(values > 0, rows, -1)


def random_directions(count: int, dim: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(count, dim, generator=gen, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def pca_directions(x: Tensor, count: int) -> Tensor:
    """The leading principal directions of x, each with both signs: (+u1, -u1, +u2, -u2, ...),
    at most 2 D of them (count is capped there)."""
    centred = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    signed = torch.stack([vh, -vh], dim=1).reshape(-1, x.shape[1])
    return signed[:count]


def purity_summary(purity: Purity, gallery_share: Tensor) -> dict[str, float]:
    fired = purity.label >= 0
    p = purity.purity[fired]
    share = gallery_share[~torch.isnan(gallery_share)]
    if not len(p):
        return {"count": 0, "mean": 0.0, "median": 0.0, "q10": 0.0, "q90": 0.0, "above_half": 0.0, "entropy_mean": 0.0,
                "gallery_share": 0.0}
    q = torch.quantile(p, torch.tensor([0.1, 0.5, 0.9], dtype=p.dtype))
    return {
        "count": int(fired.sum()), "mean": float(p.mean()), "median": float(q[1]), "q10": float(q[0]),
        "q90": float(q[2]), "above_half": float((p > 0.5).double().mean()), "entropy_mean": float(purity.entropy[fired].mean()),
        "gallery_share": float(share.mean()) if len(share) else 0.0,
    }


# -------------------------------------------------------------------------------- attribution
def head_attribution(decision_weight: Tensor, decoder_directions: Tensor) -> Tensor:
    """(L, H): change of each head's gate logit per unit of each latent, `d_j . W_h`."""
    return decoder_directions @ decision_weight.T


SHIFT_SETS = ("per_class", "global")
"""The latent sets whose gate-logit shifts `interpret` predicts (data/interpret/shifts.parquet):
each class's own top set and the global set, the sets of the `per_class` and `global` steering
strategies."""


def unit_logit_shifts(set_masks: Tensor, weights: Tensor, attribution: Tensor) -> Tensor:
    """Mean gate-logit shift per head at alpha = 1 for G groups of images, each steered with
    its own set: set_masks (G, L) bool, weights (G, L) (E[z_j] over the group for mode `scale`,
    m_j for mode `add`), attribution (L, H) -> (G, H). Linear in alpha."""
    return (set_masks.to(attribution.dtype) * weights.to(attribution.dtype)) @ attribution


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denom) if denom > 0 else float("nan")


def spearman(a: Tensor, b: Tensor) -> float:
    """Rank correlation, ties given their mean rank."""
    return pearson(_ranks(a.double().flatten()), _ranks(b.double().flatten()))


def _ranks(v: Tensor) -> Tensor:
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=v.dtype)
    values, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(len(values), dtype=v.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=v.dtype).index_add_(0, inverse, torch.ones_like(v))
    return (sums / counts)[inverse]
