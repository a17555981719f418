"""metrics/report.md: the page a person opens first after `dvc repro`.

`render_report` joins one function per section of the page; each reads what it needs from
`ReportInputs`, the typed outputs of the earlier stages (steering details and headline, the
interpretation) plus the other stages' details files and the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.interpret.cards import ClassCard, GlobalSetShift, ShiftAgreement
from pipeline.interpret.latents import SHIFT_SETS
from pipeline.interpret.records import StatsRecord
from pipeline.model.config import ModelConfig
from pipeline.model.record import TrainingRecord
from pipeline.params.file import Params
from pipeline.report.blocks import BlockUsage, render_blocks, render_compute
from pipeline.steering.ceiling import CeilingClass, CeilingDetails
from pipeline.steering.costs import LatencyDetails
from pipeline.steering.headline import ClassHeadline, PolicyEffect
from pipeline.steering.results import Curve, NullPoint, SteerDetails
from pipeline.steering.strategies import (
    CLASS_DIRECTION,
    GATE_DIRECTION,
    GLOBAL,
    PER_CLASS,
    RANDOM_DIRECTION,
    STRATEGIES,
)

# What the paper reports (Lee and Har, AAAI 2026 student abstract; ViT-S/16, CIFAR-100).
PAPER_CLASSES = {
    "bowl": {"accuracy": (0.76, 0.82), "usage": (0.72, 0.33), "heads": "h2, h5"},
    "pine_tree": {"accuracy": (0.79, 0.84), "usage": (0.93, 0.35), "heads": "h2, h3"},
}
PAPER_OVERLAP = 0.1641
PAPER_SAE_MSE = 0.0228


@dataclass(frozen=True)
class Explanation:
    """What the report shows of `interpret` joined with the sweep."""

    shift_vs_keep: dict[str, ShiftAgreement]
    """Per strategy (and `all`): predicted gate-logit shift against measured keep-rate change."""
    global_set: GlobalSetShift | None
    cards: list[ClassCard]
    purity: dict[str, Any]
    """metrics/details/interpret.json."""
    keep_error: bool


@dataclass(frozen=True)
class Ceiling:
    """The `ceiling` stage's outputs as the report reads them."""

    details: CeilingDetails
    classes: list[CeilingClass]


@dataclass(frozen=True)
class ReportInputs:
    params: Params
    config: ModelConfig
    finetune: TrainingRecord
    sae: dict[str, Any]
    """metrics/details/sae.json."""
    stats: StatsRecord
    steer: SteerDetails
    headline: list[ClassHeadline]
    head_names: list[str]
    explained: Explanation | None = None
    ceiling: Ceiling | None = None
    blocks: BlockUsage | None = None
    """Usage per gated block (`pipeline.report.blocks`); its section shows for a multi-block sweep."""
    latency: LatencyDetails | None = None
    """Stage `latency`'s record; its section shows when timed or for a multi-block sweep."""

    def curves(self) -> dict[str, Curve]:
        """The strategies' curves in `steer.strategies` order (the details file sorts its keys)."""
        order = [s for s in self.params.steer.strategies if s in self.steer.strategies]
        return {s: self.steer.strategies[s] for s in order + sorted(set(self.steer.strategies) - set(order))}

    def global_null(self) -> list[tuple[float, NullPoint]]:
        """The global set's null comparison by ascending alpha."""
        return sorted(((float(a), g) for a, g in (self.steer.global_null or {}).items()), key=lambda item: item[0])


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _heads(heads: list[int], names: list[str]) -> str:
    return ", ".join(names[h] for h in heads) or "none"


def _row(c: ClassHeadline, names: list[str]) -> str:
    beyond = {-1: "below", 0: "no", 1: "above"}[c.beyond_null] if c.null_usage_change else "-"
    return (
        f"| {c.name} | {_pct(c.baseline_accuracy)} / {c.baseline_usage:.2f} ({_heads(c.baseline_heads, names)}) "
        f"| {_pct(c.accuracy)} / {c.usage:.2f} ({_heads(c.heads, names)}) | {c.alpha:+g} "
        f"| {c.usage - c.baseline_usage:+.3f}{_ci(c.usage_change_ci)} | {beyond} |"
    )


_SIDE = {-1: "below: fewer heads than random sets", 0: "no", 1: "above: more heads than random sets"}


