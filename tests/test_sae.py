"""TopK SAE: selection, unit-norm constraint, gradients, AuxK, save/load, determinism,
dictionary recovery, and the `train_sae` stage on tiny embeddings files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ParamsError, PipelineError
from pipeline.params.sae import SaeParams
from pipeline.sae.base import normalize_rows_, remove_parallel_
from pipeline.sae.linear import normalized_mse
from pipeline.sae.registry import load_sae, save_sae
from pipeline.sae.topk import TopKSAE, topk_lowest_index
from pipeline.sae.training import (
    _Grads,
    _train_step,
    dead_topk,
    evaluate_sae,
    geometric_median,
    input_scale_for,
    train_sae,
)

from conftest import write_embeddings as write_tiny_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def dictionary_data(n: int, dim: int, n_atoms: int, active: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = non-negative combinations of `active` atoms of a random unit-norm dictionary."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, dim, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, n_atoms, generator=g).argsort(dim=1)[:, :active]
    coef = torch.rand(n, active, generator=g) * 1.5 + 0.5
    z = torch.zeros(n, n_atoms).scatter_(1, chosen, coef)
    return z @ atoms, atoms


def small_sae(dim: int = 8, n_latents: int = 24, k: int = 4, scale: float = 1.0, seed: int = 0) -> TopKSAE:
    sae = TopKSAE(dim, n_latents, k, input_scale=scale)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(seed + 2))
    return sae


def params(**overrides) -> SaeParams:
    base = dict(n_latents=32, k=4, epochs=3, batch_size=64, lr=3e-3, warmup_steps=5, device="cpu")
    return SaeParams(**{**base, **overrides})


# --------------------------------------------------------------------------------- selection
def test_topk_ties_go_to_lowest_index():
    g = torch.Generator().manual_seed(0)
    pre = torch.randint(0, 4, (200, 30), generator=g).float()  # heavy ties at every level
    for k in (1, 5, 12, 29, 30):
        got = topk_lowest_index(pre, k)
        # reference: stable descending sort keeps the lower index first among equals
        want = torch.sort(pre, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        assert torch.equal(got, want), k


def test_exactly_k_nonzeros_per_sample_with_tied_latents():
    sae = TopKSAE(dim=6, n_latents=20, k=5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.ones(20, 6) / 6**0.5)  # every latent sees the same pre-activation
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.ones(7, 6)  # constant rows: all 20 pre-activations equal and positive
    values, indices = sae.encode_topk(x)
    assert torch.equal(indices, torch.arange(5).expand(7, 5))
    assert values.shape == (7, 5) and bool((values > 0).all())
    z = sae.encode(x)
    assert torch.equal((z != 0).sum(dim=1), torch.full((7,), 5))


def test_fewer_positive_than_k_keeps_k_slots_and_lowest_zero_indices():
    sae = TopKSAE(dim=4, n_latents=10, k=4)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[7, 0] = 1.0  # only latents 7 and 9 can be positive
        sae.W_enc[9, 1] = 1.0
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    values, indices = sae.encode_topk(torch.tensor([[2.0, 3.0, 0.0, 0.0]]))
    assert indices.tolist() == [[0, 1, 7, 9]]
    assert values.tolist() == [[0.0, 0.0, 2.0, 3.0]]
    assert int((sae.encode(torch.tensor([[2.0, 3.0, 0.0, 0.0]])) > 0).sum()) == 2


# ------------------------------------------------------------------------------ model maths
def test_raw_space_encode_decode_match_the_formula():
    sae = small_sae(scale=0.37)
    x = torch.randn(9, 8)
    pre = torch.relu((0.37 * x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    assert torch.allclose(sae.pre_activations(x), pre, atol=1e-6)
    z = sae.encode(x)
    expected = torch.zeros_like(pre)
    top = torch.sort(pre, dim=1, descending=True, stable=True).indices[:, : sae.k]
    expected.scatter_(1, top, pre.gather(1, top))
    assert torch.allclose(z, expected, atol=1e-6)
    assert torch.allclose(sae.decode(z), (z @ sae.W_dec.T + sae.b_dec) / 0.37, atol=1e-5)
    # linear plus bias in raw space: what steering's x + dec(z') - dec(z) relies on
    z2 = z * 2.0
    assert torch.allclose(sae.decode(z2) - sae.decode(z), z @ sae.W_dec.T / 0.37, atol=1e-5)


def test_sparse_decode_equals_dense_decode():
    sae = small_sae(dim=16, n_latents=64, k=6, scale=2.5)
    x = torch.randn(50, 16)
    values, indices = sae.encode_topk(x)
    dense = sae.decode(sae.encode(x))
    assert torch.allclose(sae.decode_sparse(values, indices), dense, atol=1e-5)
    assert torch.allclose(sae(x).x_hat, dense, atol=1e-5)
    out = sae(x)
    assert torch.equal(out.indices, indices) and torch.allclose(out.values, values)
    assert out.pre_acts.shape == (50, 64)


def reference_loss(sae: TopKSAE, xs: torch.Tensor, dead: torch.Tensor, k_aux: int, aux_coef: float) -> torch.Tensor:
    """The training loss written with plain autograd-able ops (scaled space)."""
    pre = torch.relu((xs - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    top = topk_lowest_index(pre.detach(), sae.k)
    x_hat = F.embedding_bag(top, sae.W_dec.T, per_sample_weights=pre.gather(1, top), mode="sum") + sae.b_dec
    loss = normalized_mse(x_hat, xs)
    if bool(dead.any()):
        _, aux_top = dead_topk(pre.detach(), dead, k_aux)
        e_hat = F.embedding_bag(aux_top, sae.W_dec.T, per_sample_weights=pre.gather(1, aux_top), mode="sum")
        loss = loss + aux_coef * normalized_mse(e_hat, (xs - x_hat).detach())
    return loss


def manual_step(sae: TopKSAE, xs: torch.Tensor, dead: torch.Tensor, k_aux: int, aux_coef: float):
    rows = torch.nn.Parameter(sae.W_dec.data.T)
    grads = _Grads(*(torch.zeros_like(w) for w in (sae.W_enc, sae.b_enc, rows, sae.b_dec)))
    pre_buffer = torch.empty(xs.shape[0], sae.n_latents, dtype=xs.dtype)
    return _train_step(sae, rows, xs, dead, k_aux, aux_coef, grads, pre_buffer), grads


@pytest.mark.parametrize("n_dead", [0, 5, 20])
def test_hand_written_gradients_match_autograd(n_dead: int):
    """The training step's sparse backward (with the decoder projection) equals autograd
    through the dense formulation, with and without dead latents for AuxK."""
    sae = small_sae(dim=8, n_latents=24, k=4, seed=3).double()
    normalize_rows_(sae.W_dec.data.T)  # exactly unit norm in float64, as the projection assumes
    xs = torch.randn(30, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    dead = torch.zeros(24, dtype=torch.bool)
    dead[torch.randperm(24, generator=torch.Generator().manual_seed(5))[:n_dead]] = True

    result, grads = manual_step(sae, xs, dead, k_aux=6, aux_coef=0.5)
    loss = reference_loss(sae, xs, dead, k_aux=6, aux_coef=0.5)
    loss.backward()
    assert float(result.loss) == pytest.approx(float(loss.detach()), rel=1e-12)
    assert torch.allclose(grads.w_enc, sae.W_enc.grad, atol=1e-12)
    assert torch.allclose(grads.b_enc, sae.b_enc.grad, atol=1e-12)
    assert torch.allclose(grads.b_dec, sae.b_dec.grad, atol=1e-12)

    true_rows_grad = sae.W_dec.grad.T.clone()
    assert (true_rows_grad * sae.W_dec.T).sum(dim=1).abs().max() > 1e-3  # something to remove
    assert (grads.rows * sae.W_dec.T).sum(dim=1).abs().max() < 1e-12  # removed
    remove_parallel_(true_rows_grad, sae.W_dec.detach().T)
    assert torch.allclose(grads.rows, true_rows_grad, atol=1e-12)
    sae.remove_parallel_grad_()  # the public method does the same to W_dec.grad
    assert torch.allclose(sae.W_dec.grad.T, true_rows_grad, atol=1e-12)


def test_init_and_unit_norm_decoder_columns_after_training():
    x, _ = dictionary_data(600, 12, 24, 3, seed=0)
    sae = TopKSAE(12, 32, 4)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    assert torch.allclose(sae.W_enc, sae.W_dec.T)
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(32), atol=1e-6)

    trained, history = train_sae(x, params(n_latents=32, epochs=2, lr=1e-2), "cpu")
    norms = trained.W_dec.norm(dim=0)
    assert torch.allclose(norms, torch.ones(32), atol=1e-5)
    assert not torch.allclose(trained.W_enc, trained.W_dec.T, atol=1e-3)  # it did train
    assert history[-1]["train_fvu"] < history[0]["train_fvu"]


def test_input_normalisation_and_geometric_median():
    x = torch.randn(500, 10) * 7.0 + 3.0
    scale = input_scale_for(x)
    assert abs(float((x * scale).square().sum(dim=1).mean()) - 10.0) < 1e-3
    sae, _ = train_sae(x, params(n_latents=16, epochs=1), "cpu")
    assert sae.input_scale == pytest.approx(scale)

    cluster = torch.randn(200, 3) * 0.05
    outliers = torch.full((40, 3), 100.0)
    median = geometric_median(torch.cat([cluster, outliers]))
    assert float(median.norm()) < 0.5  # the mean sits near 16.7 per coordinate
    assert float(torch.cat([cluster, outliers]).mean(0).norm()) > 20


# -------------------------------------------------------------------------------------- AuxK
def test_auxk_zero_without_dead_latents_and_only_touches_dead_ones():
    sae = small_sae(dim=8, n_latents=24, k=3)
    xs = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    none_dead = torch.zeros(24, dtype=torch.bool)
    plain, plain_grads = manual_step(sae, xs, none_dead, k_aux=4, aux_coef=0.0)
    result, grads = manual_step(sae, xs, none_dead, k_aux=4, aux_coef=1 / 32)
    assert float(result.aux_loss) == 0.0 and float(result.loss) == float(plain.loss)

    dead = torch.ones(24, dtype=torch.bool)
    dead[plain.fired] = False  # the latents that did not fire in this batch
    assert bool(dead.any())
    result, grads = manual_step(sae, xs, dead, k_aux=4, aux_coef=1 / 32)
    assert float(result.aux_loss) > 0
    assert float(result.loss) == pytest.approx(float(plain.loss) + float(result.aux_loss) / 32)
    changed = (grads.w_enc - plain_grads.w_enc).abs().sum(dim=1) > 0
    assert bool(changed[dead].any()) and not bool(changed[~dead].any())


def test_dead_topk_caps_at_the_number_of_dead_latents():
    pre = torch.arange(40.0).reshape(4, 10)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[2, 5, 7]] = True
    values, indices = dead_topk(pre, dead, k_aux=5)
    assert indices.tolist() == [[2, 5, 7]] * 4 and torch.equal(values, pre[:, [2, 5, 7]])
    values, indices = dead_topk(pre, dead, k_aux=2)
    assert indices.tolist() == [[5, 7]] * 4 and torch.equal(values, pre[:, [5, 7]])


def test_auxk_revives_dead_latents():
    x, _ = dictionary_data(2000, 16, 32, 3, seed=0)
    base = TopKSAE(16, 64, 3, input_scale=input_scale_for(x))
    base.reset_parameters(torch.Generator().manual_seed(0))
    killed = torch.arange(16)
    with torch.no_grad():
        base.W_enc[killed] *= 0.05  # these never win the top-k, so they get no gradient
        base.b_dec.copy_(x.mean(dim=0) * base.input_scale)

    alive = {}
    for coef in (0.0, 1 / 32):
        cfg = params(n_latents=64, k=3, epochs=4, batch_size=128, warmup_steps=1, aux_coef=coef, dead_window=512)
        sae, history = train_sae(x, cfg, "cpu", init=copy.deepcopy(base))
        values, indices = sae.encode_topk(x)
        fired = torch.zeros(64, dtype=torch.bool)
        fired[indices[values > 0]] = True
        alive[coef] = int(fired[killed].sum())
        if coef == 0.0:
            assert all(row["aux_loss"] == 0.0 for row in history)
        else:
            assert history[0]["aux_loss"] > 0
    assert alive[0.0] == 0
    assert alive[1 / 32] >= 8


def test_default_dead_window_is_one_epoch():
    x, _ = dictionary_data(300, 8, 16, 2, seed=1)
    _, history = train_sae(x, params(n_latents=64, k=2, epochs=3, batch_size=50), "cpu")
    assert history[0]["aux_loss"] == 0.0  # nothing can be dead before a whole epoch went by
    assert history[0]["dead_fraction"] > 0  # 64 latents for 16 atoms: some never fire
    assert history[2]["aux_loss"] > 0


# -------------------------------------------------------------------------- recovery (core)
def test_recovers_the_generating_dictionary():
    x, atoms = dictionary_data(3000, 32, 64, 4, seed=0)
    cfg = params(n_latents=128, k=4, epochs=10, batch_size=128, lr=3e-3, warmup_steps=20, seed=0)
    sae, history = train_sae(x, cfg, "cpu")
    best_cos = (atoms @ sae.W_dec).max(dim=1).values  # columns are unit norm
    assert float((best_cos > 0.9).float().mean()) >= 0.9
    assert history[-1]["train_fvu"] < 0.2

    untrained = TopKSAE(32, 128, 4)
    untrained.reset_parameters(torch.Generator().manual_seed(123))  # not the atoms' seed
    assert float(((atoms @ untrained.W_dec).max(dim=1).values > 0.9).float().mean()) < 0.1


# ---------------------------------------------------------------------------------- metrics
def test_evaluate_sae_matches_direct_computation():
    sae = small_sae(dim=8, n_latents=24, k=3, scale=0.8)
    x = torch.randn(70, 8) + 2.0
    metrics = evaluate_sae(sae, x, batch_size=16)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
        values, indices = sae.encode_topk(x)
    fired = torch.zeros(24, dtype=torch.bool)
    fired[indices[values > 0]] = True
    assert metrics["mse"] == pytest.approx(float((x - x_hat).square().mean()), rel=1e-4)
    fvu = float((x - x_hat).square().sum() / (x - x.mean(0)).square().sum())
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert metrics["l0"] == pytest.approx(float((values > 0).sum()) / 70)
    assert metrics["dead_fraction"] == pytest.approx(1 - float(fired.sum()) / 24)


# -------------------------------------------------------------------------------- save/load
def test_save_load_round_trip(tmp_path: Path):
    sae = small_sae(dim=8, n_latents=24, k=3, scale=1.7)
    save_sae(tmp_path / "sae", sae, {"params": {"k": 999}, "model_hash": "abc", "layer": 3})
    config = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert config["k"] == 3 and config["model_hash"] == "abc" and config["params"] == {"k": 999}

    loaded = load_sae(tmp_path / "sae")
    x = torch.randn(20, 8)
    assert loaded.config() == sae.config()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_load_rejects_mismatched_files(tmp_path: Path):
    save_sae(tmp_path / "sae", small_sae(), {})
    config_path = tmp_path / "sae" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "n_latents": 25}))
    with pytest.raises(PipelineError, match="W_enc"):
        load_sae(tmp_path / "sae")
    config_path.write_text(json.dumps({**config, "format": "something_else"}))
    with pytest.raises(PipelineError, match="not an SAE this pipeline knows"):
        load_sae(tmp_path / "sae")
    with pytest.raises(PipelineError, match="missing"):
        load_sae(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("default_threads", [False, True])
def test_training_is_deterministic(default_threads: bool, one_thread: int):
    if default_threads:
        torch.set_num_threads(one_thread)
    x, _ = dictionary_data(400, 16, 32, 3, seed=2)
    cfg = params(n_latents=128, k=3, epochs=2, dead_window=100, seed=5)  # AuxK active in epoch 2
    runs = [train_sae(x, cfg, "cpu", x_eval=x[:100]) for _ in range(2)]
    assert runs[0][1][-1]["aux_loss"] > 0
    for name, tensor in runs[0][0].state_dict().items():
        assert torch.equal(runs[1][0].state_dict()[name], tensor), name
    strip = [[{k: v for k, v in row.items() if k != "samples_per_s"} for row in h] for _, h in runs]
    assert strip[0] == strip[1]
    if not default_threads:
        other, _ = train_sae(x, params(n_latents=128, k=3, epochs=2, dead_window=100, seed=6), "cpu")
        assert not torch.equal(other.W_dec, runs[0][0].W_dec)


def test_k_larger_than_width_is_a_params_error():
    with pytest.raises(ParamsError, match=r"sae\.k = 40"):
        train_sae(torch.randn(10, 4), SaeParams(expansion=8, k=40, device="cpu"), "cpu")


# ----------------------------------------------------------------------------------- stage
def write_embeddings(path: Path, x: np.ndarray, split: str) -> None:
    """Tiny embeddings of two alternating classes, as `extract` writes them."""
    write_tiny_embeddings(path, x, np.arange(len(x)) % 2, ["a", "b"], split, model_hash="hash123", layer=1)


def test_stage_writes_model_metrics_and_curves(in_tmp: Path, tiny_params):
    from pipeline.stages import train_sae as stage

    x, _ = dictionary_data(260, 8, 12, 2, seed=3)
    write_embeddings(Path("data/embeddings/train.parquet"), x[:200].numpy() * 5 + 1, "train")
    write_embeddings(Path("data/embeddings/test.parquet"), x[200:].numpy() * 5 + 1, "test")
    p = tiny_params(sae={"expansion": 2, "k": 3, "epochs": 3, "batch_size": 32})

    stage.run(p.sae)
    headline = json.loads(Path("metrics/sae/metrics.json").read_text())
    metrics = json.loads(Path("metrics/details/sae.json").read_text())
    assert headline == {**{key: metrics["test"][key] for key in ("fvu", "l0", "dead_fraction")}, "step": 3}
    assert set(metrics["train"]) == set(metrics["test"]) == {"mse", "fvu", "l0", "dead_fraction"}
    assert metrics["n_latents"] == 16 and metrics["k"] == 3 and metrics["epochs"] == 3
    assert 0 < metrics["test"]["fvu"] < 1.5 and 0 < metrics["test"]["l0"] <= 3
    curves = metrics["history"]
    assert [row["epoch"] for row in curves] == [1, 2, 3]
    assert {"loss", "train_fvu", "test_fvu", "dead_fraction"} <= set(curves[0])
    # the DVCLive curves: one TSV per scalar, a row per epoch, the history's values
    fvu = Path("metrics/sae/plots/metrics/test_fvu.tsv").read_text().splitlines()
    assert fvu == ["step\ttest_fvu", *(f"{row['epoch']}\t{row['test_fvu']}" for row in curves)]
    dead = Path("metrics/sae/plots/metrics/train_dead_fraction.tsv").read_text().splitlines()
    assert [float(line.split()[1]) for line in dead[1:]] == [row["dead_fraction"] for row in curves]

    sae = load_sae("models/sae")
    config = json.loads(Path("models/sae/config.json").read_text())
    assert config["model_hash"] == "hash123" and config["layer"] == 1
    assert config["params"]["k"] == 3 and config["params"]["expansion"] == 2
    test_x = torch.from_numpy(x[200:].numpy() * 5 + 1)
    assert evaluate_sae(sae, test_x)["fvu"] == pytest.approx(metrics["test"]["fvu"], rel=1e-5)

    # same params on the CPU: byte-identical outputs
    before = {p_: p_.read_bytes() for p_ in map(Path, ["metrics/sae/metrics.json", "metrics/details/sae.json", "metrics/sae/plots/metrics/test_fvu.tsv",
                                                       "models/sae/model.safetensors", "models/sae/config.json"])}
    stage.run(p.sae)
    assert all(path.read_bytes() == data for path, data in before.items())


def test_stage_rejects_k_above_width_before_writing(in_tmp: Path, tiny_params):
    from pipeline.stages import train_sae as stage

    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    write_embeddings(Path("data/embeddings/train.parquet"), x, "train")
    write_embeddings(Path("data/embeddings/test.parquet"), x, "test")
    with pytest.raises(ParamsError, match=r"sae\.k = 9"):
        stage.run(tiny_params(sae={"expansion": 2, "k": 9}).sae)
    assert not Path("models/sae").exists() and not Path("metrics/sae/metrics.json").exists()




def test_stage_trains_with_sae_threads_and_restores_the_thread_count(in_tmp: Path, tiny_params, monkeypatch, one_thread):
    """`sae.threads` applies to SAE training only: later work in the same process keeps its
    thread count (a different count changes other stages' floating-point results)."""
    from pipeline.stages import train_sae as stage

    x, _ = dictionary_data(120, 8, 12, 2, seed=4)
    write_embeddings(Path("data/embeddings/train.parquet"), x[:100].numpy(), "train")
    write_embeddings(Path("data/embeddings/test.parquet"), x[100:].numpy(), "test")
    seen = []
    real_train = stage.train_sae
    monkeypatch.setattr(stage, "train_sae", lambda *a, **k: (seen.append(torch.get_num_threads()), real_train(*a, **k))[1])
    torch.set_num_threads(2)
    stage.run(tiny_params(sae={"expansion": 2, "k": 2, "epochs": 1, "batch_size": 32, "threads": 1}).sae)
    assert seen == [1] and torch.get_num_threads() == 2


def test_the_learning_rate_warms_up_holds_and_decays_to_zero_over_the_final_fraction():
    from pipeline.sae.training import learning_rate

    constant = SaeParams(lr=1e-2, warmup_steps=10)
    decaying = SaeParams(lr=1e-2, warmup_steps=10, lr_decay=0.25)
    total = 100
    rates = [learning_rate(decaying, step, total) for step in range(total)]
    assert rates[0] == pytest.approx(1e-3) and rates[9] == pytest.approx(1e-2)  # warmup
    assert rates[10:75] == pytest.approx([1e-2] * 65)  # held until the final quarter
    assert rates[75] == pytest.approx(1e-2) and rates[99] == pytest.approx(1e-2 / 25)  # linear to ~0
    assert all(a > b for a, b in zip(rates[75:], rates[76:]))
    assert [learning_rate(constant, step, total) for step in range(10, total)] == pytest.approx([1e-2] * 90)
    # the trainer follows it: the last step runs at the decayed rate
    seen = []
    original = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    x, _ = dictionary_data(256, 8, 16, 2, seed=0)
    torch.optim.Adam.step = record
    try:
        train_sae(x, params(n_latents=16, k=2, epochs=2, batch_size=64, warmup_steps=2, lr=1e-2, lr_decay=0.5), "cpu")
    finally:
        torch.optim.Adam.step = original
    assert seen == pytest.approx([learning_rate(params(lr=1e-2, warmup_steps=2, lr_decay=0.5, epochs=2), s, 8) for s in range(8)])
    assert seen[-1] == pytest.approx(1e-2 / 4)
