"""Steering several gated blocks (pipeline/steering/multiblock.py) against the naive reference
that runs the whole model per variant with the steering hooked into each steered block's
decision network (tests/reference_steering.py), and against the final-block sweep."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.gated_vit import build_gated_vit, model_config
from pipeline.params.model import ModelParams
from pipeline.sae.topk import TopKSAE
from pipeline.steering.multiblock import BlockSteering, block_directions, run_blocks_sweep, steer_blocks
from pipeline.steering.propagate import propagate, resolve_blocks, stream_at
from pipeline.steering.strategies import STRATEGIES, SteerBatch, SteeringSets
from pipeline.steering.sweep import random_class_sets, random_sets, result_rows, run_sweep, steer_batch, variants_for

from conftest import TINY_SHAPE
from reference_steering import steer_blocks_naive

SHAPE = {**TINY_SHAPE, "depth": 4}  # gated blocks 1, 2, 3
N_CLASSES, N_LATENTS, N_IMAGES = 5, 64, 40
ALL_VARIANTS = variants_for(list(STRATEGIES), [-1.0, 0.5, 4.0], draws=2)  # latent strategies and controls


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = build_gated_vit(ModelParams(**SHAPE), num_classes=N_CLASSES).eval()
    with torch.no_grad():  # logits spread around 0 so the gates vary between images, heads and variants
        for net in model.decision:
            net.weight.normal_(0, 0.5)
            net.bias.zero_()
        for block in model.vit.blocks:  # heads that move the stream, so a block's gates change the next block's input
            block.attn.proj.weight.mul_(4)
        model.vit.head.weight.mul_(10)
    config = model_config(ModelParams(**SHAPE), model.vit, N_CLASSES, [f"c{i}" for i in range(N_CLASSES)], 5.0)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randint(0, 256, (N_IMAGES, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.arange(N_IMAGES) % N_CLASSES
    steered = {}
    for block in model.gated_blocks:
        sae = TopKSAE(24, N_LATENTS, k=8).eval()  # each block its own SAE (fresh random weights)
        per_class = torch.zeros(N_CLASSES, N_LATENTS, dtype=torch.bool)
        for c in range(N_CLASSES):
            per_class[c, torch.randperm(N_LATENTS, generator=gen)[:10]] = True
        alive = torch.ones(N_LATENTS, dtype=torch.bool)
        train_x = torch.randn(60, 24, generator=gen)
        steered[block] = BlockSteering(sae, SteeringSets(
            per_class=per_class, global_set=per_class[0].clone(),
            random=random_sets(alive, 10, 2, seed=block), random_per_class=random_class_sets(alive, [10] * N_CLASSES, 2, seed=block),
            mean_active=torch.rand(N_LATENTS, generator=gen) + 0.5,
            directions=block_directions(model, block, train_x, torch.arange(60) % N_CLASSES, draws=2, seed=block),
        ))
    return model, config, images, labels, steered


def unsteered_batch(model, x, labels):
    with torch.no_grad():
        return SteerBatch(labels, model(x).logits.argmax(-1))


@pytest.mark.parametrize("blocks, mode, keep_error, head_path", [
    ((1, 2, 3), "scale", True, "masked"), ((1, 2, 3), "add", False, "skipping"), ((1, 2, 3), "scale", True, "skipping"),
    ((1, 3), "scale", True, "masked"), ((2,), "add", True, "skipping"),
])
def test_steering_several_blocks_equals_the_naive_full_model_per_variant(blocks, mode, keep_error, head_path):
    model, config, images, labels, all_steered = setup()
    model.head_path = head_path
    steered = {b: all_steered[b] for b in blocks}
    x = config.preprocess(images)
    batch = unsteered_batch(model, x, labels)
    with torch.no_grad():
        stream = model.embed(x)
    fast = steer_blocks(model, steered, stream, 0, batch, ALL_VARIANTS, mode, keep_error)
    naive_gates, naive_logits = steer_blocks_naive(model, steered, x, batch, ALL_VARIANTS, mode, keep_error)
    for g, block in enumerate(model.gated_blocks):
        assert torch.equal(fast.gates[block], naive_gates[:, :, g]), block
    assert torch.equal(fast.predictions, naive_logits.argmax(-1))
    assert torch.allclose(fast.logits, naive_logits, atol=1e-4), (fast.logits - naive_logits).abs().max()
    # the variants really differ, and every steered block's gates move
    for block in blocks:
        assert (fast.gates[block] != fast.gates[block][ALL_VARIANTS.index(next(v for v in ALL_VARIANTS if v.alpha == 0))]).any()
    # and the work is deduplicated: fewer block runs than variant-image pairs
    assert all(n < len(ALL_VARIANTS) * N_IMAGES for n in fast.distinct.values())


def test_a_steered_block_changes_the_later_blocks_gates():
    """Steering block 1 as well as block 3 changes block 3's own input: its gates differ from
    steering block 3 alone (which is what a per-block fast path reusing the unsteered stream
    would compute)."""
    model, config, images, labels, steered = setup()
    x = config.preprocess(images)
    batch = unsteered_batch(model, x, labels)
    with torch.no_grad():
        stream = model.embed(x)
    both = steer_blocks(model, {1: steered[1], 3: steered[3]}, stream, 0, batch, ALL_VARIANTS, "scale", True)
    alone = steer_blocks(model, {3: steered[3]}, stream, 0, batch, ALL_VARIANTS, "scale", True)
    assert not torch.equal(both.gates[2], alone.gates[2])  # block 2 is not steered, yet its gates move
    assert not torch.equal(both.gates[3], alone.gates[3])
    assert torch.equal(alone.gates[1], alone.gates[1][:1].expand_as(alone.gates[1]))  # steering block 3 leaves block 1 alone


def test_alpha_zero_reproduces_the_unsteered_model_and_runs_each_image_once():
    model, config, images, labels, steered = setup()
    x = config.preprocess(images)
    with torch.no_grad():
        plain = model(x)
        stream, before = stream_at(model, x, 1)
    batch = SteerBatch(labels, plain.logits.argmax(-1))
    variants = [v for v in ALL_VARIANTS if v.alpha == 0.0]
    out = steer_blocks(model, steered, stream, 1, batch, variants, "scale", True)
    for g, block in enumerate(model.gated_blocks):
        assert torch.equal(out.gates[block], plain.gates[:, g].expand(len(variants), -1, -1))
    assert torch.equal(out.predictions, plain.logits.argmax(-1).expand(len(variants), -1))
    assert out.distinct == {1: N_IMAGES, 2: N_IMAGES, 3: N_IMAGES}  # every variant shares every stream
    assert before == {}  # block 0 is not gated


def test_a_stream_given_later_equals_the_stream_from_the_start():
    model, config, images, labels, steered = setup()
    x = config.preprocess(images)
    batch = unsteered_batch(model, x, labels)
    with torch.no_grad():
        embedded = model.embed(x)
        at_two, before = stream_at(model, x, 2)
    later = steer_blocks(model, {2: steered[2]}, at_two, 2, batch, ALL_VARIANTS, "scale", True)
    start = steer_blocks(model, {2: steered[2]}, embedded, 0, batch, ALL_VARIANTS, "scale", True)
    assert torch.equal(later.gates[2], start.gates[2]) and torch.equal(later.gates[3], start.gates[3])
    assert torch.equal(later.predictions, start.predictions)
    assert torch.equal(before[1], start.gates[1][0])
    with pytest.raises(ValueError, match="rule for block 1"):
        steer_blocks(model, {1: steered[1]}, at_two, 2, batch, ALL_VARIANTS, "scale", True)


@pytest.mark.parametrize("mode, keep_error", [("scale", True), ("add", False)])
def test_steering_only_the_final_block_equals_the_final_block_sweep(mode, keep_error):
    model, config, images, labels, steered = setup()
    final = {3: steered[3]}
    x = config.preprocess(images)
    batch = unsteered_batch(model, x, labels)
    with torch.no_grad():
        tokens, _ = stream_at(model, x, 3)
    sets, sae = steered[3].sets, steered[3].sae
    gates, preds = steer_batch(model, sae, sets, tokens, batch, ALL_VARIANTS, mode, keep_error)
    out = steer_blocks(model, final, tokens, 3, batch, ALL_VARIANTS, mode, keep_error)
    assert torch.equal(out.gates[3], gates) and torch.equal(out.predictions, preds)
    assert gates.float().std() > 0

    # the whole sweep: the final block's rows equal run_sweep's; the earlier blocks keep their own gates
    tally, cls = run_sweep(model, sae, sets, images, labels, config, ALL_VARIANTS, mode, keep_error, 16, torch.device("cpu"))
    blocks = run_blocks_sweep(model, final, images, labels, config, ALL_VARIANTS, mode, keep_error, 16, torch.device("cpu"))
    assert result_rows(blocks.tallies[3], config.class_names) == result_rows(tally, config.class_names)
    assert torch.equal(blocks.cls_inputs[3], cls)
    with torch.no_grad():
        own = model(x).gates
    rows = result_rows(blocks.tallies[1], config.class_names)
    for row in rows:
        sel = labels == row["class_id"]
        assert row["head_usage"] == pytest.approx(float(own[sel, 0].mean()))


def test_the_sweep_over_several_blocks_tallies_what_the_naive_path_gives():
    model, config, images, labels, steered = setup()
    variants = variants_for(["per_class", "per_class_predicted", "random", "class_direction"], [-1.0, 4.0], draws=2)
    out = run_blocks_sweep(model, steered, images, labels, config, variants, "scale", True, 16, torch.device("cpu"))
    x = config.preprocess(images)
    batch = unsteered_batch(model, x, labels)
    gates, logits = steer_blocks_naive(model, steered, x, batch, variants, "scale", True)
    for g, block in enumerate(model.gated_blocks):
        rows = {(r["strategy"], r["alpha"], r["draw"], r["class_id"]): r for r in result_rows(out.tallies[block], config.class_names)}
        for v, variant in enumerate(variants):
            for c in range(N_CLASSES):
                sel = labels == c
                row = rows[(variant.strategy, variant.alpha, variant.draw, c)]
                assert row["accuracy"] == pytest.approx(float((logits[v, sel].argmax(-1) == c).double().mean()))
                assert row["head_usage"] == pytest.approx(float(gates[v, sel, g].mean()))
    combined = {(r["strategy"], r["alpha"], r["draw"], r["class_id"]): r for r in result_rows(out.combined, config.class_names)}
    for v, variant in enumerate(variants):
        row = combined[(variant.strategy, variant.alpha, variant.draw, 2)]
        assert row["head_usage"] == pytest.approx(float(gates[v, labels == 2].mean()))  # over every gated block's heads
        assert row["keep_h5"] == pytest.approx(float(gates[v, labels == 2, 1, 1].mean()))  # block 2 (the second gated), head 1
    with torch.no_grad():
        recorded = model(x, record=(1, 2, 3)).cls_inputs
    for block in (1, 2, 3):
        assert torch.allclose(out.cls_inputs[block], recorded[block], atol=1e-6)


def test_blocks_resolve_from_final_all_or_a_list():
    model, *_ = setup()
    assert resolve_blocks("final", model) == [3]
    assert resolve_blocks("all", model) == [1, 2, 3]
    assert resolve_blocks([3, 1, 3], model) == [1, 3]
    for bad in ([0], [4], [], "some"):
        with pytest.raises(ValueError, match="gated blocks"):
            resolve_blocks(bad, model)


def test_propagate_without_rules_is_the_model_forward():
    model, config, images, _, _ = setup()
    x = config.preprocess(images)
    with torch.no_grad():
        plain = model(x)
        out = propagate(model, model.embed(x), 0, {}, 2, chunk=7)
    for g, block in enumerate(model.gated_blocks):
        assert torch.equal(out.gates[block][1], plain.gates[:, g])
    assert torch.allclose(out.logits[0], plain.logits, atol=1e-5)
