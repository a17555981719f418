"""Steering several gated blocks at once (docs/METHOD.md, section 8).

Every steered block b has its own SAE and latent sets (`BlockSteering`). For a variant
(strategy, alpha, draw) and an image, block by block from the first steered one:

    x_b   = the CLS row of the stream entering b (the stream as the blocks before b left it)
    x'_b  = the steered input of section 5 with b's SAE and b's set for the strategy (a control:
            b's direction, at the norm of b's per-class steer), computed exactly as
            `pipeline.steering.sweep.decision_inputs` computes it for the final block
    gates = b's decision network on x'_b > 0;  b runs on its actual input with these gates

so a steered block changes every later block's input, its SAE codes and its gates. Unsteered
gated blocks decide their own gates on the stream they receive. One alpha (and one strategy, one
draw) holds for every steered block of a variant, so a sweep has as many variants as the
final-block sweep (strategies x alphas x draws), not alphas^blocks.

Exact and fast (`propagate`): the blocks before the first steered block run once. From there on
the code keeps the *distinct* streams: a variant-image pair points at one of them, and at each
gated block every pair picks a gate pattern; the block then runs once per distinct (stream,
pattern) pair, whose output is the next block's distinct streams. Two variants that choose the
same gates for an image up to some block share everything that image computes until then, so
variants that leave an image's gates alone (most of them, at most alphas) cost nothing there. The
final block runs from its CLS row only (`pipeline.model.cls_row`): its per-head terms once per
distinct stream, then one small product per distinct (stream, pattern) pair. Steering only the
final block is exactly the final-block sweep (`pipeline.steering.sweep.steer_batch`).

The engine (`propagate`, `stream_at`, fixed patterns) is `pipeline.steering.propagate`, which the
ceiling across blocks (`pipeline.steering.ceiling_blocks`) runs on too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT
from pipeline.progress import progress
from pipeline.sae.base import SparseAutoencoder
from pipeline.steering.controls import control_directions
from pipeline.steering.propagate import GateRule, Propagated, propagate, stream_at
from pipeline.steering.strategies import Directions, SteerBatch, SteeringSets
from pipeline.steering.sweep import Tally, Variant, decision_inputs


@dataclass(frozen=True)
class BlockSteering:
    """What steering one block needs: its SAE (trained on that block's CLS input) and the sets
    and directions of every strategy in that SAE's latent space (`sweep.latent_sets`; the
    controls' directions from `block_directions`)."""

    sae: SparseAutoencoder
    sets: SteeringSets

    def to(self, device: torch.device | str) -> BlockSteering:
        return BlockSteering(self.sae.to(device), self.sets.to(device))


def block_directions(model: GatedViT, block: int, train_x: Tensor, train_labels: Tensor, draws: int, seed: int) -> Directions:
    """The controls' directions for steering `block`: `controls.control_directions` from that
    block's training CLS inputs and its own decision network (for the gate-closing direction)."""
    return control_directions(train_x, train_labels, model.vit.num_classes, model.decision_net(block).weight, draws, seed)


# ------------------------------------------------------------------------------ the rules
def steering_rule(model: GatedViT, steering: BlockSteering, batch: SteerBatch, variants: list[Variant], mode: str,
                  keep_error: bool) -> GateRule:
    """Gates of a steered block: per variant, its decision network on the steered CLS input
    (`sweep.decision_inputs` with this block's SAE and sets). Variants whose images all share
    their streams are steered together (one SAE encoding for the group)."""

    def rule(block: int, cls: Tensor, state_of: Tensor) -> Tensor:
        net = model.decision_net(block)
        out = cls.new_empty(*state_of.shape, model.num_heads)
        rows, group = torch.unique(state_of, dim=0, return_inverse=True)
        for g, row in enumerate(rows):
            members = (group == g).nonzero().flatten().tolist()
            steered = decision_inputs(steering.sae, steering.sets, cls[row], batch, [variants[m] for m in members], mode, keep_error)
            for m, x in zip(members, steered):  # one (B, D) matmul per variant, as the final-block sweep does
                out[m] = (net(x) > 0).to(cls.dtype)
        return out

    return rule


@torch.no_grad()
def steer_blocks(model: GatedViT, steered: Mapping[int, BlockSteering], stream: Tensor, start: int, batch: SteerBatch,
                 variants: list[Variant], mode: str, keep_error: bool, chunk: int = 256) -> Propagated:
    """Every variant steered in every block of `steered` (block -> its SAE and sets), from the
    (B, N, D) stream entering block `start` (at or before the first steered block): gates of
    every gated block from `start` on and the logits, per variant and image."""
    for block in steered:
        if not model.keep_layers <= block < model.depth:
            raise ValueError(f"block {block} is not a gated block (gated: {model.keep_layers}..{model.depth - 1})")
    rules = {b: steering_rule(model, s, batch, variants, mode, keep_error) for b, s in steered.items()}
    return propagate(model, stream, start, rules, len(variants), chunk)


# ------------------------------------------------------------------------------ the sweep
@dataclass
class BlocksSweep:
    """What a multi-block sweep measured: one `Tally` per gated block (the same predictions,
    that block's gates: `result_rows` of block b gives b's usage), and the unsteered CLS inputs
    of each steered block (to check against stored embeddings)."""

    tallies: dict[int, Tally]
    combined: Tally
    """Every gated block's heads as one tally of G x H heads (block-major: head h of the g-th
    gated block is head g * H + h), so its `head_usage` is the mean usage over the gated blocks
    (in a ViT whose blocks share one shape, affine in the GFLOPs)."""
    cls_inputs: dict[int, Tensor]
    distinct: dict[int, int] = field(default_factory=dict)
    """Block -> distinct (stream, pattern) pairs run, summed over batches."""


@torch.no_grad()
def run_blocks_sweep(model: GatedViT, steered: Mapping[int, BlockSteering], images: Tensor, labels: Tensor,
                     config: ModelConfig, variants: list[Variant], mode: str, keep_error: bool, batch_size: int,
                     device: torch.device, chunk: int = 256) -> BlocksSweep:
    """Evaluate every variant on uint8 `images`, steering every block of `steered` (the
    multi-block counterpart of `sweep.run_sweep`; with only the final block steered its final
    block's tally equals `run_sweep`'s)."""
    model.eval().to(device)
    steered = {b: s.to(device) for b, s in sorted(steered.items())}
    first = min(steered)
    gated = list(range(model.keep_layers, model.depth))
    n_classes = len(config.class_names)
    out = BlocksSweep({b: Tally(n_classes=n_classes, n_heads=model.num_heads) for b in gated},
                      Tally(n_classes=n_classes, n_heads=len(gated) * model.num_heads), {b: [] for b in steered})
    for start in progress(range(0, len(images), batch_size), desc="steer blocks", unit="batch"):
        x = config.preprocess(images[start : start + batch_size].to(device))
        y = labels[start : start + batch_size].to(device)
        stream, before = stream_at(model, x, first)
        # the unsteered model through the variants' own path (alpha 0 then reproduces it exactly)
        own = propagate(model, stream, first, {b: _recording(model, out.cls_inputs[b]) for b in steered}, 1, chunk)
        batch = SteerBatch(y, own.predictions[0])
        result = steer_blocks(model, steered, stream, first, batch, variants, mode, keep_error, chunk)
        for block, n in result.distinct.items():
            out.distinct[block] = out.distinct.get(block, 0) + n
        every = {b: result.gates[b] if b in result.gates else before[b].expand(len(variants), -1, -1) for b in gated}
        every[None] = torch.cat([every[b] for b in gated], -1)  # the combined tally's heads
        for block, tally in (*out.tallies.items(), (None, out.combined)):
            tally.add_batch(y, batch.predictions)
            for i, variant in enumerate(variants):
                tally.add(variant, y, result.predictions[i], every[block][i])
    out.cls_inputs = {b: torch.cat(rows) if rows else torch.empty(0) for b, rows in out.cls_inputs.items()}
    return out


def _recording(model: GatedViT, store: list[Tensor]) -> GateRule:
    """A block's own gates, keeping its CLS inputs (one variant: the unsteered pass)."""

    def rule(block: int, cls: Tensor, state_of: Tensor) -> Tensor:
        store.append(cls[state_of[0]].cpu())
        return (model.decision_net(block)(cls) > 0).to(cls.dtype)[state_of]

    return rule
