"""The resident training loop (`finetune.loop: resident`) and its batched augmentation, on the CPU:
every batched op equals torchvision's functional op at every magnitude, the policies draw per image
from a seeded generator, and the loop (eager and compiled) gives the standard loop's losses."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode, RandAugment, TrivialAugmentWide

from pipeline.errors import ParamsError
from pipeline.model import batched_augment as ba
from pipeline.model import fast_training
from pipeline.model.fast_training import train_resident
from pipeline.model.gated_vit import build_gated_vit, model_config
from pipeline.model.training import augment, train
from pipeline.params.file import parse_params
from pipeline.params.finetune import AugmentParams, FinetuneParams
from pipeline.params.model import ModelParams

from conftest import TINY_PARAMS

TORCHVISION = {"trivialaugment": TrivialAugmentWide(), "randaugment": RandAugment()}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sample_images(h: int = 16, w: int = 16) -> torch.Tensor:
    """Noise, smooth images, and the edge cases of the histogram ops: a constant image, a
    two-valued one, one with a constant channel."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8, generator=g)
    coarse = torch.randint(0, 256, (2, 3, 4, 4), generator=g).float()
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").round().to(torch.uint8)
    constant = torch.full((1, 3, h, w), 77, dtype=torch.uint8)
    two = torch.where(torch.rand(1, 3, h, w, generator=g) < 0.5, 10, 200).to(torch.uint8)
    flat_channel = noise[:1].clone()
    flat_channel[:, 1] = 255
    return torch.cat([noise, smooth, constant, two, flat_channel])


def torchvision_op(policy: str, image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """What torchvision's policy does to one image for a drawn op and magnitude."""
    tv = TORCHVISION[policy]
    return tv._apply_image_or_video_transform(image, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=tv._fill)


# ------------------------------------------------------------------------- batched ops
@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_the_magnitude_bins_are_torchvisions(policy, size):
    h, w = size
    space = TORCHVISION[policy]._AUGMENTATION_SPACE
    assert tuple(space) == ba.OPS
    table = ba.magnitude_table(policy, h, w)
    for i, (name, (magnitudes, signed)) in enumerate(space.items()):
        assert (name in ba.SIGNED) == signed
        expected = magnitudes(ba.NUM_BINS, h, w)
        if expected is None:
            assert not table[i].any()
        else:
            assert [float(v) for v in expected] == table[i].tolist(), name


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
@pytest.mark.parametrize("name", ba.OPS)
def test_every_batched_op_equals_torchvisions_at_every_magnitude(policy, name):
    """Exact on this CPU, every bin and sign (measured: 0 of 0 pixels differ; on CUDA, blends and
    general rotations / shears may differ by a grey level or a neighbouring pixel where a value
    falls within float rounding of a rounding boundary: see the module's docstring)."""
    images = sample_images()
    row = ba.magnitude_table(policy, 16, 16)[ba.OPS.index(name)]
    magnitudes = sorted({float(m) for m in row} | ({-float(m) for m in row} if name in ba.SIGNED else set()))
    for magnitude in magnitudes:
        ours = ba.OP_FUNCTIONS[name](images, torch.full((len(images),), magnitude, dtype=torch.float64))
        reference = torch.stack([torchvision_op(policy, image, name, magnitude) for image in images])
        assert ours.dtype == torch.uint8
        assert torch.equal(ours, reference), f"{name} at {magnitude}: {(ours.int() - reference.int()).abs().max()} max difference"


def test_geometric_ops_on_non_square_images_equal_torchvisions():
    """90-degree rotations of a non-square image go through the affine warp, as in torchvision;
    RandAugment's translations scale with the image's own sides."""
    images = sample_images(12, 20)
    table = ba.magnitude_table("randaugment", 12, 20)
    for name, magnitude in [("Rotate", 90.0), ("Rotate", -90.0), ("Rotate", 180.0), ("Rotate", 13.0),
                            ("TranslateX", float(table[3, 30])), ("TranslateY", -float(table[4, 30])), ("ShearY", 0.3)]:
        ours = ba.OP_FUNCTIONS[name](images, torch.full((len(images),), magnitude, dtype=torch.float64))
        reference = torch.stack([torchvision_op("randaugment", image, name, magnitude) for image in images])
        assert torch.equal(ours, reference), (name, magnitude)


def test_a_batch_applies_each_images_own_draw_as_torchvision_would():
    images = sample_images().repeat(4, 1, 1, 1)
    generator = torch.Generator().manual_seed(5)
    out = ba.trivial_augment(images, generator)
    draws = ba.draw(len(images), "trivialaugment", 16, 16, torch.Generator().manual_seed(5))
    reference = torch.stack([torchvision_op("trivialaugment", image, ba.OPS[int(o)], float(m))
                             for image, o, m in zip(images, draws.op, draws.magnitude)])
    assert torch.equal(out, reference)
    # RandAugment: two ops in turn per image, each at the fixed bin
    generator = torch.Generator().manual_seed(6)
    out = ba.rand_augment(images, generator, num_ops=2, magnitude=20)
    replay = torch.Generator().manual_seed(6)
    first = ba.draw(len(images), "randaugment", 16, 16, replay, magnitude_bin=20)
    second = ba.draw(len(images), "randaugment", 16, 16, replay, magnitude_bin=20)
    reference = []
    for i, image in enumerate(images):
        for d in (first, second):
            image = torchvision_op("randaugment", image, ba.OPS[int(d.op[i])], float(d.magnitude[i]))
        reference.append(image)
    assert torch.equal(out, torch.stack(reference))


def test_draws_are_per_image_seeded_and_cover_the_policy():
    params = AugmentParams(crop_padding=0, hflip=False, policy="trivialaugment")
    same = sample_images()[:1].repeat(64, 1, 1, 1)
    global_state = torch.get_rng_state()
    a = ba.augment_batch(same, params, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), global_state)  # only the given generator draws
    assert torch.equal(a, ba.augment_batch(same, params, torch.Generator().manual_seed(3)))  # seeded
    assert not torch.equal(a, ba.augment_batch(same, params, torch.Generator().manual_seed(4)))
    assert len({bytes(img.numpy()) for img in a}) >= 40  # identical images, their own draws
    draws = ba.draw(14 * 300, "trivialaugment", 16, 16, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws.op, minlength=len(ba.OPS))
    assert counts.min() > 200 and counts.max() < 400  # uniform over the 14 ops (300 expected)
    rotate = draws.magnitude[draws.op == ba.OPS.index("Rotate")]
    assert (rotate < 0).any() and (rotate > 0).any() and len(rotate.abs().unique()) > 25  # signs and bins
    posterize = draws.magnitude[draws.op == ba.OPS.index("Posterize")]
    assert (posterize >= 2).all() and (posterize <= 8).all()  # unsigned


