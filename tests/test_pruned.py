"""Class-specific compact models (pipeline/model/pruned.py): the same outputs as the gated model on
images whose gates match the kept heads, a plain timm ViT on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pipeline.errors import PipelineError
from pipeline.model.gated_vit import GatedViT, build_gated_vit, model_config
from pipeline.model.heads import KeptHeadsAttention
from pipeline.model.pruned import load_pruned, majority_heads, prune, save_pruned
from pipeline.params.model import ModelParams

from conftest import TINY_SHAPE, steer_details

SHAPE = dict(name="vit_small_patch16_224", **{**TINY_SHAPE, "depth": 4, "num_heads": 3}, keep_layers=1)


def gated_with_fixed_gates(kept: list[list[int]]) -> GatedViT:
    torch.manual_seed(0)
    model = build_gated_vit(ModelParams(**SHAPE), num_classes=5).eval()
    with torch.no_grad():
        for net, heads in zip(model.decision, kept):
            net.weight.zero_()
            net.bias.copy_(torch.tensor([1.0 if h in heads else -1.0 for h in range(model.num_heads)]))
    return model


@pytest.mark.parametrize("kept", [[[0, 1, 2], [1], []], [[2], [], [0, 2]], [[], [], []]], ids=["all-one-none", "mixed", "none"])
def test_the_compact_model_computes_what_the_gated_model_computes_when_gates_match(kept):
    model = gated_with_fixed_gates(kept)
    images = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        gated = model(images)
        assert [torch.nonzero(g).flatten().tolist() for g in gated.gates[0]] == kept
        compact = prune(model, kept)
        torch.testing.assert_close(compact(images), gated.logits, rtol=1e-5, atol=1e-5)
    removed = sum(model.num_heads - len(k) for k in kept)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.vit.parameters()) or removed == 0


def test_the_compact_model_round_trips_as_a_plain_timm_vit(tmp_path):
    kept = [[0, 2], [], [1]]
    model = gated_with_fixed_gates(kept)
    compact = prune(model, kept)
    config = model_config(ModelParams(**SHAPE), model.vit, 5, [f"c{i}" for i in range(5)], tau=5.0)
    save_pruned(tmp_path / "m", compact, config, model.keep_layers, kept, {"classes": ["c0"]})
    loaded, loaded_config, raw = load_pruned(tmp_path / "m")
    assert isinstance(loaded, VisionTransformer) and not isinstance(loaded, GatedViT)
    assert not any(m._forward_pre_hooks for m in loaded.modules())  # no gate hooks
    assert isinstance(loaded.blocks[2].attn, KeptHeadsAttention) and loaded.blocks[2].attn.kept == 0
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), compact(images))
    assert raw["classes"] == ["c0"] and loaded_config.class_names[0] == "c0"


def test_majority_heads_keeps_what_more_than_half_of_the_images_keep():
    gates = torch.tensor([
        [[1, 0, 1], [0, 0, 0]],
        [[1, 1, 0], [0, 0, 1]],
        [[1, 0, 1], [0, 0, 1]],
        [[0, 1, 0], [0, 0, 0]],
    ], dtype=torch.float32)
    assert majority_heads(gates) == [[0], []]  # 3/4 keep h0; h1 and h2 only half; h2 of block 2 half


def test_headline_heads_pool_the_selection_split_by_image_count(tmp_path, monkeypatch):
    """Final-block heads for `--heads headline`: at each class's selected alpha (per_class
    strategy, selection split), rates pooled by image count, kept where above one half."""
    from pipeline.export_pruned import headline_heads
    from pipeline.steering.results import write_results
    from pipeline.storage import write_json

    monkeypatch.chdir(tmp_path)
    details = steer_details(["per_class"], True)
    details["per_class_headline"].update(alpha={"a": 4.0, "b": -1.0, "c": 0.0}, selected_on="val")
    details["settings"]["model_sha256"] = "ab" * 32
    write_json(Path("metrics/details/steer.json"), details)

    def row(split, strategy, alpha, cls, n, accuracy, keep):
        return {"split": split, "strategy": strategy, "alpha": alpha, "draw": 0, "class_id": ord(cls) - 97, "class": cls,
                "n": n, "accuracy": accuracy, "head_usage": sum(keep) / 3, **{f"keep_h{h}": k for h, k in enumerate(keep)}}

    rows = [
        row("val", "per_class", 4.0, "a", 10, 1.0, [1.0, 0.0, 0.6]),
        row("val", "per_class", -1.0, "b", 30, 1.0, [0.0, 1.0, 0.5]),
        row("val", "per_class", -1.0, "a", 10, 1.0, [1.0, 1.0, 1.0]),  # not a's alpha
        row("val", "global", 4.0, "a", 10, 1.0, [1.0, 1.0, 1.0]),  # not the per_class strategy
        row("val", "per_class", 0.0, "c", 50, 1.0, [1.0, 1.0, 1.0]),  # not a chosen class
        row("test", "per_class", 4.0, "a", 20, 0.5, [1.0, 0.0, 0.0]),
        row("test", "per_class", -1.0, "b", 20, 1.0, [0.0, 1.0, 1.0]),
    ]
    Path("data/steer").mkdir(parents=True)
    write_results(Path("data/steer/results.parquet"), rows, 3)
    heads, info = headline_heads(["a", "b"], 3, "ab" * 32, final_block=2)
    # pooled: h0 10/40 = 0.25, h1 30/40 = 0.75, h2 (6 + 15)/40 = 0.525 (unpooled means: 0.5, 0.5, 0.55)
    assert heads == {2: [1, 2]}
    assert info["keep_rates_on_selection_split"]["block2"] == pytest.approx([0.25, 0.75, 0.525])
    assert info["alphas"] == {"a": 4.0, "b": -1.0} and info["images"] == {"val": 40, "test": 40}
    assert info["steered_gated_on_test"]["accuracy_chosen_classes"] == pytest.approx(0.75)
    assert info["steered_gated_on_test"]["head_usage"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)

    # A sweep that ran on other weights is refused; one that does not say (older runs) is read.
    with pytest.raises(PipelineError, match="other weights"):
        headline_heads(["a", "b"], 3, "cd" * 32, final_block=2)
    del details["settings"]["model_sha256"]
    write_json(Path("metrics/details/steer.json"), details)
    assert headline_heads(["a", "b"], 3, "cd" * 32, final_block=2)[0] == {2: [1, 2]}


def test_headline_heads_of_a_multi_block_sweep_come_from_every_gated_blocks_rows(tmp_path, monkeypatch):
    """A multi-block sweep (settings.blocks): every gated block's heads from blocks.parquet, each
    pooled by image count at the classes' alphas; results.parquet (G x H heads) is not read for them."""
    from pipeline.export_pruned import headline_heads
    from pipeline.steering.results import write_block_rows, write_results
    from pipeline.storage import write_json

    monkeypatch.chdir(tmp_path)
    details = steer_details(["per_class"], True)
    details["per_class_headline"].update(alpha={"a": 4.0, "b": -1.0}, selected_on="val")
    details["settings"].update(model_sha256="ab" * 32, blocks=[1, 2], gated_blocks=[1, 2])
    write_json(Path("metrics/details/steer.json"), details)

    def row(split, block, alpha, cls, n, keep):
        return {"split": split, "block": block, "strategy": "per_class", "alpha": alpha, "draw": 0, "class_id": ord(cls) - 97,
                "class": cls, "n": n, "accuracy": 1.0, "head_usage": sum(keep) / 3, **{f"keep_h{h}": k for h, k in enumerate(keep)}}

    rows = [row("val", 1, 4.0, "a", 10, [1.0, 0.0, 0.0]), row("val", 1, -1.0, "b", 30, [1.0, 1.0, 0.0]),
            row("val", 2, 4.0, "a", 10, [0.0, 0.0, 1.0]), row("val", 2, -1.0, "b", 30, [0.0, 0.4, 1.0]),
            row("val", 2, 0.0, "a", 10, [1.0, 1.0, 1.0]),  # not a's alpha
            *(row("test", b, a, c, 5, [1.0, 1.0, 1.0]) for b in (1, 2) for a, c in ((4.0, "a"), (-1.0, "b")))]
    Path("data/steer").mkdir(parents=True)
    write_block_rows(Path("data/steer/blocks.parquet"), rows, 3)
    write_results(Path("data/steer/results.parquet"), [], 6)
    heads, info = headline_heads(["a", "b"], 3, "ab" * 32, final_block=2)
    assert heads == {1: [0, 1], 2: [2]}  # block 2, h1: (0 + 12) / 40 = 0.3, not kept
    assert info["keep_rates_on_selection_split"]["block2"] == pytest.approx([0.0, 0.3, 1.0])
    assert info["steered_blocks"] == [1, 2] and info["head_usage_on_test"] == {"block1": 1.0, "block2": 1.0}


