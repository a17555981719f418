"""The ceiling across blocks: class-specific fixed gate patterns in several gated blocks
(docs/METHOD.md, section 8; the single-block ceiling of the final block is `ceiling.py`).

A configuration gives each searched block either a fixed pattern g in {0,1}^H or the model's own
gates (OWN); every other gated block, and a searched block left at OWN, decides its own gates on
the stream it receives, so fixing block b changes the gates of every later block. The criterion
is the whole model's GFLOPs per image (`pipeline.model.flops`; in a ViT whose blocks share one
shape, an affine function of the mean head usage over the gated blocks); the rule is steering's
headline rule on it: per class, on the selection split, the configuration of least mean GFLOPs
whose accuracy is at least the model's own accuracy minus the tolerance (ties: higher selection
accuracy, then the candidate listed first: the current configuration, then OWN, then the lower
pattern code), reported on test.

Search (`search_blocks`), per class, every class at once:
1. single-block ceilings: for each searched block b alone, the rule over {OWN} + all 2^H
   patterns at b, every other block own (at the final block this is `ceiling.py`'s choice);
2. the start: the best of the model's own gates and these single-block ceilings, by the rule;
3. one greedy pass from the last searched block to the first: at block b, the rule over
   {the current configuration, OWN at b, each of the 2^H patterns at b}, the other blocks as
   currently fixed.
Each step can keep the current configuration, so the result is never worse (in the criterion,
on the selection split) than any single-block ceiling. Cost: 2J evaluations of at most 2^H + 2
candidates on the selection images (J searched blocks) plus one on each split for the report;
an evaluation of block b's candidates runs blocks b.. once per distinct (stream, pattern), i.e.
about (2^H + 1) x images for every block from b on (the final block from its CLS row), and the
blocks before b once per image (`pipeline.steering.multiblock.propagate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.model.config import ModelConfig
from pipeline.model.flops import FlopModel, flop_model
from pipeline.model.gated_vit import GatedViT
from pipeline.progress import progress
from pipeline.steering.ceiling import BlocksRow, finite
from pipeline.steering.headline import PolicyEffect, PolicyResult, evaluate_policy
from pipeline.steering.propagate import OWN, fixed_rule, pattern_bits, propagate, stream_at
from pipeline.steering.uncertainty import class_means


@dataclass(frozen=True)
class BlockSplit:
    """One split's images as the search needs them: labels, the stream entering block `start`
    and the own gates of the gated blocks before it."""

    labels: Tensor
    """(N,) int64"""
    stream: Tensor
    """(N, T, D) the stream entering block `start`."""
    start: int
    gates_before: dict[int, Tensor]
    """Gated block < start -> (N, H) its own gates."""


@torch.no_grad()
def block_split(model: GatedViT, config: ModelConfig, images: Tensor, labels: Tensor, start: int, batch_size: int,
                device: torch.device) -> BlockSplit:
    """Run uint8 `images` up to block `start` once."""
    model.eval().to(device)
    streams, before = [], {}
    for s in range(0, len(images), batch_size):
        x, g = stream_at(model, config.preprocess(images[s : s + batch_size].to(device)), start)
        streams.append(x)
        for block, gates in g.items():
            before.setdefault(block, []).append(gates)
    stream = torch.cat(streams) if streams else torch.empty(0)
    return BlockSplit(labels.to(device), stream, start, {b: torch.cat(g) for b, g in before.items()})


@dataclass
class Outcome:
    """Per configuration (V) and image (N): right or wrong, head usage per gated block, GFLOPs."""

    correct: Tensor
    """(V, N) bool"""
    usage: Tensor
    """(V, N, G) float: fraction of heads kept in each gated block."""
    gflops: Tensor
    """(V, N) float64"""
    pairs: int = 0
    """(stream, pattern) pairs the blocks ran for, summed over blocks: the evaluation's work."""


def image_gflops(flops: FlopModel, kept: Tensor, keep_layers: int) -> Tensor:
    """(..., G) heads kept per gated block -> (...) GFLOPs per image (ungated blocks keep all)."""
    per_head = torch.tensor(flops.per_head, dtype=torch.float64)
    full = per_head[:keep_layers].sum() * flops.num_heads
    return (flops.fixed + full + (kept.double() * per_head[keep_layers:]).sum(-1)) / 1e9


