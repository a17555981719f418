"""The TopK SAE (Gao et al. 2024; the paper's): docs/METHOD.md, section 3.

    z     = TopK_k(ReLU(W_enc (s x - b_dec) + b_enc))
    x_hat = (W_dec z + b_dec) / s

The shared linear parts are `pipeline.sae.linear`. Its fast trainer (hand-written sparse
gradients) is `pipeline/sae/training.py`, tested equal to autograd through `training_loss`;
editing the trainers does not rerun the stages that only load an SAE.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.sae.linear import LinearSAE, LossTerms, Objective, auxk_loss, firing_sparse, normalized_mse

FORMAT = "topk_sae"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------- top-k
def topk_lowest_index(pre: Tensor, k: int) -> Tensor:
    """Indices (N, k) of the k largest entries per row, ascending; ties go to the lowest index.

    torch.topk leaves ties unspecified. Rows whose k-th value is tied with an unselected entry
    (common: ReLU zeros when fewer than k latents are positive) are redone exactly: everything
    strictly above the k-th value, then the lowest-indexed entries equal to it.
    """
    with torch.no_grad():
        n_latents = pre.shape[1]
        if k >= n_latents:
            return torch.arange(n_latents, device=pre.device).expand(pre.shape[0], n_latents).clone()
        # one extra value tells whether the k-th is tied with an unselected entry, without a
        # pass over the whole (N, n_latents) matrix
        values, indices = pre.topk(k + 1, dim=1, sorted=True)
        tied = values[:, k] == values[:, k - 1]
        indices = indices[:, :k]
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            sub, sub_kth = pre[rows], values[rows, k - 1 : k]
            above = sub > sub_kth
            need = k - above.sum(dim=1, keepdim=True)
            equal = sub == sub_kth
            take = above | (equal & (equal.cumsum(dim=1) <= need))
            indices[rows] = take.nonzero()[:, 1].reshape(-1, k)
        return indices.sort(dim=1).values


# ------------------------------------------------------------------------------ the model
class TopKSAE(LinearSAE):
    """TopK SAE D -> n_latents: exactly k codes per sample (the k largest ReLU'd pre-activations)."""

    ARCHITECTURE = "topk"
    FORMAT = FORMAT

    def __init__(self, dim: int, n_latents: int, k: int, input_scale: float = 1.0):
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must be in [1, n_latents={n_latents}], got {k}")
        self.k = k
        super().__init__(dim, n_latents, input_scale)

    def sparse_codes(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """values (N, k) >= 0 and indices (N, k) int64 (ascending), exactly k per row."""
        indices = topk_lowest_index(pre, self.k)
        return pre.gather(1, indices), indices

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`encode_sparse`: exactly k codes per row."""
        return self.encode_sparse(x)

    def training_loss(self, xs: Tensor, dead: Tensor, objective: Objective) -> LossTerms:
        """normalized_mse + aux_coef * AuxK, through a dense decode (what the hand-written fast
        path in `pipeline.sae.training` computes without one)."""
        pre = self.scaled_pre(xs).relu()
        indices = topk_lowest_index(pre, self.k)
        values = pre.gather(1, indices)
        x_hat = self.decode_scaled(torch.zeros_like(pre).scatter(1, indices, values))
        aux = auxk_loss(pre, xs, x_hat, dead, self, objective.k_aux) if objective.aux_coef > 0 else pre.new_zeros(())
        return LossTerms(normalized_mse(x_hat, xs) + objective.aux_coef * aux, aux, (x_hat - xs).square().sum(),
                         *firing_sparse(values, indices, self.n_latents))

    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **self.base_config(), "k": self.k}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TopKSAE:
        return cls(int(config["dim"]), int(config["n_latents"]), int(config["k"]), float(config["input_scale"]))


class FrozenRandomSAE(TopKSAE):
    """The control (cf. Korznikov et al. 2026): a TopK SAE left at its random initialisation
    (unit-norm random decoder columns, the encoder their transpose, b_dec the training set's
    geometric median, as TopK training starts), never trained. TopK keeps its L0 at exactly k,
    so nothing else needs fitting; same width and k as the trained SAE it stands in for."""

    ARCHITECTURE = "frozen_random"
    FORMAT = "frozen_random_sae"

    def frozen(self) -> bool:
        return True

    def config(self) -> dict[str, Any]:
        return {**super().config(), "format": self.FORMAT}
