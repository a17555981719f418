"""The steering headline: choose each class's alpha on one split, report it on another.

Rule (docs/METHOD.md, section 5, `steer.accuracy_tolerance`): per group of images, the alpha with the lowest
final-block head usage whose accuracy is at least the unsteered accuracy minus the tolerance
(ties: the smaller |alpha|, then the smaller alpha); alpha 0 always qualifies. A group is a true
class (the oracle analysis: the set and the alpha are looked up by the label) or a predicted
class (the deployable policy: looked up by the unsteered model's prediction, no label needed).

Everything works on per-image matrices of one strategy: `correct` and `usage` (A, N), row a the
images' outcome at alphas[a]. Choosing on validation images and reporting on test images keeps
the selection out of the reported numbers; intervals come from `pipeline.steering.uncertainty`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.steering.uncertainty import class_bootstrap, class_means, interval, pooled


def choose_alpha(accuracy: Tensor, usage: Tensor, alphas: list[float], tolerance: float) -> Tensor:
    """(A, G) group accuracies and usages -> (G,) index of each group's chosen alpha. A group
    without images (NaN) keeps alpha 0."""
    base = alphas.index(0.0)
    choice = torch.full((accuracy.shape[1],), base, dtype=torch.long)
    for g in range(accuracy.shape[1]):
        if torch.isnan(accuracy[base, g]):
            continue
        ok = [a for a in range(len(alphas)) if accuracy[a, g] >= accuracy[base, g] - tolerance - 1e-12]
        choice[g] = min(ok, key=lambda a: (float(usage[a, g]), abs(alphas[a]), alphas[a]))
    return choice


def choose_per_group(correct: Tensor, usage: Tensor, groups: Tensor, n_groups: int, alphas: list[float], tolerance: float) -> Tensor:
    """Per-image outcomes (A, N) and each image's group (N,) -> (n_groups,) chosen alpha index."""
    return choose_alpha(class_means(correct, groups, n_groups), class_means(usage, groups, n_groups), alphas, tolerance)


def follow(values: Tensor, choice: Tensor) -> Tensor:
    """(A, N) per-image outcomes and (N,) each image's alpha index -> (N,) the chosen outcome."""
    return values.gather(0, choice[None, :])[0]


@dataclass
class PolicyResult:
    """A policy's effect on the report split: per class and the mean over classes (equal
    weights), each with its bootstrap interval; changes are steered minus unsteered."""

    base_accuracy: Tensor
    """(C,)"""
    base_usage: Tensor
    accuracy: Tensor
    """(C,) at the policy's alphas."""
    usage: Tensor
    accuracy_change: Tensor
    """(C,)"""
    usage_change: Tensor
    accuracy_change_ci: tuple[Tensor, Tensor]
    """(C,) lower and upper ends."""
    usage_change_ci: tuple[Tensor, Tensor]
    mean_accuracy_change: float
    mean_usage_change: float
    mean_accuracy_change_ci: tuple[float, float]
    mean_usage_change_ci: tuple[float, float]


@dataclass
class PolicyEffect:
    """A policy's effect as the details files store it: mean changes over classes with their
    intervals, and how many classes use fewer heads (all, and with the interval below zero)."""

    mean_usage_change: float
    mean_usage_change_ci: list[float | None]
    mean_accuracy_change: float
    mean_accuracy_change_ci: list[float | None]
    classes_with_reduction: int
    classes_with_reduction_ci_below_zero: int

    @classmethod
    def fields_of(cls, result: PolicyResult) -> dict[str, float | int | list[float | None]]:
        """This class's fields from a `PolicyResult`, for it or a subclass to be built from."""
        return {
            "mean_usage_change": result.mean_usage_change,
            "mean_usage_change_ci": list(result.mean_usage_change_ci),
            "mean_accuracy_change": result.mean_accuracy_change,
            "mean_accuracy_change_ci": list(result.mean_accuracy_change_ci),
            "classes_with_reduction": int((result.usage_change < 0).sum()),
            "classes_with_reduction_ci_below_zero": int((result.usage_change_ci[1] < 0).sum()),
        }


def evaluate_policy(correct: Tensor, usage: Tensor, choice: Tensor, labels: Tensor, n_classes: int, alphas: list[float],
                    resamples: int, confidence: float, seed: int) -> PolicyResult:
    """Apply a per-image alpha choice (N,) to the report split's outcomes (A, N)."""
    base = alphas.index(0.0)
    steered_correct, steered_usage = follow(correct, choice).double(), follow(usage, choice).double()
    base_correct, base_usage = correct[base].double(), usage[base].double()
    changes = torch.stack([steered_correct - base_correct, steered_usage - base_usage])  # (2, N)
    point = class_means(changes, labels, n_classes)  # (2, C)
    present = ~torch.isnan(point[0])
    if resamples:
        boot = class_bootstrap(changes, labels, n_classes, resamples, seed)  # (2, R, C)
        per_class = interval(boot, confidence, dim=1)
        mean = interval(boot[:, :, present].mean(-1), confidence, dim=1)
    else:
        nan_c = torch.full_like(point, float("nan"))
        per_class, mean = (nan_c, nan_c), (torch.full((2,), float("nan")),) * 2
    return PolicyResult(
        base_accuracy=class_means(base_correct, labels, n_classes),
        base_usage=class_means(base_usage, labels, n_classes),
        accuracy=class_means(steered_correct, labels, n_classes),
        usage=class_means(steered_usage, labels, n_classes),
        accuracy_change=point[0],
        usage_change=point[1],
        accuracy_change_ci=(per_class[0][0], per_class[1][0]),
        usage_change_ci=(per_class[0][1], per_class[1][1]),
        mean_accuracy_change=float(point[0, present].mean()),
        mean_usage_change=float(point[1, present].mean()),
        mean_accuracy_change_ci=(float(mean[0][0]), float(mean[1][0])),
        mean_usage_change_ci=(float(mean[0][1]), float(mean[1][1])),
    )