def test_crop_and_flip_draw_as_the_standard_augment_does():
    params = AugmentParams(crop_padding=3, hflip=True)
    images = sample_images()
    g_standard, g_batched = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(ba.crop_flip(images, params, g_batched), augment(images, params, g_standard))
    assert torch.equal(g_standard.get_state(), g_batched.get_state())


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        ba.trivial_augment(torch.zeros(2, 3, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="bin"):
        ba.rand_augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.Generator(), magnitude=31)


# ------------------------------------------------------------------------------ the loop
SHAPE = ModelParams(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=4)


def run_loop(fn, data, labels, shape=SHAPE, **finetune):
    params = FinetuneParams(**{"epochs": 1, "batch_size": 16, "warmup_epochs": 0.5, **finetune})
    torch.manual_seed(0)
    model = build_gated_vit(shape, num_classes=4)
    config = model_config(shape, model.vit, 4, list("abcd"), 5.0)
    history = fn(model, data, labels, data[:20], labels[:20], config, params, torch.device("cpu"))
    return model, history


DATA = sample_images().repeat(4, 1, 1, 1)[:48]
LABELS = torch.arange(48) % 4


def assert_close_runs(a, b, rel):
    (model_a, history_a), (model_b, history_b) = a, b
    assert len(history_a) == len(history_b)
    for row_a, row_b in zip(history_a, history_b):
        assert row_a.keys() == row_b.keys()
        for key in ("train_loss", "train_accuracy", "test_accuracy", "head_usage"):
            assert row_a[key] == pytest.approx(row_b[key], rel=rel), key
    for p, q in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-4)


def test_the_resident_loop_gives_the_standard_loops_losses():
    """Crop and flip on, no policy or mixing: the same shuffling and crops, the same Gumbel noise;
    only the fused AdamW's rounding differs (measured: 1e-7 relative in the loss, 2e-6 in weights)."""
    augment_params = {"crop_padding": 2, "hflip": True}
    standard = run_loop(train, DATA, LABELS, epochs=2, augment=augment_params)
    resident = run_loop(train_resident, DATA, LABELS, epochs=2, augment=augment_params, loop="resident")
    assert_close_runs(standard, resident, rel=1e-5)
    assert not torch.equal(standard[0].vit.head.weight, run_loop(train, DATA, LABELS)[0].vit.head.weight)  # it trained


def test_the_resident_loop_with_the_gpu_recipe_is_deterministic():
    recipe = {"loop": "resident", "augment": {"crop_padding": 2, "policy": "trivialaugment", "mixup_alpha": 0.8, "cutmix_alpha": 1.0}}
    (a, history), (b, _) = run_loop(train_resident, DATA, LABELS, **recipe), run_loop(train_resident, DATA, LABELS, **recipe)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert history[0]["train_loss"] > 0 and set(history[0]) == {"epoch", "train_loss", "train_accuracy", "test_accuracy",
                                                                 "head_usage", "head_usage_per_block"}
    other, _ = run_loop(train_resident, DATA, LABELS, **{**recipe, "seed": 1})
    assert not torch.equal(a.vit.head.weight, other.vit.head.weight)


