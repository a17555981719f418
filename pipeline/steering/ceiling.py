"""The ceiling of class-specific final-block pruning (docs/METHOD.md, section 6).

For class c and a fixed final-block gate pattern g in {0,1}^H: acc_c(g), and usage(g) = mean(g),
on the class's images, the earlier blocks gating as the model does. The class's ceiling is the
steering headline rule applied to patterns instead of alphas: on the selection split, among the
model's own gates and every pattern with acc_c(g) >= unsteered acc_c - tolerance, the one of
least usage (ties: higher selection accuracy, then the model's own gates, then the lower pattern
code), reported on the test split. Steering the decision network's input can only choose
gates, so no class-constant steering beats what this rule finds among all patterns.

Patterns run through the final block's CLS row only (`pipeline.model.cls_row`), so each image's
per-head terms are computed once and a pattern costs one small product plus the MLP on a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.model.cls_row import HeadTerms, all_patterns, head_terms, pattern_codes, pattern_logits
from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT
from pipeline.progress import progress
from pipeline.steering.headline import PolicyEffect, evaluate_policy
from pipeline.storage import (
    metadata_dict,
    open_parquet,
    read_dataclass,
    read_table,
    with_metadata,
    write_dataclass,
    write_parquet,
)

OWN = -1
"""The pattern code that stands for the model's own (per-image) gates."""
OMIT = {"omit_none": True}


# ------------------------------------------------------------------------ per-image terms
@dataclass(frozen=True)
class SplitTerms:
    """One split's images as the ceiling needs them: labels, the final block's per-head CLS
    terms, and the model's own final-block gates and outcome."""

    labels: Tensor
    """(N,) int64"""
    terms: HeadTerms
    own_gates: Tensor
    """(N, H) the model's own eval gates of the final block."""
    own_predictions: Tensor
    """(N,) the prediction with the model's own gates, through the same CLS-row path as the patterns."""

    @property
    def own_correct(self) -> Tensor:
        return self.own_predictions == self.labels

    def rows(self, index: Tensor) -> HeadTerms:
        return HeadTerms(self.terms.x0[index], self.terms.terms[index], self.terms.bias)


@torch.no_grad()
def split_terms(model: GatedViT, config: ModelConfig, images: Tensor, labels: Tensor, batch_size: int,
                device: torch.device, desc: str = "ceiling") -> SplitTerms:
    """Run every image up to the final block once and keep its per-head CLS terms."""
    model.eval().to(device)
    x0, terms, gates, predictions = [], [], [], []
    bias = None
    for start in progress(range(0, len(images), batch_size), desc=desc, unit="batch"):
        tokens = model.forward_to_final(config.preprocess(images[start : start + batch_size].to(device)))
        t = head_terms(model, tokens)
        own = (model.final_gate_logits(t.x0) > 0).to(t.terms.dtype)
        logits = pattern_logits(model, t, own[:, None, :])[:, 0]
        x0.append(t.x0.cpu())
        terms.append(t.terms.cpu())
        gates.append(own.cpu())
        predictions.append(logits.argmax(-1).cpu())
        bias = t.bias.cpu()
    if bias is None:
        raise PipelineError("no images to search patterns on")
    return SplitTerms(labels, HeadTerms(torch.cat(x0), torch.cat(terms), bias), torch.cat(gates), torch.cat(predictions))


@torch.no_grad()
def correct_under(model: GatedViT, terms: HeadTerms, labels: Tensor, patterns: Tensor, chunk: int = 512) -> Tensor:
    """(n, P) bool: is each image right when the final block runs with each fixed pattern."""
    out = []
    for start in range(0, len(labels), chunk):
        sl = slice(start, start + chunk)
        rows = HeadTerms(terms.x0[sl], terms.terms[sl], terms.bias)
        out.append(pattern_logits(model, rows, patterns).argmax(-1) == labels[sl, None])
    return torch.cat(out) if out else torch.zeros(0, len(patterns), dtype=torch.bool)


