"""The head paths on a trained run: `extract` and the `steer` sweep, masked against skipping.

bench_flops.py measures the two paths at ViT-S/16 shape with gates set by hand; this measures
what `extract.heads` / `steer.heads` = `auto` choose on a CPU, with a finished run's trained
model, its real gates and its own images. Same machine, same batches, rounds alternating
between the paths, median reported. Beside the measured speed-up: the one the FLOP count
predicts from the gates the model actually chose (`pipeline.model.flops`), and how far the paths'
outputs are apart (stored CLS inputs, gates, predictions, the sweep's rows).

    .venv/bin/python bench/bench_head_paths.py --root <a finished run> [--params P] [--images 2048] [--sweep-images 500]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pipeline.data.dataset import load_images
from pipeline.data.embeddings import read_embeddings
from pipeline.interpret.top_sets import read_top_sets
from pipeline.model.extraction import batch_records
from pipeline.model.flops import flop_model
from pipeline.model.gated_vit import load_gated_vit
from pipeline.params.file import load_params
from pipeline.sae.registry import load_sae
from pipeline.steering.controls import directions_for
from pipeline.steering.sweep import latent_sets, result_rows, run_sweep, variants_for

PATHS = ("masked", "skipping")


def extract_pass(model, config, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """What extract computes for `images` (batch by batch), concatenated."""
    out: dict[str, list] = {}
    for start in range(0, len(images), batch_size):
        for key, value in batch_records(model, images[start : start + batch_size], config, ()).items():
            out.setdefault(key, []).append(torch.from_numpy(value))
    return {k: torch.cat(v) for k, v in out.items()}


def same_row(a: dict, b: dict) -> bool:
    """Equal rows, NaN (a class with no image among those swept) equal to NaN."""
    return a.keys() == b.keys() and all(x == y or (x != x and y != y) for x, y in zip(a.values(), b.values()))


def alternate(fn, rounds: int) -> dict[str, float]:
    """Median seconds of fn(path) per path over `rounds` alternating rounds (after a warm-up)."""
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for path in PATHS:
        fn(path)
    for _ in range(rounds):
        for path in PATHS:
            start = time.perf_counter()
            fn(path)
            times[path].append(time.perf_counter() - start)
    return {p: statistics.median(t) for p, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--params", type=Path, default=None, help="default: ROOT/params.yaml")
    ap.add_argument("--images", type=int, default=2048, help="test images for the extract pass")
    ap.add_argument("--sweep-images", type=int, default=500, help="test images for the steering sweep")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root
    params = load_params(args.params or root / "params.yaml")
    model, config = load_gated_vit(root / "models/vit")
    model.eval()
    test = load_images(root / "data/dataset/test.parquet")
    images = test.images[: args.images]
    shape = config.shape
    print(f"run {root}: depth {shape.depth}, width {shape.embed_dim}, {shape.num_heads} heads, "
          f"{(shape.img_size // shape.patch_size) ** 2 + 1} tokens; {torch.get_num_threads()} CPU threads, "
          f"median of {args.rounds} alternating rounds")

    # extract
    results: dict[str, dict] = {}

    def extract(path: str) -> None:
        model.head_path = path
        results[path] = extract_pass(model, config, images, params.extract.batch_size)

    seconds = alternate(extract, args.rounds)
    masked, skipping = results["masked"], results["skipping"]
    kept = masked["kept_per_block"].double().mean(0)
    fm = flop_model(model)
    predicted = fm.dense / fm.image([float(shape.num_heads)] * model.keep_layers + kept.tolist())
    patterns = len(torch.unique(masked["gates"], dim=0))
    print(f"\nextract ({len(images)} test images, batch {params.extract.batch_size}); mean heads kept per gated "
          f"block {[round(k, 2) for k in kept.tolist()]}, final-block patterns {patterns}")
    print(f"{'path':<10}{'images/s':>10}")
    for path in PATHS:
        print(f"{path:<10}{len(images) / seconds[path]:>10.0f}")
    print(f"speed-up {seconds['masked'] / seconds['skipping']:.2f}x, predicted by the FLOP count {predicted:.2f}x; "
          f"max |x difference| {float((masked['x'] - skipping['x']).abs().max()):.1e}, "
          f"gates differ on {int((masked['gates'] != skipping['gates']).any(-1).sum())} images, "
          f"predictions on {int((masked['prediction'] != skipping['prediction']).sum())}")

    # the steering sweep
    sp = params.steer
    sae = load_sae(root / "models/sae")
    train = read_embeddings(root / "data/embeddings/train.parquet")  # the controls' class directions
    sets = latent_sets(read_top_sets(root / "data/stats/top_sets.json", classes=(config.class_names, root / "models/vit"),
                                     width=(sae.n_latents, root / "models/sae")), sp.null_draws, sp.seed,
                       directions_for(model, train.x, train.labels, sp.null_draws, sp.seed))
    variants = variants_for(sp.strategies, sp.alphas, sp.null_draws)
    sweep_images, sweep_labels = test.images[: args.sweep_images], test.labels[: args.sweep_images]
    rows: dict[str, list] = {}

    def sweep(path: str) -> None:
        model.head_path = path
        tally, _ = run_sweep(model, sae, sets, sweep_images, sweep_labels, config, variants, sp.mode, sp.keep_error,
                             sp.batch_size, torch.device("cpu"))
        rows[path] = result_rows(tally, config.class_names)

    seconds = alternate(sweep, args.rounds)
    differing = sum(not same_row(a, b) for a, b in zip(rows["masked"], rows["skipping"]))
    print(f"\nsteering sweep ({len(variants)} variants x {len(sweep_images)} test images, batch {sp.batch_size})")
    print(f"{'path':<10}{'seconds':>9}")
    for path in PATHS:
        print(f"{path:<10}{seconds[path]:>9.2f}")
    print(f"speed-up {seconds['masked'] / seconds['skipping']:.2f}x; result rows differing: {differing} of {len(rows['masked'])}")


if __name__ == "__main__":
    main()
