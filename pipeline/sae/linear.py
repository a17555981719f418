"""What every SAE here shares: a linear encoder, an activation that makes the codes sparse, and a
linear decoder with unit-norm columns (docs/METHOD.md, sections 3 and 7).

    pre   = W_enc (s x - b_dec) + b_enc
    z     = activation(pre)              (TopK, BatchTopK's threshold, JumpReLU, ...)
    x_hat = (W_dec z + b_dec) / s

`s` is `input_scale`, one constant chosen on the training set so that the scaled embeddings
have mean squared norm D (`sae.normalize_input`); `z` lives in the SAE's normalised space. An
architecture is a subclass that says how `pre` becomes sparse codes (`encode_sparse`) and, for
the generic trainer (`pipeline.sae.training`), what its training loss is (`training_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.sae.base import SAEOutput, SparseAutoencoder, normalize_rows_, remove_parallel_


@dataclass(frozen=True)
class Objective:
    """The training-only settings of the objectives (from the `sae` params; none of them is
    needed to load or use a trained SAE)."""

    aux_coef: float = 1 / 32
    """AuxK coefficient (TopK, BatchTopK, Matryoshka; 0 disables)."""
    k_aux: int = 1
    """Dead latents AuxK reconstructs the residual from."""
    l0_coef: float = 0.0
    """JumpReLU's L0 penalty coefficient."""
    threshold_momentum: float = 0.99
    """BatchTopK's running threshold: theta <- m theta + (1 - m) (the batch's smallest kept value)."""


class LossTerms(NamedTuple):
    """One batch's training objective and what the training loop records of it."""

    loss: Tensor
    """The scalar to minimise."""
    aux_loss: Tensor
    """The auxiliary term (AuxK, or a sparsity penalty), already inside `loss`; for the log."""
    sq_err: Tensor
    """sum ||x_hat - x||^2 of the main reconstruction (normalised space)."""
    fired: Tensor
    """(n_latents,) bool: the latents with a positive code in the batch (the dead-latent tracker's input)."""
    active: Tensor
    """The number of positive codes in the batch (the L0 log's input)."""


def firing(z: Tensor) -> tuple[Tensor, Tensor]:
    """(fired, active) of dense (N, n_latents) codes, for LossTerms."""
    on = z.detach() > 0
    return on.any(dim=0), on.sum()