# ------------------------------------------------------------------------------- search
def greedy_patterns(model: GatedViT, terms: HeadTerms, labels: Tensor, base_accuracy: float, tolerance: float) -> Tensor:
    """Backward elimination on one class's selection images: from all heads kept, drop the head
    whose removal keeps the accuracy highest (ties: the lower head) while it stays at least
    `base_accuracy - tolerance`; stop when no head can go. Returns every pattern tried, (P, H)."""
    n_heads = terms.terms.shape[1]
    current = torch.ones(n_heads)
    tried = [current.clone()]
    while current.sum() > 0:
        candidates = torch.stack([current * (torch.arange(n_heads) != h) for h in range(n_heads) if current[h] > 0])
        tried += list(candidates)
        accuracy = correct_under(model, terms, labels, candidates).double().mean(0)
        ok = (accuracy >= base_accuracy - tolerance - 1e-12).nonzero().flatten()
        if not len(ok):
            break
        current = candidates[ok[accuracy[ok].argmax()]]  # argmax: the first, i.e. the lowest head, on ties
    return torch.unique(torch.stack(tried), dim=0)


def resolve_search(search: str, n_heads: int, max_exhaustive_heads: int) -> str:
    if search == "auto":
        return "exhaustive" if n_heads <= max_exhaustive_heads else "greedy"
    if search == "exhaustive" and n_heads > 16:
        raise PipelineError(f"ceiling.search 'exhaustive' over {n_heads} heads is 2^{n_heads} patterns: use 'greedy'")
    return search


# ------------------------------------------------------------------------- the rule
@dataclass
class CeilingClass:
    """One class's ceiling: the pattern chosen on the selection split, its test-split outcome."""

    class_id: int
    name: str
    pattern: int
    """The chosen pattern's code (bit h = head h kept), or OWN (-1): no pattern beat the model's gates."""
    heads: list[int]
    """The chosen pattern's kept heads (empty for OWN)."""
    selection_accuracy: float
    baseline_accuracy: float
    """Test split, the model's own gates."""
    baseline_usage: float
    accuracy: float
    """Test split, the chosen pattern."""
    usage: float
    accuracy_change_ci: tuple[float, float] | None = None
    usage_change_ci: tuple[float, float] | None = None

    @property
    def usage_change(self) -> float:
        return self.usage - self.baseline_usage


def choose_pattern(accuracy: Tensor, usage: Tensor, codes: Tensor, base_accuracy: float, base_usage: float,
                   tolerance: float) -> tuple[int, int]:
    """The rule on one class's selection split: (P,) accuracies, usages and codes of the fixed
    patterns -> (index into them or -1 for the model's own gates, the chosen code or OWN)."""
    best = (base_usage, -base_accuracy, 0, OWN)
    for p in range(len(codes)):
        if accuracy[p] >= base_accuracy - tolerance - 1e-12:
            best = min(best, (float(usage[p]), -float(accuracy[p]), 1, int(codes[p])))
    code = best[3]
    return (-1 if code == OWN else int((codes == code).nonzero()[0, 0])), code


# ----------------------------------------------------------------------------- artifacts
@dataclass
class FrontierPoint:
    pattern: int
    usage: float
    selection_accuracy: float
    test_accuracy: float


@dataclass
class CeilingSummary(PolicyEffect):
    """The ceiling over classes (equal weights), changes against the model's own gates on test."""

    selected_on: str
    heads: dict[str, list[str]]
    """Class name -> the chosen pattern's kept heads (printed names); absent classes keep own gates."""


@dataclass
class CeilingSettings:
    search: str
    patterns_per_class: int
    """The most patterns evaluated for one class (2^H when exhaustive)."""
    accuracy_tolerance: float
    select_on: str
    bootstrap: int
    confidence: float
    images: dict[str, int]
    stored_predictions_agree: dict[str, float]
    """Per split, the share of images whose CLS-row prediction with the model's own gates equals
    the full model's stored in the embeddings (1.0 up to float ties)."""


@dataclass
class BlocksRow:
    """One configuration row of the ceiling across blocks on test: means over classes (equal
    weights) and changes against the model's own gates, intervals by bootstrapping the test
    images within each class (as the summary's)."""

    accuracy: float
    gflops: float
    """GFLOPs per image (`pipeline.model.flops`)."""
    usage: dict[str, float]
    """Gated block ("b<g>") -> its head usage."""
    mean_accuracy_change: float
    mean_accuracy_change_ci: list[float | None]
    mean_gflops_change: float
    mean_gflops_change_ci: list[float | None]
    mean_gflops_relative_change: float
    """mean_gflops_change over the own gates' mean GFLOPs (-0.1: a tenth fewer)."""
    mean_usage_change: float
    """Of the mean usage over the gated blocks."""
    mean_usage_change_ci: list[float | None]
    usage_change: dict[str, float]
    """Gated block ("b<g>") -> the mean over classes of its usage change."""
    classes_with_reduction: int
    """Classes with fewer GFLOPs per image."""
    classes_with_reduction_ci_below_zero: int


