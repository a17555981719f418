"""Latent galleries (interpret): the streaming top-N pass against encode-all-then-sort.

Our side is the `interpret` stage's pass (`pipeline.stages.interpret.stream_train`): batches of
sparse TopK codes merged into a running top-N per latent, plus the per-class activation mass
in the same pass. The reference encodes every row to a dense (N, L) code matrix, then sorts each
latent's column (one stable sort over all columns, ties to the lower row) and takes the first
N firing rows: what one writes first, holding N x L floats (154 MB at 50,000 x 768, 614 MB at
3,072 latents). Both must give the same galleries; the script checks it.

    .venv/bin/python bench/bench_interpret.py --embeddings data/embeddings/train.parquet --sae models/sae
    .venv/bin/python bench/bench_interpret.py --synthetic 50000 --dim 96 --latents 768

Median of `--rounds` alternating rounds, same process, same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from pipeline.data.embeddings import read_embeddings
from pipeline.params.interpret import InterpretParams
from pipeline.sae.registry import load_sae
from pipeline.sae.topk import TopKSAE
from pipeline.stages.interpret import stream_train


def reference(sae, x: torch.Tensor, top_n: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    dense = torch.cat([sae.encode(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])  # (N, L)
    order = torch.sort(dense, dim=0, descending=True, stable=True)
    values, rows = order.values[:top_n].T.contiguous(), order.indices[:top_n].T.contiguous()
    return values, torch.where(values > 0, rows, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embeddings", default=None)
    ap.add_argument("--sae", default=None)
    ap.add_argument("--synthetic", type=int, default=50000, help="rows, when no --embeddings")
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--latents", type=int, default=768)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--top-n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.embeddings:
        table = read_embeddings(args.embeddings)
        sae = load_sae(args.sae).eval()
        x, labels = table.x, table.labels
        source = f"{args.embeddings} ({len(x)} x {x.shape[1]}), SAE {args.sae} ({sae.n_latents} latents, k {sae.k})"
    else:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.synthetic, args.dim, generator=gen)
        labels = torch.randint(0, args.classes, (args.synthetic,), generator=gen)
        torch.manual_seed(0)
        sae = TopKSAE(args.dim, args.latents, 32).eval()
        source = f"synthetic Gaussian {args.synthetic} x {args.dim}, random SAE ({args.latents} latents, k 32)"
    n_classes = int(labels.max()) + 1
    ip = InterpretParams(top_n=args.top_n, batch_size=args.batch_size, grid_images=min(8, args.top_n))
    table = SimpleNamespace(x=x, labels=labels)
    print(f"{source}; top {args.top_n}; {torch.get_num_threads()} threads; median of {args.rounds} rounds")
    times = {"streaming (ours)": [], "encode all, then sort": []}
    with torch.no_grad():
        for _ in range(args.rounds):
            start = time.perf_counter()
            top, _ = stream_train(sae, table, n_classes, ip)
            times["streaming (ours)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ref_values, ref_rows = reference(sae, x, args.top_n, args.batch_size)
            times["encode all, then sort"].append(time.perf_counter() - start)
    assert torch.equal(top.rows, ref_rows), "galleries differ"
    assert torch.equal(top.values, ref_values.to(top.values.dtype)), "activations differ"
    ours, ref = statistics.median(times["streaming (ours)"]), statistics.median(times["encode all, then sort"])
    print("| path | seconds | rows/s |\n|---|---:|---:|")
    for name, value in (("streaming (ours), with the class mass", ours), ("encode all, then sort", ref)):
        print(f"| {name} | {value:.2f} | {len(x) / value:,.0f} |")
    print(f"same galleries: yes; speed-up {ref / ours:.2f}x; peak dense codes held by the reference: "
          f"{len(x) * sae.n_latents * 4 / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
