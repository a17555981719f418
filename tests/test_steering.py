"""Steering: alpha 0 is the identity, the fast path equals the naive one, signs behave."""

from __future__ import annotations

import torch

from pipeline.interpret.stats import membership
from pipeline.model.gated_vit import build_gated_vit, model_config
from pipeline.params.model import ModelParams
from pipeline.sae.topk import TopKSAE
from pipeline.steering.controls import control_directions
from pipeline.steering.headline import select_headline
from pipeline.steering.strategies import PER_CLASS, STRATEGIES, SteerBatch, SteeringSets
from pipeline.steering.sweep import (
    Tally,
    Variant,
    final_block_outcomes,
    random_class_sets,
    random_sets,
    result_rows,
    run_sweep,
    steer_batch,
    variants_for,
)

from conftest import TINY_SHAPE
from reference_steering import steer_batch_naive

TINY = TINY_SHAPE
N_CLASSES, N_LATENTS = 5, 64


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = build_gated_vit(ModelParams(**TINY), num_classes=N_CLASSES).eval()
    with torch.no_grad():  # logits spread around 0 so the gates vary between images and heads
        model.decision[-1].weight.normal_(0, 0.5)
        model.decision[-1].bias.zero_()
    sae = TopKSAE(24, N_LATENTS, k=8).eval()
    config = model_config(ModelParams(**TINY), model.vit, N_CLASSES, [f"c{i}" for i in range(N_CLASSES)], 5.0)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.arange(40) % N_CLASSES
    per_class = torch.zeros(N_CLASSES, N_LATENTS, dtype=torch.bool)
    for c in range(N_CLASSES):
        per_class[c, torch.randperm(N_LATENTS, generator=gen)[:10]] = True
    alive = torch.ones(N_LATENTS, dtype=torch.bool)
    sets = SteeringSets(
        per_class=per_class,
        global_set=per_class[0].clone(),
        random=random_sets(alive, 10, 2, seed=0),
        random_per_class=random_class_sets(alive, [10] * N_CLASSES, 2, seed=0),
        mean_active=torch.rand(N_LATENTS, generator=gen) + 0.5,
        directions=control_directions(torch.randn(60, 24, generator=gen), torch.arange(60) % N_CLASSES, N_CLASSES,
                                      model.decision_net(model.depth - 1).weight, draws=2, seed=0),
    )
    return model, sae, config, images, labels, sets


def normalised(model, config, images):

    return config.preprocess(images)


def test_alpha_zero_and_empty_set_reproduce_the_unsteered_model():
    model, sae, config, images, labels, sets = setup()
    x = normalised(model, config, images)
    with torch.no_grad():
        plain = model(x)
        tokens = model.forward_to_final(x)
    empty = SteeringSets(torch.zeros_like(sets.per_class), torch.zeros_like(sets.global_set), torch.zeros_like(sets.random),
                       torch.zeros_like(sets.random_per_class), sets.mean_active)
    batch = SteerBatch(labels, plain.logits.argmax(-1))
    for mode in ("scale", "add"):
        for keep_error in (True,):
            variants = [Variant("per_class", 0.0), Variant("global", 0.0), Variant("random", 0.0, 1)]
            gates, preds = steer_batch(model, sae, sets, tokens, batch, variants, mode, keep_error)
            assert torch.equal(gates, plain.gates[:, -1].expand(3, -1, -1))
            assert torch.equal(preds, plain.logits.argmax(-1).expand(3, -1))
            gates, preds = steer_batch(model, sae, empty, tokens, batch, [Variant("per_class", 3.0)], mode, keep_error)
            assert torch.equal(gates[0], plain.gates[:, -1]) and torch.equal(preds[0], plain.logits.argmax(-1))


def test_fast_path_equals_naive_full_model_path():
    model, sae, config, images, labels, sets = setup()
    x = normalised(model, config, images)
    variants = variants_for(list(STRATEGIES), [-1.0, 0.5, 4.0], draws=2)  # latent strategies and controls
    with torch.no_grad():
        batch = SteerBatch(labels, model(x).logits.argmax(-1))
    for mode, keep_error in (("scale", True), ("add", False)):
        with torch.no_grad():
            tokens = model.forward_to_final(x)
        fast_gates, fast_preds = steer_batch(model, sae, sets, tokens, batch, variants, mode, keep_error)
        naive_gates, naive_preds = steer_batch_naive(model, sae, sets, x, batch, variants, mode, keep_error)
        assert torch.equal(fast_gates, naive_gates)
        assert torch.equal(fast_preds, naive_preds)
        assert fast_gates.float().std() > 0  # the variants really differ