def _ci_pct(bounds: list[float] | tuple[float, float] | None, sign: bool = False) -> str:
    if bounds is None:
        return ""
    fmt = "+.1f" if sign else ".1f"
    return f" [{100 * bounds[0]:{fmt}}, {100 * bounds[1]:{fmt}}]"


def _ci(bounds: list[float] | tuple[float, float] | None) -> str:
    return "" if bounds is None else f" [{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def _compute_line(finetune: TrainingRecord, steer: SteerDetails) -> list[str]:
    if finetune.gflops is None:
        return []
    final_attention = steer.flops.final_block_attention_gflops_dense
    share = f"; the final block's attention is {100 * final_attention / finetune.gflops_dense:.1f}% of the dense model" if final_attention else ""
    return [f"- Compute, matmul FLOPs per test image from the gates (`pipeline.model.flops`): {finetune.gflops:.4g} GFLOPs, "
            f"{100 * finetune.gflops_fraction:.0f}% of the dense model's {finetune.gflops_dense:.4g}{share}. "
            + _path_note(steer.settings.head_path)]


def _path_note(head_path: str | None) -> str:
    if head_path == "skipping":
        return ("(The sweep ran on the head-skipping path, `steer.heads`: dropped heads were not computed, so these are the "
                "FLOPs spent.)")
    return "(The sweep ran on the masked path, which computes every head: these are what the head-skipping path spends.)"


def _headline_method(steer: SteerDetails, sp: Any) -> list[str]:
    settings = steer.settings
    images = settings.images
    chosen = ("on the validation split" if settings.select_on == "val" else
              "on the test split itself (`steer.select_on: test`: the selection inflates the reported change)")
    blocks = settings.gated_blocks
    usage = ("final-block head usage" if blocks is None else
             f"head usage (the mean over gated blocks {', '.join(f'b{b}' for b in blocks)}: steering moved "
             f"{', '.join(f'b{b}' for b in settings.blocks)}, `steer.blocks`)")
    lines = [
        f"Rule: per class, the alpha with the lowest {usage} whose accuracy is at least the",
        f"unsteered accuracy minus {sp.accuracy_tolerance} (`steer.accuracy_tolerance`), chosen {chosen}",
        f"({images.get(settings.select_on, 0)} images) and reported on the test split ({images['test']} images).",
        "The per-class strategy uses the true class's latent set (an oracle analysis, as in the paper).",
        "Kept heads: those kept by a majority of the class's test images.",
    ]
    if settings.bootstrap:
        lines.append(f"Brackets: {100 * settings.confidence:.0f}% bootstrap intervals ({settings.bootstrap} resamples of the "
                     "test images within each class).")
    return lines


