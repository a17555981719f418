"""Steering SAE latents to control the final block's head gates (docs/METHOD.md, section 5).

For an image with final-block CLS input `x` and a latent set S:
    z = enc(x);  z'_j = (1 + alpha) z_j  (mode "scale")  or  z_j + alpha * m_j  (mode "add"), j in S
    x' = x + dec(z') - dec(z)   (keep_error)   or   x' = dec(z')
The final block's decision network sees x'; the final block itself runs on the original tokens
with the resulting gates, and the classifier reads its output. A control (section 6) moves x
along a direction of its own by the norm of the per-class steer's dec(z') - dec(z) instead
(`pipeline.steering.controls`).

Fast path: blocks 0..L-2 run once per batch. Every (strategy, alpha, draw) variant then only
needs the decision network (one small matmul) to get its gates, and the final block's output
depends on nothing but the tokens and the gate pattern, so the final block runs once per
distinct (image, gate pattern) pair across all variants, instead of once per variant, and then
only for the CLS row the classifier reads (`pipeline.model.cls_row`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.interpret.stats import membership
from pipeline.interpret.top_sets import TopSets
from pipeline.model.cls_row import HeadTerms, head_terms, pattern_logits, unsupported
from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT
from pipeline.progress import progress
from pipeline.sae.base import SparseAutoencoder
from pipeline.steering.controls import matched_input
from pipeline.steering.strategies import MATCHED_TO, STRATEGIES, Directions, SteerBatch, SteeringSets, check_strategies


@dataclass(frozen=True)
class Variant:
    """One steering setting: a strategy, a strength and (for `random`) a draw."""

    strategy: str
    alpha: float
    draw: int = 0


def steering_mask(sets: SteeringSets, variant: Variant, batch: SteerBatch) -> Tensor:
    """(B, n_latents) bool mask of the latents `variant` steers for these images (a latent strategy)."""
    mask = STRATEGIES[variant.strategy].mask
    if mask is None:
        raise ValueError(f"{variant.strategy} is a control: it has a direction, not a latent mask")
    return mask(sets, batch, variant.draw)


def steering_direction(sets: SteeringSets, variant: Variant, batch: SteerBatch) -> Tensor:
    """(B, D) unit directions a control moves these images' decision inputs along."""
    direction = STRATEGIES[variant.strategy].direction
    if direction is None:
        raise ValueError(f"{variant.strategy} is a latent strategy: it has a latent mask, not a direction")
    return direction(sets, batch, variant.draw)


def random_sets(alive: Tensor, size: int, draws: int, seed: int) -> Tensor:
    """`draws` seeded sets of `size` latents drawn uniformly from the alive ones (a mask)."""
    candidates = torch.nonzero(alive).flatten()
    gen = torch.Generator().manual_seed(seed)
    rows = [candidates[torch.randperm(len(candidates), generator=gen)[:size]].tolist() for _ in range(draws)]
    return membership(rows, len(alive))


def latent_sets(top_sets: TopSets, draws: int, seed: int, directions: Directions | None = None) -> SteeringSets:
    """The masks every latent strategy draws from (the stored top sets and the seeded random
    nulls), with the controls' `directions` (`pipeline.steering.controls.control_directions`)."""
    per_class, global_set = top_sets.masks()
    mean_active = top_sets.mean_active()
    alive = mean_active > 0
    return SteeringSets(
        per_class=per_class,
        global_set=global_set,
        random=random_sets(alive, int(global_set.sum()), draws, seed),
        random_per_class=random_class_sets(alive, per_class.sum(1).tolist(), draws, seed),
        mean_active=mean_active,
        directions=directions,
    )


def random_class_sets(alive: Tensor, sizes: list[int], draws: int, seed: int) -> Tensor:
    """(draws, C, L) seeded random sets of alive latents, set c of size sizes[c]: the null for
    the per-class sets (a different stream from `random_sets`: seed + 1)."""
    candidates = torch.nonzero(alive).flatten()
    gen = torch.Generator().manual_seed(seed + 1)
    out = torch.zeros(draws, len(sizes), len(alive), dtype=torch.bool)
    for d in range(draws):
        for c, size in enumerate(sizes):
            out[d, c, candidates[torch.randperm(len(candidates), generator=gen)[:size]]] = True
    return out


