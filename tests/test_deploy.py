"""The deployable steered models (pipeline/steering/deploy.py) against the sweep's engine: the
same per-image (class set, alpha) choice gives the same gates and logits block by block as
`multiblock.steer_blocks` (and, for the final block, `sweep.steer_batch` and `run_sweep`), on
both head paths; fixed patterns equal `propagate` with `fixed_rule`."""

from __future__ import annotations

import pytest
import torch
from test_multiblock import N_CLASSES, N_IMAGES, setup

from pipeline.model.cls_row import pattern_codes
from pipeline.model.flops import flop_model
from pipeline.steering.costs import LatencyDetails, read_details, write_details
from pipeline.steering.deploy import (
    CEILING,
    POLICIES,
    fixed_forward,
    kept_per_block,
    measure,
    predicted_class_forward,
    steered_decision_input,
    steered_forward,
    steering_flops,
    time_policy,
    unsteered_forward,
)
from pipeline.steering.headline import follow
from pipeline.steering.multiblock import steer_blocks
from pipeline.steering.propagate import OWN, fixed_rule, propagate
from pipeline.steering.strategies import PER_CLASS, PER_CLASS_PREDICTED, SteerBatch
from pipeline.steering.sweep import Variant, decision_inputs, run_sweep, steer_batch

ALPHAS = [-1.0, -0.5, 0.0, 0.5, 4.0]


def per_image_choice(seed: int = 5):
    """Each image's class set (not its label) and alpha index into ALPHAS, drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, N_CLASSES, (N_IMAGES,), generator=gen), torch.randint(0, len(ALPHAS), (N_IMAGES,), generator=gen)


def pick(per_variant, choice):
    """(V, B, ...) per-variant outcomes -> (B, ...) the variant choice[i] of each image i."""
    return per_variant[choice, torch.arange(per_variant.shape[1])]


@pytest.mark.parametrize("head_path", ["masked", "skipping"])
@pytest.mark.parametrize("mode, keep_error", [("scale", True), ("scale", False), ("add", True), ("add", False)])
@pytest.mark.parametrize("blocks", [(1, 2, 3), (1, 3)])
def test_steered_forward_equals_steer_blocks_for_the_same_per_image_choice(blocks, mode, keep_error, head_path):
    model, config, images, labels, all_steered = setup()
    model.head_path = head_path
    steering = {b: all_steered[b] for b in blocks}
    x = config.preprocess(images)
    set_class, choice = per_image_choice()
    alpha = torch.tensor(ALPHAS, dtype=torch.float64)[choice]
    logits, gates = steered_forward(model, steering, x, set_class, alpha, mode, keep_error)

    variants = [Variant(PER_CLASS, a) for a in ALPHAS]  # per_class reads the set of batch.labels
    with torch.no_grad():
        reference = steer_blocks(model, steering, model.embed(x), 0, SteerBatch(set_class, labels), variants, mode, keep_error)
    assert sorted(gates) == model.gated_blocks
    for block in model.gated_blocks:
        assert torch.equal(gates[block], pick(reference.gates[block], choice)), block
    expected = pick(reference.logits, choice)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    # the choice matters: the per-image steer differs from every single variant's gates
    assert all(not torch.equal(gates[blocks[-1]], reference.gates[blocks[-1]][v]) for v in range(len(ALPHAS)))
    if head_path == "skipping":  # the blocks ran on sliced attentions: only the kept heads computed
        assert len(model._slices) > 0


@pytest.mark.parametrize("mode, keep_error", [("scale", True), ("scale", False), ("add", True), ("add", False)])
def test_the_steered_decision_input_is_the_sweeps_bit_for_bit(mode, keep_error):
    _, _, _, labels, steered = setup()
    cls = torch.randn(N_IMAGES, 24, generator=torch.Generator().manual_seed(2))
    set_class, choice = per_image_choice()
    variants = [Variant(PER_CLASS, a) for a in ALPHAS]
    for dtype in (torch.float64, torch.float32):  # the grid's alphas are float32 numbers: either dtype is exact
        ours = steered_decision_input(steered[3], cls, set_class, torch.tensor(ALPHAS, dtype=dtype)[choice], mode, keep_error)
        reference = decision_inputs(steered[3].sae, steered[3].sets, cls, SteerBatch(set_class, labels), variants, mode, keep_error)
        assert torch.equal(ours, pick(reference, choice))


@pytest.mark.parametrize("head_path", ["masked", "skipping"])
@pytest.mark.parametrize("mode, keep_error", [("scale", True), ("add", False)])
def test_the_final_block_alone_equals_steer_batch(mode, keep_error, head_path):
    model, config, images, labels, steered = setup()
    model.head_path = head_path
    x = config.preprocess(images)
    set_class, choice = per_image_choice(seed=7)
    alpha = torch.tensor(ALPHAS, dtype=torch.float64)[choice]
    logits, gates = steered_forward(model, {3: steered[3]}, x, set_class, alpha, mode, keep_error)
    with torch.no_grad():
        tokens = model.forward_to_final(x)
    ref_gates, ref_preds = steer_batch(model, steered[3].sae, steered[3].sets, tokens, SteerBatch(set_class, labels),
                                       [Variant(PER_CLASS, a) for a in ALPHAS], mode, keep_error)
    assert torch.equal(gates[3], pick(ref_gates, choice))
    assert torch.equal(logits.argmax(-1), pick(ref_preds, choice))
    with torch.no_grad():
        own = model(x)
    for g, block in enumerate((1, 2)):  # the unsteered blocks keep their own gates
        assert torch.equal(gates[block], own.gates[:, g])


@pytest.mark.parametrize("head_path", ["masked", "skipping"])
def test_the_headline_policies_deployed_score_what_run_sweep_tallies(head_path):
    """The oracle (labels, alpha per true class) and the deployable policy (prediction, alpha per
    predicted class) give, image by image, the correctness and usage the sweep's rows give."""
    model, config, images, labels, steered = setup()
    model.head_path = head_path
    final = {3: steered[3]}
    sae, sets = steered[3].sae, steered[3].sets
    variants = [Variant(s, a) for s in (PER_CLASS, PER_CLASS_PREDICTED) for a in ALPHAS]
    tally, _ = run_sweep(model, sae, sets, images, labels, config, variants, "scale", True, 16, torch.device("cpu"))
    table = torch.tensor([4, 0, 1, 3, 2])  # an alpha index per class
    alphas = torch.tensor(ALPHAS, dtype=torch.float64)[table]
    x = config.preprocess(images)

    logits, gates = steered_forward(model, final, x, labels, alphas[labels], "scale", True)
    grid, correct, usage = tally.image_outcomes(PER_CLASS)
    assert grid == ALPHAS
    assert torch.equal(logits.argmax(-1) == labels, follow(correct, table[labels]))
    assert torch.allclose(gates[3].mean(-1), follow(usage, table[labels]))

    predicted = tally.all_base_predictions
    assert torch.equal(predicted, model(x).logits.argmax(-1))
    logits, gates = predicted_class_forward(model, final, x, alphas, "scale", True)
    _, correct, usage = tally.image_outcomes(PER_CLASS_PREDICTED)
    assert torch.equal(logits.argmax(-1) == labels, follow(correct, table[predicted]))
    assert torch.allclose(gates[3].mean(-1), follow(usage, table[predicted]))
    assert not torch.equal(table[predicted], table[labels])  # the two policies differ on some image


