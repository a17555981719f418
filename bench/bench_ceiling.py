"""The ceiling's pattern evaluation through the final block's CLS row against the full final block.

One run, same machine, same images: every fixed final-block gate pattern (2^H) for every image,
(a) through `pipeline.model.cls_row` (per-head CLS terms once per image, then one small product
plus the MLP on one row per pattern: what the `ceiling` stage does) and (b) through the full
final block (`GatedViT.forward_final` on every token, once per pattern: what the code did before
the ceiling existed, and what a naive search does). The tokens entering the final block are
computed once and shared by both; the predictions are compared (they agree up to float ties).
Also times the whole `ceiling` stage's search on those images. Target: the ceiling on
`cifar100-cpu` (5,000 + 10,000 images x 64 patterns) in under a minute.

Uses a finished pipeline's artifacts under --root (models/vit, data/dataset), e.g. after `make run`:

    .venv/bin/python bench/bench_ceiling.py --root . [--images 1000]

or, for a configuration's shape without its trained weights (the arithmetic does not depend on
them), `--untrained configs/cifar100-cpu.yaml` times the stage's search itself (every image to
the final block, then every class x pattern on both splits) on random images, 5,000 + 10,000 by
default (`--select-images`, `--test-images`), 100 classes:

    .venv/bin/python bench/bench_ceiling.py --untrained configs/cifar100-cpu.yaml
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.data.dataset import load_images
from pipeline.model.cls_row import all_patterns, head_terms, pattern_logits
from pipeline.model.gated_vit import build_gated_vit, load_gated_vit, model_config
from pipeline.params.file import load_params
from pipeline.steering.ceiling import search_ceiling, split_terms


def untrained_search(config_path: Path, n_select: int, n_test: int, n_classes: int, batch_size: int) -> None:
    """The ceiling stage's search at a configuration's shape, on random images and weights."""
    mp = load_params(config_path).model
    torch.manual_seed(0)
    model = build_gated_vit(mp, num_classes=n_classes).eval()
    config = model_config(mp, model.vit, n_classes, [f"c{i}" for i in range(n_classes)], 5.0)
    side = config.shape.img_size
    g = torch.Generator().manual_seed(0)
    sets = {name: (torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g), torch.arange(n) % n_classes)
            for name, n in (("val", n_select), ("test", n_test))}
    cpu = torch.device("cpu")
    start = time.perf_counter()
    terms = {name: split_terms(model, config, x, y, batch_size, cpu) for name, (x, y) in sets.items()}
    to_final = time.perf_counter() - start
    start = time.perf_counter()
    found = search_ceiling(model, terms["val"], terms["test"], "val", config.class_names, 0.0, "exhaustive")
    search = time.perf_counter() - start
    shape = config.shape
    print(f"ceiling search at the shape of {config_path} (untrained weights, random images): depth {shape.depth}, width "
          f"{shape.embed_dim}, {shape.num_heads} heads, {n_classes} classes, {n_select} + {n_test} images x "
          f"{found.patterns_per_class} patterns")
    print(f"{'part':<44}{'seconds':>9}")
    print(f"{'images to the final block, per-head CLS terms':<44}{to_final:>9.2f}")
    print(f"{'every class x pattern on both splits':<44}{search:>9.2f}")
    print(f"{'total (target: under 60 s)':<44}{to_final + search:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--images", type=int, default=1000, help="test images used (first N)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--untrained", type=Path, default=None, help="a params file: time the search at its shape")
    ap.add_argument("--select-images", type=int, default=5000)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--classes", type=int, default=100)
    args = ap.parse_args()
    if args.untrained is not None:
        untrained_search(args.untrained, args.select_images, args.test_images, args.classes, args.batch_size)
        return
    model, config = load_gated_vit(args.root / "models/vit")
    test = load_images(args.root / "data/dataset/test.parquet")
    images = test.images[: args.images]
    patterns = all_patterns(model.num_heads)
    torch.set_grad_enabled(False)

    start = time.perf_counter()
    tokens = torch.cat([model.forward_to_final(config.preprocess(images[s : s + args.batch_size]))
                        for s in range(0, len(images), args.batch_size)])
    shared = time.perf_counter() - start

    timings, predictions = {}, {}
    start = time.perf_counter()
    rows = []
    for s in range(0, len(images), args.batch_size):
        terms = head_terms(model, tokens[s : s + args.batch_size])
        rows.append(pattern_logits(model, terms, patterns).argmax(-1))
    predictions["cls"], timings["CLS row (this project)"] = torch.cat(rows), time.perf_counter() - start

    for head_path in ("masked", "skipping"):
        model.head_path = head_path
        start = time.perf_counter()
        out = torch.empty(len(images), len(patterns), dtype=torch.long)
        for s in range(0, len(images), args.batch_size):
            block = tokens[s : s + args.batch_size]
            for p, pattern in enumerate(patterns):
                out[s : s + args.batch_size, p] = model.forward_final(block, pattern.expand(len(block), -1)).argmax(-1)
        predictions[head_path], timings[f"full final block, {head_path} path"] = out, time.perf_counter() - start

    agree = {name: float((predictions["cls"] == pred).double().mean()) for name, pred in predictions.items() if name != "cls"}
    shape = config.shape
    print(f"ceiling patterns: {len(patterns)} patterns x {len(images)} images; model depth {shape.depth}, width {shape.embed_dim}, "
          f"{shape.num_heads} heads, {(shape.img_size // shape.patch_size) ** 2 + 1} tokens; blocks before the final one "
          f"(shared by all paths): {shared:.2f} s")
    print(f"{'path':<38}{'seconds':>9}{'pattern-images/s':>18}")
    for name, t in timings.items():
        print(f"{name:<38}{t:>9.2f}{len(patterns) * len(images) / t:>18.0f}")
    cls_t = timings["CLS row (this project)"]
    for head_path in ("masked", "skipping"):
        t = timings[f"full final block, {head_path} path"]
        print(f"speed-up CLS row / full block ({head_path}): {t / cls_t:.1f}x; predictions equal on {100 * agree[head_path]:.3f}% "
              "of (image, pattern) pairs")


if __name__ == "__main__":
    main()
