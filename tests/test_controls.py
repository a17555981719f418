"""The controls (docs/METHOD.md, section 6): plain directions moved by exactly the per-class SAE
steer's norm, per image and alpha; the class direction from the training split; the gate
direction as the steepest descent of the gate logits."""

from __future__ import annotations

import torch
from test_steering import N_CLASSES, normalised, setup

from pipeline.steering.controls import (
    class_mean_directions,
    gate_closing_direction,
    matched_input,
    random_directions,
    read_directions,
    write_directions,
)
from pipeline.steering.strategies import MATCHED_TO, STRATEGIES, SteerBatch
from pipeline.steering.sweep import Variant, decision_inputs

CONTROLS = [name for name, s in STRATEGIES.items() if s.is_control]
ALPHAS = [-1.0, -0.5, 0.0, 0.5, 2.0, 32.0]


def _inputs(mode: str, keep_error: bool):
    model, sae, config, images, labels, sets = setup()
    with torch.no_grad():
        x = model.forward_to_final(normalised(model, config, images))[:, 0]
        batch = SteerBatch(labels, labels.roll(1))  # predictions unlike the labels: the norm follows the label
        variants = [Variant(name, a, d) for name in [MATCHED_TO, *CONTROLS] for a in ALPHAS for d in range(2)]
        inputs = decision_inputs(sae, sets, x, batch, variants, mode, keep_error)
        z = sae.encode(x)
    return sae, sets, x, z, labels, variants, inputs


def test_registry_kinds_are_exclusive():
    assert set(CONTROLS) == {"random_direction", "class_direction", "gate_direction"}
    for name, strategy in STRATEGIES.items():
        assert (strategy.mask is None) == strategy.is_control, name
        if strategy.is_control and strategy.null is not None:
            assert STRATEGIES[strategy.null].is_control and STRATEGIES[strategy.null].uses_draws


@torch.no_grad()
def test_every_control_moves_each_image_by_the_per_class_steers_norm_at_each_alpha():
    for mode, keep_error in (("scale", True), ("add", True), ("scale", False)):
        sae, sets, x, z, labels, variants, inputs = _inputs(mode, keep_error)
        for a in ALPHAS:
            # the per-class steer's change to the SAE's output, written out here (not the library's)
            mask = sets.per_class[labels]
            z_own = torch.where(mask, (1 + a) * z if mode == "scale" else z + a * sets.mean_active, z)
            own = torch.linalg.vector_norm(sae.decode(z_own) - sae.decode(z), dim=1)
            if keep_error:  # then it is the per-class variant's own x' - x
                i = variants.index(Variant(MATCHED_TO, a, 0))
                assert torch.allclose(torch.linalg.vector_norm(inputs[i] - x, dim=1), own, rtol=1e-4, atol=1e-5)
            if a != 0:
                assert (own > 0).float().mean() > 0.3  # the check below is not vacuous (in mode scale an image
                # whose class latents are all silent is not moved)
            for name in CONTROLS:
                for d in range(2):
                    moved = inputs[variants.index(Variant(name, a, d))] - x
                    norm = torch.linalg.vector_norm(moved, dim=1)
                    assert torch.allclose(norm, own, rtol=1e-4, atol=2e-5), (mode, keep_error, name, a)
                    if a == 0:
                        assert torch.equal(moved, torch.zeros_like(moved))  # alpha 0 is the unsteered input, exactly


def test_a_control_moves_along_its_direction_signed_as_alpha():
    _, sets, x, _, labels, variants, inputs = _inputs("add", True)  # mode add moves every image
    expected = {
        "class_direction": lambda d: sets.directions.class_mean[labels],
        "gate_direction": lambda d: sets.directions.gate.expand(len(labels), -1),
        "random_direction": lambda d: sets.directions.random[d][labels],
    }
    for name, direction in expected.items():
        for a in (-0.5, 2.0):
            for d in range(2):
                moved = inputs[variants.index(Variant(name, a, d))] - x
                unit = moved / torch.linalg.vector_norm(moved, dim=1, keepdim=True)
                assert torch.allclose(unit, (1 if a > 0 else -1) * direction(d), atol=1e-3), (name, a, d)


def test_matched_input_formula():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    u = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    norm = torch.tensor([[5.0], [2.0]])
    assert torch.equal(matched_input(x, u, norm, 3.0), torch.tensor([[4.0, 6.0], [2.0, 0.0]]))
    assert torch.equal(matched_input(x, u, norm, -0.25), torch.tensor([[-2.0, -2.0], [-2.0, 0.0]]))
    assert torch.equal(matched_input(x, u, norm, 0.0), x)


def test_class_directions_are_class_means_minus_the_mean_normalised():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, generator=gen) + 2.0
    labels = torch.randint(0, 3, (30,), generator=gen)
    labels[labels == 2] = 0  # class 2 has no images; class 3 does not appear either
    got = class_mean_directions(x, labels, 4)
    for c in range(2):
        offset = x[labels == c].mean(0) - x.mean(0)
        assert torch.allclose(got[c], offset / offset.norm(), atol=1e-6)
    assert torch.equal(got[2], torch.zeros(5)) and torch.equal(got[3], torch.zeros(5))


def test_the_gate_direction_is_the_steepest_descent_of_the_summed_gate_logits():
    gen = torch.Generator().manual_seed(4)
    net = torch.nn.Linear(12, 4)
    u = gate_closing_direction(net.weight)
    x = torch.randn(12, requires_grad=True)
    net(x).sum().backward()
    assert torch.allclose(u, -x.grad / x.grad.norm(), atol=1e-6)
    others = torch.nn.functional.normalize(torch.randn(500, 12, generator=gen), dim=1)
    with torch.no_grad():
        assert (net.weight @ u).sum() < (others @ net.weight.T).sum(1).min()  # lowers the logits more than any other unit move


def test_random_directions_are_seeded_unit_and_distinct():
    a, b = random_directions(3, 8, 4, seed=0), random_directions(3, 8, 4, seed=0)
    assert torch.equal(a, b) and a.shape == (4, 3, 8)
    assert torch.allclose(a.norm(dim=-1), torch.ones(4, 3))
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[0, 0], a[0, 1])
    assert not torch.allclose(random_directions(3, 8, 4, seed=1), a)


def test_directions_round_trip(tmp_path):
    _, sets, *_ = _inputs("scale", True)
    write_directions(tmp_path / "d.safetensors", sets.directions)
    back = read_directions(tmp_path / "d.safetensors")
    assert torch.equal(back.class_mean, sets.directions.class_mean) and torch.equal(back.gate, sets.directions.gate)
    assert torch.equal(back.random, sets.directions.random)
    assert N_CLASSES == back.class_mean.shape[0]
