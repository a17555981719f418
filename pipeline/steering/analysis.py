"""The steering analysis: from the sweep's tallies to the numbers the report and metrics show.

Strategy curves with bootstrap intervals and compute, the headline (alphas chosen on the
selection split, reported on test) for the oracle and the predicted-class policy, and the
random-set nulls per class and for the global set. Pure functions of the tallies and params.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model.config import head_names
from pipeline.model.flops import FlopModel
from pipeline.params.steer import SteerParams
from pipeline.steering.headline import (
    ClassHeadline,
    PolicyResult,
    choose_per_group,
    class_null,
    curve_intervals,
    evaluate_policy,
    select_headline,
)
from pipeline.steering.results import (
    AlphaCounts,
    Baseline,
    ClassNullSummary,
    ControlPolicy,
    Curve,
    DoseResponse,
    DrawSpread,
    Flops,
    Headline,
    NullCount,
    NullPoint,
    Policy,
    Settings,
    SteerDetails,
    TopClass,
)
from pipeline.steering.strategies import GLOBAL, PER_CLASS, PER_CLASS_PREDICTED, STRATEGIES
from pipeline.steering.sweep import Tally, Variant, overall, strategy_curves
from pipeline.steering.uncertainty import interval, side


@dataclass(frozen=True)
class UsageCost:
    """GFLOPs per image from the usage a tally measures: the blocks the tally's heads cover
    (`blocks`) at that usage, every other block at the unsteered model's usage."""

    flops: FlopModel
    usage_per_block: list[float]
    """Every block's head usage, unsteered (finetune's, on test; ungated blocks 1)."""
    blocks: list[int]
    """The final block for the final-block sweep; every gated block for a multi-block one, whose
    tally's usage is the mean over them (exact when the blocks share one per-head cost)."""

    def __post_init__(self) -> None:
        if len({self.flops.per_head[b] for b in self.blocks}) > 1:
            raise ValueError(f"blocks {self.blocks} differ in per-head FLOPs: one mean usage does not give their GFLOPs")

    def gflops(self, usage: float) -> float:
        per_block = list(self.usage_per_block)
        for b in self.blocks:
            per_block[b] = usage
        return self.flops.from_usage(per_block) / 1e9

    @property
    def attention_gflops_dense(self) -> float:
        """The attention of the covered blocks with every head kept."""
        return sum(self.flops.per_head[b] for b in self.blocks) * self.flops.num_heads / 1e9


@dataclass(frozen=True)
class RunInfo:
    """What the sweep ran on, recorded in the details' settings."""

    variants: int
    head_path: str
    model_sha256: str


