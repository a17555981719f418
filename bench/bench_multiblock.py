"""Steering several gated blocks: the multi-block sweep against the naive full-model path.

One run, same machine, same images, same variants (every strategy x the alpha grid x the random
draws of the params file's `steer` section, one alpha shared by all steered blocks): the naive
path runs the whole model once per variant with the steering hooked into each steered block's
decision network (tests/reference_steering.py); the multi-block path
(`pipeline.steering.multiblock.steer_blocks`) runs the blocks before the first steered block
once and every later block once per distinct (stream, gate pattern), the final block from its
CLS row. Both must give identical gates in every gated block and identical predictions (checked
here). Target: multi-block >= 3x naive. Medians of alternating rounds, one thread by default.

Uses a finished pipeline's artifacts under --root (models/vit, models/sae, data/stats,
data/dataset), e.g. after `make run`. The final block steers with the run's SAE and top sets;
every other steered block needs an SAE on its own CLS input, which a run does not have yet: the
script trains a TopK SAE per such block on the training split's CLS inputs of that block (the
run's `sae` params, `--sae-epochs` epochs) and takes its top sets from the training codes as
`latent_stats` does (`--random-saes`: untrained ones instead). What is measured is speed; the
SAEs decide how far the gates move, hence how much deduplication finds to share.

    .venv/bin/python bench/bench_multiblock.py --root . [--images 100] [--blocks all] [--rounds 3]

`--ceiling` times the ceiling across blocks instead (`pipeline.steering.ceiling_blocks`: the
search on the val split, reported on test, over the blocks of `--blocks`) and prints its cost
and its result beside every single-block ceiling:

    .venv/bin/python bench/bench_multiblock.py --root . --ceiling
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.data.dataset import load_images
from pipeline.interpret.stats import firing_stats, top_set, top_sets
from pipeline.interpret.top_sets import TopSets, read_top_sets
from pipeline.model.gated_vit import load_gated_vit
from pipeline.params.file import load_params
from pipeline.sae.registry import load_sae
from pipeline.sae.training import train_sae
from pipeline.steering.ceiling_blocks import block_split, class_rows, search_blocks
from pipeline.steering.multiblock import BlockSteering, block_directions, steer_blocks
from pipeline.steering.propagate import resolve_blocks, stream_at
from pipeline.steering.strategies import SteerBatch
from pipeline.steering.sweep import latent_sets, variants_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_steering import steer_blocks_naive  # noqa: E402  (the naive path lives with the tests)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


@torch.no_grad()
def block_inputs(model, config, images, blocks: list[int], batch_size: int = 256) -> dict[int, torch.Tensor]:
    """The CLS inputs of `blocks` for uint8 images (the model gating itself)."""
    rows = {b: [] for b in blocks}
    for s in range(0, len(images), batch_size):
        out = model(config.preprocess(images[s : s + batch_size]), record=tuple(blocks))
        for b in blocks:
            rows[b].append(out.cls_inputs[b])
    return {b: torch.cat(r) for b, r in rows.items()}


def sets_from_codes(sae, x: torch.Tensor, labels: torch.Tensor, class_names: list[str], top_k: int) -> TopSets:
    """Top sets from the training codes, as `latent_stats` computes them."""
    with torch.no_grad():
        values, indices = sae.encode_sparse(x)
    stats = firing_stats(values, indices, labels, sae.n_latents, len(class_names))
    return TopSets(top_k=top_k, n_latents=sae.n_latents, class_names=class_names,
                   global_set=top_set(stats.freq_all, top_k).tolist(),
                   per_class={n: s.tolist() for n, s in zip(class_names, top_sets(stats.freq_class, top_k))},
                   mean_active_value=stats.mean_active_all.tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--params", type=Path, default=None, help="default: ROOT/params.yaml")
    ap.add_argument("--images", type=int, default=100, help="test images used (first N)")
    ap.add_argument("--blocks", default="all", help="'all', 'final' or comma-separated gated block indices")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sae-epochs", type=int, default=20, help="epochs of the SAEs trained for the other blocks")
    ap.add_argument("--random-saes", action="store_true", help="untrained SAEs for the blocks without one")
    ap.add_argument("--ceiling", action="store_true", help="time the ceiling across blocks instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = args.root
    params = load_params(args.params or root / "params.yaml")
    sp = params.steer
    model, config = load_gated_vit(root / "models/vit")
    model.head_path = "masked"  # both paths the same way (the skipping path is the CPU default of the stages)
    blocks = resolve_blocks(args.blocks if args.blocks in ("all", "final") else [int(b) for b in args.blocks.split(",")], model)
    if args.ceiling:
        ceiling(model, config, root, blocks, sp.accuracy_tolerance)
        return
    final = model.depth - 1
    train = load_images(root / "data/dataset/train.parquet")
    inputs = block_inputs(model, config, train.images, blocks)

    start = time.perf_counter()
    steered = {}
    for block in blocks:
        if block == final:
            sae = load_sae(root / "models/sae").eval()
            top = read_top_sets(root / "data/stats/top_sets.json", classes=(config.class_names, root / "models/vit"),
                                width=(sae.n_latents, root / "models/sae"))
        else:
            x = inputs[block]
            update = {"architecture": "frozen_random", "epochs": 1} if args.random_saes else {"epochs": args.sae_epochs}
            sae, _ = train_sae(x, params.sae.model_copy(update=update), "cpu")
            top = sets_from_codes(sae, x, train.labels, config.class_names, params.stats.top_k)
        directions = block_directions(model, block, inputs[block], train.labels, sp.null_draws, sp.seed)
        steered[block] = BlockSteering(sae, latent_sets(top, sp.null_draws, sp.seed, directions))
    prepare = time.perf_counter() - start

    test = load_images(root / "data/dataset/test.parquet")
    x = config.preprocess(test.images[: args.images])
    labels = test.labels[: args.images]
    variants = variants_for(sp.strategies, sp.alphas, sp.null_draws)
    with torch.no_grad():
        batch = SteerBatch(labels, model(x).logits.argmax(-1))

    def naive():
        return steer_blocks_naive(model, steered, x, batch, variants, sp.mode, sp.keep_error)

    def fast():
        with torch.no_grad():
            stream, _ = stream_at(model, x, blocks[0])
        return steer_blocks(model, steered, stream, blocks[0], batch, variants, sp.mode, sp.keep_error)

    def skipping():
        model.head_path = "skipping"
        try:
            return fast()
        finally:
            model.head_path = "masked"

    times = {"naive": [], "fast": [], "skipping": []}
    loads = [os.getloadavg()[0]]
    outs = {}
    for _ in range(args.rounds):
        for name, fn in (("naive", naive), ("fast", fast), ("skipping", skipping)):
            begin = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - begin)
        loads.append(os.getloadavg()[0])
    naive_gates, naive_logits = outs["naive"]
    out = outs["fast"]
    for name in ("fast", "skipping"):
        same_gates = all(torch.equal(outs[name].gates[b], naive_gates[:, :, g]) for g, b in enumerate(model.gated_blocks))
        same_predictions = torch.equal(outs[name].predictions, naive_logits.argmax(-1))
        assert same_gates and same_predictions, f"the multi-block path ({name}) and the naive path disagree"
    base = out.gates[final][variants.index(next(v for v in variants if v.alpha == 0.0))]
    moved = float((out.gates[final] != base).any(-1).double().mean())

    shape = config.shape
    pairs = len(variants) * len(labels)
    print(f"machine: {machine()}; load average {min(loads):.2f}-{max(loads):.2f} over the timed rounds")
    print(f"multi-block steering of blocks {blocks} (model depth {shape.depth}, width {shape.embed_dim}, {shape.num_heads} heads): "
          f"{len(variants)} variants ({len(sp.strategies)} strategies; {len(set(sp.alphas) | {0.0})} alphas; {sp.null_draws} draws "
          f"per random strategy) x {len(labels)} images; SAEs for blocks {[b for b in blocks if b != final]}: "
          f"{'untrained' if args.random_saes else f'trained {args.sae_epochs} epochs'} ({prepare:.1f} s)")
    print(f"distinct (stream, pattern) pairs per block (of {pairs} variant-image pairs): "
          + ", ".join(f"{b}: {n}" for b, n in out.distinct.items()) + f"; final-block gates moved on {100 * moved:.1f}% of pairs")
    print(f"{'path':<40}{'seconds (median)':>17}{'variant-images/s':>18}")
    for name, label in (("naive", "naive (full model per variant, hooks)"), ("fast", "multi-block (this project)"),
                        ("skipping", "multi-block, head-skipping path")):
        t = statistics.median(times[name])
        print(f"{label:<40}{t:>17.2f}{pairs / t:>18.0f}")
    ratios = [n / f for n, f in zip(times["naive"], times["fast"])]
    print(f"speed-up multi-block / naive (both masked): {statistics.median(ratios):.1f}x (per round "
          f"{', '.join(f'{r:.1f}' for r in ratios)}, 1-minute load average after each round "
          f"{', '.join(f'{load:.2f}' for load in loads[1:])}; target >= 3x); gates in every gated block and predictions "
          f"identical on both multi-block paths: yes")


def ceiling(model, config, root: Path, blocks: list[int], tolerance: float) -> None:
    """Time the ceiling across `blocks` on the run's val and test splits."""
    cpu = torch.device("cpu")
    val, test = load_images(root / "data/dataset/val.parquet"), load_images(root / "data/dataset/test.parquet")
    n_classes = len(config.class_names)
    loads = [os.getloadavg()[0]]
    begin = time.perf_counter()
    splits = [block_split(model, config, s.images, s.labels, blocks[0], 256, cpu) for s in (val, test)]
    found = search_blocks(model, *splits, blocks, n_classes, tolerance)
    seconds = time.perf_counter() - begin
    loads.append(os.getloadavg()[0])
    gated = list(range(model.keep_layers, model.depth))
    rows = class_rows(found, splits[1], found.test, config.class_names, model.num_heads, gated)
    print(f"machine: {machine()}; load average {min(loads):.2f}-{max(loads):.2f}")
    print(f"ceiling across blocks {blocks}: {len(val.labels)} val + {len(test.labels)} test images, {n_classes} classes, "
          f"{model.num_heads} heads; {found.evaluations} candidate evaluations, {found.pairs} block runs "
          f"(distinct stream x pattern pairs) on val; {seconds:.1f} s in all")
    print(f"{'configuration (test, mean over classes)':<42}{'accuracy':>9}{'GFLOPs':>9}" + "".join(f"{f'usage b{b}':>10}" for b in gated))
    for name in found.rows:
        mine = [r for r in rows if r["configuration"] == name]
        mean = lambda key, mine=mine: sum(r[key] for r in mine) / len(mine)  # noqa: E731
        print(f"{name:<42}{mean('accuracy'):>9.4f}{mean('gflops'):>9.5f}" + "".join(f"{mean(f'usage_b{b}'):>10.3f}" for b in gated))


if __name__ == "__main__":
    main()
