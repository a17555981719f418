"""Steering several blocks through the stages: the per-block SAE and statistics stages
(`train_sae_block`, `latent_stats_block`, one per block of extract.layers) and `steer` with
`steer.blocks: all`, on a tiny project whose ViT gates blocks 1 and 2. The sweep's rows are
recomputed from the files the stages wrote; the function-level equalities (against the naive
reference, and the final block alone against the final-block sweep) are tests/test_multiblock.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import call_stage
from pipeline.data.dataset import load_images
from pipeline.data.embeddings import read_embeddings
from pipeline.errors import PipelineError
from pipeline.interpret.top_sets import read_top_sets
from pipeline.layout import (
    download,
    extract,
    finetune,
    latent_stats,
    latent_stats_block,
    steer,
    train_sae,
    train_sae_block,
)
from pipeline.model.gated_vit import load_gated_vit
from pipeline.params.file import parse_params
from pipeline.sae.registry import load_sae
from pipeline.sae.training import evaluate_sae
from pipeline.steering.multiblock import BlockSteering, block_directions, run_blocks_sweep
from pipeline.steering.results import read_block_rows, read_details, read_results
from pipeline.steering.sweep import latent_sets, result_rows, variants_for

from conftest import TINY_PARAMS, _merge, run_every_stage

BLOCKS_PARAMS = _merge(TINY_PARAMS, {
    "model": {"depth": 3},  # gated blocks 1 and 2 (the final one)
    "extract": {"layers": [1]},
    "steer": {"blocks": "all", "bootstrap": 20},
    "latency": {"measure": True, "images": 32},  # the whole test split
})


@pytest.fixture(scope="module")
def blocks_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_every_stage(tmp_path_factory.mktemp("blocks-run"), BLOCKS_PARAMS)


@pytest.fixture
def in_blocks_run(blocks_run: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(blocks_run)
    return blocks_run


def test_each_earlier_block_has_an_sae_trained_on_its_own_cls_inputs(in_blocks_run):
    sae = load_sae(train_sae_block.files(1).sae)
    config = yaml.safe_load((train_sae_block.files(1).sae / "config.json").read_text())
    assert config["layer"] == 1
    test_x = read_embeddings(extract.embeddings_split("test"), 1).x
    final_x = read_embeddings(extract.embeddings_split("test")).x
    assert not torch.allclose(test_x, final_x)  # block 1's inputs are not the final block's
    recorded = yaml.safe_load(train_sae_block.files(1).details.read_text())["test"]["fvu"]
    assert evaluate_sae(sae, test_x)["fvu"] == pytest.approx(recorded, rel=1e-6, abs=1e-9)
    # and its statistics are that SAE's: the top sets' width and a fresh count of a class's firing
    sets = read_top_sets(latent_stats_block.files(1).top_sets)
    assert sets.n_latents == sae.n_latents
    assert sets.per_class != read_top_sets(latent_stats.TOP_SETS).per_class or not torch.equal(
        load_sae(train_sae.SAE).encoder.weight, sae.encoder.weight)


def test_the_sweep_is_the_one_the_written_saes_and_sets_give(in_blocks_run):
    """Rebuild each block's steering from the stages' files, rerun the sweep on test and compare
    it with blocks.parquet and results.parquet row by row."""
    params = parse_params(BLOCKS_PARAMS, "params").steer
    model, config = load_gated_vit(finetune.MODEL)
    steered = {}
    for block, sae_dir, sets_path, column in ((1, train_sae_block.files(1).sae, latent_stats_block.files(1).top_sets, 1),
                                              (2, train_sae.SAE, latent_stats.TOP_SETS, None)):
        train = read_embeddings(extract.embeddings_split("train"), column)
        directions = block_directions(model, block, train.x, train.labels, params.null_draws, params.seed)
        steered[block] = BlockSteering(load_sae(sae_dir), latent_sets(read_top_sets(sets_path), params.null_draws, params.seed, directions))
    variants = variants_for(params.strategies, params.alphas, params.null_draws)
    images = load_images(download.dataset_split("test"))
    model.head_path = read_details(steer.DETAILS).settings.head_path
    sweep = run_blocks_sweep(model, steered, images.images, images.labels, config, variants, params.mode, params.keep_error,
                             params.batch_size, torch.device("cpu"))
    key = lambda r: (r["strategy"], r["alpha"], r["draw"], r["class_id"])  # noqa: E731
    stored = {(r["block"], *key(r)): r for r in read_block_rows(steer.BLOCKS, "test")}
    for block in (1, 2):
        for row in result_rows(sweep.tallies[block], config.class_names):
            got = stored[(block, *key(row))]
            assert got["accuracy"] == pytest.approx(row["accuracy"]) and got["head_usage"] == pytest.approx(row["head_usage"])
    combined = {key(r): r for r in read_results(steer.RESULTS, "test")}
    assert len(combined) == len(result_rows(sweep.combined, config.class_names))
    for row in result_rows(sweep.combined, config.class_names):
        assert combined[key(row)]["head_usage"] == pytest.approx(row["head_usage"])

    # The comparison can tell SAEs apart: steering moves both blocks' gates, and block 1 steered
    # through the final block's SAE gives other rows.
    for block in (1, 2):
        assert len({round(r["head_usage"], 6) for r in stored.values() if r["block"] == block and r["n"]}) > 1
    swapped = {1: BlockSteering(steered[2].sae, steered[1].sets), 2: steered[2]}
    other = run_blocks_sweep(model, swapped, images.images, images.labels, config, variants, params.mode, params.keep_error,
                             params.batch_size, torch.device("cpu"))
    assert any(stored[(1, *key(row))]["head_usage"] != pytest.approx(row["head_usage"])
               for row in result_rows(other.tallies[1], config.class_names))


def test_the_headline_usage_is_the_mean_over_the_gated_blocks(in_blocks_run):
    details = read_details(steer.DETAILS)
    assert details.settings.blocks == [1, 2] and details.settings.gated_blocks == [1, 2]
    per_block: dict[tuple, list[float]] = {}
    for r in read_block_rows(steer.BLOCKS):
        if r["n"]:
            per_block.setdefault((r["split"], r["strategy"], r["alpha"], r["draw"], r["class_id"]), []).append(r["head_usage"])
    rows = [r for r in read_results(steer.RESULTS) if r["n"]]
    assert rows
    for r in rows:
        usages = per_block[(r["split"], r["strategy"], r["alpha"], r["draw"], r["class_id"])]
        assert len(usages) == 2 and r["head_usage"] == pytest.approx(sum(usages) / 2)
    assert len([k for k in rows[0] if k.startswith("keep_h")]) == 2 * 3  # two gated blocks of 3 heads


def test_the_headline_metric_of_compute_is_the_gflops_the_gated_blocks_usage_saves(in_blocks_run):
    """metrics/steer.json's gflops_drop: the mean usage change over the gated blocks times every
    gated head's attention FLOPs, over the unsteered model's GFLOPs (beside the ceiling's
    blocks_gflops_drop in `dvc exp show`)."""
    from pipeline.model.flops import flop_model

    details = read_details(steer.DETAILS)
    model, _ = load_gated_vit(finetune.MODEL)
    fm = flop_model(model)
    head = details.per_class_headline
    saved = -sum(fm.per_head[b] * model.num_heads for b in details.settings.gated_blocks) * head.mean_usage_change / 1e9
    metrics = yaml.safe_load((in_blocks_run / steer.METRICS).read_text())
    assert head.mean_usage_change != 0
    assert metrics["gflops_drop"] == pytest.approx(saved / details.flops.gflops_unsteered, rel=1e-4)


def test_the_default_run_writes_no_block_rows(tiny_run):
    assert not (tiny_run / steer.BLOCKS).exists()
    assert "blocks" not in yaml.safe_load((tiny_run / steer.DETAILS).read_text())["settings"]
    assert sorted(yaml.safe_load((tiny_run / steer.METRICS).read_text())) == ["acc_change", "fewer_heads", "usage_drop"]


def test_steering_a_block_without_an_sae_names_extract_layers(blocks_run, tmp_path, monkeypatch):
    work = tmp_path / "work"
    for name in ("data", "models", "metrics"):  # a copy of the run's outputs, without block 1's SAE
        shutil.copytree(blocks_run / name, work / name)
    shutil.rmtree(work / train_sae_block.files(1).sae)
    monkeypatch.chdir(work)
    with pytest.raises(PipelineError, match="add 1 to extract.layers"):
        call_stage("steer", parse_params(BLOCKS_PARAMS, "params"))


def test_the_deployed_policies_score_what_the_sweep_and_the_ceiling_measured(in_blocks_run):
    """`latency` runs each policy block by block as deployed, on every test image here: its
    accuracy and usage per block equal the image-weighted rows of the sweep (the headline's
    alphas) and of the multi-block ceiling, and the unsteered one equals the stored predictions."""
    from pipeline.layout import ceiling, latency
    from pipeline.steering.ceiling import read_block_classes
    from pipeline.steering.costs import read_details as read_latency

    cost = read_latency(latency.DETAILS)
    assert cost.settings.images == 32 and cost.settings.steered_blocks == [1, 2]
    stored = read_embeddings(extract.embeddings_split("test"))
    assert cost.policies["unsteered"].accuracy == pytest.approx(float((stored.predictions == stored.labels).double().mean()))
    alphas = read_details(steer.DETAILS).per_class_headline.alpha
    rows = [r for r in read_block_rows(steer.BLOCKS, "test") if r["strategy"] == "per_class" and r["alpha"] == alphas[r["class"]]]
    for block in ("1", "2"):
        chosen = [r for r in rows if str(r["block"]) == block]
        n = sum(r["n"] for r in chosen)
        assert cost.policies["per_class"].usage[block] == pytest.approx(sum(r["n"] * r["head_usage"] for r in chosen) / n)
    assert cost.policies["per_class"].accuracy == pytest.approx(sum(r["n"] * r["accuracy"] for r in chosen) / n)
    found, _, _ = read_block_classes(ceiling.BLOCKS)
    mine = [r for r in found if r["split"] == "test" and r["configuration"] == "blocks"]
    n = sum(r["n"] for r in mine)
    assert cost.policies["ceiling"].accuracy == pytest.approx(sum(r["n"] * r["accuracy"] for r in mine) / n)
    assert cost.policies["ceiling"].gflops == pytest.approx(sum(r["n"] * r["gflops"] for r in mine) / n)
    assert all(p.latency_ms for p in cost.policies.values()) and cost.settings.cpu is not None  # measured here


def test_the_default_run_counts_the_policies_without_timing_them(tiny_run):
    from pipeline.layout import latency
    from pipeline.steering.costs import read_details as read_latency

    cost = read_latency(tiny_run / latency.DETAILS)
    assert set(cost.policies) == {"unsteered", "per_class", "per_class_predicted", "ceiling"}
    assert not any(p.latency_ms for p in cost.policies.values())
    assert cost.settings.cpu is None and cost.settings.threads is None  # nothing machine-specific in the bytes
    assert "## Compute in time" not in (tiny_run / "metrics/report.md").read_text()