def analyse(tallies: dict[str, Tally], rows: dict[str, list[dict]], sp: SteerParams, class_names: list[str], n_heads: int,
            cost: UsageCost, run: RunInfo, names: list[str] | None = None) -> tuple[SteerDetails, list[ClassHeadline]]:
    """metrics/details/steer.json's content and the per-class headline. `tallies` and `rows`
    hold the test split and, when `sp.select_on` is `val`, the validation split; `n_heads` is
    the tally's (the final block's, or G x H over the gated blocks), `names` their printed names
    (default h0..); `cost` turns the tally's usage into GFLOPs."""
    n_classes = len(class_names)
    test, select = tallies["test"], tallies[sp.select_on]
    labels = test.all_labels
    base_acc, base_usage = overall(test, Variant(sp.strategies[0], 0.0, 0))
    curves = {name: Curve(**curve) for name, curve in strategy_curves(test, sp.strategies).items()}
    if sp.bootstrap:
        for strategy, curve in curves.items():
            outcomes = [test.image_outcomes(strategy, d) for d in test.draws(strategy)]
            correct = torch.stack([o[1] for o in outcomes])
            usage = torch.stack([o[2] for o in outcomes])
            ci = curve_intervals(curve.alpha, correct, usage, labels, n_classes, sp.bootstrap, sp.confidence, sp.seed)
            curve.accuracy_ci, curve.head_usage_ci = ci["accuracy_ci"], ci["head_usage_ci"]
    gflops = cost.gflops
    for curve in curves.values():
        curve.gflops = [gflops(u) for u in curve.head_usage]
    names = names or head_names(n_heads, sp.head_index_base)
    details = SteerDetails(
        baseline=Baseline(accuracy=base_acc, head_usage=base_usage),
        strategies=curves,
        flops=Flops(gflops_dense=cost.flops.dense / 1e9, gflops_unsteered=gflops(base_usage),
                    final_block_attention_gflops_dense=cost.attention_gflops_dense),
        settings=Settings(mode=sp.mode, keep_error=sp.keep_error, accuracy_tolerance=sp.accuracy_tolerance,
                          select_on=sp.select_on, bootstrap=sp.bootstrap, confidence=sp.confidence,
                          null_draws=sp.null_draws, head_index_base=sp.head_index_base,
                          images={split: int(t.all_labels.numel()) for split, t in tallies.items()},
                          variants=run.variants, head_path=run.head_path, model_sha256=run.model_sha256),
    )

    headline: list[ClassHeadline] = []
    if PER_CLASS in sp.strategies:
        headline, oracle, null = class_policy(PER_CLASS, test, rows, sp, n_classes, n_heads)
        details.per_class_headline = Headline(
            **Headline.fields_of(oracle), alpha={c.name: c.alpha for c in headline},
            usage_change={c.name: c.usage - c.baseline_usage for c in headline},
            mean_gflops_change=gflops(base_usage + oracle.mean_usage_change) - gflops(base_usage),
            mean_usage_reduction=sum(c.usage_reduction for c in headline) / len(headline),
            selected_on=sp.select_on,
            alpha_counts=AlphaCounts(negative=sum(c.alpha < 0 for c in headline), zero=sum(c.alpha == 0 for c in headline),
                                     positive=sum(c.alpha > 0 for c in headline)),
            top=[TopClass(name=c.name, alpha=c.alpha, baseline_accuracy=c.baseline_accuracy, baseline_usage=c.baseline_usage,
                          accuracy=c.accuracy, usage=c.usage, heads=[names[h] for h in c.heads],
                          usage_change_ci=_pair(c.usage_change_ci), accuracy_change_ci=_pair(c.accuracy_change_ci),
                          beyond_null=c.beyond_null)
                 for c in sorted(headline, key=lambda c: (-c.usage_reduction, c.class_id))[: sp.top_classes]],
            null=null,
        )
        if PER_CLASS_PREDICTED in sp.strategies:
            s_alphas, s_correct, s_usage = select.image_outcomes(PER_CLASS_PREDICTED)
            by_prediction = choose_per_group(s_correct, s_usage, select.all_base_predictions, n_classes, s_alphas, sp.accuracy_tolerance)
            p_alphas, p_correct, p_usage = test.image_outcomes(PER_CLASS_PREDICTED)
            predicted = evaluate_policy(p_correct, p_usage, by_prediction[test.all_base_predictions], labels, n_classes,
                                        p_alphas, sp.bootstrap, sp.confidence, sp.seed)
            details.predicted_class_policy = Policy(**Policy.fields_of(predicted),
                                                    alpha={name: p_alphas[int(i)] for name, i in zip(class_names, by_prediction)})
    controls = [name for name in sp.strategies if STRATEGIES[name].is_control]
    if controls:
        details.controls = {}
        for name in controls:
            rows_c, result, null = class_policy(name, test, rows, sp, n_classes, n_heads)
            policy = ControlPolicy(**ControlPolicy.fields_of(result), alpha={c.name: c.alpha for c in rows_c},
                                   selected_on=sp.select_on, null=null)
            if STRATEGIES[name].uses_draws:  # the same policy on every draw: how far chance alone goes
                others = [class_policy(name, test, rows, sp, n_classes, n_heads, draw=d, bootstrap=False)[1] for d in test.draws(name)[1:]]
                policy.draws = DrawSpread(usage_change=[result.mean_usage_change, *(o.mean_usage_change for o in others)],
                                          accuracy_change=[result.mean_accuracy_change, *(o.mean_accuracy_change for o in others)])
            details.controls[name] = policy
    null_name = STRATEGIES[GLOBAL].null
    if GLOBAL in sp.strategies and null_name in sp.strategies:
        global_null = {}
        curve = curves[GLOBAL]
        for i, a in enumerate(curve.alpha):
            effect = curve.head_usage[i] - base_usage
            null_effects = torch.tensor([overall(test, Variant(null_name, a, d))[1] - base_usage for d in test.draws(null_name)])
            low, high = (float(v) for v in interval(null_effects, sp.confidence))
            global_null[str(a)] = NullPoint(usage_change=effect, null_low=low, null_high=high, side=side(effect, low, high))
        details.global_null = global_null
    details.dose_response = {name: dose_response(curve, base_acc, base_usage, sp.accuracy_tolerance) for name, curve in curves.items()}
    return details, headline