@torch.no_grad()
def evaluate_configs(model: GatedViT, split: BlockSplit, blocks: list[int], codes: Tensor, batch_size: int = 64,
                     chunk: int = 256) -> Outcome:
    """Outcomes of V configurations: codes (V, N, J) give each image the pattern (or OWN) of each
    searched block in `blocks` (J of them, all at or after `split.start`)."""
    v, n = codes.shape[:2]
    gated = list(range(model.keep_layers, model.depth))
    correct, usage, pairs = [], [], 0
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        rules = {b: fixed_rule(model, codes[:, sl, j].to(split.stream.device)) for j, b in enumerate(blocks)}
        out = propagate(model, split.stream[sl], split.start, rules, v, chunk)
        pairs += sum(out.distinct.values())
        correct.append((out.predictions == split.labels[sl]).cpu())
        usage.append(torch.stack([(out.gates[b] if b in out.gates else split.gates_before[b][sl].expand(v, -1, -1)).mean(-1)
                                  for b in gated], -1).cpu())
    correct = torch.cat(correct, 1) if correct else torch.zeros(v, 0, dtype=torch.bool)
    usage = torch.cat(usage, 1) if usage else torch.zeros(v, 0, len(gated))
    gflops = image_gflops(flop_model(model), usage * model.num_heads, model.keep_layers)
    return Outcome(correct, usage, gflops, pairs)


def choose(accuracy: Tensor, gflops: Tensor, base_accuracy: Tensor, tolerance: float) -> Tensor:
    """The rule per class: (K, C) candidate accuracies and GFLOPs, (C,) the model's own accuracy
    -> (C,) index of the chosen candidate. Candidate 0 (the configuration a step starts from)
    always qualifies; ties: higher accuracy, then the lower index. A class without images (NaN)
    keeps candidate 0."""
    choice = torch.zeros(accuracy.shape[1], dtype=torch.long)
    for c in range(accuracy.shape[1]):
        if torch.isnan(base_accuracy[c]):
            continue
        ok = [k for k in range(accuracy.shape[0]) if k == 0 or accuracy[k, c] >= base_accuracy[c] - tolerance - 1e-12]
        choice[c] = min(ok, key=lambda k: (float(gflops[k, c]), -float(accuracy[k, c]), k))
    return choice


@dataclass
class BlocksCeiling:
    """What the search found. Rows of `select` / `test`: 0 the model's own gates, 1..J the
    single-block ceiling of each searched block, J + 1 the multi-block ceiling."""

    blocks: list[int]
    codes: Tensor
    """(C, J) each class's multi-block configuration: the code of each searched block's fixed
    pattern (bit h = head h kept), or OWN (-1)."""
    single: Tensor
    """(J, C) each block's single-block ceiling: the code at that block (or OWN), per class."""
    select: Outcome
    test: Outcome
    evaluations: int
    """Candidate evaluations on the selection split (the search's cost; each over every image)."""
    pairs: int
    """(stream, pattern) block runs over the whole search on the selection split."""

    @property
    def rows(self) -> list[str]:
        return ["own", *(f"block {b}" for b in self.blocks), "blocks"]


def _class_codes(config: Tensor, labels: Tensor) -> Tensor:
    """(K, C, J) per-class configurations -> (K, N, J) per image, by its label."""
    return config[:, labels.cpu()]


Evaluate = Callable[[Tensor], tuple[Tensor, Tensor]]
"""(K, C, J) candidate configurations (per class, the code of each searched block) -> per class
(K, C) selection accuracy and (K, C) mean GFLOPs."""


