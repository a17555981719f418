"""The naive steering reference: the whole model once per variant, and the steering formula
written out again here, independently of `pipeline.steering.sweep` (so a wrong formula there cannot
pass by being shared). Used by tests/test_steering.py and bench/bench_steer.py; the multi-block
reference (`steer_blocks_naive`) by tests/test_multiblock.py and bench/bench_multiblock.py."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.steering.strategies import STRATEGIES
from pipeline.steering.sweep import steering_direction, steering_mask


def steer_codes(z: Tensor, mask: Tensor, alpha: float, mode: str, mean_active: Tensor) -> Tensor:
    """docs/METHOD.md, section 5: z'_j = (1 + alpha) z_j (scale) or z_j + alpha m_j (add) for the masked j;
    the other latents unchanged. (Same float arithmetic as the library, so the two paths'
    gates agree exactly; the formula itself is checked on hand-computed values.)"""
    steered = (1 + alpha) * z if mode == "scale" else z + alpha * mean_active
    return torch.where(mask, steered, z)


@torch.no_grad()
def steer_batch_naive(model, sae, sets, images: Tensor, batch, variants, mode: str, keep_error: bool) -> tuple[Tensor, Tensor]:
    """Gates (V, B, H) and predictions (V, B): per variant, the full model from the images."""
    gates, preds = [], []
    for variant in variants:
        tokens = model.forward_to_final(images)
        x_steered = steered_decision_input(sae, sets, tokens[:, 0], batch, variant, mode, keep_error)
        g = (model.final_gate_logits(x_steered) > 0).to(tokens.dtype)
        gates.append(g)
        preds.append(model.forward_final(tokens, g).argmax(-1))
    return torch.stack(gates), torch.stack(preds)


def steered_decision_input(sae, sets, x: Tensor, batch, variant, mode: str, keep_error: bool) -> Tensor:
    """One variant's decision-network input x' for the (B, D) CLS inputs x (sections 5 and 6)."""
    z = sae.encode(x)
    if STRATEGIES[variant.strategy].is_control:
        # docs/METHOD.md, section 6: the true class's set steered, only for its norm; the
        # control moves x by that norm along its own direction, signed as alpha
        z_class = steer_codes(z, sets.per_class[batch.labels], variant.alpha, mode, sets.mean_active)
        norm = torch.linalg.vector_norm(sae.decode(z_class) - sae.decode(z), dim=1, keepdim=True)
        sign = 1.0 if variant.alpha > 0 else -1.0 if variant.alpha < 0 else 0.0
        return x + sign * norm * steering_direction(sets, variant, batch)
    z_steered = steer_codes(z, steering_mask(sets, variant, batch), variant.alpha, mode, sets.mean_active)
    return x + (sae.decode(z_steered) - sae.decode(z)) if keep_error else sae.decode(z_steered)


@torch.no_grad()
def steer_blocks_naive(model, steered, images: Tensor, batch, variants, mode: str, keep_error: bool) -> tuple[Tensor, Tensor]:
    """Several blocks steered (docs/METHOD.md, section 8), plainly: per variant, the model's own
    forward from the images, with a forward pre-hook on each steered block's decision network
    that hands it the steered input in place of the CLS row it was given (`steered`: block ->
    an object with that block's `sae` and `sets`). Everything else (the stream, the other blocks'
    decisions, the blocks themselves) is the model's own. Returns every gated block's gates
    (V, B, G, H) and the logits (V, B, C)."""
    gates, logits = [], []
    for variant in variants:
        hooks = []
        for block, steering in steered.items():
            def replace(module, args, steering=steering, variant=variant):
                return (steered_decision_input(steering.sae, steering.sets, args[0], batch, variant, mode, keep_error),)
            hooks.append(model.decision_net(block).register_forward_pre_hook(replace))
        try:
            out = model(images)
        finally:
            for hook in hooks:
                hook.remove()
        gates.append(out.gates)
        logits.append(out.logits)
    return torch.stack(gates), torch.stack(logits)
