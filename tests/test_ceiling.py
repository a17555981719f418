"""The ceiling (pipeline/steering/ceiling.py) against brute force through the full final block,
and the CLS-row path (pipeline/model/cls_row.py) against the final block on both head paths."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.cls_row import all_patterns, head_terms, pattern_codes, pattern_logits, unsupported
from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import build_gated_vit, model_config
from pipeline.params.model import ModelParams
from pipeline.steering.ceiling import (
    OWN,
    choose_pattern,
    greedy_patterns,
    pareto,
    search_ceiling,
    split_terms,
    summarise,
)

from conftest import TINY_SHAPE

N_CLASSES = 3


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = build_gated_vit(ModelParams(**TINY_SHAPE), num_classes=N_CLASSES).eval()
    with torch.no_grad():  # decision networks that keep some heads and drop others
        for net in model.decision:
            net.weight.normal_(0, 0.5)
            net.bias.normal_(0, 0.5)
        # a final block whose heads matter to the prediction, so that patterns differ
        model.vit.blocks[-1].attn.proj.weight.mul_(30)
        model.vit.head.weight.mul_(10)
    config = model_config(ModelParams(**TINY_SHAPE), model.vit, N_CLASSES, ["a", "b", "c"], 5.0)
    return model, config


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


@pytest.mark.parametrize("head_path", ["masked", "skipping"])
def test_the_cls_row_path_equals_the_full_final_block_on_random_gates(head_path):
    model, config = tiny()
    model.head_path = head_path
    x, _ = images(12, 1)
    with torch.no_grad():
        tokens = model.forward_to_final(config.preprocess(x))
        gates = (torch.rand(12, model.num_heads, generator=torch.Generator().manual_seed(2)) > 0.5).float()
        full = model.forward_final(tokens, gates)
        row = pattern_logits(model, head_terms(model, tokens), gates[:, None, :])[:, 0]
        assert torch.allclose(row, full, atol=1e-5), (row - full).abs().max()
        # every shared pattern at once, against the block run with that pattern for every image
        patterns = all_patterns(model.num_heads)
        shared = pattern_logits(model, head_terms(model, tokens), patterns)
        for p in (0, 5, len(patterns) - 1):
            assert torch.allclose(shared[:, p], model.forward_final(tokens, patterns[p].expand(12, -1)), atol=1e-5)
    assert unsupported(model) is None
    assert pattern_codes(patterns).tolist() == list(range(len(patterns)))


def brute_force(model, config: ModelConfig, x: torch.Tensor, labels: torch.Tensor):
    """Per image: correct with the model's own gates, and under every pattern, all through the
    full final block (`forward_final`)."""
    with torch.no_grad():
        tokens = model.forward_to_final(config.preprocess(x))
        own = (model.final_gate_logits(tokens[:, 0]) > 0).float()
        own_correct = model.forward_final(tokens, own).argmax(-1) == labels
        patterns = all_patterns(model.num_heads)
        per_pattern = torch.stack([model.forward_final(tokens, p.expand(len(x), -1)).argmax(-1) == labels for p in patterns], 1)
    return own, own_correct, patterns, per_pattern


def naive_rule(acc: list[float], usage: list[float], base_acc: float, base_usage: float, tol: float) -> int:
    """Least usage among the own gates and the qualifying patterns; ties: higher accuracy, then
    the own gates, then the lower code."""
    candidates = [(base_usage, -base_acc, 0, OWN)] + [(usage[p], -acc[p], 1, p) for p in range(len(acc)) if acc[p] >= base_acc - tol - 1e-12]
    return min(candidates)[3]


@pytest.mark.parametrize("tolerance", [0.0, 0.2])
def test_the_ceiling_equals_brute_force_through_the_full_final_block(tolerance):
    model, config = tiny()
    (xv, yv), (xt, yt) = images(45, 3), images(60, 4)
    select = split_terms(model, config, xv, yv, 16, torch.device("cpu"))
    test = split_terms(model, config, xt, yt, 16, torch.device("cpu"))
    found = search_ceiling(model, select, test, "val", config.class_names, tolerance, "exhaustive")

    own_v, own_ok_v, patterns, ok_v = brute_force(model, config, xv, yv)
    own_t, own_ok_t, _, ok_t = brute_force(model, config, xt, yt)
    assert torch.equal(select.own_correct, own_ok_v) and torch.equal(test.own_gates, own_t)
    usage = patterns.mean(1).tolist()
    for c in found.classes:
        v, t = yv == c.class_id, yt == c.class_id
        acc = ok_v[v].double().mean(0).tolist()
        expected = naive_rule(acc, usage, float(own_ok_v[v].double().mean()), float(own_v[v].mean()), tolerance)
        assert c.pattern == expected
        if expected == OWN:
            assert (c.accuracy, c.usage) == pytest.approx((float(own_ok_t[t].double().mean()), float(own_t[t].mean())))
        else:
            assert c.heads == patterns[expected].nonzero().flatten().tolist()
            assert c.accuracy == pytest.approx(float(ok_t[t, expected].double().mean())) and c.usage == pytest.approx(usage[expected])
        assert c.baseline_accuracy == pytest.approx(float(own_ok_t[t].double().mean()))
    # every (split, class, pattern) row is in the table, with the brute-force accuracy
    rows = {(r["split"], r["class_id"], r["pattern"]): r for r in found.rows}
    assert len(rows) == 2 * N_CLASSES * len(patterns)
    assert rows[("test", 1, 6)]["accuracy"] == pytest.approx(float(ok_t[yt == 1, 6].double().mean()))
    assert rows[("val", 2, 3)]["heads_kept"] == 2

    summary = summarise(found, test, N_CLASSES, "val", ["h0", "h1", "h2", "h3"], 0, 0.95, 0)
    assert summary.mean_usage_change_ci == summary.mean_accuracy_change_ci == [None, None]  # no resamples: JSON has no NaN
    changes = [c.usage - c.baseline_usage for c in found.classes]
    assert summary.mean_usage_change == pytest.approx(sum(changes) / len(changes))
    assert summary.classes_with_reduction == sum(ch < 0 for ch in changes)
    accuracy_changes = [c.accuracy - c.baseline_accuracy for c in found.classes]
    assert summary.mean_accuracy_change == pytest.approx(sum(accuracy_changes) / len(accuracy_changes))


def test_a_looser_tolerance_never_reaches_less_far():
    model, config = tiny(1)
    (xv, yv), (xt, yt) = images(45, 5), images(45, 6)
    select = split_terms(model, config, xv, yv, 16, torch.device("cpu"))
    test = split_terms(model, config, xt, yt, 16, torch.device("cpu"))
    strict = search_ceiling(model, select, test, "val", config.class_names, 0.0, "exhaustive")
    loose = search_ceiling(model, select, test, "val", config.class_names, 1.0, "exhaustive")
    for s, lo in zip(strict.classes, loose.classes):
        assert lo.usage <= s.usage + 1e-12 or lo.pattern == OWN and s.pattern == OWN
    assert all(c.pattern == 0 for c in loose.classes)  # tolerance 1: every pattern qualifies, no heads wins


def test_choose_pattern_breaks_ties_by_accuracy_then_own_gates_then_code():
    codes = torch.tensor([3, 5, 6])
    usage = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    assert choose_pattern(torch.tensor([0.8, 0.9, 0.9], dtype=torch.float64), usage, codes, 0.8, 0.75, 0.0) == (1, 5)  # 0.9 beats 0.8; code 5 < 6
    assert choose_pattern(torch.tensor([0.7, 0.7, 0.7], dtype=torch.float64), usage, codes, 0.8, 0.75, 0.0) == (-1, OWN)  # none qualifies
    assert choose_pattern(torch.tensor([0.8, 0.8, 0.8], dtype=torch.float64), usage, codes, 0.8, 0.5, 0.0) == (-1, OWN)  # same usage and accuracy


def test_greedy_search_drops_heads_while_the_rule_holds():
    model, config = tiny(2)
    x, y = images(30, 7)
    terms = split_terms(model, config, x, y, 16, torch.device("cpu"))
    base = float(terms.own_correct.double().mean())
    tried = greedy_patterns(model, terms.terms, terms.labels, base, 0.1)
    assert tried[-1].tolist() == [1.0] * model.num_heads or torch.ones(model.num_heads).tolist() in tried.tolist()
    assert len(tried) <= 1 + model.num_heads * (model.num_heads + 1) // 2
    # the greedy search's chosen pattern meets the rule, and exhaustive search reaches at least as far
    ok = all_patterns(model.num_heads)
    exhaustive_acc = (pattern_logits(model, terms.terms, ok).argmax(-1) == terms.labels[:, None]).double().mean(0)
    greedy_acc = (pattern_logits(model, terms.terms, tried).argmax(-1) == terms.labels[:, None]).double().mean(0)
    g = min((float(tried[i].mean()) for i in range(len(tried)) if greedy_acc[i] >= base - 0.1 - 1e-12), default=1.0)
    e = min(float(ok[i].mean()) for i in range(len(ok)) if exhaustive_acc[i] >= base - 0.1 - 1e-12)
    assert e <= g


def test_pareto_keeps_the_points_nothing_beats():
    usage = torch.tensor([0.0, 0.25, 0.25, 0.5, 0.75, 1.0])
    accuracy = torch.tensor([0.1, 0.5, 0.4, 0.5, 0.9, 0.9])
    assert pareto(usage, accuracy) == [0, 1, 4]
