"""`finetune` under torchrun: two CPU processes (gloo) train one model with DDP."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT, build_gated_vit, load_gated_vit, model_config
from pipeline.model.training import train
from pipeline.params.file import Params, parse_params
from pipeline.runtime import DistInfo, seed_everything
from pipeline.stages import download

from conftest import TINY_PARAMS, _merge


@pytest.mark.slow
def test_two_process_torchrun_finetune_writes_the_same_kind_of_outputs(in_tmp):
    raw = _merge(TINY_PARAMS, {"finetune": {"nproc": 2, "batch_size": 16, "epochs": 2}})
    params = parse_params(raw)
    download.run(params.data)
    Path("params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_LOG": "INFO"}
    result = subprocess.run(
        [str(torchrun), "--standalone", f"--nproc_per_node={params.finetune.nproc}", "-m", "pipeline", "finetune"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert set(json.loads(Path("metrics/finetune/metrics.json").read_text())) == {"test_accuracy", "head_usage", "gflops", "step"}
    metrics = json.loads(Path("metrics/details/finetune.json").read_text())
    assert {"test_accuracy", "head_usage", "head_usage_per_block"} <= set(metrics)
    assert len(metrics["head_usage_per_block"]) == 2
    assert Path("metrics/finetune/plots/metrics/train_loss.tsv").read_text().split()[::2] == ["step", "1", "2"]  # rank 0 logged each epoch once
    model, config = load_gated_vit("models/vit")
    # the weights moved away from the seeded initialisation (both ranks trained one model)
    torch.manual_seed(params.finetune.seed)
    init = build_gated_vit(params.model, num_classes=4)
    moved = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values())]
    assert sum(moved) > len(moved) // 2
    assert not any(p.name.startswith(".") for p in Path("models").iterdir())  # no temporaries left


def test_a_batch_that_the_whole_run_cannot_share_evenly_is_refused(tiny_params):
    """params only see one node's nproc; train() sees the whole world and refuses a remainder
    (3 processes, e.g. 3 nodes x 1, cannot share a batch of 16 without dropping samples)."""
    from pipeline.errors import PipelineError

    params = tiny_params(finetune={"batch_size": 16})
    model = build_gated_vit(params.model, num_classes=4)
    images = torch.zeros(32, 3, 16, 16, dtype=torch.uint8)
    labels = torch.zeros(32, dtype=torch.long)
    config = model_config(params.model, model.vit, 4, ["a", "b", "c", "d"], 5.0)
    with pytest.raises(PipelineError, match="batch_size 16 is not divisible by the 3 processes"):
        train(model, images, labels, images, labels, config, params.finetune, torch.device("cpu"), DistInfo(0, 3, 0))


# ------------------------------------------------- DDP equals one process (in-test, gloo, CPU)
DDP_RAW = _merge(TINY_PARAMS, {
    "model": {"gate_bias_init": 50.0},
    "finetune": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0.0, "lr": 1e-3, "seed": 3},
})


def _ddp_data() -> tuple[torch.Tensor, ...]:
    """32 random 16x16 training images of 4 classes (2 batches of 16 per epoch) and 8 test
    images: the same tensors in every process."""
    g = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    return images[:32], labels[:32], images[32:], labels[32:]


def _gate_free_model(params: Params) -> tuple[GatedViT, ModelConfig]:
    """The seeded tiny gated ViT (as `finetune` builds it), with gates that ignore the noise.

    Training gates are Gumbel-sigmoids drawn from the global RNG of each process, so one and two
    processes draw different noise. With the decision weights zeroed and frozen, every gate
    logit is the bias, 50: the hard gate, sigmoid((50 + g1 - g2) / tau) > 0.5, is 1 for any
    noise (the clamped Gumbel difference stays above -22), and the straight-through gradient
    reaches neither the frozen decision networks nor, through their zero weights, the residual
    stream. (A large bias alone would leave a noise-dependent sigmoid' in that gradient.)"""
    seed_everything(params.finetune.seed)
    model = build_gated_vit(params.model, num_classes=4, tau=params.finetune.tau)
    for net in model.decision:
        nn.init.zeros_(net.weight)
    model.decision.requires_grad_(False)
    config = model_config(params.model, model.vit, 4, ["a", "b", "c", "d"], params.finetune.tau)
    return model, config


def _ddp_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    """One rank: the run as it should be, then one where every rank claims rank 0's share."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        params = parse_params(DDP_RAW)
        for name, as_rank in (("ddp", rank), ("same_half", 0)):
            model, config = _gate_free_model(params)
            history = train(model, *_ddp_data(), config, params.finetune, torch.device("cpu"), DistInfo(as_rank, world, 0))
            torch.save({"weights": model.state_dict(), "history": history}, Path(out_dir) / f"{name}{rank}.pt")
    finally:
        dist.destroy_process_group()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference of two state dicts, leaving out the attention's key bias: softmax is
    invariant to a shift shared by all keys of a query, so that bias has no gradient in exact
    arithmetic, only rounding noise, which AdamW divides by its tiny sqrt(v) + eps into steps of
    any size (measured: 3e-6 between 1 and 2 processes, for a bias that moved 9e-6 in all)."""
    assert a.keys() == b.keys()

    def comparable(key: str, t: torch.Tensor) -> torch.Tensor:
        if key.endswith("attn.qkv.bias"):  # [query | key | value] biases
            q, _, v = t.chunk(3)
            t = torch.cat([q, v])
        return t.double()

    return max(float((comparable(k, a[k]) - comparable(k, b[k])).abs().max()) for k in a)


def test_two_ddp_processes_on_half_batches_equal_one_process_on_whole_batches(tmp_path, monkeypatch):
    """Two gloo processes, each on its half of every batch (`DistInfo(rank, 2, 0)`), end with
    the weights of one process trained on the whole batches, on both ranks.

    What a wrong implementation would give: ranks that took overlapping or differently shuffled
    or augmented shares, or gradients that were not all-reduced, train on other samples than the
    single process (the `same_half` run below, both ranks on the first half, checks that such a
    run lands far outside the tolerance). Not caught: all-reduce summing instead of averaging,
    since AdamW's step is nearly invariant to the gradient's scale."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    store = tmp_path / "store"  # file:// rendezvous: must not exist yet
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(store), str(tmp_path)), nprocs=2, join=True)

    params = parse_params(DDP_RAW)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (CPU reductions depend on the thread count)
    try:
        model, config = _gate_free_model(params)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        history = train(model, *_ddp_data(), config, params.finetune, torch.device("cpu"))
        # the premise: these gates make the Gumbel noise irrelevant (other noise, same bits)
        other_noise, config = _gate_free_model(params)
        torch.manual_seed(params.finetune.seed + 1)
        train(other_noise, *_ddp_data(), config, params.finetune, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    single = model.state_dict()
    assert all(torch.equal(v, other_noise.state_dict()[k]) for k, v in single.items())

    # The same arithmetic, reduced in another order: each rank's loss is the mean over its 8
    # samples and DDP averages the two ranks' gradients, where one process takes the mean over
    # 16 at once. That float rounding (~1e-7 relative) carried through 4 AdamW steps stays far
    # below 1e-5 (measured: 1e-9), while the 4 steps of lr 1e-3 move the weights by ~2.5e-3.
    atol = 1e-5
    assert _max_diff(single, initial) > 100 * atol  # the weights moved: equality means something
    for rank in range(2):
        ddp = torch.load(tmp_path / f"ddp{rank}.pt", weights_only=True)
        assert _max_diff(ddp["weights"], single) < atol, f"rank {rank} differs from the single process"
        # the epoch's loss and accuracy are all-reduced over both halves: the whole batch's
        for row, ref in zip(ddp["history"], history, strict=True):
            assert row["train_loss"] == pytest.approx(ref["train_loss"], abs=atol)
            assert row["train_accuracy"] == ref["train_accuracy"]
        wrong = torch.load(tmp_path / f"same_half{rank}.pt", weights_only=True)
        assert _max_diff(wrong["weights"], single) > 100 * atol  # wrong sharding is caught
