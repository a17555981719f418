"""The head-skipping eval path (`GatedViT.head_path = "skipping"`) against the masked path."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.model.gated_vit import build_gated_vit, resolve_head_path
from pipeline.params.model import ModelParams

from conftest import TINY_SHAPE

TINY = {**TINY_SHAPE, "depth": 4}


def spread_gates(seed: int = 2, dtype=torch.float32):
    """Gates that vary between images: every gated block's logits centred on their median, so
    each head is kept for about half the images (several patterns per block); block 1 drops
    every head of every image (no attention at all); the final block always keeps heads 0 and
    1, so some images keep all four."""
    torch.manual_seed(seed)
    model = build_gated_vit(ModelParams(**TINY), num_classes=5).eval()
    x = images(32, seed=seed + 100)
    with torch.no_grad():
        for offset, net in enumerate(model.decision):
            net.weight.normal_(0, 30.0)
            net.bias.zero_()
            net.bias.sub_(model(x).gate_logits[:, offset].median(0).values)
        model.decision[0].bias.fill_(-1e3)
        model.decision[2].bias[:2] = 1e3
    return model.to(dtype)


def run(model, path: str, images, **kwargs):
    model.head_path = path
    with torch.no_grad():
        return model(images, **kwargs)


def images(n: int, seed: int = 0, dtype=torch.float32):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_skipping_equals_masking_with_several_patterns_per_block(dtype, atol):
    model, x = spread_gates(dtype=dtype), images(32, dtype=dtype)
    masked, skipping = run(model, "masked", x, record=(1, 3)), run(model, "skipping", x, record=(1, 3))
    assert torch.equal(masked.gates, skipping.gates)
    assert (masked.gates[:, 0].sum(-1) == 0).all()
    final_patterns = torch.unique(masked.gates[:, -1], dim=0)
    assert len(final_patterns) >= 3 and (final_patterns.sum(-1) == 4).any()  # incl. all kept
    assert torch.allclose(masked.logits.float(), skipping.logits.float(), atol=atol)
    for block in (1, 3):  # the recorded CLS inputs (what extract stores)
        assert torch.allclose(masked.cls_inputs[block].float(), skipping.cls_inputs[block].float(), atol=atol)


def test_skipping_does_not_depend_on_the_batch_composition():
    """An image's output is the same alone, in any order and in any company."""
    model, x = spread_gates(), images(24)
    whole = run(model, "skipping", x).logits
    order = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    shuffled = run(model, "skipping", x[order]).logits
    assert torch.allclose(whole[order], shuffled, atol=1e-5)
    one_by_one = torch.cat([run(model, "skipping", x[i : i + 1]).logits for i in range(24)])
    assert torch.allclose(whole, one_by_one, atol=1e-5)
    masked = run(model, "masked", x).logits
    assert torch.allclose(masked, one_by_one, atol=1e-5)


def test_the_steering_entry_points_skip_too():
    """forward_to_final and forward_final with gates of our choosing (what steer runs)."""
    model, x = spread_gates(), images(16)
    gates = (torch.rand(16, 4, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    gates[0] = 0  # one image with no head, one with all
    gates[1] = 1
    out = {}
    for path in ("masked", "skipping"):
        model.head_path = path
        with torch.no_grad():
            tokens = model.forward_to_final(x)
            out[path] = (tokens, model.forward_final(tokens, gates))
    assert torch.allclose(out["masked"][0], out["skipping"][0], atol=1e-5)
    assert torch.allclose(out["masked"][1], out["skipping"][1], atol=1e-5)


def test_training_always_masks():
    """Skipping is an eval path: in training the masked path runs (and gradients flow)."""
    model, x = spread_gates(), images(8)
    model.train()
    outputs = {}
    for path in ("masked", "skipping"):
        model.head_path = path
        torch.manual_seed(5)  # same Gumbel noise
        outputs[path] = model(x).logits
    assert torch.equal(outputs["masked"], outputs["skipping"])
    outputs["skipping"].sum().backward()
    assert model.decision[2].weight.grad is not None


def test_sliced_weights_are_cached_per_pattern_and_follow_the_weights():
    model, x = spread_gates(), images(16)
    run(model, "skipping", x)
    cached = len(model._slices)
    assert cached >= 3
    run(model, "skipping", x)
    assert len(model._slices) == cached  # second pass: every pattern from the cache
    with torch.no_grad():  # an in-place change (an optimizer step, load_state_dict) rebuilds
        model.vit.blocks[3].attn.qkv.weight.mul_(2.0)
    assert torch.allclose(run(model, "skipping", x).logits, run(model, "masked", x).logits, atol=1e-5)
    # a new parameter object (its version counter may read the same as the old one's) rebuilds too
    proj = model.vit.blocks[3].attn.proj
    replacement = torch.nn.Parameter(proj.weight.detach() * -1.0)
    with torch.no_grad():
        while replacement._version < proj.weight._version:  # same counter reading: only identity tells
            replacement.mul_(1.0)
    assert replacement._version == proj.weight._version
    proj.weight = replacement
    assert torch.allclose(run(model, "skipping", x).logits, run(model, "masked", x).logits, atol=1e-5)
    model.double()  # a cast clears the cache: nothing refers to the old tensors
    assert len(model._slices) == 0
    assert run(model, "skipping", x.double()).logits.dtype == torch.float64


def test_the_cache_is_bounded():
    from pipeline.model.heads import HeadSliceCache

    model = spread_gates()
    cache = HeadSliceCache(max_entries=2)
    attn = model.vit.blocks[2].attn
    for pattern in ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]):
        cache.attention(2, attn, torch.tensor(pattern, dtype=torch.bool))
    assert len(cache) == 2


def test_resolve_head_path():
    assert resolve_head_path("auto", torch.device("cpu")) == "skipping"
    assert resolve_head_path("auto", torch.device("cuda")) == "masked"
    assert resolve_head_path("masked", torch.device("cpu")) == "masked"
    assert resolve_head_path("skipping", torch.device("cuda")) == "skipping"
    with pytest.raises(PipelineError, match="unknown head path"):
        resolve_head_path("fast", torch.device("cpu"))