@dataclass
class BlocksCeilingDetails:
    """The ceiling across blocks (`pipeline.steering.ceiling_blocks`; only when `steer.blocks`
    is not the final block alone): data/ceiling/blocks.parquet has it per class."""

    blocks: list[int]
    """The searched blocks."""
    gated_blocks: list[int]
    select_on: str
    evaluations: int
    """Candidate evaluations on the selection split (each over every selection image)."""
    block_runs: int
    """(stream, pattern) block runs of the search on the selection split: its work."""
    rows: dict[str, BlocksRow]
    """`own`, `block <b>` (each searched block's single-block ceiling), `blocks` (the search's result)."""


@dataclass
class CeilingDetails:
    summary: CeilingSummary
    settings: CeilingSettings
    baseline: dict[str, dict[str, float]]
    """Per split: accuracy and final-block usage with the model's own gates."""
    frontier: dict[str, list[FrontierPoint]] = field(default_factory=dict)
    """Per class, the selection split's accuracy-usage Pareto frontier of the fixed patterns."""
    blocks: BlocksCeilingDetails | None = field(default=None, metadata=OMIT)
    """The ceiling across blocks (absent when `steer.blocks` is the final block alone)."""

    def metrics(self) -> dict[str, float]:
        """metrics/ceiling.json: `ceiling_drop` (the final block's); across blocks also the
        GFLOPs saved as a fraction of the own gates' and the accuracy change (short names for
        `dvc exp show`)."""
        out = {"ceiling_drop": 0.0 - self.summary.mean_usage_change}
        if self.blocks is not None:
            row = self.blocks.rows["blocks"]
            out |= {"blocks_gflops_drop": 0.0 - row.mean_gflops_relative_change, "blocks_acc_change": row.mean_accuracy_change}
        return out


def pareto(usage: Tensor, accuracy: Tensor) -> list[int]:
    """Indices of the points no other point beats (usage <= and accuracy >=, one strictly),
    by increasing usage."""
    order = sorted(range(len(usage)), key=lambda i: (float(usage[i]), -float(accuracy[i])))
    front, best = [], -1.0
    for i in order:
        if float(accuracy[i]) > best:
            front.append(i)
            best = float(accuracy[i])
    return front


def finite(value: float) -> float | None:
    """A float for JSON, which has no NaN: an interval without resamples is None."""
    return value if math.isfinite(value) else None


def summarise(found: Search, test: SplitTerms, n_classes: int, selected_on: str, head_names: list[str],
              resamples: int, confidence: float, seed: int) -> CeilingSummary:
    """Intervals by bootstrapping the test images within each class (as steer's headline)."""
    # per image: row 0 the model's own gates, row 1 its class's chosen pattern
    correct = torch.stack([test.own_correct, found.test_correct]).double()
    usage = torch.stack([test.own_gates.mean(1), found.test_usage]).double()
    result = evaluate_policy(correct, usage, torch.ones(len(test.labels), dtype=torch.long), test.labels, n_classes,
                             [0.0, 1.0], resamples, confidence, seed)
    if resamples:
        for c in found.classes:
            c.accuracy_change_ci = (float(result.accuracy_change_ci[0][c.class_id]), float(result.accuracy_change_ci[1][c.class_id]))
            c.usage_change_ci = (float(result.usage_change_ci[0][c.class_id]), float(result.usage_change_ci[1][c.class_id]))
    fields = CeilingSummary.fields_of(result)
    for key in ("mean_usage_change_ci", "mean_accuracy_change_ci"):  # no resamples: no interval (JSON has no NaN)
        fields[key] = [finite(v) for v in fields[key]]
    return CeilingSummary(
        **fields, selected_on=selected_on,
        heads={c.name: [head_names[h] for h in c.heads] for c in found.classes if c.pattern != OWN},
    )