def greedy_configs(evaluate: Evaluate, n_classes: int, n_blocks: int, n_heads: int, tolerance: float) -> tuple[Tensor, Tensor]:
    """Steps 1-3 of the module docstring over any evaluator: (C, J) each class's configuration
    and (J, C) each block's single-block ceiling (its code at that block)."""
    patterns = torch.arange(1 << n_heads)
    classes = torch.arange(n_classes)

    def candidates(current: Tensor, j: int, keep_current: bool) -> Tensor:
        """(K, C, J): [current,] OWN at block j, then every pattern at block j; the rest as current."""
        options = torch.cat([torch.tensor([OWN]), patterns])
        configs = current.expand(len(options), -1, -1).clone()
        configs[:, :, j] = options[:, None]
        return torch.cat([current[None], configs]) if keep_current else configs

    own = torch.full((n_classes, n_blocks), OWN, dtype=torch.long)
    base_accuracy, base_gflops = (t[0] for t in evaluate(own[None]))

    # 1. single-block ceilings, every other block own
    single = torch.full((n_blocks, n_classes), OWN, dtype=torch.long)
    single_accuracy = torch.empty(n_blocks, n_classes, dtype=torch.float64)
    single_gflops = torch.empty(n_blocks, n_classes, dtype=torch.float64)
    for j in progress(range(n_blocks), desc="ceiling: single blocks", unit="block"):
        configs = candidates(own, j, keep_current=False)
        accuracy, gflops = evaluate(configs)
        pick = choose(accuracy, gflops, base_accuracy, tolerance)
        single[j] = configs[pick, classes, j]
        single_accuracy[j], single_gflops[j] = accuracy[pick, classes], gflops[pick, classes]

    # 2. start from the best of the own gates and the single-block ceilings
    best = choose(torch.cat([base_accuracy[None], single_accuracy]), torch.cat([base_gflops[None], single_gflops]),
                  base_accuracy, tolerance)
    current = own.clone()
    for c, k in enumerate(best.tolist()):
        if k > 0:
            current[c, k - 1] = single[k - 1, c]

    # 3. one greedy pass from the last searched block to the first
    for j in progress(reversed(range(n_blocks)), desc="ceiling: blocks greedy", unit="block", total=n_blocks):
        configs = candidates(current, j, keep_current=True)
        accuracy, gflops = evaluate(configs)
        current = configs[choose(accuracy, gflops, base_accuracy, tolerance), classes]
    return current, single