def test_deduplicated_final_block_equals_one_run_per_variant():
    model, _, config, images, _, _ = setup()
    with torch.no_grad():
        tokens = model.forward_to_final(normalised(model, config, images))
        gates = (torch.rand(6, len(images), 4, generator=torch.Generator().manual_seed(5)) > 0.5).float()
        gates[3] = gates[1]  # repeated patterns are computed once
        got = final_block_outcomes(model, tokens, gates, chunk=7)
        for v in range(6):
            logits = model.forward_final(tokens, gates[v])
            assert torch.equal(got[v], logits.argmax(-1))
            # and the logits themselves agree to float tolerance
            assert torch.allclose(model.forward_final(tokens[:5], gates[v][:5]), logits[:5], atol=1e-5)


def test_the_head_skipping_sweep_equals_the_masked_one():
    """steer.heads: the sweep computing only kept heads gives the masked sweep's rows."""
    model, sae, config, images, labels, sets = setup()
    variants = variants_for(["per_class", "global", "random"], [-1.0, 0.5, 4.0], draws=2)
    out = {}
    for path in ("masked", "skipping"):
        model.head_path = path
        tally, cls_inputs = run_sweep(model, sae, sets, images, labels, config, variants, "scale", True, 16, torch.device("cpu"))
        out[path] = (result_rows(tally, config.class_names), cls_inputs)
    assert out["masked"][0] == out["skipping"][0]
    assert torch.allclose(out["masked"][1], out["skipping"][1], atol=1e-5)
    assert len({r["head_usage"] for r in out["masked"][0]}) > 3  # the variants move the gates


def test_suppressing_class_latents_raises_usage_when_the_decision_net_says_so():
    """Decision weights = -u, u the direction of the class latents' decoder columns: amplifying
    the latents lowers every logit, suppressing them (alpha < 0) raises it."""
    model, sae, config, images, labels, sets = setup()
    x = normalised(model, config, images)
    with torch.no_grad():
        tokens = model.forward_to_final(x)
        cls = tokens[:, 0]
        z = sae.encode(cls)
        # per-class sets: the latents that actually fire for the class's images
        freq = torch.zeros(N_CLASSES, N_LATENTS).index_add_(0, labels, (z > 0).float())
        per_class = torch.zeros(N_CLASSES, N_LATENTS, dtype=torch.bool)
        for c in range(N_CLASSES):
            per_class[c, freq[c].topk(6).indices] = True
        sets = SteeringSets(per_class, per_class[0], sets.random, sets.random_per_class, sets.mean_active)
        u = (sae.W_dec[:, per_class.any(0)]).sum(1)
        u = u / u.norm()
        net = model.decision[-1]
        net.weight.copy_(-u.expand(4, -1))
        proj = cls @ u
        net.bias.copy_(proj.median() + torch.tensor([-0.2, -0.1, 0.1, 0.2]) * proj.std())
    variants = [Variant("per_class", a) for a in (-1.0, -0.5, 0.0, 1.0, 3.0)]
    gates, _ = steer_batch(model, sae, sets, tokens, SteerBatch(labels, labels), variants, "scale", True)
    usage = gates.mean(dim=(1, 2))
    assert 0.2 < usage[2] < 0.8
    assert usage[0] > usage[2] and usage[1] > usage[2]  # suppression keeps more heads
    assert usage[3] < usage[2] and usage[4] <= usage[3]  # amplification drops heads
    assert torch.all(usage[:-1] >= usage[1:])  # monotone in alpha


def test_sweep_tally_rows_match_direct_computation():
    model, sae, config, images, labels, sets = setup()
    variants = variants_for(["per_class", "random"], [-1.0, 2.0], draws=2)
    tally, cls = run_sweep(model, sae, sets, images, labels, config, variants, "scale", True, 16, torch.device("cpu"))
    naive, _ = run_sweep(model, sae, sets, images, labels, config, variants, "scale", True, 16, torch.device("cpu"), steer_fn=steer_batch_naive)
    rows = result_rows(tally, config.class_names)
    assert rows == result_rows(naive, config.class_names)
    assert len(rows) == len(variants) * N_CLASSES and len(cls) == len(images)
    # recompute one row by hand
    x = normalised(model, config, images)
    with torch.no_grad():
        batch = SteerBatch(labels, model(x).logits.argmax(-1))
    gates, preds = steer_batch_naive(model, sae, sets, x, batch, [Variant("random", 2.0, 1)], "scale", True)
    c = 3
    sel = labels == c
    row = next(r for r in rows if r["strategy"] == "random" and r["alpha"] == 2.0 and r["draw"] == 1 and r["class_id"] == c)
    assert row["n"] == int(sel.sum())
    assert abs(row["accuracy"] - (preds[0][sel] == c).float().mean().item()) < 1e-12
    assert abs(row["head_usage"] - gates[0][sel].mean().item()) < 1e-6
    assert abs(row["keep_h2"] - gates[0][sel][:, 2].mean().item()) < 1e-6