def test_the_export_names_where_its_heads_were_chosen():
    """A multi-block headline chooses every gated block's heads on the selection split (no
    training majority left); a final-block one leaves the earlier blocks to the training majority."""
    from pipeline.export_pruned import _chosen_on, describe

    multi = {"selected_on": "val", "steered_blocks": [1, 2], "alphas": {"a": 4.0}, "head_usage_on_test": {"block1": 0.5},
             "steered_gated_on_test": {"accuracy_chosen_classes": 0.9}}
    final = {**multi, "steered_blocks": None}
    assert _chosen_on(None, []) == "train"
    assert _chosen_on(multi, [1, 2]) == "val (every gated block: steering headline)"
    assert _chosen_on(final, [2]) == "train (blocks 2: steering headline, val)"

    timing = {"gated": 1.0, "gated_skipping": 1.0, "compact": 1.0}
    acc = {"chosen_classes": 1.0, "all": 1.0}
    result = {"accuracy": {"gated": acc, "gated_skipping": acc, "compact": acc},
              "gflops": {"dense": 1.0, "gated_if_heads_were_skipped": 1.0, "compact": 1.0},
              "latency_ms": {"batch1": timing, "batch32": timing}, "classes": ["a"], "heads_kept": 2, "heads_gated": 6,
              "kept_heads": {"block1": [0], "block2": [1]}, "chosen_images_whose_gates_match_the_kept_heads": 0.5}
    assert "every gated block: the steering headline's" in describe({**result, "steering_headline": multi})
    assert "training images" not in describe({**result, "steering_headline": multi}).splitlines()[0]
    first = describe({**result, "steering_headline": final}).splitlines()[0]
    assert "majority of their training images; final block: the steering headline's" in first
    assert "steering" not in describe(result).splitlines()[0]