def steer_latents(z: Tensor, mask: Tensor, alpha: float, mode: str, mean_active: Tensor) -> Tensor:
    """Amplify (alpha > 0) or suppress (alpha < 0) the masked latents of dense codes z."""
    if mode == "scale":
        return torch.where(mask, z * (1 + alpha), z)
    if mode == "add":
        return torch.where(mask, z + alpha * mean_active, z)
    raise ValueError(f"unknown mode {mode!r}")


def steered_input(x: Tensor, z: Tensor, z_steered: Tensor, sae: SparseAutoencoder, keep_error: bool) -> Tensor:
    """The decision network's new input x'."""
    if keep_error:
        return x + (sae.decode(z_steered) - sae.decode(z))
    return sae.decode(z_steered)


def final_block_outcomes(model: GatedViT, tokens: Tensor, gates: Tensor, chunk: int = 256, cls_row: bool = True) -> Tensor:
    """Predictions for every row of gates (V, B, H), computing the final block once per distinct
    (image, gate pattern) pair: from its CLS row alone where the model allows it (the classifier
    reads only that row; `pipeline.model.cls_row`, exact up to float rounding), else through the
    full block (also with `cls_row=False`, the reference `bench/bench_steer.py` times). Returns (V, B)
    predicted classes."""
    v, b, h = gates.shape
    codes = (gates.long() * (1 << torch.arange(h, device=gates.device))).sum(-1)  # (V, B)
    # pattern-major keys: sorted, each chunk holds few patterns (large groups for the head-skipping path)
    keys = codes * b + torch.arange(b, device=gates.device)
    unique, inverse = torch.unique(keys.flatten(), return_inverse=True)
    image_of, code_of = unique % b, unique // b
    pattern = ((code_of[:, None] >> torch.arange(h, device=gates.device)) & 1).to(tokens.dtype)
    preds = torch.empty(len(unique), dtype=torch.long, device=tokens.device)
    terms = head_terms(model, tokens) if cls_row and unsupported(model) is None else None
    for start in range(0, len(unique), chunk):
        sl = slice(start, start + chunk)
        if terms is not None:
            rows = HeadTerms(terms.x0[image_of[sl]], terms.terms[image_of[sl]], terms.bias)
            preds[sl] = pattern_logits(model, rows, pattern[sl, None, :])[:, 0].argmax(-1)
        else:
            preds[sl] = model.forward_final(tokens[image_of[sl]], pattern[sl]).argmax(-1)
    return preds[inverse].view(v, b)


@dataclass
class Tally:
    """Per-variant, per-class sums accumulated over batches."""

    n_classes: int
    n_heads: int
    count: dict[Variant, Tensor] = field(default_factory=dict)
    correct: dict[Variant, Tensor] = field(default_factory=dict)
    kept: dict[Variant, Tensor] = field(default_factory=dict)
    image_correct: dict[Variant, list[Tensor]] = field(default_factory=dict)
    """Per batch, each image's (B,) correctness: what bootstrap intervals and the per-image
    policies of `pipeline.steering.headline` need."""
    image_usage: dict[Variant, list[Tensor]] = field(default_factory=dict)
    """Per batch, each image's (B,) fraction of final-block heads kept."""
    labels: list[Tensor] = field(default_factory=list)
    base_predictions: list[Tensor] = field(default_factory=list)
    """Per batch, the unsteered model's (B,) predictions."""

    def add_batch(self, labels: Tensor, base_predictions: Tensor) -> None:
        self.labels.append(labels.cpu())
        self.base_predictions.append(base_predictions.cpu())

    def add(self, variant: Variant, labels: Tensor, preds: Tensor, gates: Tensor) -> None:
        if variant not in self.count:
            self.count[variant] = torch.zeros(self.n_classes, dtype=torch.float64)
            self.correct[variant] = torch.zeros(self.n_classes, dtype=torch.float64)
            self.kept[variant] = torch.zeros(self.n_classes, self.n_heads, dtype=torch.float64)
        labels = labels.cpu()
        self.count[variant] += torch.bincount(labels, minlength=self.n_classes).double()
        self.correct[variant] += torch.bincount(labels, weights=(preds.cpu() == labels).double(), minlength=self.n_classes)
        self.kept[variant].index_add_(0, labels, gates.cpu().double())
        self.image_correct.setdefault(variant, []).append(preds.cpu() == labels)
        self.image_usage.setdefault(variant, []).append(gates.cpu().float().mean(-1))

    def image_outcomes(self, strategy: str, draw: int = 0) -> tuple[list[float], Tensor, Tensor]:
        """A strategy's alphas and its per-image (A, N) correctness and head usage (one draw)."""
        variants = sorted((v for v in self.image_correct if v.strategy == strategy and v.draw == draw), key=lambda v: v.alpha)
        correct = torch.stack([torch.cat(self.image_correct[v]) for v in variants])
        usage = torch.stack([torch.cat(self.image_usage[v]) for v in variants])
        return [v.alpha for v in variants], correct, usage

    def draws(self, strategy: str) -> list[int]:
        return sorted({v.draw for v in self.count if v.strategy == strategy})

    @property
    def all_labels(self) -> Tensor:
        return torch.cat(self.labels)

    @property
    def all_base_predictions(self) -> Tensor:
        return torch.cat(self.base_predictions)