def test_headline_rule_picks_lowest_usage_within_tolerance():
    def row(c, a, acc, usage):
        return {"strategy": "per_class", "alpha": a, "draw": 0, "class_id": c, "class": f"c{c}", "n": 10,
                "accuracy": acc, "head_usage": usage, "keep_h0": usage, "keep_h1": usage}

    rows = [row(0, 0.0, 0.8, 0.9), row(0, 1.0, 0.8, 0.5), row(0, 2.0, 0.7, 0.1), row(0, -1.0, 0.9, 0.95),
            row(1, 0.0, 0.5, 0.4), row(1, 1.0, 0.4, 0.2)]
    strict = {c.class_id: c for c in select_headline(rows, rows, 2, tolerance=0.0, strategy=PER_CLASS)}
    assert strict[0].alpha == 1.0 and strict[0].usage == 0.5 and strict[0].heads == []
    assert strict[1].alpha == 0.0  # every other alpha loses accuracy
    loose = {c.class_id: c for c in select_headline(rows, rows, 2, tolerance=0.1, strategy=PER_CLASS)}
    assert loose[0].alpha == 2.0 and loose[1].alpha == 1.0
    assert abs(loose[0].usage_reduction - 0.8) < 1e-12


def test_random_sets_are_seeded_and_drawn_from_alive_latents():
    alive = torch.zeros(50, dtype=torch.bool)
    alive[10:30] = True
    a, b = random_sets(alive, 5, 3, seed=1), random_sets(alive, 5, 3, seed=1)
    assert torch.equal(a, b) and a.sum(1).tolist() == [5, 5, 5]
    assert not a[:, ~alive].any()
    assert not torch.equal(a[0], a[1])
    assert torch.equal(membership([[1, 3]], 5), torch.tensor([[False, True, False, True, False]]))


def test_tally_counts_per_class():
    tally = Tally(n_classes=3, n_heads=2)
    v = Variant("global", 1.0)
    tally.add(v, torch.tensor([0, 0, 2]), torch.tensor([0, 1, 2]), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    assert tally.count[v].tolist() == [2, 0, 1]
    assert tally.correct[v].tolist() == [1, 0, 1]
    assert tally.kept[v].tolist() == [[2, 1], [0, 0], [0, 0]]


# ------------------------------------------------------- the formula on hand-computed values
class _LinearSAE(torch.nn.Module):
    """A 2-d SAE with 3 latents whose codes and decoding are known by hand:
    z = relu(W x) (no top-k), decode(z) = D^T z + b."""

    dim, n_latents = 2, 3

    def __init__(self):
        super().__init__()
        self.W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        self.D = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]])  # rows: decoder directions
        self.b = torch.tensor([0.5, -0.5])

    def encode(self, x):
        return (x @ self.W.T).relu()

    def decode(self, z):
        return z @ self.D + self.b