def _headline(steer: SteerDetails, headline: list[ClassHeadline], head_names: list[str], top: int) -> list[str]:
    summary = steer.per_class_headline
    tolerance = steer.settings.accuracy_tolerance
    n = len(headline)
    acc_ci, usage_ci = summary.mean_accuracy_change_ci, summary.mean_usage_change_ci
    has_ci = acc_ci[0] is not None and acc_ci[0] == acc_ci[0]  # not NaN
    lines = [
        "| policy | mean usage change | mean accuracy change (points) | classes using fewer heads |",
        "|---|---|---|---|",
        f"| class set of the true class (oracle) | {summary.mean_usage_change:+.3f}{_ci(usage_ci) if has_ci else ''} | "
        f"{100 * summary.mean_accuracy_change:+.1f}{_ci_pct(acc_ci, sign=True) if has_ci else ''} | "
        f"{summary.classes_with_reduction} of {n} |",
    ]
    predicted = steer.predicted_class_policy
    if predicted:
        lines.append(
            f"| class set of the predicted class (deployable) | {predicted.mean_usage_change:+.3f}"
            f"{_ci(predicted.mean_usage_change_ci) if has_ci else ''} | {100 * predicted.mean_accuracy_change:+.1f}"
            f"{_ci_pct(predicted.mean_accuracy_change_ci, sign=True) if has_ci else ''} | {predicted.classes_with_reduction} of {n} |"
        )
    lines.append("")
    if has_ci:
        costs = acc_ci[0] < -tolerance
        lines.append(
            f"Oracle: usage changes by {summary.mean_usage_change:+.3f} ({100 * steer.settings.confidence:.0f}% interval "
            f"{usage_ci[0]:+.3f} to {usage_ci[1]:+.3f}); "
            + (f"the accuracy change's interval reaches {100 * acc_ci[0]:+.1f} points, below the tolerance of "
               f"{0.0 - 100 * tolerance:+.1f}: this run cannot claim the reduction comes at no accuracy cost."
               if costs else f"the accuracy change's interval stays at or above {0.0 - 100 * tolerance:+.1f} points: no accuracy cost "
               "at this confidence.")
            + f" {summary.classes_with_reduction_ci_below_zero} of {n} classes have a usage-change interval entirely below zero."
        )
    unsteered = steer.flops.gflops_unsteered
    lines.append(f"In compute: {summary.mean_gflops_change:+.4g} GFLOPs per image, {100 * summary.mean_gflops_change / unsteered:+.1f}% "
                 f"of the unsteered model's {unsteered:.4g} "
                 + ("(only the final block's attention changes)." if steer.settings.blocks is None else
                    "(the attention of every gated block; per block: section Across blocks)."))
    if predicted:
        lines.append("The deployable policy chooses the latent set and alpha by the unsteered prediction (alphas chosen per "
                     "predicted class on the selection split): what the label is worth is the gap between the two rows.")
    null = summary.null
    if null:
        expected = (1 - steer.settings.confidence) / 2 * null.classes
        lines.append(
            f"Against {steer.settings.null_draws} random sets of each class set's size (`random_per_class`, same alpha): "
            f"{null.classes_below} of {null.classes} classes lose more heads than the null's central interval allows and "
            f"{null.classes_above} keep more (with no class-specific effect, about {expected:.1f} each way by chance)."
        )
    counts = summary.alpha_counts
    lines += [
        f"Selected alphas: {counts.negative} negative, {counts.zero} zero, {counts.positive} positive.",
        "",
        "| class | baseline acc / usage (heads) | steered acc / usage (heads) | alpha | usage change | beyond null |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_row(c, head_names) for c in featured(headline, top)]
    return lines


def featured(headline: list[ClassHeadline], top: int) -> list[ClassHeadline]:
    """The classes the report features: the `top` largest usage reductions, then the paper's."""
    ranked = sorted(headline, key=lambda c: (-c.usage_reduction, c.class_id))
    return ranked[:top] + [c for c in headline if c.name in PAPER_CLASSES and c not in ranked[:top]]


def render_report(inputs: ReportInputs) -> str:
    sections = (_title, _configuration, _model_and_sae, _headline_section, _across_blocks, _compute, _control, _strategies, _global_null,
                _interpretation, _beside_paper, _figures)
    return "\n".join(line for section in sections for line in section(inputs))


def _title(r: ReportInputs) -> list[str]:
    base, heads = r.params.steer.head_index_base, r.config.shape.num_heads
    return [
        "# Steering SAE latents to control dynamic head pruning: run report",
        "",
        "Reproduces Lee and Har, *Steering Sparse Autoencoder Latents to Control Dynamic Head Pruning in",
        "Vision Transformers* (AAAI 2026 student abstract) with this pipeline. All numbers below are",
        "computed by this run from its own artifacts (`metrics/*.json`, `data/steer/results.parquet`).",
        f"Heads are numbered from {base} (h{base} .. h{heads - 1 + base}).",
        "",
    ]


def _configuration(r: ReportInputs) -> list[str]:
    params, config, sp, shape = r.params, r.config, r.params.steer, r.config.shape
    drawn = [s for s in sp.strategies if STRATEGIES[s].uses_draws]
    draws = f" ({sp.null_draws} {'/'.join(drawn)} draws)" if drawn else ""
    return [
        "## Configuration",
        "",
        "| part | setting |",
        "|---|---|",
        f"| data | `{params.data.source}`, {len(config.class_names)} classes |",
        f"| model | `{config.timm_name}` img {shape.img_size}, patch {shape.patch_size}, width {shape.embed_dim}, "
        f"depth {shape.depth}, {shape.num_heads} heads, gated from block {config.keep_layers}; "
        f"{'pretrained' if params.model.pretrained else 'from checkpoint' if params.model.checkpoint else 'from scratch'} |",
        f"| fine-tuning | {params.finetune.epochs} epochs, head target {params.finetune.head_target}, weight {params.finetune.head_weight}, tau {params.finetune.tau} |",
        f"| SAE | {_sae_kind(r.sae)}, {r.sae.get('n_latents')} latents, {_sae_sparsity(r.sae)}, {params.sae.epochs} epochs |",
        f"| statistics | top-{params.stats.top_k} most frequent latents (train split) |",
        f"| steering | mode `{sp.mode}`, keep_error {sp.keep_error}, alphas {sorted(set(sp.alphas) | {0.0})}, "
        f"strategies {', '.join(sp.strategies)}{draws}, tolerance {sp.accuracy_tolerance} |",
        "",
    ]


SAE_KINDS = {"topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU", "matryoshka": "Matryoshka BatchTopK",
             "frozen_random": "frozen random TopK (never trained: the control)"}


def _sae_kind(sae: dict[str, Any]) -> str:
    architecture = sae.get("architecture", "topk")  # details written before architectures existed are TopK
    return SAE_KINDS.get(architecture, architecture)


def _sae_sparsity(sae: dict[str, Any]) -> str:
    if sae.get("k") is None:
        return "L0 set by its learned thresholds"
    return f"k = {sae['k']}" + (" on average over a batch" if sae.get("architecture") in ("batchtopk", "matryoshka") else "")


def _model_and_sae(r: ReportInputs) -> list[str]:
    finetune, sae, stats = r.finetune, r.sae, r.stats
    return [
        "## Model and SAE",
        "",
        f"- Test accuracy {_pct(finetune.test_accuracy)}; final-block head usage {finetune.head_usage:.3f}; "
        f"per block {', '.join(f'{u:.2f}' for u in finetune.head_usage_per_block)}.",
        f"- SAE on the test split: FVU {sae['test']['fvu']:.4f}, MSE {sae['test']['mse']:.4g}, L0 {sae['test']['l0']:.1f}, "
        f"dead fraction {sae['test']['dead_fraction']:.3f} (paper: MSE {PAPER_SAE_MSE}, definition not given).",
        *_compute_line(finetune, r.steer),
        f"- Latent overlap between the global top set and each class's (mean over classes): "
        f"|A ∩ B| / K = {stats.overlap_global_vs_class:.4f}, Jaccard = {stats.jaccard_global_vs_class:.4f} "
        f"(paper: {PAPER_OVERLAP}, formula not given). Alive latents: {stats.alive_latents}.",
        "",
    ]


def _headline_section(r: ReportInputs) -> list[str]:
    lines = ["## Per-class steering (headline)", "", *_headline_method(r.steer, r.params.steer), ""]
    if r.headline and r.steer.per_class_headline is not None:
        return lines + _headline(r.steer, r.headline, r.head_names, r.params.steer.top_classes)
    return lines + [f"({PER_CLASS} is not among `steer.strategies`: no headline.)"]


def _across_blocks(r: ReportInputs) -> list[str]:
    if r.blocks is None or r.steer.settings.blocks is None:
        return []
    across = r.ceiling.details.blocks if r.ceiling is not None else None
    rows = []
    if across is not None:
        names = {"blocks": f"ceiling: fixed patterns in {', '.join(f'b{b}' for b in across.blocks)}",
                 **{f"block {b}": f"ceiling: b{b} alone" for b in across.blocks}}
        rows = [(names[key], [row.usage[f"b{b}"] for b in r.blocks.gated], row.mean_gflops_change, row.mean_accuracy_change)
                for key, row in across.rows.items() if key in names]
    return ["", *render_blocks(r.blocks, rows)]


def _compute(r: ReportInputs) -> list[str]:
    if r.latency is None:
        return []
    timed = all(p.latency_ms for p in r.latency.policies.values())
    if not timed and r.steer.settings.blocks is None:
        return []
    return ["", *render_compute(r.latency)]


def _share(change: float, ceiling: float) -> str:
    """A policy's usage change as a share of the ceiling's (when the ceiling lowers usage)."""
    return f"{100 * change / ceiling:.0f}%" if ceiling < 0 else "n/a (the ceiling does not lower usage)"


def _control(r: ReportInputs) -> list[str]:
    """How much control: the ceiling of class-specific final-block pruning against steering."""
    if r.ceiling is None:
        return []
    ceiling, settings = r.ceiling.details.summary, r.ceiling.details.settings
    n = len(r.ceiling.classes)
    split = "validation" if settings.select_on == "val" else "test"
    agree = ", ".join(f"{s} {100 * a:.2f}%" for s, a in settings.stored_predictions_agree.items())
    across = r.ceiling.details.blocks
    if r.steer.settings.blocks is not None and across is not None:  # steering moved several blocks: the ceiling across them
        ceiling = across.rows["blocks"]
        blocks = ", ".join(f"b{b}" for b in across.blocks)
        about = (f"The ceiling (stage `ceiling`, across blocks): per class, fixed gate patterns in {blocks} (a greedy search "
                 f"from the best single-block ceiling, docs/METHOD.md section 8) under the steering headline's rule on the "
                 f"model's GFLOPs, chosen on the {split} split and reported on test. Usage here, as in the steering rows, is "
                 "the mean over the gated blocks; the share is a policy's mean usage change over the ceiling's.")
        name = f"ceiling: fixed patterns in {blocks} per class"
    else:
        about = (f"The ceiling (stage `ceiling`): per class, every fixed final-block gate pattern ({settings.search} search, at most "
                 f"{settings.patterns_per_class} patterns a class) under the steering headline's rule, chosen on the {split} split and "
                 "reported on test. Steering the decision network's input can only choose gates, so no class-constant steering "
                 "beats it; the share is a policy's mean usage change over the ceiling's. (Patterns ran through the final block's "
                 f"CLS row, exact up to float rounding: its own-gate predictions equal the full model's on {agree} of the images.)")
        name = "ceiling: a fixed final-block pattern per class"
    acc_ci, usage_ci = ceiling.mean_accuracy_change_ci, ceiling.mean_usage_change_ci
    has_ci = acc_ci[0] is not None and acc_ci[0] == acc_ci[0]
    lines = [
        "",
        "## How much control",
        "",
        about,
        "",
        "| policy | mean usage change | mean accuracy change (points) | share of the ceiling | classes using fewer heads | classes below the null |",
        "|---|---|---|---|---|---|",
        f"| {name} | {ceiling.mean_usage_change:+.3f}{_ci(usage_ci) if has_ci else ''} | "
        f"{100 * ceiling.mean_accuracy_change:+.1f}{_ci_pct(acc_ci, sign=True) if has_ci else ''} | 100% | "
        f"{ceiling.classes_with_reduction} of {n} | - |",
    ]
    controls = r.steer.controls or {}
    rows = [("SAE latents of the true class (oracle)", r.steer.per_class_headline),
            ("SAE latents of the predicted class (deployable)", r.steer.predicted_class_policy),
            *((CONTROL_NAMES.get(name, name), policy) for name, policy in controls.items())]
    for name, policy in rows:
        if policy is None:
            continue
        null = getattr(policy, "null", None)
        beyond = f"{null.classes_below} of {null.classes}" if null else "-"
        draws = getattr(policy, "draws", None)
        if draws is not None:  # the mean over draws, each selected and reported alone, and their range
            usage, accuracy = _mean(draws.usage_change), _mean(draws.accuracy_change)
            lines.append(f"| {name} | {usage:+.3f} (draws {min(draws.usage_change):+.3f} to {max(draws.usage_change):+.3f}) | "
                         f"{100 * accuracy:+.1f} (draws {100 * min(draws.accuracy_change):+.1f} to {100 * max(draws.accuracy_change):+.1f}) | "
                         f"{_share(usage, ceiling.mean_usage_change)} | {policy.classes_with_reduction} of {n} (draw 0) | {beyond} |")
            continue
        p_ci = policy.mean_usage_change_ci
        with_ci = p_ci[0] is not None and p_ci[0] == p_ci[0]
        lines.append(f"| {name} | {policy.mean_usage_change:+.3f}{_ci(p_ci) if with_ci else ''} | "
                     f"{100 * policy.mean_accuracy_change:+.1f}{_ci_pct(policy.mean_accuracy_change_ci, sign=True) if with_ci else ''} | "
                     f"{_share(policy.mean_usage_change, ceiling.mean_usage_change)} | {policy.classes_with_reduction} of {n} | {beyond} |")
    oracle = r.steer.per_class_headline
    if oracle is not None:
        pruning = "final-block" if across is None or r.steer.settings.blocks is None else "multi-block"
        lines += ["", f"Per-class SAE steering reaches {_share(oracle.mean_usage_change, ceiling.mean_usage_change)} of the usage "
                  f"reduction that class-specific {pruning} pruning reaches on this model."]
    if controls:
        lines += ["", "Controls (docs/METHOD.md, section 6) move the decision network's input, image by image and alpha by alpha, "
                  f"by exactly as much as the per-class SAE steer moves it, along a plain direction; each is selected per class on "
                  f"the {split} split like the SAE's policy, and its null is the random direction's draws. The random direction's "
                  "row is the mean over its draws, each draw selected and reported alone, with their range."]
        if oracle is not None and CLASS_DIRECTION in controls:
            lines += ["", _sae_against_class_direction(oracle, controls[CLASS_DIRECTION])]
        random = controls.get(RANDOM_DIRECTION)
        if oracle is not None and random is not None and random.draws is not None:
            lines += ["", _sae_against_random_directions(oracle, random.draws.usage_change)]
    lines += ["", "![per class: fixed patterns, the frontier, the ceiling's choice and steering](plots/ceiling_frontier.png)"]
    return lines


CONTROL_NAMES = {
    RANDOM_DIRECTION: "control: a random direction per class (the controls' null)",
    CLASS_DIRECTION: "control: the class's mean embedding direction (no SAE)",
    GATE_DIRECTION: "control: the gate-closing direction (closes heads fastest)",
}


def _sae_against_class_direction(sae: PolicyEffect, plain: PolicyEffect) -> str:
    """One plain sentence: does the SAE beat a class direction of the same norm?"""
    sae_ci, plain_ci = sae.mean_usage_change_ci, plain.mean_usage_change_ci
    both = all(v is not None and v == v for v in (*sae_ci, *plain_ci))
    apart = both and (sae_ci[1] < plain_ci[0] or plain_ci[1] < sae_ci[0])
    numbers = f"SAE {sae.mean_usage_change:+.3f}, class direction {plain.mean_usage_change:+.3f}"
    if not both:
        verdict = "without intervals (steer.bootstrap is 0) the two cannot be told apart from noise"
    elif not apart:
        verdict = "the intervals overlap: at this size the two cannot be told apart"
    elif sae.mean_usage_change < plain.mean_usage_change:
        verdict = "the intervals do not overlap: the SAE's class latents give control beyond the class's mean direction"
    else:
        verdict = ("the intervals do not overlap: a plain class direction, with no SAE, gives more control than the SAE latents, "
                   "contrary to the paper's story")
    return f"At equal effort, mean usage change ({numbers}): {verdict}."


def _sae_against_random_directions(sae: PolicyEffect, draws: list[float]) -> str:
    """Where the SAE's policy falls among random directions of the same norm, each selected alike."""
    more = sum(d < sae.mean_usage_change for d in draws)
    return (f"Of {len(draws)} random directions of the same norm, each selected per class alike, {more} lower usage more than the "
            f"SAE latents ({sae.mean_usage_change:+.3f}; random directions {min(draws):+.3f} to {max(draws):+.3f})"
            + (": at equal effort the SAE's class latents move the gates less than chance directions do." if more > len(draws) / 2
               else "."))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _strategies(r: ReportInputs) -> list[str]:
    base, curves = r.steer.baseline, r.curves()
    with_ci = any(curve.accuracy_ci is not None for curve in curves.values())
    lines = [
        "",
        "## Strategies (all test images)",
        "",
        f"Unsteered: accuracy {_pct(base.accuracy)}, final-block head usage {base.head_usage:.3f}. "
        + ("Brackets: bootstrap intervals over test images; a strategy with draws is the mean over its draws "
           "(the spread over draws is in `metrics/details/steer.json`)." if with_ci else ""),
        "",
        *[f"- `{name}`: {STRATEGIES[name].description}" for name in curves],
        "",
        "| strategy | alpha | accuracy | head usage | GFLOPs per image |",
        "|---|---|---|---|---|",
    ]
    for strategy, curve in curves.items():
        for i, (a, acc, usage) in enumerate(zip(curve.alpha, curve.accuracy, curve.head_usage)):
            acc_ci = _ci_pct(curve.accuracy_ci[i]) if with_ci else ""
            usage_ci = f" [{curve.head_usage_ci[i][0]:.3f}, {curve.head_usage_ci[i][1]:.3f}]" if with_ci else ""
            gflops = f"{curve.gflops[i]:.4g}" if curve.gflops is not None else "-"
            lines.append(f"| {strategy} | {a:+g} | {100 * acc:.1f}%{acc_ci} | {usage:.3f}{usage_ci} | {gflops} |")
    return lines + _dose_response(r)


def _dose_response(r: ReportInputs) -> list[str]:
    """Per strategy, how far its curve goes at no accuracy cost (read off the test curves)."""
    if not r.steer.dose_response:
        return []
    tolerance = r.steer.settings.accuracy_tolerance
    lines = ["", f"Dose-response, read off the test curves above (descriptive: nothing is selected here): the largest usage "
             f"reduction at an accuracy no lower than the unsteered minus {tolerance}, and the least |alpha| that reaches it.", "",
             "| strategy | largest usage reduction at no accuracy cost | at alpha | accuracy change (points) | usage change over the grid's last step |",
             "|---|---|---|---|---|"]
    for name in r.curves():
        d = r.steer.dose_response.get(name)
        if d is not None:
            lines.append(f"| {name} | {d.usage_reduction:.3f} | {d.alpha:+g} | {100 * d.accuracy_change:+.1f} | "
                         f"{d.last_step_usage_change:+.3f} |")
    return lines


def _global_null(r: ReportInputs) -> list[str]:
    if r.steer.global_null is None:
        return []
    null = STRATEGIES[GLOBAL].null
    lines = [
        "",
        f"The global set against {r.steer.settings.null_draws} random sets of its size (`{null}`), usage change "
        f"from the unsteered {r.steer.baseline.head_usage:.3f}:",
        "",
        "| alpha | global set | random sets' central interval | outside? |",
        "|---|---|---|---|",
    ]
    for a, g in r.global_null():
        lines.append(f"| {a:+g} | {g.usage_change:+.3f} | [{g.null_low:+.3f}, {g.null_high:+.3f}] | {_SIDE[g.side]} |")
    return lines


def _beside_paper(r: ReportInputs) -> list[str]:
    shape, stats, finetune = r.config.shape, r.stats, r.finetune
    paper_scale = shape.embed_dim == 384 and shape.depth == 12 and r.params.data.source != "synthetic"
    ours = {c.name: c for c in r.headline}
    lines = [
        "",
        "## Beside the paper",
        "",
        "| quantity | paper (ViT-S/16, CIFAR-100) | this run |",
        "|---|---|---|",
    ]
    for name, ref in PAPER_CLASSES.items():
        mine = ours.get(name)
        got = (f"{_pct(mine.baseline_accuracy)} -> {_pct(mine.accuracy)}, usage {mine.baseline_usage:.2f} -> {mine.usage:.2f} "
               f"({_heads(mine.heads, r.head_names)})") if mine else "class not in this data set"
        lines.append(
            f"| {name} | {_pct(ref['accuracy'][0])} -> {_pct(ref['accuracy'][1])}, usage {ref['usage'][0]} -> {ref['usage'][1]} "
            f"({ref['heads']}) | {got} |"
        )
    lines += [
        f"| overlap global vs class | {PAPER_OVERLAP} | {stats.overlap_global_vs_class:.4f} (\\|A ∩ B\\| / K), {stats.jaccard_global_vs_class:.4f} (Jaccard) |",
        "",
        ("This run has the paper's architecture (ViT-S/16 width 384, 12 blocks) and real data; at "
         f"{_pct(finetune.test_accuracy)} test accuracy, compare its numbers with the paper's only as far as the models' "
         "accuracy and head usage are alike."
         if paper_scale else
         "This run is smaller than the paper's (model, data or both): compare signs and shapes of the curves, not values. "
         "The direction in which amplifying class latents moves head usage is a property of the trained decision network "
         "and may be the reverse of the paper's at small scale."),
        "",
        "Every sign in this report is one training run's: on `configs/cifar100-cpu.yaml`, amplifying the same latent sets "
        "lowered usage in some training seeds and raised it in others (docs/results/cifar100-cpu-seeds). State a direction with its sign "
        "agreement across seeds: queue a seed sweep and run `pipeline summarize` (docs/EXPERIMENTS.md, \"Seed sweeps\").",
        "",
    ]
    return lines


def _figures(r: ReportInputs) -> list[str]:
    lines = [
        "## Figures",
        "",
        "![accuracy and head usage vs alpha](plots/steer_curves.png)",
        "",
    ]
    if r.headline:
        lines += [
            "![per-class head keep rates, unsteered and at the headline alpha](plots/head_keep_heatmap.png)",
            "",
            "![per-class head usage, unsteered vs steered](plots/steer_class_usage.png)",
            "",
        ]
    if r.explained:
        lines += [
            "![latents of the global set and their most activating training images](plots/latent_grid.png)",
            "",
            "![class purity of SAE latents against random and PCA directions](plots/purity.png)",
            "",
        ]
    lines += [
        "![class-by-class overlap of the top latent sets](plots/overlap_heatmap.png)",
        "",
        "![firing frequency of the SAE latents](plots/firing_frequency.png)",
        "",
    ]
    return lines


def _num(x: float | None, fmt: str = "+.2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _interpretation(r: ReportInputs) -> list[str]:
    """What the latents mean (purity, class cards) and why steering moves the heads it moves."""
    if r.explained is None:
        return []
    explained, head_names, mode = r.explained, r.head_names, r.params.steer.mode
    purity, chance = explained.purity["purity"], explained.purity["chance_purity"]
    sae, rnd, pca = purity["sae"], purity["random"], purity["pca"]
    lines = [
        "",
        "## What the latents mean",
        "",
        "Each latent's class distribution is its activation mass per class on the training images; its label is the "
        "top class and its purity that class's share (`pipeline latent N` prints one latent, `pipeline class NAME` one "
        "class). The same statistics for random and PCA directions of the embeddings, each firing on the same fraction "
        "of images as a paired SAE latent, say whether the SAE's basis is more class-pure than a rotation:",
        "",
        "| basis | directions | mean purity | median | 10% / 90% | purity > 0.5 | top-image class share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in (("SAE latents (alive)", sae), ("random directions", rnd), ("PCA directions (both signs)", pca)):
        lines.append(f"| {name} | {row['count']} | {row['mean']:.3f} | {row['median']:.3f} | {row['q10']:.3f} / {row['q90']:.3f} | "
                     f"{100 * row['above_half']:.0f}% | {row.get('gallery_share', 0.0):.3f} |")
    lines += ["", f"A direction that ignores the class would have purity about {chance:.3f} (the largest class's share). "
              "Top-image class share: of each direction's most activating training images (its gallery), the share in its "
              "most common class, which is what a person looking at the gallery sees."]
    cards = explained.cards
    if cards:
        lines += ["", "### Class cards", "",
                  "Each featured class's most frequent latents, the heads each pushes hardest at its mean activation "
                  "(gate-logit change; on = towards keeping the head), the steering outcome and the classes it shares latents "
                  "with. Images: `plots/class_cards.png`.", ""]
        for card in cards:
            (u0, u1), (a0, a1) = card.usage, card.accuracy
            lines.append(f"**{card.name}**: steered at alpha {card.alpha:+g}, usage {u0:.2f} -> {u1:.2f}, accuracy "
                         f"{100 * a0:.0f}% -> {100 * a1:.0f}%; shares latents with {', '.join(card.related) or 'no class'}.")
            lines += [f"- {latent.line}; pushes {latent.pushes}" for latent in card.latents]
            lines.append("")
    shifts, glob = explained.shift_vs_keep, explained.global_set
    lines += [
        "## Why steering moves the heads it moves",
        "",
        "The final block's decision network is linear in its CLS input, so a latent's effect on each gate logit is exact "
        "before any experiment: attribution = decision weights . the latent's decoder direction. Steering a set in mode "
        f"`{mode}` moves a class's mean gate logit by alpha x sum over the set of (mean activation x attribution)"
        + ("" if explained.keep_error else " plus the change of the reconstruction error (keep_error is off: the prediction is partial)")
        + ". Against the keep-rate changes the sweep measured (test split, one point per strategy, class, alpha != 0 and head):",
        "",
        "| strategy | points | Pearson | Spearman | points whose keep rate moved | same sign as predicted |",
        "|---|---|---|---|---|---|",
    ]
    for name in (*SHIFT_SETS, "all"):
        row = shifts[name]
        agree = "n/a" if row.sign_agreement is None else f"{100 * row.sign_agreement:.0f}%"
        lines.append(f"| {name} | {row.points} | {_num(row.pearson)} | {_num(row.spearman)} | {row.moved} | {agree} |")
    if glob:
        push = ", ".join(f"{h} {p:+.2f}" for h, p in zip(head_names, glob.predicted_logit_shift))
        seen = ", ".join(f"{h} {m:+.3f}" for h, m in zip(head_names, glob.measured_keep_change))
        total = sum(glob.measured_keep_change) / max(len(head_names), 1)
        lines += ["", f"The global set at alpha {glob.alpha:+g}: predicted mean gate-logit shift {push}; measured keep-rate "
                  f"change {seen} (usage {total:+.3f}). A keep rate moves only where logits cross zero, and a mean shift hides "
                  "its spread over images, so the two need not agree head by head; the correlation above says how far "
                  "they do."]
    lines += ["", "![predicted gate-logit shift against measured keep-rate change](plots/shift_vs_keep.png)", "",
              "![attribution of the featured classes' latents to the final block's heads](plots/attribution_heatmap.png)", "",
              "![class cards: top latents and their most activating images](plots/class_cards.png)"]
    return lines
