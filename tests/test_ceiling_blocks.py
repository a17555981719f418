"""The ceiling across blocks (pipeline/steering/ceiling_blocks.py): configurations evaluated
against the model with its decision networks patched, the search against every single-block
ceiling, the final block's `ceiling.py` and an exhaustive joint search; then the `ceiling` stage
with `steer.blocks: all` on a tiny project whose ViT gates blocks 1 and 2 (its rows recomputed
from the stored configurations) and with the default `final` (no multi-block outputs, the same
final-block ones)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.data.dataset import load_images
from pipeline.errors import PipelineError
from pipeline.layout import ceiling as files
from pipeline.layout import download as download_files
from pipeline.layout import finetune as finetune_files
from pipeline.model.flops import flop_model
from pipeline.model.gated_vit import build_gated_vit, load_gated_vit, model_config
from pipeline.params.file import parse_params
from pipeline.params.model import ModelParams
from pipeline.stages import ceiling as ceiling_stage
from pipeline.stages import download, extract, finetune
from pipeline.steering.ceiling import read_block_classes, read_classes, read_details, search_ceiling, split_terms
from pipeline.steering.ceiling_blocks import (
    OWN,
    block_split,
    choose,
    class_rows,
    evaluate_configs,
    greedy_configs,
    policy_effects,
    search_blocks,
)
from pipeline.steering.uncertainty import class_means

from conftest import TINY_PARAMS, TINY_SHAPE, _merge

SHAPE = {**TINY_SHAPE, "num_heads": 3}  # depth 3: gated blocks 1 and 2, 8 patterns each
N_CLASSES = 3
CPU = torch.device("cpu")


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = build_gated_vit(ModelParams(**SHAPE), num_classes=N_CLASSES).eval()
    with torch.no_grad():  # gates that vary, heads that matter to the stream and the prediction
        for net in model.decision:
            net.weight.normal_(0, 0.5)
            net.bias.normal_(0, 0.5)
        for block in model.vit.blocks[1:]:
            block.attn.proj.weight.mul_(20)
        model.vit.head.weight.mul_(10)
    config = model_config(ModelParams(**SHAPE), model.vit, N_CLASSES, ["a", "b", "c"], 5.0)
    return model, config


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


@torch.no_grad()
def fixed_patterns_naive(model, config, x, labels, blocks, codes):
    """Per configuration, the model's own forward with each searched block's decision network
    patched to output +1 for the heads of the image's fixed pattern and -1 for the others
    (untouched where the code is OWN). Returns (V, N) correct, (V, N, G) usage, (V, N) GFLOPs."""
    flops = flop_model(model)
    correct, usage, gflops = [], [], []
    for v in range(codes.shape[0]):
        hooks = []
        for j, block in enumerate(blocks):
            def patch(module, args, out, j=j, v=v):
                code = codes[v, :, j]
                bits = ((code.clamp(min=0)[:, None] >> torch.arange(model.num_heads)) & 1).float()
                return torch.where((code >= 0)[:, None], bits * 2 - 1, out)
            hooks.append(model.decision_net(block).register_forward_hook(patch))
        try:
            out = model(config.preprocess(x))
        finally:
            for hook in hooks:
                hook.remove()
        correct.append(out.logits.argmax(-1) == labels)
        usage.append(out.gates.mean(-1))
        kept = out.gates.sum(-1)  # (N, G)
        gflops.append(torch.tensor([flops.image([model.num_heads] * model.keep_layers + k.tolist()) / 1e9 for k in kept],
                                   dtype=torch.float64))
    return torch.stack(correct), torch.stack(usage), torch.stack(gflops)


def test_configurations_evaluate_as_the_model_with_patched_decisions():
    model, config = tiny()
    x, y = images(30, 1)
    split = block_split(model, config, x, y, 1, 16, CPU)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-1, 8, (6, 30, 2), generator=g)
    codes[0] = OWN  # the model itself
    got = evaluate_configs(model, split, [1, 2], codes, batch_size=7)
    correct, usage, gflops = fixed_patterns_naive(model, config, x, y, [1, 2], codes)
    assert torch.equal(got.correct, correct)
    assert torch.equal(got.usage, usage)
    assert torch.allclose(got.gflops, gflops, rtol=1e-12)
    assert got.usage[1:].std() > 0 and not torch.equal(got.correct[0], got.correct[1])  # the configurations matter
    # block 2 only, the stream entering block 2: the same outcome as through block 1 with it own
    at_two = block_split(model, config, x, y, 2, 16, CPU)
    only_two = codes[:, :, 1:].clone()
    two = evaluate_configs(model, at_two, [2], only_two)
    through = evaluate_configs(model, split, [1, 2], torch.cat([torch.full_like(only_two, OWN), only_two], -1))
    assert torch.equal(two.correct, through.correct) and torch.equal(two.usage, through.usage)


def test_choose_keeps_the_start_unless_something_qualifies_with_fewer_flops():
    base = torch.tensor([0.8, 0.8, 0.8], dtype=torch.float64)
    accuracy = torch.tensor([[0.8, 0.8, 0.8], [0.9, 0.7, 0.8], [0.8, 0.9, 0.85]], dtype=torch.float64)
    gflops = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.9], [0.5, 0.9, 0.9]], dtype=torch.float64)
    assert choose(accuracy, gflops, base, 0.0).tolist() == [1, 2, 2]  # tie at 0.5: higher accuracy; class 2: tie 0.9 -> 0.85
    assert choose(accuracy, gflops, base, 0.1).tolist() == [1, 1, 2]
    assert choose(accuracy[:1], gflops[:1], torch.tensor([0.8, float("nan"), 0.9], dtype=torch.float64), 0.0).tolist() == [0, 0, 0]


def test_the_greedy_pass_starts_from_the_best_single_block_ceiling_and_can_combine_blocks():
    """A hand-made evaluator over two blocks of one head (codes OWN, 0 = dropped, 1 = kept), two
    classes. Class 0: the best single block is block 1 (GFLOPs 0.7), but block 2 alone (0.9)
    blocks it: dropping both heads loses accuracy, so a greedy pass from the last block alone
    would stop at 0.9. Class 1: each block alone saves a little, both together most (0.6)."""
    base = {(OWN, OWN): (1.0, 0.8)}
    tables = [
        {**base, (OWN, 0): (0.9, 0.8), (0, OWN): (0.7, 0.8), (0, 0): (0.6, 0.5), (1, 0): (0.95, 0.8), (0, 1): (0.75, 0.8)},
        {**base, (OWN, 0): (0.8, 0.8), (0, OWN): (0.9, 0.8), (0, 0): (0.6, 0.8)},
    ]
    calls = []

    def evaluate(configs):
        calls.append(len(configs))
        out = torch.tensor([[tables[c].get(tuple(configs[k, c].tolist()), (1.0, 0.8)) for c in range(2)]
                            for k in range(len(configs))], dtype=torch.float64)
        return out[..., 1], out[..., 0]

    codes, single = greedy_configs(evaluate, 2, 2, 1, 0.0)
    assert single.tolist() == [[0, 0], [0, 0]]  # block 1 alone: drop its head (0.7 and 0.9); block 2 alone: drop (0.9, 0.8)
    assert codes.tolist() == [[0, OWN], [0, 0]]
    assert calls == [1, 3, 3, 4, 4]  # own; each block's OWN + 2 patterns; then the current configuration + those


@pytest.mark.parametrize("tolerance", [0.0, 0.2])
def test_the_search_is_no_worse_than_every_single_block_ceiling(tolerance):
    model, config = tiny()
    (xv, yv), (xt, yt) = images(45, 3), images(45, 4)
    select, test = block_split(model, config, xv, yv, 1, 16, CPU), block_split(model, config, xt, yt, 1, 16, CPU)
    found = search_blocks(model, select, test, [1, 2], N_CLASSES, tolerance)
    acc = class_means(found.select.correct, yv, N_CLASSES)  # rows: own, block 1, block 2, blocks
    gflops = class_means(found.select.gflops, yv, N_CLASSES)
    assert (acc[-1] >= acc[0] - tolerance - 1e-12).all()
    for single in (1, 2):
        assert (gflops[-1] <= gflops[single] + 1e-12).all()
        assert (acc[single] >= acc[0] - tolerance - 1e-12).all()
    assert (gflops[-1] < gflops[0]).any()  # the search finds something
    # the final block's single-block ceiling is ceiling.py's choice
    final = search_ceiling(model, split_terms(model, config, xv, yv, 16, CPU), split_terms(model, config, xt, yt, 16, CPU),
                           "val", config.class_names, tolerance, "exhaustive")
    assert found.single[1].tolist() == [c.pattern for c in final.classes]
    assert found.evaluations == 1 + 2 * 9 + 2 * 10
    # reported rows: own, each single-block ceiling and the blocks', with kept heads per block
    rows = class_rows(found, test, found.test, config.class_names, model.num_heads, [1, 2])
    assert [r["configuration"] for r in rows[::N_CLASSES]] == ["own", "block 1", "block 2", "blocks"]
    mine = [r for r in rows if r["configuration"] == "blocks"]
    for c, row in enumerate(mine):
        assert row["accuracy"] == pytest.approx(float(found.test.correct[-1][yt == c].double().mean()))
        code = int(found.codes[c, 1])
        assert row["heads_b2"] == (None if code == OWN else [h for h in range(3) if code >> h & 1])
    effects = policy_effects(found.test, yt, N_CLASSES, 3, 50, 0.95, 0)
    assert effects["gflops"].mean_usage_change == pytest.approx(sum(r["gflops"] for r in mine) / 3 - sum(
        r["gflops"] for r in rows if r["configuration"] == "own") / 3)


def test_the_search_against_an_exhaustive_joint_search():
    """All 9 x 9 joint configurations (OWN or a pattern in each of the two blocks) through the
    patched model: the search's choice evaluates as the patched model says and reaches no less
    GFLOPs than the joint optimum under the same rule."""
    model, config = tiny(1)
    (xv, yv), (xt, yt) = images(45, 5), images(30, 6)
    select, test = block_split(model, config, xv, yv, 1, 16, CPU), block_split(model, config, xt, yt, 1, 16, CPU)
    found = search_blocks(model, select, test, [1, 2], N_CLASSES, 0.0)
    joint = torch.tensor(list(itertools.product(range(-1, 8), repeat=2)))  # (81, 2), row 0 = (OWN, OWN)
    correct, _, gflops = fixed_patterns_naive(model, config, xv, yv, [1, 2], joint[:, None, :].expand(-1, len(yv), -1))
    acc, cost = class_means(correct, yv, N_CLASSES), class_means(gflops, yv, N_CLASSES)
    best = choose(acc, cost, acc[0], 0.0)
    for c in range(N_CLASSES):
        mine = ((joint == found.codes[c]).all(1)).nonzero()[0, 0]
        assert float(cost[best[c], c]) <= float(cost[mine, c]) + 1e-12
        assert float(acc[mine, c]) >= float(acc[0, c]) - 1e-12
        sel = yv == c
        assert float(found.select.gflops[-1][sel].mean()) == pytest.approx(float(cost[mine, c]), rel=1e-12)


# ------------------------------------------------------------------------------ the stage
BLOCKS_PARAMS = _merge(TINY_PARAMS, {"model": {"depth": 3}, "steer": {"blocks": "all", "bootstrap": 20}})
"""Gated blocks 1 and 2 (the final one) of 3 heads: 8 patterns each."""
FINAL_OUTPUTS = (files.PATTERNS, files.CLASSES, files.METRICS, files.DETAILS)


@pytest.fixture(scope="module")
def ceiling_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project run up to `extract`, then `ceiling` with `steer.blocks: final` (its outputs
    moved under final/) and with `all`."""
    root = tmp_path_factory.mktemp("ceiling-blocks")
    params = parse_params(BLOCKS_PARAMS, "params")
    old = Path.cwd()
    os.chdir(root)
    try:
        download.run(params.data)
        finetune.run(params.model, params.finetune)
        extract.run(params.extract)
        ceiling_stage.run(params.ceiling, params.steer.model_copy(update={"blocks": "final"}))
        for path in (files.CEILING, files.METRICS, files.DETAILS):
            (root / "final" / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, root / "final" / path)
        ceiling_stage.run(params.ceiling, params.steer)
    finally:
        os.chdir(old)
    return root


