"""The full steering sweep through the fast path against the naive full-model path.

One run, same machine, same images, same variants (every strategy x the alpha grid x the random
draws of the given params file): the fast path runs blocks 0..L-2 once per batch and the final
block once per distinct (image, gate pattern); the naive path runs the whole model once per
variant. Both produce identical tallies (checked here too). Target: fast >= 6x naive.

Uses a finished pipeline's artifacts (models/vit, models/sae, data/stats, data/dataset) under
--root, e.g. after `make run`:

    .venv/bin/python bench/bench_steer.py --root . [--images 1000]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

from pipeline.data.dataset import load_images
from pipeline.data.embeddings import read_embeddings
from pipeline.interpret.top_sets import read_top_sets
from pipeline.model.gated_vit import load_gated_vit
from pipeline.params.file import load_params
from pipeline.sae.registry import load_sae
from pipeline.steering import sweep
from pipeline.steering.controls import directions_for
from pipeline.steering.sweep import latent_sets, result_rows, run_sweep, variants_for

full_block_outcomes = sweep.final_block_outcomes
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_steering import steer_batch_naive  # noqa: E402  (the naive path lives with the tests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--params", type=Path, default=None, help="default: ROOT/params.yaml")
    ap.add_argument("--images", type=int, default=1000, help="test images used (first N)")
    args = ap.parse_args()
    root = args.root
    sp = load_params(args.params or root / "params.yaml").steer
    model, config = load_gated_vit(root / "models/vit")
    sae = load_sae(root / "models/sae")
    train = read_embeddings(root / "data/embeddings/train.parquet")  # the controls' class directions
    directions = directions_for(model, train.x, train.labels, sp.null_draws, sp.seed)
    sets = latent_sets(read_top_sets(root / "data/stats/top_sets.json", classes=(config.class_names, root / "models/vit"),
                                     width=(sae.n_latents, root / "models/sae")), sp.null_draws, sp.seed, directions)
    test = load_images(root / "data/dataset/test.parquet")
    images, labels = test.images[: args.images], test.labels[: args.images]
    variants = variants_for(sp.strategies, sp.alphas, sp.null_draws)
    cpu = torch.device("cpu")

    timings, tallies = {}, {}
    for name, naive in (("naive (full model per variant)", True), ("fast path (this project)", False)):
        start = time.perf_counter()
        tallies[name], _ = run_sweep(model, sae, sets, images, labels, config, variants, sp.mode, sp.keep_error, sp.batch_size, cpu, steer_fn=steer_batch_naive if naive else None)
        timings[name] = time.perf_counter() - start
    # the fast path with the final block run whole (every token) per distinct image and pattern,
    # as before it read only the CLS row
    sweep.final_block_outcomes = functools.partial(full_block_outcomes, cls_row=False)
    try:
        start = time.perf_counter()
        tallies["fast path, full final block"], _ = run_sweep(model, sae, sets, images, labels, config, variants, sp.mode, sp.keep_error,
                                                               sp.batch_size, cpu)
        timings["fast path, full final block"] = time.perf_counter() - start
    finally:
        sweep.final_block_outcomes = full_block_outcomes
    rows = [result_rows(t, config.class_names) for t in tallies.values()]
    assert rows[0] == rows[1] == rows[2], "the sweeps disagree"
    shape = config.shape
    print(f"steering sweep: {len(variants)} variants ({', '.join(sp.strategies)}; {len(set(sp.alphas) | {0.0})} alphas; "
          f"{sp.null_draws} draws per random strategy) x {len(images)} images; model depth {shape.depth}, width {shape.embed_dim}")
    print(f"{'path':<34}{'seconds':>9}{'variant-images/s':>18}")
    for name, t in timings.items():
        print(f"{name:<34}{t:>9.2f}{len(variants) * len(images) / t:>18.0f}")
    naive_t, fast_t = timings["naive (full model per variant)"], timings["fast path (this project)"]
    print(f"speed-up fast / naive: {naive_t / fast_t:.1f}x (target >= 6x); results identical: yes")
    print(f"speed-up of the CLS-row final block within the fast path: {timings['fast path, full final block'] / fast_t:.2f}x")


if __name__ == "__main__":
    main()