def variants_for(strategies: list[str], alphas: list[float], draws: int) -> list[Variant]:
    """Every (strategy, alpha, draw) to evaluate; alpha 0 is the shared baseline."""
    check_strategies(strategies)
    grid = sorted(set(alphas) | {0.0})
    out = []
    for strategy in strategies:
        n = draws if STRATEGIES[strategy].uses_draws else 1
        out += [Variant(strategy, a, d) for a in grid for d in range(n)]
    return out


SteerFn = Callable[..., tuple[Tensor, Tensor]]
"""(model, sae, sets, normalised images, batch, variants, mode, keep_error) -> gates (V, B, H)
and predictions (V, B): the signature of a reference steering implementation."""


def decision_inputs(sae: SparseAutoencoder, sets: SteeringSets, x: Tensor, batch: SteerBatch, variants: list[Variant], mode: str,
                    keep_error: bool) -> Tensor:
    """(V, B, D): every variant's decision-network input x' for the (B, D) CLS inputs x. A
    control moves x by the norm of the `MATCHED_TO` steer's dec(z') - dec(z) at its alpha."""
    z = sae.encode(x)
    matched_norms: dict[float, Tensor] = {}  # alpha -> (B, 1), computed once for all controls at that alpha

    def matched_norm(alpha: float) -> Tensor:
        if alpha not in matched_norms:
            z_own = steer_latents(z, steering_mask(sets, Variant(MATCHED_TO, alpha), batch), alpha, mode, sets.mean_active)
            matched_norms[alpha] = (sae.decode(z_own) - sae.decode(z)).norm(dim=-1, keepdim=True)
        return matched_norms[alpha]

    inputs = []
    for variant in variants:
        if STRATEGIES[variant.strategy].is_control:
            inputs.append(matched_input(x, steering_direction(sets, variant, batch), matched_norm(variant.alpha), variant.alpha))
        else:
            z_steered = steer_latents(z, steering_mask(sets, variant, batch), variant.alpha, mode, sets.mean_active)
            inputs.append(steered_input(x, z, z_steered, sae, keep_error))
    return torch.stack(inputs)


@torch.no_grad()
def steer_batch(
    model: GatedViT, sae: SparseAutoencoder, sets: SteeringSets, tokens: Tensor, batch: SteerBatch, variants: list[Variant], mode: str, keep_error: bool
) -> tuple[Tensor, Tensor]:
    """Gates (V, B, H) and predictions (V, B) of all variants, reusing `tokens` (fast path)."""
    x_steered = decision_inputs(sae, sets, tokens[:, 0], batch, variants, mode, keep_error)
    # one (B, D) matmul per variant, as the naive reference does (one (V*B, D) matmul may round differently)
    gates = torch.stack([(model.final_gate_logits(x) > 0).to(tokens.dtype) for x in x_steered])
    return gates, final_block_outcomes(model, tokens, gates)


