"""Training augmentation beyond crop and flip (the cifar100-gpu recipe): per-image policies and
MixUp / CutMix, seeded, and off by default without touching the random streams."""

from __future__ import annotations

import pytest
import torch
import yaml

from pipeline.model.gated_vit import build_gated_vit, model_config
from pipeline.model.training import apply_policy, augment, mix, train
from pipeline.params.file import parse_params
from pipeline.params.finetune import AugmentParams

from conftest import REPO_ROOT


def images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_defaults_add_no_augmentation_and_draw_nothing_more():
    """Policy none and both alphas 0 (every existing configuration) change no image and leave
    the generator where crop and flip alone leave it: the existing runs' bytes stay the same."""
    params = AugmentParams()
    plain, extended = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    reference = augment(images(), AugmentParams(crop_padding=params.crop_padding, hflip=params.hflip), plain)
    assert torch.equal(augment(images(), params, extended), reference)
    x = torch.randn(4, 3, 8, 8)
    mixed, targets = mix(x, torch.tensor([0, 1, 2, 3]), 5, params, extended)
    assert mixed is x and targets is None
    assert torch.equal(plain.get_state(), extended.get_state())


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_policies_draw_per_image_from_the_data_generator_only(policy):
    params = AugmentParams(crop_padding=0, hflip=False, policy=policy, randaugment_magnitude=15)
    batch = images(8)
    global_state = torch.get_rng_state()
    a = apply_policy(batch, params, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), global_state)  # the Gumbel noise stream is untouched
    assert torch.equal(a, apply_policy(batch, params, torch.Generator().manual_seed(3)))  # seeded
    assert not torch.equal(a, apply_policy(batch, params, torch.Generator().manual_seed(4)))
    assert a.dtype == torch.uint8 and a.shape == batch.shape
    changed = [not torch.equal(a[i], batch[i]) for i in range(len(batch))]
    assert sum(changed) >= 2  # images get their own draws (some ops can be the identity)


def test_mixup_blends_a_batch_with_its_reversal_and_its_labels_alike():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = mix(x, labels, 4, AugmentParams(mixup_alpha=0.8), torch.Generator().manual_seed(0))
    lam = float(targets[0, 0])
    assert 0 < lam < 1 and torch.allclose(targets.sum(1), torch.ones(4))
    assert targets[0, 3] == pytest.approx(1 - lam)  # image 0 is mixed with image 3
    assert torch.allclose(mixed[0], lam * x[0] + (1 - lam) * x[3])


def test_cutmix_pastes_a_box_and_weights_the_labels_by_its_area():
    x = torch.zeros(2, 1, 8, 8)
    x[1] = 1.0
    for seed in range(5):
        mixed, targets = mix(x, torch.tensor([0, 1]), 2, AugmentParams(cutmix_alpha=1.0), torch.Generator().manual_seed(seed))
        pasted = float(mixed[0].mean())  # image 0 shows image 1's ones inside the box
        assert targets[0, 1] == pytest.approx(pasted) and targets[0, 0] == pytest.approx(1 - pasted)


def test_training_with_the_gpu_recipe_runs_and_is_deterministic(tiny_params):
    params = tiny_params(finetune={"epochs": 1, "batch_size": 8, "augment": {
        "crop_padding": 2, "policy": "trivialaugment", "mixup_alpha": 0.8, "cutmix_alpha": 1.0}})
    data = images(16)
    labels = torch.arange(16) % 4

    def run():
        torch.manual_seed(0)
        model = build_gated_vit(params.model, num_classes=4)
        config = model_config(params.model, model.vit, 4, list("abcd"), 5.0)
        history = train(model, data, labels, data, labels, config, params.finetune, torch.device("cpu"))
        return model, history

    (a, history), (b, _) = run(), run()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert history[0]["train_loss"] > 0


def test_the_gpu_configuration_is_the_papers_architecture_with_the_from_scratch_recipe():
    params = parse_params(yaml.safe_load((REPO_ROOT / "configs/cifar100-gpu.yaml").read_text()))
    m, f, s = params.model, params.finetune, params.sae
    assert (m.embed_dim, m.depth, m.num_heads, m.img_size, m.patch_size, m.pretrained) == (384, 12, 6, 32, 4, False)
    assert params.data.source == "imagefolder" and m.keep_layers == 1
    assert (s.expansion * 384, s.k, s.epochs) == (3072, 32, 100)
    assert f.precision == "bf16" and f.augment.policy == "trivialaugment" and f.augment.mixup_alpha > 0
    assert f.label_smoothing > 0 and f.warmup_epochs > 0