@dataclass
class Search:
    """What the search found: per class its ceiling and frontier, and every pattern's outcome."""

    classes: list[CeilingClass]
    frontier: dict[str, list[FrontierPoint]]
    rows: list[dict]
    """data/ceiling/patterns.parquet: one row per (split, class, pattern)."""
    patterns_per_class: int
    test_correct: Tensor
    """(N,) bool per test image: right under its class's chosen pattern (own gates where none was chosen)."""
    test_usage: Tensor
    """(N,) per test image: the final-block usage of that choice."""


def search_ceiling(model: GatedViT, select: SplitTerms, test: SplitTerms, select_on: str, class_names: list[str],
                   tolerance: float, search: str) -> Search:
    """Per class: the candidate patterns (all, or the greedy path on the selection images), the
    rule on the selection split, the outcome on test."""
    n_heads = select.own_gates.shape[1]
    exhaustive = all_patterns(n_heads) if search == "exhaustive" else None
    classes, frontier, rows, most = [], {}, [], 0
    test_correct, test_usage = test.own_correct.clone(), test.own_gates.mean(1)
    for class_id, name in enumerate(progress(class_names, desc="ceiling", unit="class")):
        sel_rows = (select.labels == class_id).nonzero().flatten()
        test_rows = (test.labels == class_id).nonzero().flatten()
        if not len(sel_rows) or not len(test_rows):
            continue  # no images to choose on or to report on: the class keeps its own gates
        base_acc = float(select.own_correct[sel_rows].double().mean())
        base_usage = float(select.own_gates[sel_rows].mean())
        sel_terms, sel_labels = select.rows(sel_rows), select.labels[sel_rows]
        patterns = exhaustive if exhaustive is not None else greedy_patterns(model, sel_terms, sel_labels, base_acc, tolerance)
        codes, usage = pattern_codes(patterns), patterns.mean(1).double()
        sel_acc = correct_under(model, sel_terms, sel_labels, patterns).double().mean(0)
        test_ok = correct_under(model, test.rows(test_rows), test.labels[test_rows], patterns)
        test_acc = test_ok.double().mean(0)
        index, code = choose_pattern(sel_acc, usage, codes, base_acc, base_usage, tolerance)
        if index >= 0:
            test_correct[test_rows], test_usage[test_rows] = test_ok[:, index], float(usage[index])
        own_test_acc = float(test.own_correct[test_rows].double().mean())
        own_test_usage = float(test.own_gates[test_rows].mean())
        classes.append(CeilingClass(
            class_id=class_id, name=name, pattern=code,
            heads=[] if index < 0 else patterns[index].nonzero().flatten().tolist(),
            selection_accuracy=base_acc if index < 0 else float(sel_acc[index]),
            baseline_accuracy=own_test_acc, baseline_usage=own_test_usage,
            accuracy=own_test_acc if index < 0 else float(test_acc[index]),
            usage=own_test_usage if index < 0 else float(usage[index]),
        ))
        frontier[name] = [FrontierPoint(int(codes[i]), float(usage[i]), float(sel_acc[i]), float(test_acc[i]))
                          for i in pareto(usage, sel_acc)]
        outcomes = {select_on: (len(sel_rows), sel_acc), "test": (len(test_rows), test_acc)}  # one entry when select_on is test
        for split, (n, accuracy) in outcomes.items():
            rows += [{"split": split, "class_id": class_id, "class": name, "pattern": int(c), "heads_kept": int(k),
                      "usage": float(u), "n": n, "accuracy": float(a)}
                     for c, k, u, a in zip(codes.tolist(), patterns.sum(1).tolist(), usage.tolist(), accuracy.tolist())]
        most = max(most, len(patterns))
    return Search(classes, frontier, rows, most, test_correct, test_usage)


PATTERNS_SCHEMA = pa.schema([
    ("split", pa.string()), ("class_id", pa.int32()), ("class", pa.string()), ("pattern", pa.int64()),
    ("heads_kept", pa.int32()), ("usage", pa.float64()), ("n", pa.int32()), ("accuracy", pa.float64()),
])


def write_patterns(path: Path | str, rows: list[dict]) -> None:
    write_parquet(path, pa.Table.from_pylist(rows, schema=PATTERNS_SCHEMA))


