"""The interface every sparse autoencoder here offers, in raw embedding space.

Every SAE takes and returns RAW embeddings (any input scaling is folded into its methods) and
decodes linearly: `decode(z) = z @ decoder_directions() + offset`, which is what steering
relies on (`x' = x + decode(z') - decode(z)`) and what makes a latent's effect on a linear
decision network exact (`pipeline.interpret.latents.head_attribution`).

Adding an architecture is one subclass of `pipeline.sae.linear.LinearSAE` in a file of its own
(its `sparse_codes` and `training_loss`; the generic trainer in `pipeline/sae/training.py`
trains it), registered in `pipeline.sae.registry.ARCHITECTURES` and built in
`training.build_sae`; `latent_stats`, `interpret`, `steer` and `ceiling` use it unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn


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
