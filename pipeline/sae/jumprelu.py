"""JumpReLU SAE (Rajamanoharan et al. 2024): docs/METHOD.md, section 7.

    z_j = pre_j * H(pre_j - theta_j),   theta_j = exp(log_theta_j) > 0, learned per latent

The step H has no useful gradient in theta, so training uses straight-through estimates with a
rectangle kernel K of bandwidth eps (`sae.jumprelu.bandwidth`): the gradients are those of the
kernel-smoothed step H_eps(u) = clamp(u / eps + 1/2, 0, 1), only in theta:

    d z_j / d theta_j   ~ -(pre_j / eps) K((pre_j - theta_j) / eps)
    d H_j / d theta_j   ~ -(1 / eps)     K((pre_j - theta_j) / eps)

(the paper writes theta_j / eps for the first; within the kernel's window pre_j = theta_j up to
eps / 2, and ours is the exact derivative of the smoothed objective, which the tests check by
finite differences). Sparsity comes from an L0 penalty, `sae.jumprelu.l0_coef` times the
batch's mean number of active latents, through the same estimate: no AuxK (a latent below its
threshold everywhere gets no gradient from the reconstruction, but the L0 term's kernel still
reaches latents whose pre-activations come within eps / 2 of theta).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.sae.linear import LinearSAE, LossTerms, Objective, firing, normalized_mse, sparse_from_dense

FORMAT_VERSION = 1
DEFAULT_BANDWIDTH = 0.05


def _window(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """K((pre - theta) / eps) / eps for the rectangle kernel: 1/eps inside |pre - theta| < eps/2."""
    return ((pre - theta).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class JumpReLUFn(torch.autograd.Function):
    """z = pre * H(pre - theta): the true gradient in pre, the smoothed one in theta."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        grad_pre = grad * (pre > theta)
        grad_theta = (-(grad * pre) * _window(pre, theta, ctx.bandwidth)).sum(0)
        return grad_pre, grad_theta, None


class StepFn(torch.autograd.Function):
    """H(pre - theta): no gradient in pre, the smoothed one in theta."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        return None, (-grad * _window(pre, theta, ctx.bandwidth)).sum(0), None


class JumpReLUSAE(LinearSAE):
    """JumpReLU SAE: a learned threshold per latent, sparsity from an L0 penalty."""

    ARCHITECTURE = "jumprelu"
    FORMAT = "jumprelu_sae"

    def __init__(self, dim: int, n_latents: int, input_scale: float = 1.0, init_threshold: float = 1.0, bandwidth: float = DEFAULT_BANDWIDTH):
        if not (init_threshold > 0 and bandwidth > 0):
            raise ValueError(f"init_threshold and bandwidth must be > 0, got {init_threshold}, {bandwidth}")
        super().__init__(dim, n_latents, input_scale)
        self.bandwidth = float(bandwidth)
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(init_threshold)))

    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def sparse_codes(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return sparse_from_dense(pre * (pre > self.threshold()))

    def training_loss(self, xs: Tensor, dead: Tensor, objective: Objective) -> LossTerms:
        pre = self.scaled_pre(xs).relu()
        theta = self.threshold()
        z = JumpReLUFn.apply(pre, theta, self.bandwidth)
        x_hat = self.decode_scaled(z)
        l0 = StepFn.apply(pre, theta, self.bandwidth).sum(1).mean()
        penalty = objective.l0_coef * l0
        return LossTerms(normalized_mse(x_hat, xs) + penalty, penalty, (x_hat - xs).square().sum(), *firing(z))

    def config(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "format_version": FORMAT_VERSION, **self.base_config(), "bandwidth": self.bandwidth}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> JumpReLUSAE:
        return cls(int(config["dim"]), int(config["n_latents"]), float(config["input_scale"]),
                   bandwidth=float(config.get("bandwidth", DEFAULT_BANDWIDTH)))