@pytest.mark.parametrize("head_path", ["masked", "skipping"])
def test_fixed_forward_equals_propagate_with_fixed_rule(head_path):
    model, config, images, labels, _ = setup()
    model.head_path = head_path
    x = config.preprocess(images)
    gen = torch.Generator().manual_seed(3)
    patterns = {b: torch.randint(0, 2, (N_IMAGES, model.num_heads), generator=gen).float() for b in (1, 3)}
    patterns[3][::4] = -1  # every fourth image keeps its own final-block gates (the ceiling's OWN)
    logits, gates = fixed_forward(model, patterns, x)
    codes = {b: torch.where((p < 0).any(-1), OWN, pattern_codes(p.clamp(min=0))) for b, p in patterns.items()}
    with torch.no_grad():
        ref = propagate(model, model.embed(x), 0, {b: fixed_rule(model, c[None]) for b, c in codes.items()}, 1)
    for block in model.gated_blocks:
        assert torch.equal(gates[block], ref.gates[block][0]), block
    assert torch.equal(gates[1], patterns[1])
    assert torch.equal(logits.argmax(-1), ref.predictions[0])
    assert torch.allclose(logits, ref.logits[0], atol=1e-4)
    with torch.no_grad():
        own = model(x).gates
    assert not torch.equal(gates[2], own[:, 1])  # block 2 is free, but its input moved


@pytest.mark.parametrize("head_path", ["masked", "skipping"])
@pytest.mark.parametrize("mode", ["scale", "add"])
def test_alpha_zero_is_the_plain_model(mode, head_path):
    model, config, images, labels, steered = setup()
    model.head_path = head_path
    x = config.preprocess(images)
    with torch.no_grad():
        plain = model(x)
    for logits, gates in (steered_forward(model, steered, x, labels, torch.zeros(N_IMAGES), mode, True),
                          predicted_class_forward(model, steered, x, torch.zeros(N_CLASSES), mode, True),
                          unsteered_forward(model, x)):
        assert torch.equal(logits, plain.logits)
        for g, block in enumerate(model.gated_blocks):
            assert torch.equal(gates[block], plain.gates[:, g])
    logits, _ = steered_forward(model, steered, x, labels, torch.full((N_IMAGES,), 4.0), mode, True)
    assert not torch.equal(logits, plain.logits)


