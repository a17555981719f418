"""The steering headline: alpha chosen on validation and reported on test, bootstrap
intervals, the random-set null, and the deployable predicted-class policy."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.steering.headline import choose_per_group, class_null, evaluate_policy, follow, select_headline
from pipeline.steering.strategies import PER_CLASS, SteerBatch, SteeringSets, per_class_mask, per_class_predicted_mask
from pipeline.steering.uncertainty import class_bootstrap, class_means, interval, pooled, side


def row(split_acc: float, usage: float, class_id: int, alpha: float, strategy: str = "per_class", draw: int = 0) -> dict:
    return {"strategy": strategy, "alpha": alpha, "draw": draw, "class_id": class_id, "class": f"c{class_id}", "n": 10,
            "accuracy": split_acc, "head_usage": usage, "keep_h0": usage, "keep_h1": usage}


# ------------------------------------------------------------------------------------ selection
def test_the_alpha_is_chosen_on_the_selection_rows_and_reported_from_the_report_rows():
    """Validation says alpha +1 keeps accuracy and saves heads; test says alpha +2 would have been
    better. The headline must take +1 (validation's choice) and report test's numbers at +1."""
    val = [row(0.8, 0.9, 0, 0.0), row(0.8, 0.5, 0, 1.0), row(0.6, 0.1, 0, 2.0)]
    test = [row(0.7, 0.95, 0, 0.0), row(0.65, 0.55, 0, 1.0), row(0.9, 0.05, 0, 2.0)]
    (chosen,) = select_headline(val, test, 2, tolerance=0.0, strategy=PER_CLASS)
    assert chosen.alpha == 1.0
    assert (chosen.baseline_accuracy, chosen.accuracy, chosen.usage) == (0.7, 0.65, 0.55)  # test's numbers
    (same_split,) = select_headline(test, test, 2, tolerance=0.0, strategy=PER_CLASS)
    assert same_split.alpha == 2.0  # choosing on test picks what test favours


def test_choose_per_group_never_reads_the_report_split():
    """Per-image outcomes: choices depend only on the selection matrices passed in."""
    alphas = [-1.0, 0.0, 1.0]
    correct = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)  # (A, N)
    usage = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]])
    groups = torch.tensor([0, 0, 1, 1])
    choice = choose_per_group(correct, usage, groups, 2, alphas, tolerance=0.0)
    assert choice.tolist() == [2, 2]  # alpha +1 for both groups: accuracy kept, fewest heads
    worse = correct.clone()
    worse[2, 2] = False  # group 1 loses an image at alpha +1 on the selection split
    assert choose_per_group(worse, usage, groups, 2, alphas, tolerance=0.0).tolist() == [2, 1]
    assert choose_per_group(worse, usage, groups, 2, alphas, tolerance=0.5).tolist() == [2, 2]
    assert follow(usage, torch.tensor([0, 1, 2, 2])).tolist() == pytest.approx([1.0, 0.5, 0.4, 0.4])


def test_a_group_without_selection_images_keeps_alpha_zero():
    alphas = [0.0, 1.0]
    correct = torch.ones(2, 2, dtype=torch.bool)
    usage = torch.tensor([[0.5, 0.5], [0.1, 0.1]])
    assert choose_per_group(correct, usage, torch.tensor([0, 0]), 2, alphas, 0.0).tolist() == [1, 0]


# ------------------------------------------------------------------------------ uncertainty
def test_bootstrap_intervals_match_the_known_sampling_spread_and_are_seeded():
    """Per-image values 0/1 with p = 0.3 in a class of n = 400: the bootstrap standard deviation
    of the class mean is sqrt(p (1 - p) / n) = 0.0229, and the 95% interval about +-1.96 of it."""
    n, p = 400, 0.3
    values = torch.zeros(n)
    values[: int(n * p)] = 1
    labels = torch.zeros(n, dtype=torch.long)
    boot = class_bootstrap(values[None], labels, 1, 4000, seed=3)[0, :, 0]
    assert boot.std().item() == pytest.approx(math.sqrt(p * (1 - p) / n), rel=0.06)
    low, high = interval(boot, 0.95)
    assert (high - low).item() == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.08)
    assert torch.equal(boot, class_bootstrap(values[None], labels, 1, 4000, seed=3)[0, :, 0])
    assert not torch.equal(boot, class_bootstrap(values[None], labels, 1, 4000, seed=4)[0, :, 0])


def test_resampling_stays_within_each_class():
    """Class 0 is all ones, class 1 all zeros: every resample keeps the class means exactly."""
    values = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    labels = torch.tensor([0, 0, 0, 1, 1])
    boot = class_bootstrap(values[None], labels, 3, 50, seed=0)[0]
    assert torch.all(boot[:, 0] == 1) and torch.all(boot[:, 1] == 0) and torch.isnan(boot[:, 2]).all()
    assert torch.allclose(pooled(boot[:, :2], torch.tensor([3, 2])), torch.full((50,), 0.6, dtype=torch.float64))
    assert class_means(values, labels, 2).tolist() == [1.0, 0.0]


def test_evaluate_policy_reports_paired_changes_per_class_and_their_mean():
    alphas = [0.0, 1.0]
    labels = torch.tensor([0, 0, 1, 1])
    correct = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    usage = torch.tensor([[1.0, 1.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.0]])
    result = evaluate_policy(correct, usage, torch.tensor([1, 1, 1, 1]), labels, 2, alphas, resamples=200, confidence=0.9, seed=0)
    assert result.accuracy_change.tolist() == [0.5, -0.5]
    assert result.usage_change.tolist() == [-0.5, -0.25]
    assert result.mean_accuracy_change == 0.0 and result.mean_usage_change == -0.375
    assert result.usage_change_ci[0][0] == result.usage_change_ci[1][0] == -0.5  # no spread in class 0
    low, high = result.mean_accuracy_change_ci
    assert -0.5 <= low < 0 < high <= 0.5


# ------------------------------------------------------------------------------------- nulls
def test_outside_null_uses_the_central_interval_of_the_draws():
    null = torch.arange(21, dtype=torch.float64)[:, None]  # 0..20: central 90% is [1, 19]
    low, high = interval(null.expand(-1, 3), confidence=0.9)
    assert low.tolist() == pytest.approx([1.0] * 3) and high.tolist() == pytest.approx([19.0] * 3)
    assert [side(e, lo, hi) for e, lo, hi in zip([0.5, 10.0, 19.5], low.tolist(), high.tolist())] == [-1, 0, 1]
    assert side(0.5, 1.0, 19.0) == -1 and side(1.0, 1.0, 19.0) == 0


def test_a_decision_network_that_ignores_the_sae_flags_no_class():
    """When steering changes no gate (zero decision weights along every decoded change), the
    class set's effect and every random set's are all 0: no class lies outside the null."""
    from test_steering import setup

    from pipeline.steering.sweep import result_rows, run_sweep, variants_for

    model, sae, config, images, labels, sets = setup()
    with torch.no_grad():
        model.decision[-1].weight.zero_()
        model.decision[-1].bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    variants = variants_for(["per_class", "random_per_class"], [-1.0, 2.0], draws=2)
    tally, _ = run_sweep(model, sae, sets, images, labels, config, variants, "scale", True, 16, torch.device("cpu"))
    nulls = class_null(result_rows(tally, config.class_names), "per_class", "random_per_class", 0.95)
    assert len(nulls) == 5
    assert all(side(*triple) == 0 and triple == (0.0, 0.0, 0.0) for per_alpha in nulls.values() for triple in per_alpha.values())


def test_class_null_compares_a_class_set_with_its_own_random_draws():
    rows = [row(0.5, 0.6, 0, 0.0), row(0.5, 0.2, 0, 1.0)]  # the class set: usage -0.4 at alpha 1
    for d, usage in enumerate([0.55, 0.6, 0.65]):
        rows += [row(0.5, 0.6, 0, 0.0, "random_per_class", d), row(0.5, usage, 0, 1.0, "random_per_class", d)]
    effect, low, high = class_null(rows, "per_class", "random_per_class", 0.9)[0][1.0]
    assert effect == pytest.approx(-0.4) and low == pytest.approx(-0.045) and high == pytest.approx(0.045)
    assert side(effect, low, high) == -1


# ------------------------------------------------------------------ the predicted-class strategy
def _sets(n_classes: int = 3, n_latents: int = 6) -> SteeringSets:
    per_class = torch.zeros(n_classes, n_latents, dtype=torch.bool)
    for c in range(n_classes):
        per_class[c, 2 * c : 2 * c + 2] = True
    none = torch.zeros(1, n_latents, dtype=torch.bool)
    return SteeringSets(per_class, per_class[0], none, none[None].expand(1, n_classes, -1), torch.ones(n_latents))


def test_the_predicted_class_strategy_equals_the_oracle_when_the_model_is_always_right():
    sets, labels = _sets(), torch.tensor([0, 1, 2, 1])
    right = SteerBatch(labels, labels.clone())
    assert torch.equal(per_class_predicted_mask(sets, right, 0), per_class_mask(sets, right, 0))


def test_the_predicted_class_strategy_follows_the_prediction_when_it_is_wrong():
    sets = _sets()
    batch = SteerBatch(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1]))  # images 1 and 2 mispredicted
    predicted, oracle = per_class_predicted_mask(sets, batch, 0), per_class_mask(sets, batch, 0)
    assert torch.equal(predicted[0], oracle[0])
    assert torch.equal(predicted[1], sets.per_class[2]) and torch.equal(predicted[2], sets.per_class[1])
    assert not torch.equal(predicted[1], oracle[1])


def test_the_sweep_feeds_the_unsteered_prediction_to_the_predicted_strategy():
    """In run_sweep the predicted-class variant equals the oracle variant on images the model gets
    right and the oracle of the predicted class elsewhere; checked against the naive path."""
    from test_steering import setup

    from pipeline.steering.sweep import result_rows, run_sweep, variants_for

    from reference_steering import steer_batch_naive

    model, sae, config, images, labels, sets = setup()
    variants = variants_for(["per_class", "per_class_predicted"], [-1.0, 4.0], draws=1)
    fast, _ = run_sweep(model, sae, sets, images, labels, config, variants, "scale", True, 16, torch.device("cpu"))
    naive, _ = run_sweep(model, sae, sets, images, labels, config, variants, "scale", True, 16, torch.device("cpu"),
                         steer_fn=steer_batch_naive)
    assert result_rows(fast, config.class_names) == result_rows(naive, config.class_names)
    predictions = fast.all_base_predictions
    with torch.no_grad():
        assert torch.equal(predictions, model(config.preprocess(images)).logits.argmax(-1))
    assert (predictions != labels).any()  # the random model makes mistakes: the two strategies can differ
    _, oracle_correct, oracle_usage = fast.image_outcomes("per_class")
    _, predicted_correct, predicted_usage = fast.image_outcomes("per_class_predicted")
    right = predictions == labels
    assert torch.equal(predicted_usage[:, right], oracle_usage[:, right])


def test_dose_response_finds_the_largest_reduction_at_no_accuracy_cost_and_the_least_alpha():
    from pipeline.steering.analysis import dose_response
    from pipeline.steering.results import Curve

    alphas = [-1.0, 0.0, 1.0, 2.0, 4.0, 8.0]
    curve = Curve(alpha=alphas, accuracy=[0.9, 0.9, 0.9, 0.9, 0.8, 0.9], head_usage=[0.8, 0.5, 0.4, 0.3, 0.1, 0.3],
                  accuracy_range=[[a, a] for a in alphas], head_usage_range=[[u, u] for u in alphas])
    d = dose_response(curve, base_accuracy=0.9, base_usage=0.5, tolerance=0.0)
    # alpha 4 reaches 0.4 but loses accuracy; 0.2 is reached at +2 and again at +8: the least |alpha| is +2
    assert (d.usage_reduction, d.alpha) == (pytest.approx(0.2), 2.0)
    assert d.last_step_usage_change == pytest.approx(0.2)  # 0.3 at +8 against 0.1 at +4
    loose = dose_response(curve, base_accuracy=0.9, base_usage=0.5, tolerance=0.1)
    assert (loose.usage_reduction, loose.alpha) == (pytest.approx(0.4), 4.0)
