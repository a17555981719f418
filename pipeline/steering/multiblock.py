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

The same engine evaluates fixed gate patterns in several blocks (`fixed_rule`), which is what
the ceiling across blocks searches (`pipeline.steering.ceiling_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.model.cls_row import HeadTerms, head_terms, pattern_codes, pattern_logits, unsupported
from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT
from pipeline.progress import progress
from pipeline.sae.base import SparseAutoencoder
from pipeline.steering.controls import control_directions
from pipeline.steering.strategies import Directions, SteerBatch, SteeringSets
from pipeline.steering.sweep import Tally, Variant, decision_inputs

OWN = -1
"""A fixed-pattern code that stands for the model's own gates (the block decides for itself)."""

GateRule = Callable[[int, Tensor, Tensor], Tensor]
"""(block, cls, state_of) -> (V, B, H) 0/1 gates of every variant-image pair at `block`, where
cls (S, D) holds the CLS rows of the S distinct streams entering the block and state_of (V, B)
says which stream each pair has."""


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


def pattern_bits(codes: Tensor, n_heads: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(...) integer codes -> (..., H) 0/1 patterns (bit h = head h; the inverse of `pattern_codes`)."""
    return ((codes[..., None] >> torch.arange(n_heads, device=codes.device)) & 1).to(dtype)


# ------------------------------------------------------------------------------ the engine
@dataclass
class Propagated:
    """Every variant-image pair's outcome from the block the stream was given at."""

    gates: dict[int, Tensor]
    """Gated block -> (V, B, H) 0/1 gates (every gated block from the start on)."""
    logits: Tensor
    """(V, B, C) classifier logits (from the final block's CLS row where the model allows it)."""
    distinct: dict[int, int] = field(default_factory=dict)
    """Block -> distinct (stream, pattern) pairs it ran for: the work, against V x B naively."""

    @property
    def predictions(self) -> Tensor:
        """(V, B) predicted classes."""
        return self.logits.argmax(-1)


@torch.no_grad()
def stream_at(model: GatedViT, images: Tensor, block: int) -> tuple[Tensor, dict[int, Tensor]]:
    """The (B, N, D) stream entering `block` (the earlier blocks gating themselves) from
    normalised images, and the (B, H) own gates of the gated blocks before it."""
    x, gates = model.embed(images), {}
    for i in range(block):
        x, _, g = model.run_block(i, x)
        if g is not None:
            gates[i] = g
    return x, gates


def _run_pairs(model: GatedViT, block: int, states: Tensor, parent: Tensor, pattern: Tensor, chunk: int) -> Tensor:
    """Block `block` on stream parent[k] with gates pattern[k], for every pair k (in chunks)."""
    out = states.new_empty(len(parent), *states.shape[1:])
    for start in range(0, len(parent), chunk):
        sl = slice(start, start + chunk)
        out[sl] = model.run_block(block, states[parent[sl]], gates=pattern[sl])[0]
    return out


def _final_pairs(model: GatedViT, states: Tensor, parent: Tensor, pattern: Tensor, chunk: int) -> Tensor:
    """Classifier logits of the final block on stream parent[k] with gates pattern[k]."""
    if unsupported(model) is not None:  # the CLS-row identity does not hold: the whole block
        out = []
        for start in range(0, len(parent), chunk):
            sl = slice(start, start + chunk)
            out.append(model.forward_final(states[parent[sl]], pattern[sl]))
        return torch.cat(out)
    parts = [head_terms(model, states[s : s + chunk]) for s in range(0, len(states), chunk)]
    x0, terms, bias = torch.cat([p.x0 for p in parts]), torch.cat([p.terms for p in parts]), parts[0].bias
    out = []
    for start in range(0, len(parent), chunk):
        rows = parent[start : start + chunk]
        out.append(pattern_logits(model, HeadTerms(x0[rows], terms[rows], bias), pattern[start : start + chunk, None, :])[:, 0])
    return torch.cat(out)


@torch.no_grad()
def propagate(model: GatedViT, stream: Tensor, start: int, rules: Mapping[int, GateRule], n_variants: int,
              chunk: int = 256) -> Propagated:
    """Run blocks `start`.. on the (B, N, D) stream entering `start`, for `n_variants` variants
    that differ only in the gates `rules` give their blocks (every other gated block decides its
    own gates on the stream it receives), running each block once per distinct (stream, pattern)
    pair. `chunk`: streams per block call (memory)."""
    if start > min(rules, default=start):
        raise ValueError(f"a rule for block {min(rules)} but the stream enters block {start}")
    last, n_images = model.depth - 1, stream.shape[0]
    states = stream  # (S, N, D): the distinct streams entering the current block
    state_of = torch.arange(n_images, device=stream.device).expand(n_variants, n_images)  # (V, B) -> index into states
    gates, distinct = {}, {}
    logits = None
    for block in range(start, model.depth):
        if block < model.keep_layers:  # ungated: every distinct stream once
            states = torch.cat([model.vit.blocks[block](states[s : s + chunk]) for s in range(0, len(states), chunk)])
            distinct[block] = len(states)
            continue
        cls = states[:, 0]
        if block in rules:
            g = rules[block](block, cls, state_of)
        else:
            g = (model.decision_net(block)(cls) > 0).to(states.dtype)[state_of]
        gates[block] = g
        # distinct (stream, pattern) pairs, pattern-major: a chunk holds few patterns (large
        # groups for the head-skipping path), as `sweep.final_block_outcomes` orders them
        n_states = len(states)
        keys = pattern_codes(g) * n_states + state_of
        unique, inverse = torch.unique(keys.flatten(), return_inverse=True)
        parent, pattern = unique % n_states, pattern_bits(unique // n_states, model.num_heads, states.dtype)
        distinct[block] = len(unique)
        if block == last:
            logits = _final_pairs(model, states, parent, pattern, chunk)[inverse].view(n_variants, n_images, -1)
        else:
            states = _run_pairs(model, block, states, parent, pattern, chunk)
            state_of = inverse.view(n_variants, n_images)
    if logits is None:  # the stream entered past the final block: nothing to run
        raise ValueError(f"start block {start} is past the model's depth {model.depth}")
    return Propagated(gates, logits, distinct)


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


def fixed_rule(model: GatedViT, codes: Tensor) -> GateRule:
    """Gates of a block held at fixed patterns: (V, B) codes per variant-image pair, OWN (-1)
    where the block keeps deciding its own gates."""

    def rule(block: int, cls: Tensor, state_of: Tensor) -> Tensor:
        own = (model.decision_net(block)(cls) > 0).to(cls.dtype)[state_of]
        return torch.where((codes >= 0)[..., None], pattern_bits(codes.clamp(min=0), model.num_heads, cls.dtype), own)

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
def resolve_blocks(blocks: str | list[int], model: GatedViT) -> list[int]:
    """`steer.blocks` as block indices: `final` (the default: the last block), `all` (every
    gated block), or a list of gated block indices (sorted, duplicates removed)."""
    gated = list(range(model.keep_layers, model.depth))
    if blocks == "final":
        return [model.depth - 1]
    if blocks == "all":
        return gated
    if isinstance(blocks, str) or not blocks or any(b not in gated for b in blocks):
        raise ValueError(f"blocks = {blocks!r}: 'final', 'all' or a non-empty list of gated blocks ({gated[0]}..{gated[-1]})")
    return sorted(set(blocks))


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
