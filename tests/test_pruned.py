"""Class-specific compact models (pipeline/pruned.py): the same outputs as the gated model on
images whose gates match the kept heads, a plain timm ViT on disk."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pipeline.gated_vit import GatedViT, build_gated_vit, model_config
from pipeline.params import ModelParams
from pipeline.pruned import KeptHeadsAttention, load_pruned, majority_heads, prune, save_pruned

SHAPE = dict(name="vit_small_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=4, num_heads=3, keep_layers=1)


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