def inductor_or_skip() -> None:
    """Skip only where inductor cannot compile at all on this machine (no C compiler)."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    except Exception as exc:  # noqa: BLE001 - any failure of the toolchain itself
        pytest.skip(f"torch.compile (inductor) unavailable here: {type(exc).__name__}: {str(exc)[:200]}")


@pytest.mark.slow  # inductor's first compilation: about a minute on a busy 2-core machine, seconds once cached
def test_the_compiled_step_gives_the_eager_steps_losses():
    """With inductor's random numbers taken from torch's own generator (`fallback_random`), the
    compiled forward and backward draw the eager step's Gumbel noise: equal losses up to the
    compiled kernels' float rounding."""
    inductor_or_skip()
    torch._dynamo.reset()
    small = ModelParams(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)  # fewer kernels to compile
    with torch._inductor.config.patch(fallback_random=True, compile_threads=1):
        compiled = run_loop(train_resident, DATA, LABELS, shape=small, loop="resident", compile=True, batch_size=24, epochs=2)
    eager = run_loop(train_resident, DATA, LABELS, shape=small, loop="resident", batch_size=24, epochs=2)
    assert_close_runs(eager, compiled, rel=1e-4)


def test_a_resumed_resident_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    recipe = {"loop": "resident", "epochs": 2, "augment": {"crop_padding": 2, "policy": "trivialaugment", "mixup_alpha": 0.8}}
    uninterrupted, history = run_loop(train_resident, DATA, LABELS, **recipe)
    checkpoint = tmp_path / "ckpt.pt"
    real_save = fast_training._save

    def killed_after_epoch_1(path, model, opt, gens, device, state, fingerprint):
        real_save(path, model, opt, gens, device, state, fingerprint)
        raise KeyboardInterrupt

    monkeypatch.setattr(fast_training, "_save", killed_after_epoch_1)
    params = FinetuneParams(batch_size=16, warmup_epochs=0.5, resume=True, **recipe)
    torch.manual_seed(0)
    model = build_gated_vit(SHAPE, num_classes=4)
    config = model_config(SHAPE, model.vit, 4, list("abcd"), 5.0)
    with pytest.raises(KeyboardInterrupt):
        train_resident(model, DATA, LABELS, DATA[:20], LABELS[:20], config, params, torch.device("cpu"), checkpoint=checkpoint)
    monkeypatch.setattr(fast_training, "_save", real_save)
    torch.manual_seed(0)
    model = build_gated_vit(SHAPE, num_classes=4)
    seen = []
    resumed = train_resident(model, DATA, LABELS, DATA[:20], LABELS[:20], config, params, torch.device("cpu"),
                             checkpoint=checkpoint, on_epoch=seen.append)
    assert resumed == history and seen == history  # the restored row, then the new one
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), uninterrupted.state_dict().values()))


def test_the_new_keys_default_to_the_standard_loop_and_compile_needs_the_resident_one():
    params = parse_params(TINY_PARAMS)
    assert params.finetune.loop == "standard" and params.finetune.compile is False
    with pytest.raises(ParamsError, match="compile"):
        parse_params({**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], "compile": True}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_on_cuda_the_batched_ops_stay_within_rounding_of_torchvisions(policy):
    """The GPU's float rounding is not the CPU's: at most one grey level off, on at most 1% of
    the values, for every op at every bin and sign (the exact ops exactly)."""
    images = sample_images(32, 32)
    table = ba.magnitude_table(policy, 32, 32)
    for i, name in enumerate(ba.OPS):
        for magnitude in sorted({float(m) for m in table[i]} | ({-float(m) for m in table[i]} if name in ba.SIGNED else set())):
            ours = ba.OP_FUNCTIONS[name](images.cuda(), torch.full((len(images),), magnitude, dtype=torch.float64, device="cuda")).cpu()
            reference = torch.stack([torchvision_op(policy, image, name, magnitude) for image in images])
            diff = (ours.int() - reference.int()).abs()
            if name in ("Identity", "TranslateX", "TranslateY", "Brightness", "Posterize", "Solarize", "AutoContrast", "Equalize"):
                assert torch.equal(ours, reference), (name, magnitude)
            elif name in ("Color", "Contrast", "Sharpness"):
                assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, (name, magnitude)
            else:  # a neighbouring source pixel now and then
                assert (diff > 0).float().mean() <= 0.01, (name, magnitude)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_resident_step_on_cuda_never_waits_for_the_gpu():
    """No host synchronisation in a training step, augmentation and mixing included: torch
    raises on any while the sync debug mode is `error` (the epoch's read-back and evaluation
    come after the steps)."""
    device = torch.device("cuda")
    params = FinetuneParams(loop="resident", batch_size=16, precision="bf16", augment={
        "crop_padding": 2, "policy": "randaugment", "mixup_alpha": 0.8, "cutmix_alpha": 1.0})
    torch.manual_seed(0)
    model = build_gated_vit(SHAPE, num_classes=4).to(device).train()
    config = model_config(SHAPE, model.vit, 4, list("abcd"), 5.0)
    opt, kind = fast_training.make_optimizer(model, params)
    assert kind == "fused"
    step = fast_training.ResidentStep(model, opt, DATA.to(device), LABELS.to(device), config, params,
                                      torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(1), autocast=True)
    idx = torch.arange(16, device=device)
    step(idx, 1e-3)  # the first step allocates the optimiser state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss, correct, count = step(idx, 1e-3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and count == 16