# ----------------------------------------------------------------- per class, from result rows
def kept_heads(keep_rates: list[float]) -> list[int]:
    """Heads kept by a majority of a class's images."""
    return [h for h, rate in enumerate(keep_rates) if rate > 0.5]


@dataclass
class ClassHeadline:
    """One class's headline: the alpha chosen on the selection split, the numbers on the report
    split (test). Intervals and the null comparison are filled in when computed."""

    class_id: int
    name: str
    alpha: float
    baseline_accuracy: float
    baseline_usage: float
    baseline_heads: list[int]
    accuracy: float
    usage: float
    heads: list[int]
    keep_rates: list[float]
    accuracy_change_ci: tuple[float, float] | None = None
    usage_change_ci: tuple[float, float] | None = None
    null_usage_change: tuple[float, float] | None = None
    """The central interval of random class-sized sets' usage change at this alpha."""
    beyond_null: int = 0
    """-1 / 0 / +1: the usage change lies below / inside / above the null's interval."""

    @property
    def usage_reduction(self) -> float:
        return self.baseline_usage - self.usage


def _by_class(rows: list[dict], strategy: str, draw: int = 0) -> dict[int, dict[float, dict]]:
    """rows of one strategy and draw -> {class_id: {alpha: row}} (classes with images only)."""
    out: dict[int, dict[float, dict]] = {}
    for row in rows:
        if row["strategy"] == strategy and row["draw"] == draw and row["n"] > 0:
            out.setdefault(row["class_id"], {})[row["alpha"]] = row
    return out


def select_headline(select_rows: list[dict], report_rows: list[dict], n_heads: int, tolerance: float,
                    strategy: str, draw: int = 0) -> list[ClassHeadline]:
    """Per class: the alpha the rule picks on `select_rows`, with its accuracy, usage and kept
    heads on `report_rows` (pass the same rows for both to choose and report on one split)."""
    chosen = _by_class(select_rows, strategy, draw)
    reported = _by_class(report_rows, strategy, draw)
    out = []
    for class_id in sorted(reported):
        report = reported[class_id]
        candidates = chosen.get(class_id, {})
        alpha = 0.0
        if 0.0 in candidates:  # the rule of `choose_alpha`, on this class's rows
            alphas = sorted(candidates)
            accuracy = torch.tensor([[candidates[a]["accuracy"]] for a in alphas], dtype=torch.float64)
            usage = torch.tensor([[candidates[a]["head_usage"]] for a in alphas], dtype=torch.float64)
            alpha = alphas[int(choose_alpha(accuracy, usage, alphas, tolerance)[0])]
        base, best = report[0.0], report[alpha]
        keep = [best[f"keep_h{h}"] for h in range(n_heads)]
        out.append(ClassHeadline(
            class_id=class_id, name=base["class"], alpha=alpha,
            baseline_accuracy=base["accuracy"], baseline_usage=base["head_usage"],
            baseline_heads=kept_heads([base[f"keep_h{h}"] for h in range(n_heads)]),
            accuracy=best["accuracy"], usage=best["head_usage"], heads=kept_heads(keep), keep_rates=keep,
        ))
    return out


def class_null(report_rows: list[dict], strategy: str, null: str, confidence: float) -> dict[int, dict[float, tuple[float, float, float]]]:
    """Per class and alpha on the report rows: (the class set's usage change, the null's
    central interval low, high) where the null is the usage change of `null`'s random draws."""
    own = _by_class(report_rows, strategy)
    draws: dict[int, dict[int, dict[float, float]]] = {}
    for row in report_rows:
        if row["strategy"] == null and row["n"] > 0:
            draws.setdefault(row["class_id"], {}).setdefault(row["draw"], {})[row["alpha"]] = row["head_usage"]
    out: dict[int, dict[float, tuple[float, float, float]]] = {}
    for class_id, rows in own.items():
        if class_id not in draws:
            continue
        out[class_id] = {}
        for alpha, row in rows.items():
            effect = row["head_usage"] - rows[0.0]["head_usage"]
            null_effects = torch.tensor([d[alpha] - d[0.0] for d in draws[class_id].values()], dtype=torch.float64)
            low, high = interval(null_effects, confidence)
            out[class_id][alpha] = (effect, float(low), float(high))
    return out



# ------------------------------------------------------------------------- strategy curves
def curve_intervals(alphas: list[float], correct: Tensor, usage: Tensor, labels: Tensor, n_classes: int,
                    resamples: int, confidence: float, seed: int) -> dict[str, list[list[float]]]:
    """Bootstrap intervals of a strategy curve's points: per-image outcomes (draws, A, N) ->
    for accuracy and usage over all images, [low, high] at each alpha (draws averaged per image
    first, so the interval is over images, not over draws)."""
    values = torch.cat([correct.double().mean(0), usage.double().mean(0)])  # (2A, N)
    counts = torch.bincount(labels, minlength=n_classes)
    boot = pooled(class_bootstrap(values, labels, n_classes, resamples, seed), counts)  # (2A, R)
    low, high = interval(boot, confidence, dim=1)
    a = len(alphas)
    return {
        "accuracy_ci": [[float(lo), float(hi)] for lo, hi in zip(low[:a], high[:a])],
        "head_usage_ci": [[float(lo), float(hi)] for lo, hi in zip(low[a:], high[a:])],
    }
