"""pipeline/interpret/latents.py against brute force and hand-built cases; pipeline/interpret/cards.py's join."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.interpret import latents as it
from pipeline.interpret.cards import Interpretation, compare_shifts, pushes
from pipeline.sae.topk import TopKSAE
from pipeline.steering.sweep import steer_latents, steered_input


# ------------------------------------------------------------------------------- galleries
def _codes(n: int, n_latents: int, k: int, seed: int, levels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random TopK codes (values >= 0, some exactly 0); `levels` quantises values to force ties."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n_latents, generator=gen)[:k] for _ in range(n)]).sort(1).values
    values = torch.rand(n, k, generator=gen)
    if levels:
        values = (values * levels).floor() / levels
    return values, indices


def _brute_force(values: torch.Tensor, indices: torch.Tensor, n_latents: int, top_n: int) -> tuple[list, list]:
    dense = torch.zeros(values.shape[0], n_latents)
    dense.scatter_(1, indices, values)
    rows, vals = [], []
    for j in range(n_latents):
        firing = [(float(dense[r, j]), r) for r in range(values.shape[0]) if dense[r, j] > 0]
        firing.sort(key=lambda t: (-t[0], t[1]))  # larger first, then the lower row
        rows.append([r for _, r in firing[:top_n]])
        vals.append([v for v, _ in firing[:top_n]])
    return rows, vals


@pytest.mark.parametrize("levels", [None, 4], ids=["distinct", "many-ties"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_streaming_top_images_equal_brute_force_with_ties_to_the_lower_row(levels, batch):
    n, n_latents, k, top_n = 60, 12, 3, 5
    values, indices = _codes(n, n_latents, k, seed=3, levels=levels)
    top = it.top_images([(values[s:s + batch], indices[s:s + batch]) for s in range(0, n, batch)], n_latents, top_n)
    rows, vals = _brute_force(values, indices, n_latents, top_n)
    for j in range(n_latents):
        got = [r for r in top.rows[j].tolist() if r >= 0]
        assert got == rows[j], j
        assert top.values[j, : len(got)].tolist() == pytest.approx(vals[j])
        assert (top.values[j, len(got):] == 0).all()


def test_a_latent_that_fires_on_fewer_images_than_n_has_empty_slots():
    values = torch.tensor([[0.5, 0.0], [0.2, 0.0]])
    indices = torch.tensor([[0, 1], [0, 1]])
    top = it.top_images([(values, indices)], n_latents=3, top_n=3)
    assert top.rows.tolist() == [[0, 1, -1], [-1, -1, -1], [-1, -1, -1]]


# ---------------------------------------------------------------------------------- purity
def test_labels_purity_and_entropy_on_hand_built_mass():
    mass = torch.tensor([
        [3.0, 1.0, 0.0],   # 75% class 0
        [1.0, 1.0, 0.0],   # a tie: the lower class, purity 0.5, entropy 1 bit
        [0.0, 0.0, 2.0],   # pure class 2
        [0.0, 0.0, 0.0],   # never fires
    ])
    p = it.class_purity(mass)
    assert p.label.tolist() == [0, 0, 2, -1]
    assert p.purity.tolist() == pytest.approx([0.75, 0.5, 1.0, 0.0])
    h = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    assert p.entropy.tolist() == pytest.approx([h, 1.0, 0.0, 0.0])


def test_class_mass_sums_activations_per_class():
    acts = torch.tensor([[1.0, 0.0], [2.0, 3.0], [0.5, 0.0]])
    labels = torch.tensor([0, 1, 0])
    assert it.class_mass(acts, labels, 2).tolist() == [[1.5, 2.0], [0.0, 3.0]]


def test_thresholded_directions_fire_on_their_paired_rate():
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    out = it.thresholded(proj, torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64))
    assert (out > 0).sum(0).tolist() == [20, 100, 200]
    assert (out >= 0).all()


def test_the_sae_basis_is_purer_than_random_and_pca_directions_when_data_is_built_so():
    """Embeddings = one-hot class direction (a sparse class code) plus a big shared nuisance
    direction: class-aligned directions are pure, random ones mix classes, and the leading
    principal direction is the nuisance, so PCA is less pure than the class directions."""
    n_classes, dim, per_class = 4, 8, 100
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.zeros(len(labels), dim, dtype=torch.float64)
    x[torch.arange(len(labels)), labels] = 1.0
    x[:, 7] = 5.0 * torch.randn(len(labels), generator=gen, dtype=torch.float64)
    class_dirs = torch.eye(dim, dtype=torch.float64)[:n_classes]
    rates = torch.full((n_classes,), 0.25, dtype=torch.float64)
    aligned, aligned_share = it.direction_purity(x, class_dirs, rates, labels, n_classes, top_n=10)
    assert aligned.label.tolist() == [0, 1, 2, 3] and aligned.purity.min() > 0.99 and (aligned_share == 1).all()
    random, _ = it.direction_purity(x, it.random_directions(32, dim, seed=0), torch.full((32,), 0.25, dtype=torch.float64), labels, n_classes)
    assert random.purity.mean() < 0.6
    pca = it.pca_directions(x, 2)
    assert abs(float(pca[0, 7])) > 0.99 and torch.allclose(pca[1], -pca[0])  # the nuisance, both signs
    pca_purity, _ = it.direction_purity(x, pca, torch.full((2,), 0.25, dtype=torch.float64), labels, n_classes)
    assert pca_purity.purity.max() < 0.5


# ----------------------------------------------------------------------------- attribution
def _sae(dim: int = 6, n_latents: int = 10, k: int = 3, scale: float = 0.7) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(dim, n_latents, k, input_scale=scale).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    return sae


def test_attribution_equals_the_finite_difference_of_the_decision_logits():
    sae = _sae()
    decision = torch.nn.Linear(6, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    attribution = it.head_attribution(decision.weight, sae.decoder_directions())
    z = sae.encode(x)
    eps = 1e-3
    for j in range(sae.n_latents):
        moved = z.clone()
        moved[:, j] += eps
        shifted = decision(x + sae.decode(moved) - sae.decode(z))
        torch.testing.assert_close((shifted - decision(x)) / eps, attribution[j].expand(5, -1), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", ["scale", "add"])
def test_unit_shift_times_alpha_is_the_mean_logit_shift_of_steering(mode):
    """The prediction `interpret` makes equals what the steering code does to the mean gate
    logit (keep_error on), for any alpha: the relation is exact, not an approximation."""
    sae = _sae()
    decision = torch.nn.Linear(6, 4).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    z = sae.encode(x)
    set_mask = torch.zeros(sae.n_latents, dtype=torch.bool)
    set_mask[[1, 4, 7]] = True
    mean_active = torch.rand(sae.n_latents, dtype=torch.float64)
    weights = z.mean(0) if mode == "scale" else mean_active
    unit = it.unit_logit_shifts(set_mask[None], weights[None], it.head_attribution(decision.weight, sae.decoder_directions()))[0]
    for alpha in (-1.0, 0.5, 4.0):
        steered = steer_latents(z, set_mask.expand_as(z), alpha, mode, mean_active)
        measured = (decision(steered_input(x, z, steered, sae, keep_error=True)) - decision(x)).mean(0)
        torch.testing.assert_close(measured, alpha * unit, rtol=1e-9, atol=1e-10)


def test_rank_correlation_gives_ties_their_mean_rank():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    assert it._ranks(a).tolist() == [0.0, 1.5, 1.5, 3.0]
    assert it.spearman(a, torch.tensor([10.0, 20.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert it.pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


# --------------------------------------------------------------------- the join with steer
def _interp(unit_per_class: np.ndarray, unit_global: np.ndarray) -> Interpretation:
    return Interpretation(
        firing_rate=np.array([0.1, 0.2]), mean_activation=np.array([2.0, 1.0]), label=["a", "b"], purity=np.array([0.9, 0.6]),
        attribution=np.array([[0.5, -1.0], [0.0, 0.25]]), gallery_rows={0: [3, 1]},
        unit_shifts={("per_class", "scale"): unit_per_class, ("global", "scale"): unit_global,
                     ("per_class", "add"): unit_per_class, ("global", "add"): unit_global},
    )


def _row(strategy: str, alpha: float, class_id: int, keep: tuple[float, float], draw: int = 0) -> dict:
    return {"strategy": strategy, "alpha": alpha, "draw": draw, "class_id": class_id, "n": 10, "keep_h0": keep[0], "keep_h1": keep[1]}


def test_compare_shifts_pairs_alpha_times_unit_shift_with_the_keep_change_from_alpha_zero():
    interp = _interp(np.array([[1.0, -2.0], [0.5, 0.0]]), np.array([[0.2, 0.2], [0.2, 0.2]]))
    rows = [
        _row("per_class", 0.0, 0, (0.5, 0.5)), _row("per_class", 2.0, 0, (0.7, 0.1)),
        _row("per_class", 0.0, 1, (0.4, 0.4)), _row("per_class", 2.0, 1, (0.4, 0.5)),
        _row("random", 2.0, 0, (0.9, 0.9)),  # not a set interpret predicts: ignored
    ]
    comparison = compare_shifts(interp, rows, "scale", 2)
    assert comparison.predicted.tolist() == [2.0, -4.0, 1.0, 0.0]
    assert comparison.measured.tolist() == pytest.approx([0.2, -0.4, 0.0, 0.1])
    summary = comparison.summary()["per_class"]
    assert summary.points == 4 and summary.moved == 3
    assert summary.sign_agreement == pytest.approx(2 / 3)  # the last point moved against a zero prediction


def test_pushes_names_the_strongest_heads_at_the_mean_activation():
    interp = _interp(np.zeros((1, 2)), np.zeros((1, 2)))
    assert pushes(interp, 0, ["h0", "h1"]) == "h1 off (-2), h0 on (+1)"


def test_top_label_share_counts_the_most_common_class_among_gallery_images():
    labels = torch.tensor([0, 0, 1, 2, 1])
    rows = torch.tensor([[0, 1, 2, -1], [2, 4, 3, 0], [-1, -1, -1, -1]])
    share = it.top_label_share(rows, labels)
    assert share[:2].tolist() == pytest.approx([2 / 3, 0.5]) and torch.isnan(share[2])
    acts = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 0.0]])
    assert it.top_rows(acts, 2).tolist() == [[1, 2], [0, 1]]  # the tie goes to the lower row
