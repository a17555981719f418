"""What steering costs in deployment: CPU latency and GFLOPs of the steered model, per policy.

On a finished run's stored model, SAE and top sets (models/vit, models/sae, data/stats/top_sets.json,
loaded as the `steer` stage loads them) and its test images, each policy runs as a deployed
model would (`pipeline.steering.deploy`: block by block, one policy per batch, no sweep
machinery), on the head-skipping and the masked path, at batch 1 and batch 32:

- unsteered: the model's own gates;
- per_class: the final block steered with the image's true class set at the alpha the
  headline chose for that class (metrics/details/steer.json; an oracle: it needs the label);
- per_class_predicted: the deployable policy, the unsteered pass first for the predicted class,
  then the steered pass with that class's set and alpha (its time includes both passes);
- ceiling: the final block held at the `ceiling` stage's pattern for the true class
  (data/ceiling/classes.parquet; skipped when absent).

Rounds alternate between the policies; each round runs every full batch of the `--images`
timed images; the table gives medians. The mode and keep_error are those the alphas were chosen
with (steer.json's settings), not params.yaml's.

    .venv/bin/python bench/bench_latency.py --root . [--images 256] [--rounds 5] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from pipeline.data.dataset import load_images
from pipeline.interpret.top_sets import read_top_sets
from pipeline.model.gated_vit import load_gated_vit
from pipeline.sae.registry import load_sae
from pipeline.steering.ceiling import read_classes
from pipeline.steering.costs import LatencyDetails, cpu_model, write_details
from pipeline.steering.deploy import CEILING, UNSTEERED, measure
from pipeline.steering.multiblock import BlockSteering
from pipeline.steering.propagate import OWN, pattern_bits
from pipeline.steering.results import read_details
from pipeline.steering.sweep import latent_sets


def alpha_table(alphas: dict[str, float], class_names: list[str]) -> torch.Tensor:
    return torch.tensor([alphas[name] for name in class_names], dtype=torch.float64)


def ceiling_patterns(path: Path, class_names: list[str], n_heads: int) -> torch.Tensor | None:
    """(C, H) the ceiling's pattern per class, a row of -1 where it keeps the model's own gates."""
    if not path.exists():
        return None
    by_name = {c.name: c.pattern for c in read_classes(path)}
    codes = torch.tensor([by_name[name] for name in class_names])
    return torch.where((codes == OWN)[:, None], torch.tensor(-1.0), pattern_bits(codes.clamp(min=0), n_heads))


def table(results: dict[str, LatencyDetails], final: int) -> str:
    sizes = next(iter(results.values())).settings.batch_sizes
    head = ["path", "policy", "accuracy", f"usage b{final}", "GFLOPs (model + SAE + extra pass)"]
    head += [f"batch {s}: ms/batch" if s == 1 else f"batch {s}: ms/batch (ms/img)" for s in sizes]
    head += [f"x unsteered, batch {s}" for s in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for path, details in results.items():
        base = details.policies[UNSTEERED].latency_ms
        for name, p in details.policies.items():
            parts = [f"{p.gflops:.4f}", f"{p.gflops_steering_overhead:.6f}"] + ([f"{p.gflops_extra_pass:.4f}"] if p.gflops_extra_pass else [])
            gflops = f"{p.gflops_total:.4f} = " + " + ".join(parts) if p.gflops_total != p.gflops else f"{p.gflops:.4f}"
            row = [path, name, f"{p.accuracy:.4f}", f"{p.usage[str(final)]:.3f}", gflops]
            for s in sizes:
                t = p.latency_ms[str(s)]
                row.append(f"{t.batch_ms:.2f}" if s == 1 else f"{t.batch_ms:.2f} ({t.image_ms:.3f})")
            row += [f"{p.latency_ms[str(s)].batch_ms / base[str(s)].batch_ms:.2f}x" for s in sizes]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--images", type=int, default=256, help="test images timed (the first N)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--paths", default="skipping,masked")
    ap.add_argument("--json", type=Path, default=None, help="write each path's LatencyDetails to JSON-PATH.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root
    model, config = load_gated_vit(root / "models/vit")
    sae = load_sae(root / "models/sae").eval()
    top = read_top_sets(root / "data/stats/top_sets.json", classes=(config.class_names, root / "models/vit"),
                        width=(sae.n_latents, root / "models/sae"))
    steer = read_details(root / "metrics/details/steer.json")
    if steer.per_class_headline is None or steer.predicted_class_policy is None:
        raise SystemExit("steer.json has no per_class headline or predicted-class policy: run `steer` with both strategies")
    final = model.depth - 1
    steering = {final: BlockSteering(sae, latent_sets(top, draws=1, seed=0))}  # only the class sets are used
    oracle = alpha_table(steer.per_class_headline.alpha, config.class_names)
    predicted = alpha_table(steer.predicted_class_policy.alpha, config.class_names)
    patterns = ceiling_patterns(root / "data/ceiling/classes.parquet", config.class_names, model.num_heads)
    ceiling = None if patterns is None else {final: patterns}

    test = load_images(root / "data/dataset/test.parquet")
    x, y = config.preprocess(test.images[: args.images]), test.labels[: args.images]
    mode, keep_error = steer.settings.mode, steer.settings.keep_error
    results = {}
    for path in args.paths.split(","):
        model.head_path = path
        results[path] = measure(model, steering, x, y, oracle, predicted, mode, keep_error, ceiling=ceiling,
                                batch_sizes=(1, 32), rounds=args.rounds)
        if args.json:
            write_details(args.json.with_name(f"{args.json.stem}-{path}.json"), results[path])
    s = next(iter(results.values())).settings
    print(f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {s.threads} thread(s); "
          f"{s.images} test images, {s.rounds} rounds; steering block {final}, mode {mode}, keep_error {keep_error}; "
          f"dense {next(iter(results.values())).gflops_dense:.4f} GFLOPs"
          + ("" if CEILING in results[next(iter(results))].policies else "; no ceiling (data/ceiling missing)"))
    print()
    print(table(results, final))


if __name__ == "__main__":
    main()