def search_blocks(model: GatedViT, select: BlockSplit, test: BlockSplit, blocks: list[int], n_classes: int,
                  tolerance: float, batch_size: int = 64) -> BlocksCeiling:
    """The search of the module docstring on `select`, reported on `test` (both entering the
    same block, at or before the first of `blocks`)."""
    blocks = sorted(blocks)
    if not blocks or min(blocks) < max(select.start, model.keep_layers) or max(blocks) >= model.depth:
        raise ValueError(f"blocks {blocks}: gated blocks at or after the split's start {select.start}")
    labels = select.labels.cpu()
    evaluations, pairs = 0, 0

    def evaluate(configs: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal evaluations, pairs
        out = evaluate_configs(model, select, blocks, _class_codes(configs, labels), batch_size)
        evaluations, pairs = evaluations + len(configs), pairs + out.pairs
        return class_means(out.correct, labels, n_classes), class_means(out.gflops, labels, n_classes)

    codes, single = greedy_configs(evaluate, n_classes, len(blocks), model.num_heads, tolerance)
    # the report: own gates, each single-block ceiling, the multi-block ceiling, on both splits
    report = _report_configs(codes, single)
    outcome = {name: evaluate_configs(model, split, blocks, _class_codes(report, split.labels.cpu()), batch_size)
               for name, split in (("select", select), ("test", test))}
    return BlocksCeiling(blocks, codes, single, outcome["select"], outcome["test"], evaluations, pairs)


def _report_configs(codes: Tensor, single: Tensor) -> Tensor:
    """(J + 2, C, J): the own gates, each block's single-block ceiling, the multi-block ceiling."""
    n_blocks, n_classes = single.shape
    configs = torch.full((n_blocks + 2, n_classes, n_blocks), OWN, dtype=torch.long)
    for j in range(n_blocks):
        configs[1 + j, :, j] = single[j]
    configs[-1] = codes
    return configs


# ------------------------------------------------------------------------------ reporting
def class_rows(found: BlocksCeiling, split: BlockSplit, outcome: Outcome, class_names: list[str], n_heads: int,
               gated: list[int]) -> list[dict]:
    """One row per (configuration row, class) on a split: n, accuracy, GFLOPs, usage per gated
    block, and the configuration's kept heads per searched block (None: the block's own gates)."""
    labels = split.labels.cpu()
    accuracy = class_means(outcome.correct, labels, len(class_names))
    gflops = class_means(outcome.gflops, labels, len(class_names))
    usage = class_means(outcome.usage.transpose(1, 2), labels, len(class_names))  # (V, G, C)
    counts = torch.bincount(labels, minlength=len(class_names))
    configs = _report_configs(found.codes, found.single)
    rows = []
    for r, name in enumerate(found.rows):
        for c, cls in enumerate(class_names):
            heads = {f"heads_b{b}": None if int(configs[r][c, j]) == OWN else
                     pattern_bits(configs[r][c, j], n_heads).nonzero().flatten().tolist() for j, b in enumerate(found.blocks)}
            rows.append({"configuration": name, "class_id": c, "class": cls, "n": int(counts[c]),
                         "accuracy": float(accuracy[r, c]), "gflops": float(gflops[r, c]),
                         **{f"usage_b{b}": float(usage[r, g, c]) for g, b in enumerate(gated)}, **heads})
    return rows


def policy_effects(outcome: Outcome, labels: Tensor, n_classes: int, row: int, resamples: int, confidence: float,
                   seed: int) -> dict[str, PolicyResult]:
    """Row `row` of a split's outcome against the model's own gates (row 0), per class and
    the mean over classes with bootstrap intervals (as the single-block ceiling's summary):
    `usage` is the mean usage over the gated blocks, `gflops` GFLOPs per image."""
    labels = labels.cpu()
    choice = torch.ones(len(labels), dtype=torch.long)
    correct = torch.stack([outcome.correct[0], outcome.correct[row]])
    out = {}
    for name, values in (("usage", outcome.usage.mean(-1)), ("gflops", outcome.gflops)):
        out[name] = evaluate_policy(correct, torch.stack([values[0], values[row]]), choice, labels, n_classes, [0.0, 1.0],
                                    resamples, confidence, seed)
    return out


def summarise_rows(found: BlocksCeiling, split: BlockSplit, outcome: Outcome, n_classes: int, gated: list[int],
                   resamples: int, confidence: float, seed: int) -> dict[str, BlocksRow]:
    """Every configuration row (`found.rows`) of a split's outcome against the own gates (row
    0), means over classes with intervals (`policy_effects`)."""
    labels = split.labels.cpu()
    usage = class_means(outcome.usage.transpose(1, 2), labels, n_classes)  # (V, G, C)
    present = ~torch.isnan(usage[0, 0]) if gated else torch.zeros(n_classes, dtype=torch.bool)
    out = {}
    for r, name in enumerate(found.rows):
        effects = policy_effects(outcome, labels, n_classes, r, resamples, confidence, seed)
        flops, mean_usage = effects["gflops"], effects["usage"]
        own_gflops = float(flops.base_usage[present].mean())
        counts = PolicyEffect.fields_of(flops)
        out[name] = BlocksRow(
            accuracy=float(flops.accuracy[present].mean()), gflops=float(flops.usage[present].mean()),
            usage={f"b{g}": float(usage[r, i, present].mean()) for i, g in enumerate(gated)},
            mean_accuracy_change=flops.mean_accuracy_change,
            mean_accuracy_change_ci=[finite(v) for v in flops.mean_accuracy_change_ci],
            mean_gflops_change=flops.mean_usage_change,
            mean_gflops_change_ci=[finite(v) for v in flops.mean_usage_change_ci],
            mean_gflops_relative_change=flops.mean_usage_change / own_gflops,
            mean_usage_change=mean_usage.mean_usage_change,
            mean_usage_change_ci=[finite(v) for v in mean_usage.mean_usage_change_ci],
            usage_change={f"b{g}": float((usage[r, i, present] - usage[0, i, present]).mean()) for i, g in enumerate(gated)},
            classes_with_reduction=int(counts["classes_with_reduction"]),
            classes_with_reduction_ci_below_zero=int(counts["classes_with_reduction_ci_below_zero"]),
        )
    return out
