"""Sparse autoencoders on the final block's CLS input (METHOD.md section 3): the interface the
statistics and steering stages use, the TopK SAE, and its file format.

Every SAE here takes and returns RAW embeddings (any input scaling is folded into its methods)
and decodes linearly: `decode(z) = z @ decoder_directions() + offset`, which is what steering
relies on (`x' = x + decode(z') - decode(z)`) and what makes a latent's effect on a linear
decision network exact (`pipeline.steering`).

    TopK:  z     = TopK_k(ReLU(W_enc (s x - b_dec) + b_enc))
           x_hat = (W_dec z + b_dec) / s

`s` is `input_scale`, one constant chosen on the training set so that the scaled embeddings
have mean squared norm D (`sae.normalize_input`); `z` lives in the SAE's normalised space.

Adding an architecture (BatchTopK, JumpReLU, ...) is one subclass of `SparseAutoencoder` with
its `FORMAT`, registered in `ARCHITECTURES`, plus its trainer in `pipeline/sae_training.py`;
`latent_stats` and `steer` use it unchanged. The trainer (hand-written sparse gradients) lives
in `pipeline/sae_training.py`, so editing it does not rerun the stages that only load an SAE.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.storage import load_weights, save_weights

FORMAT = "topk_sae"
FORMAT_VERSION = 1


class SAEOutput(NamedTuple):
    """What training, statistics and steering need from one forward pass (raw space)."""

    x_hat: Tensor
    """(N, D) reconstruction in raw embedding space."""
    values: Tensor
    """(N, k) activations of the selected latents (>= 0; 0 when fewer than k are positive)."""
    indices: Tensor
    """(N, k) int64 selected latents, ascending within each row."""
    pre_acts: Tensor
    """(N, n_latents) ReLU'd pre-activations before the top-k choice."""


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


# ------------------------------------------------------------------------------ interface
class SparseAutoencoder(nn.Module):
    """What every SAE offers to statistics and steering; all methods work in raw space.

    Sparse codes are `(values, indices)` pairs of shape (N, m): entries with value 0 are
    padding (a latent *fires* only where its value is > 0)."""

    ARCHITECTURE: ClassVar[str]
    """The `sae.architecture` value that trains this kind."""
    FORMAT: ClassVar[str]
    """The `format` field of its config.json."""
    dim: int
    n_latents: int

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, D) embeddings -> sparse codes (values, indices)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes (N, n_latents)."""
        values, indices = self.encode_sparse(x)
        dense = torch.zeros(x.shape[0], self.n_latents, dtype=values.dtype, device=values.device)
        return dense.scatter(1, indices, values)

    def decode(self, z: Tensor) -> Tensor:
        """Dense codes (N, n_latents) -> reconstruction (N, D)."""
        raise NotImplementedError

    def decoder_directions(self) -> Tensor:
        """(n_latents, D): row j is the change of `decode(z)` per unit of z_j."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What `from_config` needs to rebuild the module (stored in config.json)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparseAutoencoder:
        raise NotImplementedError


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


@torch.no_grad()
def normalize_rows_(rows: Tensor) -> None:
    """Unit-norm rows, in place."""
    rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def remove_parallel_(grad: Tensor, rows: Tensor) -> None:
    """grad_j -= (grad_j . w_j) w_j for unit-norm rows w_j, in place.

    With unit-norm decoder columns that component would only change their norm, which the
    renormalisation after the step undoes anyway; removing it keeps Adam's moments clean.
    """
    grad.addcmul_(rows, torch.linalg.vecdot(grad, rows).unsqueeze(1), value=-1.0)


# ------------------------------------------------------------------------------ save / load
ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {cls.ARCHITECTURE: cls for cls in (TopKSAE,)}
"""Every SAE kind, by `sae.architecture`."""


def save_sae(directory: Path | str, sae: SparseAutoencoder, extra_config: dict[str, Any]) -> None:
    """Write safetensors weights plus config.json; the SAE's own config keys win over extras."""
    save_weights(directory, sae.state_dict(), {**extra_config, **sae.config()})


def load_sae(directory: Path | str) -> SparseAutoencoder:
    """Load an SAE written by save_sae (on the CPU), of whichever registered architecture its
    config names; any mismatch is a clear PipelineError."""
    state, config = load_weights(directory)
    by_format = {cls.FORMAT: cls for cls in ARCHITECTURES.values()}
    cls = by_format.get(config.get("format"))
    if cls is None:
        raise PipelineError(f"{directory}: not an SAE this pipeline knows (config format {config.get('format')!r}; known {sorted(by_format)})")
    try:
        sae = cls.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"{directory}/config.json: bad or missing SAE field ({exc})") from None
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    for name, shape in expected.items():
        if name not in state:
            raise PipelineError(f"{directory}: weights lack tensor '{name}'")
        if tuple(state[name].shape) != shape:
            raise PipelineError(f"{directory}: tensor '{name}' has shape {tuple(state[name].shape)}, config implies {shape}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise PipelineError(f"{directory}: unexpected tensors {unknown}")
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(state[name].to(param.dtype))  # copy_ keeps W_dec's memory layout
    return sae
