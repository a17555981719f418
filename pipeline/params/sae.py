"""`sae`: the sparse autoencoder and its training (read by `train_sae` only)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.params.base import Device, Section


class SaeParams(Section):
    """`train_sae`: the sparse autoencoder on the final block's CLS input."""

    architecture: Literal["topk"] = "topk"
    """SAE kind (`pipeline.sae.ARCHITECTURES`): `topk` (OpenAI's TopK SAE, the paper's). A new
    kind is a `SparseAutoencoder` subclass plus its trainer; statistics and steering use any."""
    expansion: Annotated[int, Field(ge=1)] = 8
    """Number of latents as a multiple of the embedding width D (paper: 8 x 384 = 3072)."""
    n_latents: Annotated[int, Field(ge=1)] | None = None
    """Explicit number of latents; overrides `expansion` when set."""
    k: Annotated[int, Field(ge=1)] = 32
    """Active latents per sample (ours; OpenAI uses 32, SAELens 100)."""
    epochs: Annotated[int, Field(ge=1)] = 100
    """Passes over the training embeddings (paper: 100)."""
    batch_size: Annotated[int, Field(ge=1)] = 256
    """Samples per optimisation step."""
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """Adam learning rate after warmup (constant afterwards)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    """Linear learning-rate warmup, in steps."""
    aux_coef: Annotated[float, Field(ge=0)] = 1 / 32
    """AuxK loss coefficient (OpenAI: 1/32; 0 disables)."""
    k_aux: Annotated[int, Field(ge=1)] | None = None
    """Dead latents used by the AuxK loss; null means D / 2."""
    dead_window: Annotated[int, Field(ge=1)] | None = None
    """A latent is dead after this many samples without firing; null means one epoch."""
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    """Initial decoder bias, computed on a sample of the training embeddings."""
    normalize_input: bool = True
    """Scale inputs by one constant so that their mean squared norm is D (ours; the constant is
    stored with the SAE and folded back, so encode/decode work on raw embeddings)."""
    seed: int = 0
    """Seed of initialisation and shuffling."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    threads: Annotated[int, Field(ge=1)] | None = 1
    """CPU threads for SAE training; null keeps torch's default. The SAE's matrices are small,
    so extra threads mostly add synchronisation (BENCHMARKS.md, "SAE training", has the
    measurement behind the default of 1)."""

    @model_validator(mode="after")
    def _consistent(self) -> SaeParams:
        # With `expansion` the width depends on D, checked when the embeddings are read.
        if self.n_latents is not None and self.k > self.n_latents:
            raise ValueError(f"k {self.k} must be <= n_latents {self.n_latents}")
        if self.n_latents is not None and self.k_aux is not None and self.k_aux > self.n_latents:
            raise ValueError(f"k_aux {self.k_aux} must be <= n_latents {self.n_latents}")
        return self