def run_sweep(
    model: GatedViT,
    sae: SparseAutoencoder,
    sets: SteeringSets,
    images: Tensor,
    labels: Tensor,
    config: ModelConfig,
    variants: list[Variant],
    mode: str,
    keep_error: bool,
    batch_size: int,
    device: torch.device,
    steer_fn: SteerFn | None = None,
) -> tuple[Tally, Tensor]:
    """Evaluate every variant on uint8 `images`; returns the tally and the stream's CLS inputs."""
    model.eval().to(device)
    sae.eval().to(device)
    sets = sets.to(device)
    tally = Tally(n_classes=len(config.class_names), n_heads=model.num_heads)
    cls_inputs = []
    for start in progress(range(0, len(images), batch_size), desc="steer", unit="batch"):
        x = config.preprocess(images[start : start + batch_size].to(device))
        y = labels[start : start + batch_size].to(device)
        if steer_fn is not None:  # a reference implementation from the images (tests, bench/)
            with torch.no_grad():
                batch = SteerBatch(y, model(x).logits.argmax(-1))
            gates, preds = steer_fn(model, sae, sets, x, batch, variants, mode, keep_error)
        else:
            with torch.no_grad():
                tokens = model.forward_to_final(x)
                own_gates = (model.final_gate_logits(tokens[:, 0]) > 0).to(tokens.dtype)
                batch = SteerBatch(y, final_block_outcomes(model, tokens, own_gates[None])[0])  # the variants' own path
            cls_inputs.append(tokens[:, 0].cpu())
            gates, preds = steer_batch(model, sae, sets, tokens, batch, variants, mode, keep_error)
        tally.add_batch(y, batch.predictions)
        for i, variant in enumerate(variants):
            tally.add(variant, y, preds[i], gates[i])
    return tally, (torch.cat(cls_inputs) if cls_inputs else torch.empty(0))


# --------------------------------------------------------------------------- summarising
def result_rows(tally: Tally, class_names: list[str]) -> list[dict]:
    """One row per (strategy, alpha, draw, class): n, accuracy, head usage, per-head keep rates."""
    rows = []
    for variant in sorted(tally.count, key=lambda v: (v.strategy, v.alpha, v.draw)):
        count = tally.count[variant]
        for c, name in enumerate(class_names):
            n = float(count[c])
            keep = (tally.kept[variant][c] / n).tolist() if n else [float("nan")] * tally.n_heads
            rows.append(
                {
                    "strategy": variant.strategy,
                    "alpha": variant.alpha,
                    "draw": variant.draw,
                    "class_id": c,
                    "class": name,
                    "n": int(n),
                    "accuracy": float(tally.correct[variant][c] / n) if n else float("nan"),
                    "head_usage": float(sum(keep) / len(keep)) if n else float("nan"),
                    **{f"keep_h{h}": k for h, k in enumerate(keep)},
                }
            )
    return rows


def overall(tally: Tally, variant: Variant) -> tuple[float, float]:
    """Accuracy and head usage over all images for one variant."""
    n = tally.count[variant].sum()
    return float(tally.correct[variant].sum() / n), float(tally.kept[variant].sum() / (n * tally.n_heads))


def strategy_curves(tally: Tally, strategies: list[str]) -> dict[str, dict[str, list]]:
    """Per strategy: alphas and the accuracy / head usage at each (a strategy with draws: the
    mean over draws, with the [min, max] over draws in `accuracy_range` / `head_usage_range`)."""
    curves = {}
    for strategy in strategies:
        alphas = sorted({v.alpha for v in tally.count if v.strategy == strategy})
        curve: dict[str, list] = {"alpha": alphas, "accuracy": [], "head_usage": [], "accuracy_range": [], "head_usage_range": []}
        for alpha in alphas:
            pairs = [overall(tally, v) for v in tally.count if v.strategy == strategy and v.alpha == alpha]
            for i, key in enumerate(("accuracy", "head_usage")):
                values = [p[i] for p in pairs]
                curve[key].append(sum(values) / len(values))
                curve[f"{key}_range"].append([min(values), max(values)])
        curves[strategy] = curve
    return curves