def read_patterns(path: Path | str) -> list[dict]:
    table, _ = read_table(path, {name: PATTERNS_SCHEMA.field(name).type for name in PATTERNS_SCHEMA.names})
    return table.to_pylist()


CLASSES_SCHEMA = pa.schema([
    ("class_id", pa.int32()), ("class", pa.string()), ("pattern", pa.int64()), ("heads", pa.list_(pa.int32())),
    ("selection_accuracy", pa.float64()), ("baseline_accuracy", pa.float64()), ("baseline_usage", pa.float64()),
    ("accuracy", pa.float64()), ("usage", pa.float64()),
    ("accuracy_change_ci", pa.list_(pa.float64(), 2)), ("usage_change_ci", pa.list_(pa.float64(), 2)),
])


def write_classes(path: Path | str, classes: list[CeilingClass]) -> None:
    rows = [{"class_id": c.class_id, "class": c.name, "pattern": c.pattern, "heads": c.heads,
             "selection_accuracy": c.selection_accuracy, "baseline_accuracy": c.baseline_accuracy,
             "baseline_usage": c.baseline_usage, "accuracy": c.accuracy, "usage": c.usage,
             "accuracy_change_ci": c.accuracy_change_ci, "usage_change_ci": c.usage_change_ci} for c in classes]
    write_parquet(path, pa.Table.from_pylist(rows, schema=CLASSES_SCHEMA))


def read_classes(path: Path | str) -> list[CeilingClass]:
    table, _ = read_table(path, {name: CLASSES_SCHEMA.field(name).type for name in CLASSES_SCHEMA.names})
    pair = lambda v: None if v is None else (float(v[0]), float(v[1]))  # noqa: E731
    return [CeilingClass(class_id=r["class_id"], name=r["class"], pattern=r["pattern"], heads=list(r["heads"]),
                         selection_accuracy=r["selection_accuracy"], baseline_accuracy=r["baseline_accuracy"],
                         baseline_usage=r["baseline_usage"], accuracy=r["accuracy"], usage=r["usage"],
                         accuracy_change_ci=pair(r["accuracy_change_ci"]), usage_change_ci=pair(r["usage_change_ci"]))
            for r in table.to_pylist()]


BLOCKS_SCHEMA = pa.schema([
    ("split", pa.string()), ("configuration", pa.string()), ("class_id", pa.int32()), ("class", pa.string()),
    ("n", pa.int32()), ("accuracy", pa.float64()), ("gflops", pa.float64()),
])
"""blocks.parquet's fixed columns; then usage_b<g> (float64) per gated block and heads_b<b>
(list of int32, null: the block's own gates) per searched block, named in the metadata."""


def blocks_schema(blocks: list[int], gated: list[int]) -> pa.Schema:
    fields = [*BLOCKS_SCHEMA, *(pa.field(f"usage_b{g}", pa.float64()) for g in gated),
              *(pa.field(f"heads_b{b}", pa.list_(pa.int32())) for b in blocks)]
    return with_metadata(pa.schema(fields), {"blocks": blocks, "gated_blocks": gated})


def write_block_classes(path: Path | str, rows: list[dict], blocks: list[int], gated: list[int]) -> None:
    """data/ceiling/blocks.parquet: one row per (split, configuration, class)
    (`ceiling_blocks.class_rows` with a `split` column)."""
    write_parquet(path, pa.Table.from_pylist(rows, schema=blocks_schema(blocks, gated)))


def read_block_classes(path: Path | str) -> tuple[list[dict], list[int], list[int]]:
    """blocks.parquet's rows, its searched blocks and its gated blocks, columns checked."""
    meta = metadata_dict(open_parquet(path, {}).schema_arrow)
    try:
        blocks, gated = [int(b) for b in meta["blocks"]], [int(g) for g in meta["gated_blocks"]]
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{path}: no blocks in its metadata; rerun `ceiling`") from None
    schema = blocks_schema(blocks, gated)
    table, _ = read_table(path, {name: schema.field(name).type for name in schema.names})
    return table.to_pylist(), blocks, gated


def write_details(path: Path | str, details: CeilingDetails) -> None:
    write_dataclass(path, details)


def read_details(path: Path | str) -> CeilingDetails:
    return read_dataclass(CeilingDetails, path, rerun="ceiling")
