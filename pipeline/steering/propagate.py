"""The engine of exact multi-block evaluation: run blocks from a given stream on, for variants
that differ only in the gates some blocks are given, once per distinct (stream, gate pattern)
pair (docs/METHOD.md, section 8).

Steering several blocks (`pipeline.steering.multiblock`) and the ceiling across blocks
(`pipeline.steering.ceiling_blocks`) both run on it; it knows nothing of SAEs or latent sets,
so that the ceiling does not depend on the steering code. At each gated block every
variant-image pair picks a gate pattern (a `GateRule`, or the block's own decision); the block
then runs once per distinct (stream, pattern) pair, whose outputs are the next block's distinct
streams. The final block runs from its CLS row only (`pipeline.model.cls_row`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.model.cls_row import HeadTerms, head_terms, pattern_codes, pattern_logits, unsupported
from pipeline.model.gated_vit import GatedViT

OWN = -1
"""A fixed-pattern code that stands for the model's own gates (the block decides for itself)."""

GateRule = Callable[[int, Tensor, Tensor], Tensor]
"""(block, cls, state_of) -> (V, B, H) 0/1 gates of every variant-image pair at `block`, where
cls (S, D) holds the CLS rows of the S distinct streams entering the block and state_of (V, B)
says which stream each pair has."""


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


# ------------------------------------------------------------------------------ fixed patterns
def fixed_rule(model: GatedViT, codes: Tensor) -> GateRule:
    """Gates of a block held at fixed patterns: (V, B) codes per variant-image pair, OWN (-1)
    where the block keeps deciding its own gates."""

    def rule(block: int, cls: Tensor, state_of: Tensor) -> Tensor:
        own = (model.decision_net(block)(cls) > 0).to(cls.dtype)[state_of]
        return torch.where((codes >= 0)[..., None], pattern_bits(codes.clamp(min=0), model.num_heads, cls.dtype), own)

    return rule


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
