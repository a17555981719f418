"""Benchmark: this project's SAE training against overcomplete's, architecture by architecture.

One run, same machine, same embeddings, same width, k, batch size, schedule (linear warmup and
`--lr-decay`) and epochs. Reports training samples/s, the encoder product's GFLOP/s at that rate
against the product alone (the floor every trainer pays), and test FVU and L0 for both.

    .venv/bin/pip install -e '.[bench]'        # overcomplete==0.3.0 (benchmark-only)
    .venv/bin/python bench/bench_sae.py --threads 1   # synthetic 8000 + 2000 x 384 embeddings
    .venv/bin/python bench/bench_sae.py --threads 1 --embeddings data/embeddings \
        --arch topk --select-lr 1e-3,3e-3,1e-2 --lr-decay 0.2 --match-quality   # the real ones

Fairness notes:
- Our `train_sae` is timed whole (input normalisation, geometric-median init, the loop).
- The peer gets its best case: inputs centred on the training mean and scaled by our
  `input_scale` (its decoder has no bias), its own `train_sae` loop with `monitoring=0` (no
  per-step metrics), a DataLoader over an in-memory TensorDataset, its default gradient clipping,
  and plain MSE for TopK and BatchTopK (its AuxK variant, `--peer-loss auxk`, decodes half of
  all latents densely and is slower); JumpReLU gets our objective (normalised MSE + l0_coef x
  L0) through its own Heaviside pseudo-gradient, its rectangle kernel at our bandwidth and its
  thresholds starting at ours. FVU is scale-invariant, so both are compared on the same numbers.
- The libraries parametrise their weights differently (ours: unit-norm encoder rows and
  decoder columns, encoder = decoder^T at the start; overcomplete: PyTorch's default Linear
  init and a Xavier dictionary renormalised in the forward pass), so one learning rate favours
  one of them. `--select-lr` gives each its own best rate of a list, chosen on the val split;
  FVU is then reported on test.
- `--match-quality` answers "how long until the same quality": the fewest epochs at which ours
  reaches the peer's median test FVU (its schedule scaled to those epochs), against the peer's
  time for its full run.
- One short untimed run of each comes first (one-time initialisation). Then runs alternate
  (ours, peer, ours, peer, ...); the table shows medians over `--repeats`, and the speed ratio
  is the median of per-run ratios (each run against the peer run after it), because these
  2-core machines are shared and noisy. `--threads 1` keeps both libraries off the second
  core, which another busy process makes every multi-threaded op wait for.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.params.sae import SaeParams
from pipeline.sae.training import evaluate_sae, input_scale_for, learning_rate, train_sae

log = logging.getLogger("bench_sae")


class Run(NamedTuple):
    samples_per_s: float
    seconds: float
    fvu: float
    l0: float


def synthetic_embeddings(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """ViT-CLS-like vectors: a large shared offset, sparse non-negative combinations of 4 D
    random directions with power-law frequencies, per-dimension scales, a little noise."""
    g = torch.Generator().manual_seed(seed)
    n_atoms = 4 * dim
    atoms = torch.randn(n_atoms, dim, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    freq = torch.rand(n_atoms, generator=g) ** 3
    p_active = (freq * 24 / freq.sum()).clamp(max=1.0)
    active = torch.rand(n, n_atoms, generator=g) < p_active
    coef = torch.empty(n, n_atoms).exponential_(generator=g) * active
    offset = 3.0 * torch.randn(dim, generator=g) / dim**0.5
    x = coef @ atoms + offset + 0.1 * torch.randn(n, dim, generator=g)
    return x * torch.exp(0.3 * torch.randn(dim, generator=g))


def load_embeddings(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """train, val (for choosing learning rates), test, and a description."""
    if args.embeddings is not None:
        from pipeline.data.embeddings import read_embeddings

        train, val, test = (read_embeddings(args.embeddings / f"{split}.parquet").x for split in ("train", "val", "test"))
        return train, val, test, f"{args.embeddings} ({train.shape[0]} + {test.shape[0]} x {train.shape[1]})"
    x = synthetic_embeddings(args.n_train + args.n_test, args.dim, args.seed)
    val = synthetic_embeddings(args.n_test, args.dim, args.seed + 1)  # train and test as before --select-lr
    name = f"synthetic ({args.n_train} + {args.n_test} x {args.dim}, seed {args.seed})"
    return x[: args.n_train], val, x[args.n_train :], name


def ours_params(args: argparse.Namespace, dim: int) -> SaeParams:
    return SaeParams(
        architecture=args.arch,
        n_latents=args.expansion * dim,
        k=args.k,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        lr_decay=args.lr_decay,
        aux_coef=args.aux_coef,
        seed=args.seed,
        device="cpu",
        batchtopk={"threshold_momentum": args.threshold_momentum},
        jumprelu={"l0_coef": args.l0_coef, "bandwidth": args.bandwidth, "init_threshold": args.init_threshold},
    )


def run_ours(x_train: torch.Tensor, x_test: torch.Tensor, args: argparse.Namespace) -> Run:
    params = ours_params(args, x_train.shape[1])
    start = time.perf_counter()
    sae, _ = train_sae(x_train, params, "cpu")
    elapsed = time.perf_counter() - start
    quality = evaluate_sae(sae, x_test)
    return Run(x_train.shape[0] * args.epochs / elapsed, elapsed, quality["fvu"], quality["l0"])


def import_overcomplete():
    import matplotlib
    import matplotlib.cm

    # overcomplete 0.3.0 calls matplotlib.cm.get_cmap, removed in matplotlib 3.9
    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    import overcomplete.sae

    return overcomplete.sae


def peer_model_and_loss(oc, args: argparse.Namespace, dim: int):
    """overcomplete's model of `args.arch` and the criterion that matches our objective."""
    n_latents = args.expansion * dim

    def mse(x, x_hat, pre_codes, codes, dictionary):
        return (x - x_hat).square().mean()

    if args.arch == "topk":
        model = oc.TopKSAE(dim, nb_concepts=n_latents, top_k=args.k, device="cpu")
        if args.peer_loss == "auxk":
            from overcomplete.sae.losses import top_k_auxiliary_loss

            return model, top_k_auxiliary_loss
        return model, mse
    if args.arch == "batchtopk":
        # its top_k counts over the whole batch: k per sample on average, as ours
        model = oc.BatchTopKSAE(dim, nb_concepts=n_latents, top_k=args.k * args.batch_size,
                                threshold_momentum=args.threshold_momentum, device="cpu")
        return model, mse
    if args.arch == "jumprelu":
        # our objective with its parts: the rectangle kernel and bandwidth, thresholds (its
        # log-parametrised ones) starting where ours do, normalised MSE + l0_coef * L0 through
        # its Heaviside pseudo-gradient
        model = oc.JumpSAE(dim, nb_concepts=n_latents, kernel="rectangle", bandwidth=args.bandwidth, device="cpu")
        with torch.no_grad():
            model.thresholds.fill_(math.log(args.init_threshold))

        def jump_loss(x, x_hat, pre_codes, codes, dictionary):
            nmse = (x - x_hat).square().sum() / (x - x.mean(dim=0)).square().sum()
            step = oc.heaviside(pre_codes.relu(), model.thresholds.exp(), model.kernel_fn, model.bandwidth)
            return nmse + args.l0_coef * step.sum(dim=1).mean()

        return model, jump_loss
    raise ValueError(f"no peer for {args.arch!r}")


