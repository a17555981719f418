"""The TopK SAE (Gao et al. 2024; the paper's): docs/METHOD.md, section 3.

    z     = TopK_k(ReLU(W_enc (s x - b_dec) + b_enc))
    x_hat = (W_dec z + b_dec) / s

`s` is `input_scale`, one constant chosen on the training set so that the scaled embeddings
have mean squared norm D (`sae.normalize_input`); `z` lives in the SAE's normalised space.
Its trainer (hand-written sparse gradients) is `pipeline/sae/training.py`, so editing that
does not rerun the stages that only load an SAE.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.sae.base import SAEOutput, SparseAutoencoder, normalize_rows_, remove_parallel_

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
class TopKSAE(SparseAutoencoder):
    """TopK SAE D -> n_latents with unit-norm decoder columns; public methods use raw space."""

    ARCHITECTURE = "topk"
    FORMAT = FORMAT

    def __init__(self, dim: int, n_latents: int, k: int, input_scale: float = 1.0):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must be in [1, n_latents={n_latents}], got {k}")
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a positive finite number, got {input_scale}")
        self.dim, self.n_latents, self.k = dim, n_latents, k
        self.input_scale = float(input_scale)
        self.W_enc = nn.Parameter(torch.empty(n_latents, dim))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        # W_dec is (dim, n_latents) but stored transposed in memory, so that its columns (the
        # rows of W_dec.T) are contiguous: embedding_bag then reads them without a copy.
        self.W_dec = nn.Parameter(torch.empty(n_latents, dim).T)
        self.b_dec = nn.Parameter(torch.zeros(dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder columns, W_enc = W_dec^T, zero biases."""
        directions = torch.randn(self.n_latents, self.dim, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        self.W_dec.copy_(directions.T)
        self.W_enc.copy_(directions)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def normalize_decoder_(self) -> None:
        """Rescale every decoder column to unit norm (in place, keeping the memory layout)."""
        normalize_rows_(self.W_dec.T)

    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder column's gradient along the column."""
        if self.W_dec.grad is not None:
            remove_parallel_(self.W_dec.grad.T, self.W_dec.T)

    def dec_rows(self) -> Tensor:
        """W_dec^T: the decoder columns as (n_latents, dim) rows (a view, contiguous)."""
        rows = self.W_dec.T
        return rows if rows.is_contiguous() else rows.contiguous()

    # -- public API, raw space
    def pre_activations(self, x: Tensor) -> Tensor:
        """(N, n_latents) ReLU'd pre-activations, before the top-k choice."""
        return F.linear(x * self.input_scale - self.b_dec, self.W_enc, self.b_enc).relu()

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """values (N, k) >= 0 and indices (N, k) int64 (ascending), exactly k per row."""
        pre = self.pre_activations(x)
        indices = topk_lowest_index(pre, self.k)
        return pre.gather(1, indices), indices

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_topk(x)

    def decode(self, z: Tensor) -> Tensor:
        """Dense codes (N, n_latents) -> raw-space reconstruction (N, D)."""
        return (z @ self.W_dec.T + self.b_dec) / self.input_scale

    def decoder_directions(self) -> Tensor:
        return self.W_dec.T / self.input_scale

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """decode() of the codes given as (values, indices), reading only those columns."""
        decoded = F.embedding_bag(indices, self.dec_rows(), per_sample_weights=values, mode="sum")
        return (decoded + self.b_dec) / self.input_scale

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        indices = topk_lowest_index(pre, self.k)
        values = pre.gather(1, indices)
        return SAEOutput(self.decode_sparse(values, indices), values, indices, pre)

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "n_latents": self.n_latents,
            "k": self.k,
            "input_scale": self.input_scale,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TopKSAE:
        return cls(int(config["dim"]), int(config["n_latents"]), int(config["k"]), float(config["input_scale"]))
