"""Steered models as they would run in deployment, and what they cost (issue 27).

The sweep (`pipeline.steering.sweep`, `pipeline.steering.multiblock`) is built to evaluate
hundreds of variants at once: it shares streams, deduplicates (image, pattern) pairs and reads
the final block from its CLS row. None of that exists in deployment, where one policy runs on
one batch. Here each policy is the plain block-by-block forward that a deployed model would
run, on the model's current head path (`GatedViT.head_path`: `skipping` computes only the kept
heads, grouped by pattern as `pipeline.model.heads` does), so its time is the policy's time:

- `unsteered_forward`: every gated block decides its own gates (= `GatedViT.forward`);
- `steered_forward`: at each steered block the CLS input is encoded by that block's SAE, the
  latents of the image's class set amplified by the image's alpha (exactly as
  `sweep.decision_inputs` does for strategy `per_class`), and the decision network on the
  steered input gives the gates; the block itself runs on its actual input. With the true class
  this is the oracle `per_class` policy;
- `predicted_class_forward`: the deployable `per_class_predicted` policy, which needs the
  unsteered model's prediction first: the unsteered pass, the alpha table looked up by the
  predicted class, then `steered_forward` (its time includes both passes);
- `fixed_forward`: gates held at given per-image patterns in some blocks (the ceiling's
  class-specific patterns).

tests/test_deploy.py checks each against the sweep's engine. `measure` times the four policies
at several batch sizes and counts their FLOPs; `LatencyDetails` is its typed record.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from pipeline.model.flops import flop_model
from pipeline.model.gated_vit import GatedViT
from pipeline.model.pruned import latency
from pipeline.steering.costs import BatchLatency, LatencyDetails, LatencySettings, PolicyLatency, cpu_model
from pipeline.steering.multiblock import BlockSteering
from pipeline.steering.strategies import PER_CLASS, PER_CLASS_PREDICTED
from pipeline.steering.sweep import steered_input

UNSTEERED = "unsteered"
CEILING = "ceiling"
POLICIES = (UNSTEERED, PER_CLASS, PER_CLASS_PREDICTED, CEILING)
"""What `measure` times, in this order: the model's own gates, the oracle per-class steer, the
deployable predicted-class steer (with its extra pass) and the ceiling's fixed patterns."""

Forward = Callable[[Tensor, Tensor], tuple[Tensor, dict[int, Tensor]]]
"""(normalised images (B, 3, H, W), labels (B,)) -> (logits (B, C), gates: block -> (B, H))."""


# ----------------------------------------------------------------------------- the forwards
@torch.no_grad()
def _forward(model: GatedViT, x: Tensor, choose: Callable[[int, Tensor], Tensor | None]) -> tuple[Tensor, dict[int, Tensor]]:
    """Block by block from normalised images; at each gated block `choose(block, cls)` gives
    its (B, H) gates from the (B, D) CLS row entering it, or None: the block decides itself."""
    stream, gates = model.embed(x), {}
    for block in range(model.depth):
        chosen = choose(block, stream[:, 0]) if block >= model.keep_layers else None
        stream, _, g = model.run_block(block, stream, gates=chosen)
        if g is not None:
            gates[block] = g
    return model.head(stream), gates