def run_peer(x_train: torch.Tensor, x_test: torch.Tensor, args: argparse.Namespace) -> Run:
    oc = import_overcomplete()
    from torch.utils.data import DataLoader, TensorDataset

    mean, scale = x_train.mean(dim=0), input_scale_for(x_train)
    xs_train, xs_test = (x_train - mean) * scale, (x_test - mean) * scale
    torch.manual_seed(args.seed)
    model, criterion = peer_model_and_loss(oc, args, x_train.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.peer_lr)
    loader = DataLoader(TensorDataset(xs_train), batch_size=args.batch_size, shuffle=True)
    total = args.epochs * len(loader)
    # the same schedule as ours (pipeline.sae.training.learning_rate)
    schedule = ours_params(args, x_train.shape[1])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(schedule, step, total) / args.lr)  # a factor on peer_lr

    start = time.perf_counter()
    oc.train_sae(model, loader, criterion, optimizer, scheduler, nb_epochs=args.epochs, monitoring=0, device="cpu")
    elapsed = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        sq_err = active = 0.0
        for begin in range(0, xs_test.shape[0], 4096):
            xb = xs_test[begin : begin + 4096]
            _, codes = model.encode(xb)
            sq_err += float((xb - model.decode(codes)).double().square().sum())
            active += float((codes > 0).sum())
    fvu = sq_err / float((xs_test.double() - xs_test.double().mean(dim=0)).square().sum())
    return Run(x_train.shape[0] * args.epochs / elapsed, elapsed, fvu, active / xs_test.shape[0])