def firing_sparse(values: Tensor, indices: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    """(fired, active) of codes given as (values, indices), for LossTerms."""
    on = (values.detach() > 0).to(values.dtype)
    counts = torch.zeros(n_latents, dtype=values.dtype, device=values.device)
    return counts.index_add_(0, indices.reshape(-1), on.reshape(-1)) > 0, on.sum()


def normalized_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """mse(x_hat, x) / mse(mean x, x): OpenAI's loss, a batch estimate of the FVU."""
    return (x_hat - x).square().sum() / (x - x.mean(dim=0)).square().sum().clamp_min(1e-12)


def sparse_from_dense(z: Tensor) -> tuple[Tensor, Tensor]:
    """Dense codes (N, L) -> (values, indices) of width max-active-per-row (at least 1),
    indices ascending, rows with fewer active latents padded with value 0 at the lowest
    inactive indices."""
    active = z > 0
    n_active = active.sum(dim=1, keepdim=True)
    width = max(int(n_active.max()) if z.numel() else 0, 1)
    # every active latent, and the first (width - n_active) inactive ones of the row: exactly
    # `width` per row, so the row-major nonzero() gives each row's indices in ascending order
    # (an argsort of the whole (N, L) matrix costs several times more)
    inactive = ~active
    padding = inactive & (inactive.cumsum(dim=1, dtype=torch.int32) <= width - n_active)
    indices = (active | padding).nonzero()[:, 1].reshape(z.shape[0], width)
    values = z.gather(1, indices) * active.gather(1, indices)
    return values, indices


class CenteredLinear(torch.autograd.Function):
    """pre = (xs - b_dec) W_enc^T + b_enc with xs constant.

    The same forward as F.linear; the backward gets b_dec's gradient, -(sum_i grad_pre_i) W_enc,
    from a vector-matrix product instead of autograd's full (N, n_latents) x (n_latents, D)
    gradient for the centred input, which nothing else needs.
    """

    @staticmethod
    def forward(ctx, xs: Tensor, b_dec: Tensor, w_enc: Tensor, b_enc: Tensor) -> Tensor:
        xc = xs - b_dec
        ctx.save_for_backward(xc, w_enc)
        return F.linear(xc, w_enc, b_enc)

    @staticmethod
    def backward(ctx, grad_pre: Tensor):
        xc, w_enc = ctx.saved_tensors
        grad_b_enc = grad_pre.sum(dim=0)
        return None, -(grad_b_enc @ w_enc), grad_pre.T @ xc, grad_b_enc


class LinearSAE(SparseAutoencoder):
    """Linear encoder and decoder with unit-norm decoder columns; public methods use raw space."""

    def __init__(self, dim: int, n_latents: int, input_scale: float = 1.0):
        super().__init__()
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a positive finite number, got {input_scale}")
        self.dim, self.n_latents = dim, n_latents
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
        """(N, n_latents) ReLU'd pre-activations, before the sparsifying choice."""
        return F.linear(x * self.input_scale - self.b_dec, self.W_enc, self.b_enc).relu()

    def decode(self, z: Tensor) -> Tensor:
        """Dense codes (N, n_latents) -> raw-space reconstruction (N, D)."""
        return (z @ self.W_dec.T + self.b_dec) / self.input_scale

    def decoder_directions(self) -> Tensor:
        return self.W_dec.T / self.input_scale

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """decode() of the codes given as (values, indices), reading only those columns."""
        decoded = F.embedding_bag(indices, self.dec_rows(), per_sample_weights=values, mode="sum")
        return (decoded + self.b_dec) / self.input_scale

    def sparse_codes(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """ReLU'd pre-activations -> the inference codes (values, indices): the architecture's
        activation (TopK's k largest, a threshold, ...)."""
        raise NotImplementedError

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.sparse_codes(self.pre_activations(x))

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        values, indices = self.sparse_codes(pre)
        return SAEOutput(self.decode_sparse(values, indices), values, indices, pre)

    # -- training, normalised space (`xs` = s x)
    def scaled_pre(self, xs: Tensor) -> Tensor:
        """Pre-activations (before any ReLU) of already-scaled inputs, differentiable in the
        weights (`xs` is data: no gradient flows to it)."""
        return CenteredLinear.apply(xs, self.b_dec, self.W_enc, self.b_enc)

    def decode_scaled(self, z: Tensor) -> Tensor:
        """Dense codes -> reconstruction in normalised space, differentiable."""
        return z @ self.W_dec.T + self.b_dec

    def training_loss(self, xs: Tensor, dead: Tensor, objective: Objective) -> LossTerms:
        """The architecture's objective on one batch of scaled inputs, for autograd; `dead` is
        the (n_latents,) mask of latents that have not fired for `sae.dead_window` samples."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called by the generic trainer after every optimiser step (the decoder's norm)."""
        self.normalize_decoder_()

    def frozen(self) -> bool:
        """True: the trainer must not change the weights (the frozen-random control)."""
        return False

    def base_config(self) -> dict[str, Any]:
        return {"dim": self.dim, "n_latents": self.n_latents, "input_scale": self.input_scale}


def auxk_loss(pre: Tensor, xs: Tensor, x_hat: Tensor, dead: Tensor, sae: LinearSAE, k_aux: int) -> Tensor:
    """OpenAI's AuxK: reconstruct the residual xs - x_hat (a constant target) from the top
    min(k_aux, #dead) ReLU'd pre-activations among dead latents; 0 without dead latents."""
    if not bool(dead.any()):
        return torch.zeros((), dtype=xs.dtype, device=xs.device)
    # only the dead columns: usually a small fraction, so the top-k and the decode shrink with it
    dead_ids = dead.nonzero().squeeze(1)
    sub = pre[:, dead_ids].relu()
    top = sub.topk(min(k_aux, dead_ids.numel()), dim=1)
    z_aux = torch.zeros_like(sub).scatter(1, top.indices, top.values)
    return normalized_mse(z_aux @ sae.W_dec[:, dead_ids].T, (xs - x_hat).detach())
