"""The head-gated ViT: gate semantics, exact head dropping, timm compatibility, round trips."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.errors import PipelineError
from pipeline.model.gated_vit import (
    GatedViT,
    build_gated_vit,
    gumbel_sigmoid_st,
    load_gated_vit,
    load_timm_checkpoint,
    model_config,
    save_gated_vit,
)
from pipeline.model.training import usage_loss
from pipeline.params.model import ModelParams

from conftest import TINY_SHAPE

TINY = TINY_SHAPE


def tiny_model(seed: int = 0, **overrides) -> GatedViT:
    torch.manual_seed(seed)
    params = ModelParams(**{**TINY, **overrides})
    return build_gated_vit(params, num_classes=5)


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_train_gates_are_binary_and_differentiable():
    model = tiny_model().train()
    out = model(images())
    assert out.gates.shape == (6, 2, 4)  # blocks 1 and 2 are gated (keep_layers = 1)
    assert set(out.gates.unique().tolist()) <= {0.0, 1.0}
    usage_loss(out.gates, 0.0).backward()
    for net in model.decision:
        assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_gumbel_gate_keep_probability_is_sigmoid_of_logit():
    logits = torch.tensor([-2.0, 0.0, 1.0]).repeat(40000, 1)
    kept = gumbel_sigmoid_st(logits, tau=5.0, generator=torch.Generator().manual_seed(0)).mean(0)
    assert torch.allclose(kept, torch.sigmoid(torch.tensor([-2.0, 0.0, 1.0])), atol=0.01)


def test_eval_gates_equal_positive_logits():
    model = tiny_model().eval()
    with torch.no_grad():
        for net in model.decision:  # spread logits around zero so both decisions occur
            net.bias.copy_(torch.tensor([1.0, -1.0, 0.05, -0.05]))
        out = model(images())
    assert torch.equal(out.gates, (out.gate_logits > 0).float())
    assert 0 < out.gates.mean() < 1


def test_dropped_head_matches_removing_its_contribution_by_hand():
    model = tiny_model().eval()
    block = model.vit.blocks[2]
    x = torch.randn(3, 17, 24)
    captured = {}
    handle = block.attn.proj.register_forward_hook(lambda m, args, out: captured.setdefault("heads", args[0]))
    with torch.no_grad():
        model.run_block(2, x, gates=torch.ones(3, 4))
    handle.remove()
    per_head = captured["heads"].view(3, 17, 4, 6)  # (B, N, heads, head_dim), all heads kept
    gates = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        got, _, _ = model.run_block(2, x, gates=gates)
        kept = (per_head * gates[:, None, :, None]).reshape(3, 17, 24)
        y = x + block.ls1(F.linear(kept, block.attn.proj.weight, block.attn.proj.bias))
        expected = y + block.ls2(block.mlp(block.norm2(y)))
    assert torch.allclose(got, expected, atol=1e-5)
    # the all-dropped sample keeps only the projection bias of the attention branch
    assert not torch.allclose(got[1], model.run_block(2, x, gates=torch.ones(3, 4))[0][1])


def test_all_heads_kept_equals_plain_timm_model():
    model = tiny_model(gate_bias_init=50.0).eval()  # every logit > 0
    plain = timm.create_model("vit_small_patch16_224", num_classes=5, **TINY).eval()
    plain.load_state_dict(model.vit.state_dict())
    with torch.no_grad():
        out = model(images())
        assert out.gates.min() == 1
        assert torch.allclose(out.logits, plain(images()), atol=1e-5)


def test_steering_pieces_compose_to_the_full_forward():
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(images(), record=(2,))
        tokens = model.forward_to_final(images())
        assert torch.equal(tokens[:, 0], out.cls_inputs[2])
        gates = (model.final_gate_logits(tokens[:, 0]) > 0).float()
        assert torch.equal(gates, out.gates[:, -1])
        assert torch.allclose(model.forward_final(tokens, gates), out.logits, atol=1e-6)


def test_usage_loss_pulls_head_usage_toward_target():
    model = tiny_model().train()
    opt = torch.optim.Adam(model.decision.parameters(), lr=0.05)
    x = images(32)
    usage = []
    for _ in range(80):
        gates = model(x).gates
        usage.append(gates.mean().item())
        loss = usage_loss(gates, target=0.25)
        opt.zero_grad()
        loss.backward()
        opt.step()
    start, end = sum(usage[:5]) / 5, sum(usage[-10:]) / 10  # training-mode (sampled) usage
    assert start > 0.8  # sigmoid(2) initial keep rate
    assert abs(end - 0.25) < 0.1


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model().eval()
    config = model_config(ModelParams(**TINY), model.vit, 5, list("abcde"), tau=5.0)
    save_gated_vit(tmp_path / "vit", model, config)
    loaded, loaded_config = load_gated_vit(tmp_path / "vit")
    assert loaded_config.class_names == list("abcde")
    with torch.no_grad():
        a, b = model(images()), loaded(images())
    assert torch.equal(a.logits, b.logits) and torch.equal(a.gates, b.gates)


def test_timm_state_dict_loads_into_gated_model(tmp_path):
    torch.manual_seed(3)
    donor = timm.create_model("vit_small_patch16_224", num_classes=1000, **TINY)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "donor.safetensors"))
    model = build_gated_vit(ModelParams(**TINY, checkpoint=tmp_path / "donor.safetensors"), num_classes=5)
    for key, value in donor.state_dict().items():
        if not key.startswith("head."):  # a 1000-way head does not fit 5 classes: kept fresh
            assert torch.equal(model.vit.state_dict()[key], value), key
    assert model.vit.head.weight.shape == (5, 24)


def test_malicious_checkpoint_is_rejected(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"blocks.0.attn.qkv.weight": Exploit()}, path)
    model = tiny_model()
    with pytest.raises(PipelineError, match="rejected"):
        load_timm_checkpoint(model.vit, path)


# ------------------------------------------------------------------------------ preprocessing
def test_preprocess_at_the_native_size_only_normalises():
    from pipeline.model.config import preprocess

    raw = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = preprocess(raw, 8, [0.5, 0.25, 0.0], [0.5, 0.5, 2.0])
    expected = (raw.float() / 255 - torch.tensor([0.5, 0.25, 0.0])[:, None, None]) / torch.tensor([0.5, 0.5, 2.0])[:, None, None]
    assert out.shape == (2, 3, 8, 8) and torch.allclose(out, expected, atol=1e-6)


def test_preprocess_upsamples_bilinearly_as_the_paper_configuration_does():
    """The paper's setting feeds 32 px CIFAR images to a 224 px ViT-S/16. Bilinear with
    half-pixel centres: a 2-pixel row 0, 255 becomes 0, 1/4, 3/4, 1 at 4 pixels."""
    from pipeline.model.config import preprocess

    row = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 2, 2)
    out = preprocess(row, 4, [0.0] * 3, [1.0] * 3)
    assert out.shape == (1, 3, 4, 4)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    cifar = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert preprocess(cifar, 224, [0.5] * 3, [0.5] * 3).shape == (2, 3, 224, 224)


def test_preprocess_antialiases_when_it_shrinks():
    """One-pixel stripes shrunk 3x: without antialiasing bilinear sampling would pick single
    stripes (values 0 or 1); the antialiased result is their local average, near 1/2."""
    from pipeline.model.config import preprocess

    stripes = (torch.arange(96) % 2 * 255).to(torch.uint8).view(1, 1, 1, 96).expand(1, 3, 96, 96)
    out = preprocess(stripes, 32, [0.0] * 3, [1.0] * 3)
    inner = out[0, 0, 1:-1, 1:-1]
    assert out.shape == (1, 3, 32, 32) and (inner - 0.5).abs().max() < 0.2


def test_the_model_config_preprocesses_at_its_own_size_and_round_trips_through_json():
    from pipeline.model.config import ModelConfig, preprocess

    model = tiny_model()
    config = model_config(ModelParams(**{**TINY, "img_size": 32}), tiny_model(img_size=32).vit, 5, list("abcde"), tau=5.0)
    assert config.shape.img_size == 32 and model.vit.patch_embed.img_size[0] == 16
    raw = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(config.preprocess(raw), preprocess(raw, 32, config.mean, config.std))
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.to_json()["shape"] == {"img_size": 32, "patch_size": 4, "embed_dim": 24, "depth": 3, "num_heads": 4}