def encoder_floor(dim: int, args: argparse.Namespace, repeats: int = 200) -> tuple[float, float]:
    """(samples/s, GFLOP/s) of the dense encoder product alone, (batch x D) @ (D x L) plus bias:
    the one dense product every trainer here must run per step, so its rate bounds theirs."""
    n_latents = args.expansion * dim
    x, w, b = torch.randn(args.batch_size, dim), torch.randn(n_latents, dim), torch.randn(n_latents)
    out = torch.empty(args.batch_size, n_latents)
    for _ in range(20):
        torch.addmm(b, x, w.T, out=out)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.addmm(b, x, w.T, out=out)
    per_step = (time.perf_counter() - start) / repeats
    return args.batch_size / per_step, 2 * args.batch_size * dim * n_latents / per_step / 1e9


def epochs_to_match(x_train: torch.Tensor, x_test: torch.Tensor, args: argparse.Namespace,
                    target_fvu: float) -> tuple[int, Run] | None:
    """The fewest epochs (up to `args.epochs`) at which ours reaches `target_fvu` (its schedule,
    warmup and decay, scaled to that many epochs), and that run."""
    for epochs in range(1, args.epochs + 1):
        run = run_ours(x_train, x_test, argparse.Namespace(**{**vars(args), "epochs": epochs}))
        log.info("  ours at %d epochs: FVU %.4f in %.1f s", epochs, run.fvu, run.seconds)
        if run.fvu <= target_fvu:
            return epochs, run
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", type=Path, default=None, help="folder with train.parquet and test.parquet")
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--arch", choices=["topk", "batchtopk", "jumprelu"], default="topk",
                        help="the architecture both libraries train")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="ours (and the peer's unless --peer-lr)")
    parser.add_argument("--peer-lr", type=float, default=None, help="the peer's learning rate (default: --lr)")
    parser.add_argument("--select-lr", type=str, default=None,
                        help="comma-separated learning rates: each library runs each once and keeps the one with the "
                             "lowest val FVU (the two parametrise their weights differently, so one rate does not fit both)")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--lr-decay", type=float, default=0.0, help="final fraction of steps with linear decay to 0 (both)")
    parser.add_argument("--aux-coef", type=float, default=1 / 32,
                        help="ours' AuxK coefficient (0: the peer's plain objective for topk and batchtopk)")
    parser.add_argument("--threshold-momentum", type=float, default=0.99, help="batchtopk (both)")
    parser.add_argument("--l0-coef", type=float, default=2e-3, help="jumprelu (both)")
    parser.add_argument("--bandwidth", type=float, default=0.05, help="jumprelu (both)")
    parser.add_argument("--init-threshold", type=float, default=1.0, help="jumprelu (both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the median is reported")
    parser.add_argument("--peer-loss", choices=["mse", "auxk"], default="mse", help="topk's peer criterion")
    parser.add_argument("--match-quality", action="store_true",
                        help="also time ours at the fewest epochs that reach the peer's median test FVU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.peer_lr is None:
        args.peer_lr = args.lr
    x_train, x_val, x_test, name = load_embeddings(args)
    dim = x_train.shape[1]
    log.info("embeddings: %s; %s, n_latents %d, k %d, epochs %d, batch %d, lr %g (decay %g), torch threads %d",
             name, args.arch, args.expansion * dim, args.k, args.epochs, args.batch_size, args.lr,
             args.lr_decay, torch.get_num_threads())
    # one short untimed run of each first: one-time costs (kernel and library initialisation)
    # would otherwise land on whichever runs first
    warmup = argparse.Namespace(**{**vars(args), "epochs": 1})
    for runner in (run_ours, run_peer):
        runner(x_train[:1024], x_test[:256], warmup)

    if args.select_lr:
        candidates = [float(v) for v in args.select_lr.split(",")]
        for label, runner, key in (("ours", run_ours, "lr"), ("overcomplete", run_peer, "peer_lr")):
            val_fvu = {}
            for lr in candidates:
                val_fvu[lr] = runner(x_train, x_val, argparse.Namespace(**{**vars(args), "lr": lr, "peer_lr": lr})).fvu
                log.info("lr selection %-12s lr %g: val FVU %.4f", label, lr, val_fvu[lr])
            setattr(args, key, min(val_fvu, key=val_fvu.get))
        log.info("selected on val: ours lr %g, overcomplete lr %g", args.lr, args.peer_lr)

    results: dict[str, list[Run]] = {"ours": [], "overcomplete": []}
    for repeat in range(args.repeats):
        for label, runner in (("ours", run_ours), ("overcomplete", run_peer)):
            run = runner(x_train, x_test, args)
            results[label].append(run)
            log.info("run %d %-12s %9.0f samples/s  test FVU %.4f  L0 %.1f", repeat + 1, label,
                     run.samples_per_s, run.fvu, run.l0)

    def median(label: str, field: str) -> float:
        return statistics.median(getattr(run, field) for run in results[label])

    # each run is compared with the peer run next to it, which saw the same machine load
    ratios = [ours.samples_per_s / peer.samples_per_s for ours, peer in zip(results["ours"], results["overcomplete"])]
    floor_rate, floor_gflops = encoder_floor(dim, args)
    # the encoder product's FLOPs per sample, at each trainer's rate
    flops_per_sample = 2 * dim * args.expansion * dim
    peer_name = f"overcomplete 0.3.0 {args.arch}" + (f" ({args.peer_loss})" if args.arch == "topk" else "")
    print()
    print(f"\nlearning rates: ours {args.lr:g}, overcomplete {args.peer_lr:g}" + (" (chosen on val)" if args.select_lr else ""))
    print(f"| {args.arch} SAE, {args.epochs} epochs (median of {args.repeats} runs) | samples/s | "
          "encoder-product GFLOP/s | test FVU | test L0 |")
    print("|---|---:|---:|---:|---:|")
    for label, title in (("ours", "this project (`pipeline.sae.training`)"), ("overcomplete", peer_name)):
        rate = median(label, "samples_per_s")
        print(f"| {title} | {rate:.0f} | {rate * flops_per_sample / 1e9:.2f} | "
              f"{median(label, 'fvu'):.4f} | {median(label, 'l0'):.1f} |")
    print(f"| the dense encoder product alone (the floor) | {floor_rate:.0f} | {floor_gflops:.2f} | | |")
    print(f"| speed ratio at equal epochs (median of per-run ratios) | {statistics.median(ratios):.2f}x | | | |")
    print(f"\nper-run speed ratios: {[round(r, 2) for r in ratios]}")

    if args.match_quality:
        target = median("overcomplete", "fvu")
        log.info("ours: the fewest epochs that reach the peer's test FVU %.4f", target)
        matched = epochs_to_match(x_train, x_test, args, target)
        if matched is None:
            print(f"\nours does not reach the peer's test FVU {target:.4f} within {args.epochs} epochs")
        else:
            epochs, run = matched
            peer_seconds = median("overcomplete", "seconds")
            print(f"\nequal quality: ours reaches test FVU {run.fvu:.4f} (peer: {target:.4f} at {args.epochs} epochs) "
                  f"in {epochs} epochs, {run.seconds:.1f} s against the peer's {peer_seconds:.1f} s: "
                  f"{peer_seconds / run.seconds:.2f}x less time")


if __name__ == "__main__":
    main()