def _codes(row: dict, blocks: list[int]) -> list[int]:
    """A blocks.parquet row's configuration: per searched block its pattern's code or OWN."""
    return [OWN if row[f"heads_b{b}"] is None else sum(1 << h for h in row[f"heads_b{b}"]) for b in blocks]


def test_the_stage_rows_are_what_the_stored_configurations_give(ceiling_run):
    """Rebuild each (configuration, class)'s codes from blocks.parquet, evaluate them on each
    split with `evaluate_configs` and compare with every stored number; the details' rows and
    the headline follow from the test rows."""
    rows, blocks, gated = read_block_classes(ceiling_run / files.BLOCKS)
    assert blocks == [1, 2] and gated == [1, 2]
    model, config = load_gated_vit(ceiling_run / finetune_files.MODEL)
    names = ["own", "block 1", "block 2", "blocks"]
    n_classes = len(config.class_names)
    assert len(rows) == 2 * len(names) * n_classes
    for split in ("val", "test"):
        images = load_images(ceiling_run / download_files.dataset_split(split))
        stream = block_split(model, config, images.images, images.labels, 1, 16, CPU)
        mine = {(r["configuration"], r["class_id"]): r for r in rows if r["split"] == split}
        codes = torch.tensor([[_codes(mine[(name, c)], blocks) for c in range(n_classes)] for name in names])  # (V, C, J)
        out = evaluate_configs(model, stream, blocks, codes[:, images.labels])
        accuracy, gflops = class_means(out.correct, images.labels, n_classes), class_means(out.gflops, images.labels, n_classes)
        usage = class_means(out.usage.transpose(1, 2), images.labels, n_classes)
        for v, name in enumerate(names):
            for c in range(n_classes):
                row = mine[(name, c)]
                assert row["n"] == int((images.labels == c).sum()) and row["class"] == config.class_names[c]
                assert row["accuracy"] == pytest.approx(float(accuracy[v, c]), abs=1e-12)
                assert row["gflops"] == pytest.approx(float(gflops[v, c]), rel=1e-12)
                for g, b in enumerate(gated):
                    assert row[f"usage_b{b}"] == pytest.approx(float(usage[v, g, c]), abs=1e-7)
        # own gates everywhere in row own; a single-block ceiling fixes its block only
        assert (codes[0] == OWN).all() and (codes[1, :, 1] == OWN).all() and (codes[2, :, 0] == OWN).all()
    test_rows = [r for r in rows if r["split"] == "test"]
    mean = lambda name, key: sum(r[key] for r in test_rows if r["configuration"] == name) / n_classes  # noqa: E731
    details = read_details(ceiling_run / files.DETAILS).blocks
    assert (details.blocks, details.gated_blocks, details.select_on) == ([1, 2], [1, 2], "val")
    assert details.evaluations == 1 + 2 * 9 + 2 * 10 and details.block_runs > 0
    assert set(details.rows) == set(names)
    for name in names:
        got = details.rows[name]
        assert got.accuracy == pytest.approx(mean(name, "accuracy")) and got.gflops == pytest.approx(mean(name, "gflops"))
        assert got.mean_gflops_change == pytest.approx(mean(name, "gflops") - mean("own", "gflops"))
        assert got.mean_gflops_relative_change == pytest.approx(got.mean_gflops_change / mean("own", "gflops"))
        assert got.mean_accuracy_change == pytest.approx(mean(name, "accuracy") - mean("own", "accuracy"))
        for b in gated:
            assert got.usage_change[f"b{b}"] == pytest.approx(mean(name, f"usage_b{b}") - mean("own", f"usage_b{b}"), abs=1e-7)
        assert got.mean_usage_change == pytest.approx(sum(got.usage_change.values()) / len(gated), abs=1e-7)
        low, high = got.mean_gflops_change_ci
        assert low <= got.mean_gflops_change + 1e-12 and got.mean_gflops_change <= high + 1e-12
    headline = json.loads((ceiling_run / files.METRICS).read_text())
    assert headline["blocks_gflops_drop"] == pytest.approx(-details.rows["blocks"].mean_gflops_relative_change, rel=1e-5)
    assert headline["blocks_acc_change"] == pytest.approx(details.rows["blocks"].mean_accuracy_change, abs=1e-6)