def class_policy(strategy: str, test: Tally, rows: dict[str, list[dict]], sp: SteerParams, n_classes: int, n_heads: int,
                 draw: int = 0, bootstrap: bool = True,
                 ) -> tuple[list[ClassHeadline], PolicyResult, ClassNullSummary | None]:
    """One strategy's per-class policy (one draw): each class's alpha chosen on `sp.select_on`'s
    rows, its test outcome per class with bootstrap intervals (none when `bootstrap` is false),
    and each class's effect against the strategy's null (None without one; the classes' rows
    carry their own side of it)."""
    headline = select_headline(rows[sp.select_on], rows["test"], n_heads, sp.accuracy_tolerance, strategy, draw)
    alphas, correct, usage = test.image_outcomes(strategy, draw)
    labels = test.all_labels
    by_class = torch.full((n_classes,), alphas.index(0.0), dtype=torch.long)
    by_class[torch.tensor([c.class_id for c in headline])] = torch.tensor([alphas.index(c.alpha) for c in headline])
    resamples = sp.bootstrap if bootstrap else 0
    result = evaluate_policy(correct, usage, by_class[labels], labels, n_classes, alphas, resamples, sp.confidence, sp.seed)
    null_name = STRATEGIES[strategy].null
    nulls = class_null(rows["test"], strategy, null_name, sp.confidence) if null_name in sp.strategies else {}
    for c in headline:
        if resamples:
            c.accuracy_change_ci = (float(result.accuracy_change_ci[0][c.class_id]), float(result.accuracy_change_ci[1][c.class_id]))
            c.usage_change_ci = (float(result.usage_change_ci[0][c.class_id]), float(result.usage_change_ci[1][c.class_id]))
        if c.class_id in nulls:
            effect, low, high = nulls[c.class_id][c.alpha]
            c.null_usage_change, c.beyond_null = (low, high), side(effect, low, high)
    return headline, result, null_summary(headline, nulls, alphas)


def null_summary(headline: list[ClassHeadline], nulls: dict[int, dict[float, tuple[float, float, float]]],
                 alphas: list[float]) -> ClassNullSummary | None:
    """How many classes' chosen effect, and effect at each alpha, lies beyond their null."""
    if not nulls:
        return None
    return ClassNullSummary(
        classes_below=sum(c.beyond_null < 0 for c in headline),
        classes_above=sum(c.beyond_null > 0 for c in headline),
        classes=len(headline),
        per_alpha={str(a): NullCount(below=sum(side(*nulls[k][a]) < 0 for k in nulls),
                                     above=sum(side(*nulls[k][a]) > 0 for k in nulls)) for a in alphas},
    )


def dose_response(curve: Curve, base_accuracy: float, base_usage: float, tolerance: float) -> DoseResponse:
    """The largest usage reduction at no accuracy cost along one curve, and the least |alpha|
    reaching it (ties: the smaller alpha)."""
    ok = [i for i, acc in enumerate(curve.accuracy) if acc >= base_accuracy - tolerance - 1e-12]
    best = max((base_usage - curve.head_usage[i] for i in ok), default=0.0)
    reach = [i for i in ok if base_usage - curve.head_usage[i] >= best - 1e-12]
    i = min(reach, key=lambda j: (abs(curve.alpha[j]), curve.alpha[j])) if reach else curve.alpha.index(0.0)
    top = sorted(range(len(curve.alpha)), key=lambda j: curve.alpha[j])[-2:]
    last_step = curve.head_usage[top[1]] - curve.head_usage[top[0]] if len(top) == 2 else 0.0
    return DoseResponse(usage_reduction=max(best, 0.0), alpha=curve.alpha[i], accuracy_change=curve.accuracy[i] - base_accuracy,
                        last_step_usage_change=last_step)


def _pair(bounds: tuple[float, float] | None) -> list[float] | None:
    return None if bounds is None else list(bounds)
