"""FLOPs from the gates, checked against torch's FlopCounterMode, and the path that computes
only the kept heads, checked against the masked path."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model.flops import flop_model
from pipeline.model.gated_vit import build_gated_vit
from pipeline.model.heads import run_block_with_heads
from pipeline.params.model import ModelParams

from conftest import TINY_SHAPE

TINY = TINY_SHAPE


def tiny(seed: int = 0, **shape):
    torch.manual_seed(seed)
    return build_gated_vit(ModelParams(**{**TINY, **shape}), num_classes=5).eval()


def counted(fn) -> int:
    """FLOPs as FlopCounterMode counts them. Attention runs on SDPA's math backend: the CPU's
    fused kernel has no FLOP formula registered and would be left out of the count."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_with_heads(model, images, kept: list[list[int]]):
    """The whole model with block b computing only heads kept[b] (decision networks still run)."""
    x = model.embed(images)
    for b, block in enumerate(model.vit.blocks):
        if b >= model.keep_layers:
            model.decision_net(b)(x[:, 0])
        x = run_block_with_heads(block, x, torch.tensor(kept[b], dtype=torch.long))
    return model.head(x)


@pytest.mark.parametrize("shape", [TINY, {**TINY, "img_size": 24, "num_heads": 6}])
def test_the_dense_count_equals_flop_counter_mode_on_the_gated_model(shape):
    model = tiny(**shape)
    images = torch.randn(3, 3, shape["img_size"], shape["img_size"])
    with torch.no_grad():
        total = counted(lambda: model(images))
    assert total == 3 * flop_model(model).dense


@pytest.mark.parametrize("kept", [[[0, 1, 2, 3], [1, 3], [2]], [[0, 1, 2, 3], [], [0, 1, 2, 3]], [[0], [0, 1, 2], [3]]])
def test_the_count_with_heads_removed_equals_flop_counter_mode(kept):
    model = tiny()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        total = counted(lambda: forward_with_heads(model, images, kept))
    fm = flop_model(model)
    assert total == 2 * fm.image([len(k) for k in kept])
    assert fm.image([len(k) for k in kept]) < fm.dense


def test_usage_gives_the_mean_flops_of_a_mixed_batch():
    fm = flop_model(tiny())
    kept_a, kept_b = [4, 2, 1], [4, 4, 3]
    mean = (fm.image(kept_a) + fm.image(kept_b)) / 2
    assert fm.from_usage([1.0, 6 / 8, 4 / 8]) == pytest.approx(mean)


def test_computing_only_the_kept_heads_equals_the_masked_path():
    model = tiny(1)
    images = torch.randn(4, 3, 16, 16)
    block = 2
    with torch.no_grad():
        x = model.forward_to_final(images)
        for heads in ([0, 1, 2, 3], [1, 3], [2], []):
            gates = torch.zeros(4, 4)
            gates[:, heads] = 1
            masked, _, _ = model.run_block(block, x, gates=gates)
            computed = run_block_with_heads(model.vit.blocks[block], x, torch.tensor(heads, dtype=torch.long))
            assert torch.allclose(masked, computed, atol=1e-5), heads
