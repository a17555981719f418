"""The steering analysis: from the sweep's tallies to the numbers the report and metrics show.

Strategy curves with bootstrap intervals and compute, the headline (alphas chosen on the
selection split, reported on test) for the oracle and the predicted-class policy, and the
random-set nulls per class and for the global set. Pure functions of the tallies and params.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.flops import FlopModel
from pipeline.headline import (
    ClassHeadline,
    PolicyResult,
    choose_per_group,
    class_null,
    curve_intervals,
    evaluate_policy,
    select_headline,
)
from pipeline.params import SteerParams
from pipeline.steering import Tally, Variant, overall, strategy_curves
from pipeline.uncertainty import interval, side


def policy_json(result: PolicyResult, alphas_by_class: dict[str, float] | None = None) -> dict:
    out = {
        "mean_usage_change": result.mean_usage_change,
        "mean_usage_change_ci": list(result.mean_usage_change_ci),
        "mean_accuracy_change": result.mean_accuracy_change,
        "mean_accuracy_change_ci": list(result.mean_accuracy_change_ci),
        "classes_with_reduction": int((result.usage_change < 0).sum()),
        "classes_with_reduction_ci_below_zero": int((result.usage_change_ci[1] < 0).sum()),
    }
    if alphas_by_class is not None:
        out["alpha"] = alphas_by_class
    return out


def analyse(tallies: dict[str, Tally], rows: dict[str, list[dict]], sp: SteerParams, class_names: list[str], n_heads: int,
            flops: FlopModel, usage_per_block: list[float]) -> tuple[dict[str, Any], list[ClassHeadline]]:
    """metrics/details/steer.json's content and the per-class headline. `tallies` and `rows`
    hold the test split and, when `sp.select_on` is `val`, the validation split; the FLOPs
    keep every block but the final one at `usage_per_block` (finetune's, on test)."""
    n_classes = len(class_names)
    test, select = tallies["test"], tallies[sp.select_on]
    labels = test.all_labels
    base_acc, base_usage = overall(test, Variant(sp.strategies[0], 0.0, 0))
    curves = strategy_curves(test, sp.strategies)
    if sp.bootstrap:
        for strategy, curve in curves.items():
            outcomes = [test.image_outcomes(strategy, d) for d in test.draws(strategy)]
            correct = torch.stack([o[1] for o in outcomes])
            usage = torch.stack([o[2] for o in outcomes])
            curve.update(curve_intervals(curve["alpha"], correct, usage, labels, n_classes, sp.bootstrap, sp.confidence, sp.seed))
    gflops = lambda final_usage: flops.from_usage([*usage_per_block[:-1], final_usage]) / 1e9  # noqa: E731
    for curve in curves.values():
        curve["gflops"] = [gflops(u) for u in curve["head_usage"]]
    head_name = lambda h: f"h{h + sp.head_index_base}"  # noqa: E731
    metrics: dict[str, Any] = {
        "baseline": {"accuracy": base_acc, "head_usage": base_usage},
        "strategies": curves,
        "flops": {"gflops_dense": flops.dense / 1e9, "gflops_unsteered": gflops(base_usage),
                  "final_block_attention_gflops_dense": flops.per_head[-1] * n_heads / 1e9},
        "settings": {"mode": sp.mode, "keep_error": sp.keep_error, "accuracy_tolerance": sp.accuracy_tolerance,
                     "select_on": sp.select_on, "bootstrap": sp.bootstrap, "confidence": sp.confidence,
                     "null_draws": sp.null_draws, "head_index_base": sp.head_index_base,
                     "images": {split: int(t.all_labels.numel()) for split, t in tallies.items()}},
    }

    headline: list[ClassHeadline] = []
    if "per_class" in sp.strategies:
        headline = select_headline(rows[sp.select_on], rows["test"], n_heads, sp.accuracy_tolerance)
        alphas, correct, usage = test.image_outcomes("per_class")
        chosen = torch.tensor([alphas.index(c.alpha) for c in headline])  # headline: one entry per class with images
        by_class = torch.zeros(n_classes, dtype=torch.long).fill_(alphas.index(0.0))
        by_class[torch.tensor([c.class_id for c in headline])] = chosen
        oracle = evaluate_policy(correct, usage, by_class[labels], labels, n_classes, alphas, sp.bootstrap, sp.confidence, sp.seed)
        nulls = class_null(rows["test"], "per_class", "random_per_class", sp.confidence) if "random_per_class" in sp.strategies else {}
        for c in headline:
            if sp.bootstrap:
                c.accuracy_change_ci = (float(oracle.accuracy_change_ci[0][c.class_id]), float(oracle.accuracy_change_ci[1][c.class_id]))
                c.usage_change_ci = (float(oracle.usage_change_ci[0][c.class_id]), float(oracle.usage_change_ci[1][c.class_id]))
            if c.class_id in nulls:
                effect, low, high = nulls[c.class_id][c.alpha]
                c.null_usage_change, c.beyond_null = (low, high), side(effect, low, high)
        summary = policy_json(oracle, {c.name: c.alpha for c in headline})
        summary.update(
            usage_change={c.name: c.usage - c.baseline_usage for c in headline},
            mean_gflops_change=gflops(base_usage + summary["mean_usage_change"]) - gflops(base_usage),
            mean_usage_reduction=sum(c.usage_reduction for c in headline) / len(headline),
            selected_on=sp.select_on,
            alpha_counts={"negative": sum(c.alpha < 0 for c in headline), "zero": sum(c.alpha == 0 for c in headline),
                          "positive": sum(c.alpha > 0 for c in headline)},
            top=[{"class": c.name, "alpha": c.alpha, "baseline_accuracy": c.baseline_accuracy, "baseline_usage": c.baseline_usage,
                  "accuracy": c.accuracy, "usage": c.usage, "heads": [head_name(h) for h in c.heads],
                  "usage_change_ci": c.usage_change_ci, "accuracy_change_ci": c.accuracy_change_ci, "beyond_null": c.beyond_null}
                 for c in sorted(headline, key=lambda c: (-c.usage_reduction, c.class_id))[: sp.top_classes]],
        )
        if nulls:
            summary["null"] = {
                "classes_below": sum(c.beyond_null < 0 for c in headline),
                "classes_above": sum(c.beyond_null > 0 for c in headline),
                "classes": len(headline),
                "per_alpha": {
                    str(a): {"below": sum(side(*nulls[k][a]) < 0 for k in nulls), "above": sum(side(*nulls[k][a]) > 0 for k in nulls)}
                    for a in alphas
                },
            }
        metrics["per_class_headline"] = summary
        if "per_class_predicted" in sp.strategies:
            s_alphas, s_correct, s_usage = select.image_outcomes("per_class_predicted")
            by_prediction = choose_per_group(s_correct, s_usage, select.all_base_predictions, n_classes, s_alphas, sp.accuracy_tolerance)
            p_alphas, p_correct, p_usage = test.image_outcomes("per_class_predicted")
            predicted = evaluate_policy(p_correct, p_usage, by_prediction[test.all_base_predictions], labels, n_classes,
                                        p_alphas, sp.bootstrap, sp.confidence, sp.seed)
            metrics["predicted_class_policy"] = policy_json(predicted, {name: p_alphas[int(i)] for name, i in zip(class_names, by_prediction)})
    if "global" in sp.strategies and "random" in sp.strategies:
        global_null = {}
        for i, a in enumerate(curves["global"]["alpha"]):
            effect = curves["global"]["head_usage"][i] - base_usage
            null_effects = torch.tensor([overall(test, Variant("random", a, d))[1] - base_usage for d in test.draws("random")])
            low, high = (float(v) for v in interval(null_effects, sp.confidence))
            global_null[str(a)] = {"usage_change": effect, "null_low": low, "null_high": high, "side": side(effect, low, high)}
        metrics["global_null"] = global_null
    return metrics, headline
