"""The SAE architectures beside TopK (docs/METHOD.md, section 7) and the generic autograd
trainer: BatchTopK's inference threshold, JumpReLU's straight-through gradients, Matryoshka's
prefix losses, the frozen control, and TopK's fast path against autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from test_sae import dictionary_data

from pipeline.params.sae import SaeParams
from pipeline.sae.batchtopk import BatchTopKSAE, MatryoshkaSAE, batch_topk, prefix_sizes
from pipeline.sae.jumprelu import JumpReLUFn, JumpReLUSAE, StepFn
from pipeline.sae.linear import Objective, normalized_mse, sparse_from_dense
from pipeline.sae.registry import ARCHITECTURES, load_sae, save_sae
from pipeline.sae.topk import TopKSAE
from pipeline.sae.training import _Grads, _new_sae, _train_step, evaluate_sae, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def params(architecture: str, **overrides) -> SaeParams:
    base = {"architecture": architecture, "n_latents": 48, "k": 4, "epochs": 6, "batch_size": 64, "warmup_steps": 5, "lr": 3e-3}
    return SaeParams(**{**base, **overrides})


DATA, ATOMS = dictionary_data(1200, 16, 40, 3, seed=0)
HELD_OUT, _ = dictionary_data(400, 16, 40, 3, seed=0)


def test_every_architecture_is_registered_and_the_params_accept_it():
    assert set(ARCHITECTURES) == {"topk", "batchtopk", "jumprelu", "matryoshka", "frozen_random"}
    for name in ARCHITECTURES:
        assert params(name).architecture == name


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "matryoshka", "frozen_random"])
def test_each_architecture_trains_decodes_linearly_and_round_trips(architecture, tmp_path):
    p = params(architecture)
    initial = _new_sae(DATA, p, torch.Generator().manual_seed(p.seed))
    sae, history = train_sae(DATA, p, "cpu", x_eval=HELD_OUT)
    assert type(sae) is ARCHITECTURES[architecture] and len(history) == p.epochs
    fvu_start, fvu_end = evaluate_sae(initial.eval(), HELD_OUT)["fvu"], history[-1]["test_fvu"]
    if architecture == "frozen_random":
        assert fvu_end == pytest.approx(fvu_start, rel=1e-6)
    else:
        assert fvu_end < 0.7 * fvu_start, (fvu_start, fvu_end)
    with torch.no_grad():
        z = sae.encode(HELD_OUT[:20])
        z2 = z.clone()
        z2[:, :5] += 1.5
        assert torch.allclose(sae.decode(z2) - sae.decode(z), (z2 - z) @ sae.decoder_directions(), atol=1e-4)
        values, indices = sae.encode_sparse(HELD_OUT[:20])
        assert values.shape == indices.shape and bool((values >= 0).all())
        assert torch.allclose(torch.zeros_like(z).scatter(1, indices, values), z)
    save_sae(tmp_path / "sae", sae, {})
    back = load_sae(tmp_path / "sae")
    assert type(back) is type(sae)
    for (name, a), (_, b) in zip(sae.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(back.encode(HELD_OUT), sae.encode(HELD_OUT))


def test_the_fast_topk_path_equals_autograd_in_gradients_and_in_a_few_steps():
    p = params("topk", epochs=2)
    sae = _new_sae(DATA, p, torch.Generator().manual_seed(0))
    xs = DATA[:64] * sae.input_scale
    dead = torch.zeros(sae.n_latents, dtype=torch.bool)
    dead[::3] = True  # AuxK in play
    objective = Objective(aux_coef=1 / 32, k_aux=8)
    # one gradient: hand-written against autograd on training_loss
    rows = torch.nn.Parameter(sae.W_dec.data.T.clone())
    grads = _Grads(torch.zeros_like(sae.W_enc), torch.zeros_like(sae.b_enc), torch.zeros_like(rows), torch.zeros_like(sae.b_dec))
    reference = copy.deepcopy(sae)
    with torch.no_grad():
        reference.W_dec.copy_(rows.data.T)
    fast = _train_step(sae, rows.data, xs, dead, objective.k_aux, objective.aux_coef, grads, torch.empty(64, sae.n_latents))
    terms = reference.training_loss(xs, dead, objective)
    terms.loss.backward()
    reference.remove_parallel_grad_()
    assert torch.allclose(fast.loss, terms.loss, atol=1e-6)
    assert torch.allclose(grads.w_enc, reference.W_enc.grad, atol=1e-5)
    assert torch.allclose(grads.b_enc, reference.b_enc.grad, atol=1e-5)
    assert torch.allclose(grads.rows, reference.W_dec.grad.T, atol=1e-5)
    assert torch.allclose(grads.b_dec, reference.b_dec.grad, atol=1e-5)
    # two epochs of both trainers from the same start
    fast_sae, fast_hist = train_sae(DATA, p, "cpu")
    auto_sae, auto_hist = train_sae(DATA, params("topk", epochs=2, trainer="autograd"), "cpu")
    for name, value in fast_sae.state_dict().items():
        assert torch.allclose(value, auto_sae.state_dict()[name], atol=2e-4), name
    assert fast_hist[-1]["loss"] == pytest.approx(auto_hist[-1]["loss"], rel=1e-3)


def test_batch_topk_keeps_k_per_sample_on_average_and_the_threshold_reproduces_it_on_held_out_data():
    pre = torch.rand(8, 30)
    z = batch_topk(pre, 3)
    assert int((z > 0).sum()) == 24
    assert torch.equal(z[z > 0].sort().values, pre.flatten().topk(24).values.sort().values)
    for architecture in ("batchtopk", "matryoshka"):
        sae, _ = train_sae(DATA, params(architecture, epochs=8, batchtopk={"threshold_momentum": 0.9}), "cpu")
        assert float(sae.threshold) > 0
        l0 = evaluate_sae(sae, HELD_OUT)["l0"]
        assert abs(l0 - sae.k) < 0.25 * sae.k, (architecture, l0)


def test_the_batchtopk_threshold_is_a_running_mean_of_the_smallest_kept_value():
    sae = BatchTopKSAE(4, 6, 2)
    first, second = torch.tensor([[5.0, 4.0, 3.0, 0, 0, 0]] * 2), torch.tensor([[9.0, 8.0, 1.0, 0, 0, 0]] * 2)
    sae.train_codes(first, momentum=0.9)
    assert float(sae.threshold) == pytest.approx(4.0)  # the first batch sets it
    sae.train_codes(second, momentum=0.9)
    assert float(sae.threshold) == pytest.approx(0.9 * 4.0 + 0.1 * 8.0)


def test_matryoshka_prefix_losses_equal_hand_computed_ones():
    assert prefix_sizes(64, [0.0625, 0.25, 1.0]) == [4, 16, 64]
    assert prefix_sizes(10, [0.5]) == [5, 10]
    sae = MatryoshkaSAE(3, 4, 2, prefixes=[1, 2, 4])
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0, 1], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
        sae.b_dec.copy_(torch.tensor([0.5, 0.0, 0.0]))
    z = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 3.0, 0.0, 1.0]])
    xs = torch.tensor([[2.0, 0.0, 1.0], [1.5, 3.0, 0.0]])
    denominator = float((xs - xs.mean(0)).square().sum())
    by_hand = []
    for m in (1, 2, 4):  # decode with latents [0, m) only, by hand
        x_hat = torch.zeros(2, 3) + torch.tensor([0.5, 0.0, 0.0])
        for i in range(2):
            for j in range(m):
                x_hat[i] += z[i, j] * sae.W_dec[:, j].detach()
        by_hand.append(float((x_hat - xs).square().sum()) / denominator)
    got = [float(v.detach()) for v in sae.prefix_losses(z, xs)]
    assert got == pytest.approx(by_hand, abs=1e-6)
    assert float(sae.reconstruction_loss(z, xs)[0].detach()) == pytest.approx(sum(by_hand) / 3, abs=1e-6)


def _dense_reference_loss(sae, xs: torch.Tensor, dead: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Each architecture's objective written the plain way: autograd through F.linear (what
    `training_loss`'s CenteredLinear saves a product of) and plain dense decodes."""
    pre = torch.nn.functional.linear(xs - sae.b_dec, sae.W_enc, sae.b_enc).relu()

    def dense_decode(z: torch.Tensor) -> torch.Tensor:
        return z @ sae.W_dec.T + sae.b_dec

    if isinstance(sae, JumpReLUSAE):
        theta = sae.threshold()
        x_hat = dense_decode(JumpReLUFn.apply(pre, theta, sae.bandwidth))
        return normalized_mse(x_hat, xs) + objective.l0_coef * StepFn.apply(pre, theta, sae.bandwidth).sum(1).mean()
    z = batch_topk(pre, sae.k)
    x_hat = dense_decode(z)
    prefixes = sae.prefixes if isinstance(sae, MatryoshkaSAE) else [sae.n_latents]
    loss = torch.stack([normalized_mse(z[:, :m] @ sae.W_dec[:, :m].T + sae.b_dec, xs) for m in prefixes]).mean()
    masked = torch.where(dead, pre, torch.zeros_like(pre))
    top = masked.topk(min(objective.k_aux, int(dead.sum())), dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    return loss + objective.aux_coef * normalized_mse(z_aux @ sae.W_dec.T, (xs - x_hat).detach())


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka", "jumprelu"])
def test_the_training_losses_have_the_plain_objectives_gradients(architecture):
    p = params(architecture, jumprelu={"init_threshold": 0.3, "bandwidth": 0.2, "l0_coef": 0.01})
    sae = _new_sae(DATA, p, torch.Generator().manual_seed(0))
    with torch.no_grad():  # move the biases off zero so that every term is exercised
        sae.b_enc.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    xs = DATA[:64] * sae.input_scale
    dead = torch.zeros(sae.n_latents, dtype=torch.bool)
    dead[::3] = True
    objective = Objective(aux_coef=1 / 32, k_aux=8, l0_coef=0.01)
    reference = copy.deepcopy(sae)
    terms = sae.training_loss(xs, dead, objective)
    terms.loss.backward()
    _dense_reference_loss(reference, xs, dead, objective).backward()
    assert float(terms.loss.detach()) == pytest.approx(float(_dense_reference_loss(copy.deepcopy(reference), xs, dead, objective).detach()), rel=1e-5)
    for (name, got), (_, want) in zip(sae.named_parameters(), reference.named_parameters()):
        assert want.grad is not None and bool(want.grad.abs().sum() > 0), name  # not vacuous
        assert torch.allclose(got.grad, want.grad, rtol=1e-4, atol=1e-6), name
    if architecture == "jumprelu":  # the window below the thresholds is in play
        pre = sae.pre_activations(DATA[:64])
        theta = sae.threshold().detach()
        assert bool(((pre < theta) & (pre > theta - sae.bandwidth / 2) & (pre > 0)).any())


def _smoothed_step(u: torch.Tensor, eps: float) -> torch.Tensor:
    return (u / eps + 0.5).clamp(0, 1)


def test_jumprelu_straight_through_gradients_match_finite_differences_of_the_smoothed_objective():
    eps, h = 0.2, 1e-4
    gen = torch.Generator().manual_seed(0)
    pre = torch.rand(50, 6, generator=gen, dtype=torch.float64)
    theta = (torch.rand(6, generator=gen, dtype=torch.float64) * 0.6 + 0.2).requires_grad_(True)
    weight = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    (JumpReLUFn.apply(pre, theta, eps) * weight).sum().backward()
    ste_z = theta.grad.clone()
    theta.grad = None
    StepFn.apply(pre, theta, eps).sum().backward()
    ste_l0 = theta.grad.clone()

    def smoothed(t: torch.Tensor) -> tuple[float, float]:
        step = _smoothed_step(pre - t, eps)
        return float((pre * step * weight).sum()), float(step.sum())

    with torch.no_grad():
        for j in range(6):
            up, down = theta.detach().clone(), theta.detach().clone()
            up[j] += h
            down[j] -= h
            (z_up, l0_up), (z_down, l0_down) = smoothed(up), smoothed(down)
            assert (z_up - z_down) / (2 * h) == pytest.approx(float(ste_z[j]), rel=1e-5, abs=1e-6)
            assert (l0_up - l0_down) / (2 * h) == pytest.approx(float(ste_l0[j]), rel=1e-5, abs=1e-6)
    assert bool((ste_l0 < 0).all())  # the check is not vacuous: every threshold sees the kernel
    # the forward passes are the exact jump, not the smoothed one
    assert torch.equal(JumpReLUFn.apply(pre, theta.detach(), eps), pre * (pre > theta.detach()))


def test_jumprelu_l0_penalty_lowers_l0():
    loose, _ = train_sae(DATA, params("jumprelu", epochs=10, jumprelu={"l0_coef": 0.0, "init_threshold": 0.5}), "cpu")
    tight, _ = train_sae(DATA, params("jumprelu", epochs=10, jumprelu={"l0_coef": 0.2, "init_threshold": 0.5}), "cpu")
    assert evaluate_sae(tight, HELD_OUT)["l0"] < 0.8 * evaluate_sae(loose, HELD_OUT)["l0"]
    assert float(tight.threshold().detach().mean()) > float(loose.threshold().detach().mean()) + 0.1  # the thresholds rose
    assert isinstance(tight, JumpReLUSAE)


def test_the_frozen_random_sae_never_changes_in_training():
    p = params("frozen_random")
    start = _new_sae(DATA, p, torch.Generator().manual_seed(p.seed))
    sae, history = train_sae(DATA, p, "cpu", init=copy.deepcopy(start))
    for name, value in start.state_dict().items():
        assert torch.equal(value, sae.state_dict()[name]), name
    topk = TopKSAE(start.dim, start.n_latents, start.k, start.input_scale)
    topk.load_state_dict(start.state_dict())
    trained, _ = train_sae(DATA, params("topk"), "cpu", init=topk)  # the same start, trained: it moves
    assert not torch.equal(trained.W_enc, start.W_enc)
    assert len(history) == p.epochs and history[0]["l0"] == pytest.approx(p.k)


def test_sparse_from_dense_pads_with_zeros_at_ascending_indices():
    z = torch.tensor([[0.0, 2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    values, indices = sparse_from_dense(z)
    assert values.tolist() == [[2.0, 1.0], [3.0, 0.0], [0.0, 0.0]]
    assert indices.tolist() == [[1, 3], [0, 1], [0, 1]]
    assert float(normalized_mse(z, z)) == 0.0