def unsteered_forward(model: GatedViT, x: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
    """The model with its own gates: logits (B, C) and gates block -> (B, H)."""
    return _forward(model, x, lambda block, cls: None)


def steer_per_image(z: Tensor, mask: Tensor, alpha: Tensor, mode: str, mean_active: Tensor) -> Tensor:
    """`sweep.steer_latents` with one alpha per image (B,): the same float arithmetic, so an
    image's codes equal the sweep's at that alpha (for alpha given in float64, any alpha; in
    float32, any float32 number such as the grid's)."""
    if mode == "scale":  # the sweep multiplies by the Python float (1 + alpha), cast to z's dtype
        return torch.where(mask, z * (1 + alpha.double()).to(z.dtype)[:, None], z)
    if mode == "add":
        return torch.where(mask, z + alpha.to(z.dtype)[:, None] * mean_active, z)
    raise ValueError(f"unknown mode {mode!r}")


def steered_decision_input(steering: BlockSteering, cls: Tensor, set_class: Tensor, alpha: Tensor, mode: str,
                           keep_error: bool) -> Tensor:
    """(B, D) decision-network input x' for the CLS inputs `cls` (B, D): the latents of class
    set_class[i]'s set amplified by alpha[i] (docs/METHOD.md, section 5), what
    `sweep.decision_inputs` gives for strategy `per_class` at that alpha."""
    z = steering.sae.encode(cls)
    z_steered = steer_per_image(z, steering.sets.per_class[set_class], alpha, mode, steering.sets.mean_active)
    return steered_input(cls, z, z_steered, steering.sae, keep_error)


def steered_gates(model: GatedViT, block: int, steering: BlockSteering, cls: Tensor, set_class: Tensor, alpha: Tensor,
                  mode: str, keep_error: bool) -> Tensor:
    """(B, H) gates of a steered block: its decision network on the steered input."""
    x = steered_decision_input(steering, cls, set_class, alpha, mode, keep_error)
    return (model.decision_net(block)(x) > 0).to(cls.dtype)


@torch.no_grad()
def steered_forward(model: GatedViT, steering: Mapping[int, BlockSteering], x: Tensor, set_class: Tensor, alpha: Tensor,
                    mode: str, keep_error: bool) -> tuple[Tensor, dict[int, Tensor]]:
    """The per-class policy as deployed: every block of `steering` (block -> its SAE and sets)
    steered with image i's class set set_class[i] at strength alpha[i]; every other gated block
    decides its own gates on the stream it receives. Logits (B, C) and gates block -> (B, H).

    set_class = the labels is the oracle `per_class`; the unsteered prediction is
    `per_class_predicted` (`predicted_class_forward`). With keep_error and alpha 0 this is the
    plain model exactly; without keep_error alpha 0 still feeds the decision network the SAE's
    reconstruction, as the sweep's alpha-0 row of that setting does."""
    for block in steering:
        if not model.keep_layers <= block < model.depth:
            raise ValueError(f"block {block} is not a gated block (gated: {model.keep_layers}..{model.depth - 1})")

    def choose(block: int, cls: Tensor) -> Tensor | None:
        if block not in steering:
            return None
        return steered_gates(model, block, steering[block], cls, set_class, alpha, mode, keep_error)

    return _forward(model, x, choose)


@torch.no_grad()
def predicted_class_forward(model: GatedViT, steering: Mapping[int, BlockSteering], x: Tensor, alphas: Tensor, mode: str,
                            keep_error: bool) -> tuple[Tensor, dict[int, Tensor]]:
    """The deployable policy (`per_class_predicted`): the unsteered model predicts each image's
    class c, then `steered_forward` with class c's set at alphas[c] ((C,) table: the policy's
    alpha per predicted class, `SteerDetails.predicted_class_policy.alpha`). Both passes run
    whole, as a deployment without further engineering would; the blocks before the first
    steered one compute the same stream twice (sharing it would save them)."""
    predicted = unsteered_forward(model, x)[0].argmax(-1)
    return steered_forward(model, steering, x, predicted, alphas.to(x.device)[predicted], mode, keep_error)


@torch.no_grad()
def fixed_forward(model: GatedViT, patterns: Mapping[int, Tensor], x: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
    """Gates held at per-image 0/1 patterns (block -> (B, H)) in the blocks of `patterns`; a row
    with a negative entry (the ceiling's OWN, -1) and every other gated block decide their own.
    Logits (B, C) and gates block -> (B, H)."""

    def choose(block: int, cls: Tensor) -> Tensor | None:
        if block not in patterns:
            return None
        fixed = patterns[block].to(cls.dtype)
        own = (fixed < 0).any(-1, keepdim=True)
        if not bool(own.any()):
            return fixed
        return torch.where(own, (model.decision_net(block)(cls) > 0).to(cls.dtype), fixed)

    return _forward(model, x, choose)


# ----------------------------------------------------------------------------------- FLOPs
def steering_flops(steering: Mapping[int, BlockSteering], n_heads: int, keep_error: bool) -> float:
    """Matmul FLOPs per image that steering adds to the model's own count, counted as
    `pipeline.model.flops` counts (2 FLOPs per multiply-add; elementwise work, the top-k choice
    and the scale/add of the codes not counted). Per steered block, on the one CLS row:

        encoder   D x L                 (the SAE's pre-activations)
        decoder   L x D, twice with keep_error (dec(z') and dec(z)), once without
        decision  D x H                 `GatedViT.run_block` also evaluates the decision network
                                        on the unsteered input (unused but computed; the steered
                                        one is the one `FlopModel` already counts)

    The decoder is counted dense, as `SparseAutoencoder.decode` computes it (a sparse decode of
    the k active latents would cost 2 k D instead)."""
    total = 0.0
    for s in steering.values():
        d, n_latents = s.sae.dim, s.sae.n_latents
        total += 2.0 * d * n_latents * (1 + (2 if keep_error else 1)) + 2.0 * d * n_heads
    return total


def kept_per_block(model: GatedViT, gates: Mapping[int, Tensor]) -> list[float]:
    """Mean heads kept in each block (every block of the model; ungated ones keep all)."""
    return [float(gates[b].float().sum(-1).mean()) if b in gates else float(model.num_heads) for b in range(model.depth)]


# ---------------------------------------------------------------------------------- timing
def time_policy(fn: Callable[[Tensor], object], x: Tensor, rounds: int) -> float:
    """Median seconds of one call fn(x) over `rounds` calls after one warm-up (`pruned.latency`,
    under no_grad: no autograd graph is recorded in deployment)."""
    with torch.no_grad():
        return latency(fn, x, rounds)


def time_alternating(fns: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn within every round (after one
    warm-up call each), so that a change in the machine's load hits every fn alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------------- measure
def policies(model: GatedViT, steering: Mapping[int, BlockSteering], oracle_alphas: Tensor, predicted_alphas: Tensor,
             mode: str, keep_error: bool, ceiling: Mapping[int, Tensor] | None = None) -> dict[str, Forward]:
    """Each policy as a `Forward`: the per-class alpha tables are (C,) (oracle: looked up by the
    label; predicted: by the unsteered prediction); `ceiling`: block -> (C, H) fixed pattern per
    class (a row of -1: that class keeps the model's own gates), looked up by the label."""
    out: dict[str, Forward] = {
        UNSTEERED: lambda x, y: unsteered_forward(model, x),
        PER_CLASS: lambda x, y: steered_forward(model, steering, x, y, oracle_alphas[y], mode, keep_error),
        PER_CLASS_PREDICTED: lambda x, y: predicted_class_forward(model, steering, x, predicted_alphas, mode, keep_error),
    }
    if ceiling is not None:
        out[CEILING] = lambda x, y: fixed_forward(model, {b: p[y] for b, p in ceiling.items()}, x)
    return out


def measure(model: GatedViT, steering: Mapping[int, BlockSteering], x: Tensor, labels: Tensor, oracle_alphas: Tensor,
            predicted_alphas: Tensor, mode: str, keep_error: bool, ceiling: Mapping[int, Tensor] | None = None,
            batch_sizes: tuple[int, ...] = (1, 32), rounds: int = 5, timed: bool = True) -> LatencyDetails:
    """Time every policy (`policies`) on normalised images `x` (N, 3, H, W) with labels (N,) on
    the model's current head path, at each batch size (its full batches of the N images; rounds
    alternate between policies), and count its FLOPs from the gates it chose on them. `timed`
    false: the counts only (no `latency_ms`), the same bytes on every run."""
    if len(x) < max(batch_sizes):
        raise ValueError(f"{len(x)} images: fewer than the largest batch size {max(batch_sizes)}")
    model.eval()
    fns = policies(model, steering, oracle_alphas, predicted_alphas, mode, keep_error, ceiling)
    flops = flop_model(model)
    per_image_steering = steering_flops(steering, model.num_heads, keep_error)
    chunk = max(batch_sizes)
    outcome = {}
    for name, fn in fns.items():  # the outcome: one pass in batches of the largest size
        parts = [fn(x[s : s + chunk], labels[s : s + chunk]) for s in range(0, len(x), chunk)]
        logits = torch.cat([p[0] for p in parts])
        gates = {b: torch.cat([p[1][b] for p in parts]) for b in parts[0][1]}
        outcome[name] = (float((logits.argmax(-1) == labels).double().mean()), gates)
    unsteered_gflops = flops.image(kept_per_block(model, outcome[UNSTEERED][1])) / 1e9

    times: dict[int, dict[str, float]] = {}
    for size in batch_sizes if timed else ():
        batches = [(x[s : s + size], labels[s : s + size]) for s in range(0, len(x) // size * size, size)]
        calls = {name: (lambda fn=fn, batches=batches: [fn(xb, yb) for xb, yb in batches]) for name, fn in fns.items()}
        times[size] = {name: t / len(batches) for name, t in time_alternating(calls, rounds).items()}

    out = {}
    for name in fns:
        accuracy, gates = outcome[name]
        steered = name in (PER_CLASS, PER_CLASS_PREDICTED)
        out[name] = PolicyLatency(
            accuracy=accuracy,
            usage={str(b): float(g.float().mean()) for b, g in sorted(gates.items())},
            gflops=flops.image(kept_per_block(model, gates)) / 1e9,
            gflops_steering_overhead=per_image_steering / 1e9 if steered else 0.0,
            gflops_extra_pass=unsteered_gflops if name == PER_CLASS_PREDICTED else 0.0,
            latency_ms={str(size): BatchLatency(batch_ms=times[size][name] * 1e3, image_ms=times[size][name] * 1e3 / size)
                        for size in times},
        )
    # what the timings ran on; absent when nothing was timed, so that the counts alone are the
    # same bytes on every machine
    settings = LatencySettings(rounds=rounds if timed else None, threads=torch.get_num_threads() if timed else None,
                               images=len(x), head_path=model.head_path, batch_sizes=list(batch_sizes),
                               steered_blocks=sorted(steering), mode=mode, keep_error=keep_error,
                               cpu=cpu_model() if timed else None, torch_version=torch.__version__ if timed else None)
    return LatencyDetails(policies=out, gflops_dense=flops.dense / 1e9, settings=settings)