def test_the_stage_blocks_ceiling_is_no_worse_than_each_single_block_ceiling_on_the_selection_split(ceiling_run):
    rows, blocks, _ = read_block_classes(ceiling_run / files.BLOCKS)
    val = {(r["configuration"], r["class_id"]): r for r in rows if r["split"] == "val"}
    classes = sorted({c for _, c in val})
    for c in classes:
        best, own = val[("blocks", c)], val[("own", c)]
        assert best["accuracy"] >= own["accuracy"] - BLOCKS_PARAMS["steer"].get("accuracy_tolerance", 0.0) - 1e-12
        for b in blocks:
            assert best["gflops"] <= val[(f"block {b}", c)]["gflops"] + 1e-12, (c, b)
    assert any(val[("blocks", c)]["gflops"] < val[("own", c)]["gflops"] for c in classes)  # the search finds something
    # the final block's single-block ceiling is the final-block ceiling's pattern, class by class
    final = {c.class_id: c.pattern for c in read_classes(ceiling_run / files.CLASSES)}
    assert [_codes(val[("block 2", c)], blocks)[1] for c in classes] == [final[c] for c in classes]


def test_the_default_run_writes_no_multi_block_outputs_and_the_same_final_block_ones(ceiling_run):
    final = ceiling_run / "final"
    assert not (final / files.BLOCKS).exists() and (ceiling_run / files.BLOCKS).exists()
    details = json.loads((final / files.DETAILS).read_text())
    assert "blocks" not in details and read_details(final / files.DETAILS).blocks is None
    assert json.loads((final / files.METRICS).read_text()).keys() == {"ceiling_drop"}
    for path in (files.PATTERNS, files.CLASSES):
        assert (final / path).read_bytes() == (ceiling_run / path).read_bytes(), path
    everything = json.loads((ceiling_run / files.DETAILS).read_text())
    assert everything.pop("blocks") and everything == details
    headline = json.loads((ceiling_run / files.METRICS).read_text())
    assert headline.pop("ceiling_drop") == json.loads((final / files.METRICS).read_text())["ceiling_drop"]
    assert headline.keys() == {"blocks_gflops_drop", "blocks_acc_change"}


@pytest.mark.parametrize(("blocks", "ceiling", "match"), [
    ([0], {}, "steer.blocks = \\[0\\]: 'final', 'all' or a non-empty list of gated blocks"),
    ("all", {"max_exhaustive_heads": 2}, "tries all 2\\^3 patterns"),
])
def test_the_stage_refuses_blocks_it_cannot_search(ceiling_run, tmp_path, monkeypatch, blocks, ceiling, match):
    for name in ("data/dataset", "data/embeddings", "models/vit"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(ceiling_run / name)
    monkeypatch.chdir(tmp_path)
    params = parse_params(_merge(BLOCKS_PARAMS, {"steer": {"blocks": blocks}, "ceiling": ceiling}), "params")
    with pytest.raises(PipelineError, match=match):
        ceiling_stage.run(params.ceiling, params.steer)
    assert not (tmp_path / files.CEILING).exists()
