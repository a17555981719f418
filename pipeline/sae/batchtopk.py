"""BatchTopK (Bussmann et al. 2024) and Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima
2024): docs/METHOD.md, section 7.

Training keeps the k x B largest ReLU'd pre-activations over the whole batch of B samples, so
the L0 averages k but varies per sample. Inference cannot depend on the batch: one threshold
theta, a running mean of the batch's smallest kept value (`sae.batchtopk.threshold_momentum`),
gives `z = pre * (pre > theta)`.

Matryoshka adds nested dictionaries: the reconstruction loss is the mean over prefixes of the
latents (`sae.matryoshka.prefixes`, fractions of the width, the last one the whole), each
prefix decoding alone, so the first latents learn what matters most and later ones refine it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.sae.linear import LinearSAE, LossTerms, Objective, auxk_loss, firing, normalized_mse, sparse_from_dense

FORMAT_VERSION = 1
DEFAULT_PREFIXES = [0.0625, 0.25, 1.0]
"""Matryoshka's prefix fractions when none are given (`sae.matryoshka.prefixes`' default)."""


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """(B, L) ReLU'd pre-activations -> dense codes keeping the k * B largest entries of the
    whole batch (zeros stay zero, so a batch with fewer positive entries keeps fewer)."""
    return batch_topk_kept(pre, k)[0]


def batch_topk_kept(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`batch_topk`'s codes and the (k * B,) kept values (what the threshold is estimated from)."""
    flat = pre.flatten()
    keep = min(k * pre.shape[0], flat.numel())
    kept = flat.detach().topk(keep, sorted=False)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter(0, kept.indices, True)
    return torch.where(mask, flat, torch.zeros_like(flat)).view_as(pre), kept.values


class BatchTopKSAE(LinearSAE):
    """BatchTopK SAE: k codes per sample on average in training; a fixed threshold at inference."""

    ARCHITECTURE = "batchtopk"
    FORMAT = "batchtopk_sae"

    def __init__(self, dim: int, n_latents: int, k: int, input_scale: float = 1.0):
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must be in [1, n_latents={n_latents}], got {k}")
        self.k = k
        super().__init__(dim, n_latents, input_scale)
        self.register_buffer("threshold", torch.tensor(0.0))  # unset until training's first batch

    def sparse_codes(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return sparse_from_dense(pre * (pre > self.threshold))

    def train_codes(self, pre: Tensor, momentum: float) -> Tensor:
        """Training codes from ReLU'd pre-activations; moves the inference threshold towards
        the batch's smallest kept value (the first batch sets it: it starts at 0, unset)."""
        z, kept = batch_topk_kept(pre, self.k)
        with torch.no_grad():
            kept = kept[kept > 0]  # the kept codes that are on (a short vector: no pass over z)
            if kept.numel():
                smallest = kept.min()
                self.threshold.copy_(smallest if not bool(self.threshold > 0) else momentum * self.threshold + (1 - momentum) * smallest)
        return z

    def reconstruction_loss(self, z: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
        x_hat = self.decode_scaled(z)
        return normalized_mse(x_hat, xs), x_hat

    def training_loss(self, xs: Tensor, dead: Tensor, objective: Objective) -> LossTerms:
        pre = self.scaled_pre(xs).relu()
        z = self.train_codes(pre, objective.threshold_momentum)
        loss, x_hat = self.reconstruction_loss(z, xs)
        aux = auxk_loss(pre, xs, x_hat, dead, self, objective.k_aux) if objective.aux_coef > 0 else pre.new_zeros(())
        return LossTerms(loss + objective.aux_coef * aux, aux, (x_hat - xs).square().sum(), *firing(z))

    def config(self) -> dict[str, Any]:
        # the threshold is a buffer, stored with the weights
        return {"format": self.FORMAT, "format_version": FORMAT_VERSION, **self.base_config(), "k": self.k}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchTopKSAE:
        return cls(int(config["dim"]), int(config["n_latents"]), int(config["k"]), float(config["input_scale"]))


def prefix_sizes(n_latents: int, fractions: list[float]) -> list[int]:
    """The nested dictionary sizes: round(f * n_latents) for each fraction, at least 1, the
    last one n_latents, strictly increasing."""
    sizes = sorted({max(1, round(f * n_latents)) for f in fractions} | {n_latents})
    return sizes


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: BatchTopK codes, the loss averaged over nested prefixes."""

    ARCHITECTURE = "matryoshka"
    FORMAT = "matryoshka_sae"

    def __init__(self, dim: int, n_latents: int, k: int, prefixes: list[int], input_scale: float = 1.0):
        super().__init__(dim, n_latents, k, input_scale)
        if not prefixes or prefixes[-1] != n_latents or any(a >= b for a, b in zip(prefixes, prefixes[1:])) or prefixes[0] < 1:
            raise ValueError(f"prefixes must increase strictly from >= 1 to n_latents={n_latents}, got {prefixes}")
        self.prefixes = list(prefixes)

    def prefix_losses(self, z: Tensor, xs: Tensor) -> list[Tensor]:
        """normalized_mse of each prefix's reconstruction (latents [0, m) only, plus b_dec)."""
        return [normalized_mse(z[:, :m] @ self.W_dec[:, :m].T + self.b_dec, xs) for m in self.prefixes]

    def reconstruction_loss(self, z: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
        losses = self.prefix_losses(z, xs)
        return torch.stack(losses).mean(), self.decode_scaled(z)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "format": self.FORMAT, "prefixes": self.prefixes}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MatryoshkaSAE:
        n_latents = int(config["n_latents"])
        prefixes = [int(m) for m in config.get("prefixes", prefix_sizes(n_latents, DEFAULT_PREFIXES))]
        return cls(int(config["dim"]), n_latents, int(config["k"]), prefixes, float(config["input_scale"]))
