"""Inference with pruned heads: the head-skipping path against the masked path.

The masked path (`head_path = "masked"`) computes every head and multiplies dropped ones by
zero; the skipping path (`head_path = "skipping"`, what `extract` and `steer` use on a CPU)
groups the batch by gate pattern and computes only the kept heads, with each pattern's sliced
weights built once and cached.
At the paper's shape (ViT-S/16: width 384, 12 blocks, 6 heads, 197 tokens), with the decision
networks set so that every gated block keeps k of 6 heads (usage 1.0, 0.67, 0.5, 0.33): the
measured speed-up of skipping over masking beside the one the FLOP count predicts
(`pipeline.model.flops`), at batch 32 and batch 1, and with many distinct patterns in the batch (a
different random k-subset per image and block). Target: measured >= 0.9 x predicted for usage
<= 0.5 at batch 32. Same machine, same run, alternating rounds, median reported.

    .venv/bin/python bench/bench_flops.py [--rounds 3] [--threads 2] [--device cuda --dtype bfloat16]

On a GPU each timing is of `--repeat` calls between two synchronisations (kernel launches are
asynchronous), after the same warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.model.flops import flop_model
from pipeline.model.gated_vit import build_gated_vit
from pipeline.params.model import ModelParams

SHAPE = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)


def set_gates(model, kept: int, distinct: bool, seed: int = 0) -> None:
    """Decision networks that keep `kept` heads per gated block: the first `kept` heads for
    every image, or (distinct) a pseudo-random subset per image, from the CLS token's sign pattern."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in model.decision:
            if distinct:
                net.weight.copy_(torch.randn(net.weight.shape, generator=gen) * 50.0)
                net.bias.zero_()
            else:
                net.weight.zero_()
                net.bias.copy_(torch.tensor([1.0 if h < kept else -1.0 for h in range(model.num_heads)]))


def on_path(model, path: str):
    """The model's eval forward on head path `path`."""
    def forward(images: torch.Tensor):
        model.head_path = path
        return model(images)
    return forward


def timed(fn, images: torch.Tensor, rounds: int, repeat: int = 1) -> float:
    """Median seconds per call over `rounds` timings of `repeat` calls each."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(repeat):
            fn(images)
        sync()
        times.append((time.perf_counter() - start) / repeat)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=1, help="calls per timing (10 or more on a GPU)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_gated_vit(ModelParams(**SHAPE), num_classes=100).eval()
    fm = flop_model(model)
    model = model.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"ViT-S/16 shape {SHAPE}, {where}, {args.dtype}, median of {args.rounds} rounds x {args.repeat} calls")
    print(f"{'batch':>5} {'usage':>6} {'patterns':>9} {'masked img/s':>13} {'skipping img/s':>15} {'speed-up':>9} {'predicted':>10} {'ratio':>6}")
    # the last entry: a random subset per image and block (its kept value is unused)
    for batch, kept_values, distinct in ((32, (6, 4, 3, 2), False), (1, (6, 3, 2), False), (32, (0,), True)):
        images = torch.randn(batch, 3, 224, 224, generator=gen).to(device=device, dtype=dtype)
        for kept in kept_values:
            set_gates(model, kept, distinct)
            with torch.no_grad():
                out = on_path(model, "masked")(images)
                on_path(model, "skipping")(images)  # warm-up (and the sliced weights cached)
                masked = timed(on_path(model, "masked"), images, args.rounds, args.repeat)
                skipping = timed(on_path(model, "skipping"), images, args.rounds, args.repeat)
            usage = float(out.gates.mean())
            kept_per_block = [6.0] * model.keep_layers + [float(k) for k in out.gates.sum(-1).mean(0)]
            predicted = fm.dense / fm.image(kept_per_block)
            patterns = max(len(torch.unique(out.gates[:, b], dim=0)) for b in range(out.gates.shape[1]))
            speed_up = masked / skipping
            print(f"{batch:>5} {usage:>6.2f} {patterns:>9} {batch / masked:>13.1f} {batch / skipping:>15.1f} "
                  f"{speed_up:>8.2f}x {predicted:>9.2f}x {speed_up / predicted:>6.2f}")


if __name__ == "__main__":
    main()
