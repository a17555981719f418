"""`sae`: the sparse autoencoder and its training (read by `train_sae` only)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.params.base import Device, Section


class BatchTopKParams(Section):
    """`sae.batchtopk`: BatchTopK's inference threshold (also Matryoshka's)."""

    threshold_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99
    """Per step, theta <- m theta + (1 - m) (the batch's smallest kept activation); the first
    batch sets it. Inference keeps the latents above theta, so codes do not depend on the batch."""


class JumpReLUParams(Section):
    """`sae.jumprelu`: the JumpReLU SAE's thresholds and sparsity penalty."""

    l0_coef: Annotated[float, Field(ge=0)] = 2e-3
    """Coefficient of the L0 penalty (mean active latents per sample) beside the normalised MSE
    (ours: the penalty is L0 through the straight-through estimate, not a tanh surrogate)."""
    bandwidth: Annotated[float, Field(gt=0)] = 0.05
    """Width eps of the rectangle kernel of the straight-through threshold gradients, in the
    SAE's normalised units (inputs scaled to mean squared norm D)."""
    init_threshold: Annotated[float, Field(gt=0)] = 1.0
    """Every latent's threshold at initialisation, in normalised units (a unit-norm encoder row
    gives pre-activations of about unit scale). The thresholds then move slowly (Adam on their
    logarithm), so this sets most of the L0 of a short run."""


class MatryoshkaParams(Section):
    """`sae.matryoshka`: the nested dictionary sizes."""

    prefixes: list[Annotated[float, Field(gt=0, le=1)]] = [0.0625, 0.25, 1.0]
    """Prefix sizes as fractions of the width (the whole dictionary is always one of them); the
    loss is the mean of their reconstruction losses."""


class SaeParams(Section):
    """`train_sae`: the sparse autoencoder on the final block's CLS input."""

    architecture: Literal["topk", "batchtopk", "jumprelu", "matryoshka", "frozen_random"] = "topk"
    """SAE kind (`pipeline.sae.registry.ARCHITECTURES`, docs/METHOD.md, sections 3 and 7):
    `topk` (OpenAI's TopK SAE, the paper's), `batchtopk` (top k x batch in training, a learned
    threshold at inference), `jumprelu` (learned per-latent thresholds, an L0 penalty),
    `matryoshka` (BatchTopK with nested prefix losses), `frozen_random` (a TopK SAE left at its
    random initialisation: the control). Statistics, steering and the ceiling use any."""
    trainer: Literal["auto", "fast", "autograd"] = "auto"
    """`fast`: TopK's hand-written sparse gradients (topk only); `autograd`: the generic trainer
    every architecture has; `auto`: fast for topk, autograd otherwise."""
    batchtopk: BatchTopKParams = BatchTopKParams()
    """Used by `batchtopk` and `matryoshka`."""
    jumprelu: JumpReLUParams = JumpReLUParams()
    """Used by `jumprelu`."""
    matryoshka: MatryoshkaParams = MatryoshkaParams()
    """Used by `matryoshka`."""
    expansion: Annotated[int, Field(ge=1)] = 8
    """Number of latents as a multiple of the embedding width D (paper: 8 x 384 = 3072)."""
    n_latents: Annotated[int, Field(ge=1)] | None = None
    """Explicit number of latents; overrides `expansion` when set."""
    k: Annotated[int, Field(ge=1)] = 32
    """Active latents per sample (ours; OpenAI uses 32, SAELens 100); BatchTopK and Matryoshka:
    on average over a batch; unused by JumpReLU (its L0 comes from `jumprelu.l0_coef`)."""
    epochs: Annotated[int, Field(ge=1)] = 100
    """Passes over the training embeddings (paper: 100)."""
    batch_size: Annotated[int, Field(ge=1)] = 256
    """Samples per optimisation step."""
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """Adam learning rate after warmup (constant afterwards unless `lr_decay`)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    """Linear learning-rate warmup, in steps."""
    lr_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Final fraction of the steps over which the learning rate falls linearly to zero
    (Anthropic's SAEs: 0.2; 0 keeps it constant). bench/bench_sae.py measures what it buys."""
    aux_coef: Annotated[float, Field(ge=0)] = 1 / 32
    """AuxK loss coefficient (OpenAI: 1/32; 0 disables): TopK, BatchTopK and Matryoshka's
    dead-latent loss (JumpReLU has none)."""
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
        if self.trainer == "fast" and self.architecture != "topk":
            raise ValueError(f"trainer 'fast' trains only topk SAEs, not {self.architecture!r} (use auto or autograd)")
        if not self.matryoshka.prefixes:
            raise ValueError("matryoshka.prefixes must hold at least one fraction")
        return self
