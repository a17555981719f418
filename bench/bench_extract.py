"""Extraction throughput (Parquet writing included) against the bare model forward pass.

One run on the same machine and the same batches: A (bare eval forward) and B (extract_split,
which also gathers the CLS inputs and streams them into Parquet) alternate in rounds and the
median round is reported. Target: B >= 0.9 x A. Then peak-memory growth of extraction for two
data-set sizes, each in a fresh subprocess: it stays flat because rows are written batch by
batch (the input images themselves are allocated before the measurement starts).

    .venv/bin/python bench/bench_extract.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from pipeline.model.config import preprocess
from pipeline.model.extraction import extract_split
from pipeline.model.gated_vit import build_gated_vit, model_config
from pipeline.params.model import ModelParams

SHAPE = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=6)


def setup(n: int):
    torch.manual_seed(0)
    params = ModelParams(**SHAPE)
    model = build_gated_vit(params, num_classes=10).eval()
    config = model_config(params, model.vit, 10, [str(i) for i in range(10)], 5.0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n) % 10
    return model, config, images, labels


def meta(model) -> dict:
    return {"model_hash": "bench", "layer": model.depth - 1, "dim": 96, "num_heads": 6, "class_names": [str(i) for i in range(10)], "split": "bench", "extra_layers": [0, 1, 2]}


def current_rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def memory_probe(n: int, batch_size: int) -> None:
    """Peak RSS during extraction minus RSS just before it (sampled every 5 ms)."""
    model, config, images, labels = setup(n)
    index = torch.arange(n)
    before, peak, done = current_rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        extract_split(model, images, labels, index, config, Path(tmp) / "e.parquet", meta(model), batch_size, torch.device("cpu"), (0, 1, 2))
        size = (Path(tmp) / "e.parquet").stat().st_size
    done.set()
    sampler.join()
    print(json.dumps({"n": n, "peak_growth_mb": peak[0] - before, "file_mb": size / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory-sizes", type=int, nargs=2, default=[4096, 32768])
    ap.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return memory_probe(args.probe, args.batch_size)

    model, config, images, labels = setup(args.images)
    index = torch.arange(args.images)

    @torch.no_grad()
    def bare():
        for start in range(0, args.images, args.batch_size):
            model(preprocess(images[start : start + args.batch_size], 32, config.mean, config.std))

    def extract(tmp: Path):
        extract_split(model, images, labels, index, config, tmp / "e.parquet", meta(model), args.batch_size, torch.device("cpu"), (0, 1, 2))

    times = {"bare forward": [], "extract + Parquet": []}
    with tempfile.TemporaryDirectory() as tmp:
        bare(), extract(Path(tmp))  # warm-up
        for _ in range(args.rounds):
            for name, run in (("bare forward", bare), ("extract + Parquet", lambda: extract(Path(tmp)))):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    rate = {k: args.images / statistics.median(v) for k, v in times.items()}
    print(f"extraction, {args.images} images, batch {args.batch_size}, {SHAPE}, 4 CLS layers stored")
    print(f"{'path':<22}{'images/s':>10}")
    for k, v in rate.items():
        print(f"{k:<22}{v:>10.1f}")
    print(f"ratio extract / bare: {rate['extract + Parquet'] / rate['bare forward']:.3f} (target >= 0.9)")
    print(f"{'images':>8}{'peak RSS growth MB':>20}{'file MB':>10}")
    for n in args.memory_sizes:
        out = subprocess.run([sys.executable, __file__, "--probe", str(n), "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row['n']:>8}{row['peak_growth_mb']:>20.1f}{row['file_mb']:>10.1f}")


if __name__ == "__main__":
    main()