def test_the_steering_formula_on_hand_computed_values():
    """x = (1, 2): z = (1, 2, 3), decode(z) = (5.5, -1.5). Steering latents {0, 2}:
    - scale, alpha 2: z' = (3, 2, 9); keep_error: x' = x + D^T (z' - z) = (1, 2) + (2*2 + 6*1, 6*-1) = (11, -4)
    - scale, alpha -1 (ablation): z' = (0, 2, 0); x' = (1, 2) - (2 + 3, -3) = (-4, 5)
    - add, alpha 0.5, m = (4, 0, 2): z' = (3, 2, 4); x' = (1, 2) + (2*2 + 1, -1) = (6, 1)
    - without keep_error: x' = decode(z'); scale alpha 2: (3*2 + 9 + 0.5, 2 - 9 - 0.5) = (15.5, -7.5)
    """
    from pipeline.steering.sweep import steer_latents, steered_input

    sae = _LinearSAE()
    x = torch.tensor([[1.0, 2.0]])
    z = sae.encode(x)
    assert z.tolist() == [[1.0, 2.0, 3.0]]
    mask = torch.tensor([[True, False, True]])
    mean_active = torch.tensor([4.0, 0.0, 2.0])

    def steer(alpha, mode, keep_error):
        z_steered = steer_latents(z, mask, alpha, mode, mean_active)
        return z_steered.tolist(), steered_input(x, z, z_steered, sae, keep_error).tolist()

    assert steer(2.0, "scale", True) == ([[3.0, 2.0, 9.0]], [[11.0, -4.0]])
    assert steer(-1.0, "scale", True) == ([[0.0, 2.0, 0.0]], [[-4.0, 5.0]])
    assert steer(-0.5, "scale", True) == ([[0.5, 2.0, 1.5]], [[-1.5, 3.5]])
    assert steer(0.5, "add", True) == ([[3.0, 2.0, 4.0]], [[6.0, 1.0]])
    assert steer(-1.0, "add", True) == ([[-3.0, 2.0, 1.0]], [[-9.0, 4.0]])
    assert steer(2.0, "scale", False) == ([[3.0, 2.0, 9.0]], [[15.5, -7.5]])
    assert steer(0.0, "add", False) == ([[1.0, 2.0, 3.0]], [[5.5, -1.5]])  # the plain reconstruction


def test_an_unknown_strategy_is_a_params_error_naming_it():
    import pytest

    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError, match=r"steer.strategies.1 = 'oracle': unknown strategy \(known: per_class, per_class_predicted, global, random, random_per_class, random_direction, class_direction, gate_direction\)"):
        variants_for(["global", "oracle"], [1.0], 1)


def test_every_registered_strategy_runs_through_the_sweep_and_the_registry_decides_draws():
    from pipeline.steering.strategies import STRATEGIES

    variants = variants_for(list(STRATEGIES), [1.0], draws=2)
    for name, strategy in STRATEGIES.items():
        draws = {v.draw for v in variants if v.strategy == name}
        assert draws == ({0, 1} if strategy.uses_draws else {0}), name
    model, sae, config, images, labels, sets = setup()
    tally, _ = run_sweep(model, sae, sets, images, labels, config, variants, "scale", True, 16, torch.device("cpu"))
    assert {v.strategy for v in tally.count} == set(STRATEGIES)


# ----------------------------------------------------------------- the averages behind tables
def test_overall_and_strategy_curves_average_images_then_draws():
    """overall(): accuracy and usage over all images of a variant (not a mean of class means);
    strategy_curves(): per alpha, the mean over a strategy's draws."""
    from pipeline.steering.sweep import overall, strategy_curves

    tally = Tally(n_classes=2, n_heads=2)
    labels = torch.tensor([0, 0, 0, 1])  # class 0 has 3 images, class 1 one
    base, r0, r1 = Variant("per_class", 0.0), Variant("random", 1.0, 0), Variant("random", 1.0, 1)
    tally.add(base, labels, torch.tensor([0, 0, 1, 0]), torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    tally.add(r0, labels, torch.tensor([0, 0, 0, 1]), torch.ones(4, 2))
    tally.add(r1, labels, torch.tensor([1, 1, 1, 0]), torch.zeros(4, 2))
    tally.add(Variant("random", 0.0, 0), labels, torch.tensor([0, 0, 0, 1]), torch.ones(4, 2))
    tally.add(Variant("random", 0.0, 1), labels, torch.tensor([0, 0, 0, 1]), torch.ones(4, 2))

    accuracy, usage = overall(tally, base)
    assert accuracy == 2 / 4  # images 0, 1 right; a mean of class means would give (2/3 + 0) / 2
    assert usage == 5 / 8  # kept heads over images x heads
    curves = strategy_curves(tally, ["per_class", "random"])
    assert curves["per_class"] == {"alpha": [0.0], "accuracy": [0.5], "head_usage": [0.625],
                                   "accuracy_range": [[0.5, 0.5]], "head_usage_range": [[0.625, 0.625]]}
    assert curves["random"]["alpha"] == [0.0, 1.0]
    assert curves["random"]["accuracy"] == [1.0, 0.5]  # draws at alpha 1: 1.0 and 0.0
    assert curves["random"]["head_usage"] == [1.0, 0.5]
    assert curves["random"]["accuracy_range"] == [[1.0, 1.0], [0.0, 1.0]]  # the spread over draws