def test_steering_flops_count_the_sae_matmuls_on_one_cls_row():
    model, _, _, _, steered = setup()
    d, n_latents, h = 24, 64, model.num_heads
    one = 2 * d * n_latents + 2 * 2 * n_latents * d + 2 * d * h  # encoder, two decoders, the unsteered decision net
    assert steering_flops({3: steered[3]}, h, keep_error=True) == one
    assert steering_flops(steered, h, keep_error=False) == 3 * (one - 2 * n_latents * d)


def test_time_policy_is_the_median_seconds_of_one_call():
    calls = []
    seconds = time_policy(lambda x: calls.append(torch.is_grad_enabled()), torch.zeros(1), rounds=3)
    assert calls == [False] * 4 and 0 <= seconds < 0.1  # one warm-up, three timed, without autograd


@pytest.fixture
def one_thread():
    """Timing on one thread: on a shared 2-core machine a two-thread op waits for the busy core
    (BENCHMARKS.md, "A busy machine"), which makes batch-1 rounds many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("head_path", ["masked", "skipping"])
def test_measure_times_every_policy_and_counts_its_flops(tmp_path, head_path, one_thread):
    model, config, images, labels, steered = setup()
    model.head_path = head_path
    x, labels = config.preprocess(images[:20]), labels[:20]  # 4 per class: timing batch 1 stays quick
    final = {3: steered[3]}
    oracle = torch.tensor([4.0, -1.0, 0.0, 0.5, 4.0])
    predicted = torch.tensor([0.5, 4.0, -1.0, 0.0, 4.0])
    ceiling = {3: torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [-1, -1, -1, -1], [0, 0, 0, 0], [1, 1, 1, 0]]).float()}
    details = measure(model, final, x, labels, oracle, predicted, "scale", True, ceiling=ceiling, batch_sizes=(1, 8), rounds=1)
    assert list(details.policies) == list(POLICIES)
    flops = flop_model(model)
    expected = {
        "unsteered": unsteered_forward(model, x),
        PER_CLASS: steered_forward(model, final, x, labels, oracle[labels], "scale", True),
        PER_CLASS_PREDICTED: predicted_class_forward(model, final, x, predicted, "scale", True),
        CEILING: fixed_forward(model, {3: ceiling[3][labels]}, x),
    }
    for name, (logits, gates) in expected.items():
        p = details.policies[name]
        assert p.accuracy == pytest.approx(float((logits.argmax(-1) == labels).double().mean()))
        assert p.usage == pytest.approx({str(b): float(gates[b].mean()) for b in (1, 2, 3)})
        assert p.gflops == pytest.approx(flops.image(kept_per_block(model, gates)) / 1e9)
        assert set(p.latency_ms) == {"1", "8"}
        for size, t in p.latency_ms.items():
            assert t.batch_ms > 0 and t.image_ms == pytest.approx(t.batch_ms / int(size))
    usage = {name: details.policies[name].usage["3"] for name in POLICIES}
    assert len(set(usage.values())) == 4  # each policy chose different final-block gates
    assert details.policies[PER_CLASS].gflops_steering_overhead == pytest.approx(steering_flops(final, 4, True) / 1e9)
    assert details.policies[PER_CLASS_PREDICTED].gflops_extra_pass == pytest.approx(details.policies["unsteered"].gflops)
    assert details.policies[CEILING].gflops_total == details.policies[CEILING].gflops
    assert details.settings.head_path == head_path and details.settings.threads == 1
    assert details.settings.images == 20 and details.settings.steered_blocks == [3]
    write_details(tmp_path / "latency.json", details)
    assert read_details(tmp_path / "latency.json") == details
    assert isinstance(details, LatencyDetails)
    with pytest.raises(ValueError, match="fewer than the largest batch size"):
        measure(model, final, x[:4], labels[:4], oracle, predicted, "scale", True, batch_sizes=(1, 8), rounds=1)


def test_a_block_that_is_not_gated_cannot_be_steered():
    model, config, images, labels, steered = setup()
    with pytest.raises(ValueError, match="not a gated block"):
        steered_forward(model, {0: steered[1]}, config.preprocess(images), labels, torch.zeros(N_IMAGES), "scale", True)

