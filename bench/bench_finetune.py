"""Training throughput of the head-gated ViT against the same timm ViT without gates.

One run, same machine, same batches, same optimiser; A and B alternate in rounds so that
machine noise hits both alike, and the median round is reported. Target: ratio >= 0.9.

    .venv/bin/python bench/bench_finetune.py [--img-size 32 --patch-size 4 --embed-dim 96 --depth 4 --heads 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from pipeline.model.gated_vit import GatedViT
from pipeline.model.training import usage_loss


def step_fn(model, gated: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, y):
        if gated:
            out = model(x)
            loss = F.cross_entropy(out.logits, y) + 2.0 * usage_loss(out.gates, 0.5)
        else:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--embed-dim", type=int, default=96)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    shape = dict(img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads)
    torch.manual_seed(0)
    plain = timm.create_model(args.model, num_classes=100, **shape).train()
    gated = GatedViT(timm.create_model(args.model, num_classes=100, **shape), keep_layers=1).train()
    gated.vit.load_state_dict(plain.state_dict())
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 100, (args.batch_size,))
    steps = {"timm ViT (no gates)": step_fn(plain, False), "gated ViT (this project)": step_fn(gated, True)}
    for fn in steps.values():  # warm-up
        fn(x, y)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn(x, y)
            times[name].append(time.perf_counter() - start)
    rate = {k: args.steps * args.batch_size / statistics.median(v) for k, v in times.items()}
    print(f"training throughput, batch {args.batch_size}, {shape}, torch threads {torch.get_num_threads()}")
    print(f"{'model':<28}{'images/s':>10}")
    for k, v in rate.items():
        print(f"{k:<28}{v:>10.1f}")
    ratio = rate["gated ViT (this project)"] / rate["timm ViT (no gates)"]
    print(f"ratio gated / plain: {ratio:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
